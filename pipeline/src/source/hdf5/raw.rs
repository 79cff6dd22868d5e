//! The fast path of [`Hdf5Source`](super::Hdf5Source): chunks of a fixed-layout data set read straight from
//! the file (one positioned read per chunk, at the offset HDF5's chunk index gives), their fletcher32 checksum
//! verified and their deflate stream inflated by libdeflate, all outside HDF5 and its global lock, so loader
//! threads read and inflate chunks in parallel. Only chunks of whole samples whose filters are deflate and
//! fletcher32 (in either order, either one optional: what `pack` and h5py's `compression="gzip",
//! fletcher32=True` write) take this path.

use std::os::unix::fs::FileExt;
use std::path::Path;

use ::hdf5::Dataset;

/// The fast path's chunk index: where each chunk lies in the file and which filters it went through.
pub(super) struct RawChunks {
    file: std::fs::File,
    /// Per chunk (chunk c holds samples `c * block ..`): file offset, stored size, HDF5 filter mask.
    chunks: Vec<Option<(u64, usize, u32)>>,
    /// The filter pipeline in write order; only these two are handled.
    filters: Vec<RawFilter>,
    /// Bytes of one uncompressed chunk.
    chunk_bytes: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum RawFilter {
    Deflate,
    Fletcher32,
}

impl RawChunks {
    /// The chunk index of `ds` (a fixed-layout data set of `count` samples in `path`, `block` per chunk), when
    /// the fast path applies: chunks of whole samples, filters only deflate and fletcher32.
    pub(super) fn index(path: &Path, ds: &Dataset, block: usize, count: usize) -> Option<RawChunks> {
        let shape = ds.shape();
        let chunk = ds.chunk()?;
        if chunk[1..] != shape[1..] || count == 0 || block == 0 {
            return None;
        }
        let filters = ds
            .filters()
            .iter()
            .map(|f| match f {
                ::hdf5::filters::Filter::Deflate(_) => Some(RawFilter::Deflate),
                ::hdf5::filters::Filter::Fletcher32 => Some(RawFilter::Fletcher32),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        let mut chunks = vec![None; count.div_ceil(block)];
        ds.chunks_visit(|info| {
            if let Some(slot) = chunks.get_mut(info.offset[0] as usize / block) {
                *slot = Some((info.addr, info.size as usize, info.filter_mask));
            }
            0
        })
        .ok()?;
        let file = std::fs::File::open(path).ok()?;
        Some(RawChunks { file, chunks, filters, chunk_bytes: chunk.iter().product() })
    }

    /// Chunk `c`'s pixels, or `None` when the chunk is not stored (HDF5 supplies fill values then).
    pub(super) fn read(&self, c: usize) -> Result<Option<Vec<u8>>, String> {
        let Some(&Some((addr, size, mask))) = self.chunks.get(c) else { return Ok(None) };
        let mut buf = vec![0u8; size];
        self.file.read_exact_at(&mut buf, addr).map_err(|e| format!("chunk {c}: {e}"))?;
        // Undo the filters in reverse pipeline order, skipping those the chunk's mask says were not applied.
        for (i, f) in self.filters.iter().enumerate().rev() {
            if mask & (1 << i) != 0 {
                continue;
            }
            buf = match f {
                RawFilter::Fletcher32 => {
                    let body =
                        buf.len().checked_sub(4).ok_or_else(|| format!("chunk {c}: shorter than its checksum"))?;
                    let stored = u32::from_le_bytes([buf[body], buf[body + 1], buf[body + 2], buf[body + 3]]);
                    let sum = fletcher32(&buf[..body]);
                    // HDF5 before 1.6.3 stored it with the bytes of each half swapped; HDF5 accepts both.
                    let swapped = ((sum & 0x00ff_00ff) << 8) | ((sum >> 8) & 0x00ff_00ff);
                    if stored != sum && stored != swapped {
                        return Err(format!("chunk {c}: data error detected by Fletcher32 checksum (corrupt file)"));
                    }
                    buf.truncate(body);
                    buf
                }
                RawFilter::Deflate => {
                    // The output is the chunk, plus a checksum when fletcher32 ran before deflate.
                    let mut out = vec![0u8; self.chunk_bytes + 4];
                    let n = crate::source::timed_decode(|| {
                        libdeflater::Decompressor::new().zlib_decompress(&buf, &mut out)
                    })
                    .map_err(|e| format!("chunk {c}: cannot inflate: {e}"))?;
                    out.truncate(n);
                    out
                }
            };
        }
        if buf.len() != self.chunk_bytes {
            return Err(format!("chunk {c}: {} bytes after its filters, expected {}", buf.len(), self.chunk_bytes));
        }
        Ok(Some(buf))
    }
}

/// HDF5's Fletcher-32 (H5_checksum_fletcher32 in H5checksum.c): big-endian 16-bit words, an odd last byte as
/// the high byte of a word, both sums folded every 360 words. Per block, `a += Σ w_i` and
/// `b += n·a + Σ (n-i)·w_i` (what the word-by-word loop adds up to), so the compiler can vectorize it; wrapping
/// u32 arithmetic gives what the C code's 32-bit sums give.
fn fletcher32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (0u32, 0u32);
    let fold = |x: u32| (x & 0xffff) + (x >> 16);
    let even = data.len() & !1;
    for block in data[..even].chunks(720) {
        // With at most 360 words per block, both sums fit in u32 (360·361/2·65535 < 2^32): vectorizable.
        let n = (block.len() / 2) as u32;
        let (mut s, mut t) = (0u32, 0u32);
        for (i, w) in block.chunks_exact(2).enumerate() {
            let w = u32::from(u16::from_be_bytes([w[0], w[1]]));
            s = s.wrapping_add(w);
            t = t.wrapping_add((n - i as u32).wrapping_mul(w));
        }
        b = b.wrapping_add(n.wrapping_mul(a)).wrapping_add(t);
        a = a.wrapping_add(s);
        (a, b) = (fold(a), fold(b));
    }
    if let Some(&last) = data.get(even) {
        a = a.wrapping_add(u32::from(last) << 8);
        b = b.wrapping_add(a);
        (a, b) = (fold(a), fold(b));
    }
    (fold(b) << 16) | fold(a)
}
