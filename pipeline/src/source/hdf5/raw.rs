//! The fast path of [`Hdf5Source`](super::Hdf5Source): chunks of a fixed-layout data set read straight from
//! the file (one positioned read per chunk, at the offset HDF5's chunk index gives), their fletcher32 checksum
//! verified and their Blosc or deflate stream decompressed by c-blosc or libdeflate, all outside HDF5 and its
//! global lock, so loader threads read and decompress chunks in parallel. Only chunks of whole samples whose
//! filters are fletcher32 and at most one of Blosc and deflate (in either order, each optional: what `pack` and
//! h5py's `compression="gzip", fletcher32=True` or hdf5plugin's Blosc write) take this path.
//!
//! Nothing is allocated per chunk in the steady state: each thread reuses its buffer for the stored bytes and
//! its decompressor ([`SCRATCH`]), and the buffers of chunks dropped from the caches are reused for new chunks
//! ([`recycle`]), so inflating writes into memory that is already mapped instead of fresh zeroed pages.

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use ::hdf5::Dataset;

use super::fletcher32::fletcher32;

/// The fast path's chunk index: where each chunk lies in the file and which filters it went through.
pub(super) struct RawChunks {
    file: std::fs::File,
    /// Per chunk (chunk c holds samples `c * block ..`): file offset, stored size, HDF5 filter mask; or why the
    /// index entry cannot be right (it points past the end of the file, or claims more bytes than a chunk can
    /// take when stored): reading that chunk is then an error.
    chunks: Vec<ChunkEntry>,
    /// The filter pipeline in write order; only these are handled, one compressor at most.
    filters: Vec<RawFilter>,
    /// Bytes of one uncompressed chunk.
    chunk_bytes: usize,
}

/// Where a chunk is stored (file offset, stored size, filter mask), or why its index entry cannot be right; `None`:
/// not stored.
type ChunkEntry = Option<Result<(u64, usize, u32), String>>;

#[derive(Clone, Copy, PartialEq)]
enum RawFilter {
    Deflate,
    Blosc,
    Fletcher32,
}

thread_local! {
    /// Per thread: the stored (filtered) bytes of the chunk being read, and a decompressor (libdeflate allocates
    /// one per `new`), both reused from chunk to chunk.
    static SCRATCH: RefCell<(Vec<u8>, Option<libdeflater::Decompressor>)> = const { RefCell::new((Vec::new(), None)) };
}

/// Buffers of dropped chunks, kept for the next chunks read. Chunks come and go a shuffle window at a time (the
/// loader reads a window's chunks, then the threads' recent lists drop as many), hence room for a window's worth.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// At most this many bytes of spare buffers (all sources together): memory stays bounded, flat in data set size.
const SPARE_BYTES: usize = 8 << 20;

/// Keeps `buf` (the pixels of a chunk no longer used) for a later chunk, if there is room.
pub(super) fn recycle(buf: Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.iter().map(Vec::capacity).sum::<usize>() + buf.capacity() <= SPARE_BYTES {
        spare.push(buf);
    }
}

/// A buffer of `len` initialized bytes (contents unspecified): a spare one when one is large enough.
fn buffer(len: usize) -> Vec<u8> {
    let reused = {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        spare.iter().position(|b| b.capacity() >= len).map(|i| spare.swap_remove(i))
    };
    let mut buf = reused.unwrap_or_default();
    // Spare buffers keep their length, so this zero-fills at most the few bytes past it.
    buf.resize(len, 0);
    buf
}

impl RawChunks {
    /// The chunk index of `ds` (a fixed-layout data set of `count` samples in `path`, `block` per chunk), when
    /// the fast path applies: chunks of whole samples, filters only fletcher32 and one of Blosc and deflate.
    /// `count` is bounded by the chunks the file stores (checked at open), so is the index; each entry is checked
    /// against `file_len`.
    pub(super) fn index(path: &Path, ds: &Dataset, block: usize, count: usize, file_len: u64) -> Option<RawChunks> {
        let shape = ds.shape();
        let chunk = ds.chunk()?;
        if chunk.len() != shape.len() || chunk[1..] != shape[1..] || count == 0 || block == 0 || chunk[0] != block {
            return None;
        }
        let chunk_bytes: usize = chunk.iter().product();
        // Stored bytes of a chunk: compression may expand a little (deflate's stored blocks, Blosc's header), and
        // fletcher32 adds 4 bytes; HDF5 skips a filter whose output would be larger than its input.
        let max_stored = chunk_bytes as u64 + chunk_bytes as u64 / 8 + 4096;
        let filters = ds
            .filters()
            .iter()
            .map(|f| match f {
                ::hdf5::filters::Filter::Deflate(_) => Some(RawFilter::Deflate),
                ::hdf5::filters::Filter::Blosc(..) => Some(RawFilter::Blosc),
                ::hdf5::filters::Filter::Fletcher32 => Some(RawFilter::Fletcher32),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        if filters.iter().filter(|&&f| f != RawFilter::Fletcher32).count() > 1 {
            return None;
        }
        let mut chunks = vec![None; count.div_ceil(block)];
        let mut consistent = true;
        ds.chunks_visit(|info| {
            // An entry must sit on a chunk boundary of the first dimension and at 0 in the others.
            if info.offset[0] % block as u64 != 0 || info.offset[1..].iter().any(|&o| o != 0) {
                consistent = false;
                return 0;
            }
            let Some(slot) = usize::try_from(info.offset[0] / block as u64).ok().and_then(|c| chunks.get_mut(c)) else {
                return 0;
            };
            let (addr, size) = (info.addr, info.size);
            *slot = Some(if addr.checked_add(size).is_none_or(|end| end > file_len) {
                Err(format!("stored at bytes {addr}..+{size}, past the end of the {file_len}-byte file (corrupt file)"))
            } else if size > max_stored {
                Err(format!("claims {size} stored bytes for a {chunk_bytes}-byte chunk (corrupt file)"))
            } else {
                Ok((addr, size as usize, info.filter_mask))
            });
            0
        })
        .ok()?;
        // An index that does not match the data set's chunking: leave the file to HDF5.
        if !consistent {
            return None;
        }
        let file = std::fs::File::open(path).ok()?;
        Some(RawChunks { file, chunks, filters, chunk_bytes })
    }

    /// Chunk `c`'s pixels, or `None` when the chunk is not stored (HDF5 supplies fill values then).
    pub(super) fn read(&self, c: usize) -> Result<Option<Vec<u8>>, String> {
        let (addr, size, mask) = match self.chunks.get(c) {
            Some(Some(Ok(entry))) => *entry,
            Some(Some(Err(why))) => return Err(format!("chunk {c}: {why}")),
            _ => return Ok(None),
        };
        SCRATCH.with(|scratch| {
            let (stored, decompressor) = &mut *scratch.borrow_mut();
            if stored.len() < size {
                stored.resize(size, 0);
            }
            self.file.read_exact_at(&mut stored[..size], addr).map_err(|e| format!("chunk {c}: {e}"))?;
            // The bytes so far: `stored[..len]`, or `out[..len]` once inflated.
            let (mut out, mut len) = (None::<Vec<u8>>, size);
            // Undo the filters in reverse pipeline order, skipping those the chunk's mask says were not applied.
            for (i, f) in self.filters.iter().enumerate().rev() {
                if mask & (1 << i) != 0 {
                    continue;
                }
                match f {
                    RawFilter::Fletcher32 => {
                        let bytes = out.as_deref().unwrap_or(&stored[..]);
                        let body = len.checked_sub(4).ok_or_else(|| format!("chunk {c}: shorter than its checksum"))?;
                        let stored_sum =
                            u32::from_le_bytes([bytes[body], bytes[body + 1], bytes[body + 2], bytes[body + 3]]);
                        let sum = fletcher32(&bytes[..body]);
                        // HDF5 before 1.6.3 stored it with the bytes of each half swapped; HDF5 accepts both.
                        let swapped = ((sum & 0x00ff_00ff) << 8) | ((sum >> 8) & 0x00ff_00ff);
                        if stored_sum != sum && stored_sum != swapped {
                            return Err(format!(
                                "chunk {c}: data error detected by Fletcher32 checksum (corrupt file)"
                            ));
                        }
                        len = body;
                    }
                    RawFilter::Deflate => {
                        // The output is the chunk, plus a checksum when fletcher32 ran before deflate.
                        let mut inflated = buffer(self.chunk_bytes + 4);
                        let d = decompressor.get_or_insert_with(libdeflater::Decompressor::new);
                        len = crate::source::timed_decode(|| d.zlib_decompress(&stored[..len], &mut inflated))
                            .map_err(|e| format!("chunk {c}: cannot inflate: {e}"))?;
                        out = Some(inflated);
                    }
                    RawFilter::Blosc => {
                        let src = &stored[..len];
                        let mut want = 0usize;
                        // SAFETY: `src` is valid for its length; validate only reads the header within it.
                        let ok = unsafe { blosc_src::blosc_cbuffer_validate(src.as_ptr().cast(), len, &mut want) };
                        if ok != 0 || want > self.chunk_bytes + 4 {
                            return Err(format!("chunk {c}: not a Blosc buffer of this chunk's size (corrupt file)"));
                        }
                        let mut decoded = buffer(want);
                        // SAFETY: validated above (the header's sizes fit `src`); `decoded` holds `want` bytes;
                        // the _ctx variant keeps no global state, so loader threads may call it at once.
                        let n = crate::source::timed_decode(|| unsafe {
                            blosc_src::blosc_decompress_ctx(src.as_ptr().cast(), decoded.as_mut_ptr().cast(), want, 1)
                        });
                        if n < 0 || n as usize != want {
                            return Err(format!("chunk {c}: cannot decompress its Blosc buffer (code {n})"));
                        }
                        len = want;
                        out = Some(decoded);
                    }
                }
            }
            if len != self.chunk_bytes {
                return Err(format!("chunk {c}: {len} bytes after its filters, expected {}", self.chunk_bytes));
            }
            let pixels = match out {
                Some(mut inflated) => {
                    inflated.truncate(len);
                    inflated
                }
                None => {
                    let mut copy = buffer(len);
                    copy.copy_from_slice(&stored[..len]);
                    copy
                }
            };
            Ok(Some(pixels))
        })
    }
}
