//! HDF5 files (<https://www.hdfgroup.org/solutions/hdf5/>), as written by `selfsup pack` or by h5py, in one of
//! two layouts:
//! - fixed: dataset `images`, `uint8 [N,H,W,C]` (C = 1 or 3) or `[N,H,W]` (gray), delivered as stored;
//! - encoded: dataset `encoded`, variable-length `uint8` holding one PNG/JPEG file per sample, decoded like
//!   [`ImageFolder`](super::ImageFolder) decodes (to the `channels` asked for).
//!
//! Optional: dataset `labels` (integers `[N]`, read once at open), the attribute `class_names` (strings, on
//! the file or on the data set) and, in the encoded layout, dataset `checksums` (`uint32 [N]`, attribute
//! `checksum = "crc32"`: what `pack` writes; read once at open). With `checksums`, each sample's bytes are
//! checked against their CRC-32 before decoding (inside [`timed_decode`](super::timed_decode): part of turning
//! stored bytes into pixels), and a mismatch is an error for that sample only; HDF5's own fletcher32 covers a
//! vlen data set's heap references, not the bytes. Files without it (h5py's, older packs) read unchecked.
//!
//! Reading streams chunk by chunk: a `get` that misses reads the sample's whole chunk (one hyperslab read
//! along N) into a small first-in-first-out cache of decoded chunks shared by all threads (plus a per-thread
//! list of the chunks each thread used last, so that hits touch no shared state), so with the loader's
//! block-aware shuffle ([`Source::block_len`]) each chunk is read about once per epoch, never once per sample.
//! Concurrent misses on the same chunk wait for one read. HDF5 calls are serialized by hdf5-metno's global
//! lock, so the handles are safe to share between rayon threads; decoding of encoded samples runs outside it.
//!
//! Nothing the file claims is trusted before it is checked against sane limits and the file itself, so a damaged
//! or hostile file is a clear error, not a huge allocation or a panic ([`validate`]): sides in 1..=65535 and at
//! most `max_pixels` pixels, blocks of at most 256 MiB, every chunk of the data set stored (an unwritten chunk
//! reads back as zeros; and so the sample count is bounded by what the file holds), `labels` and `checksums` shaped
//! `[N]` before they are read, labels in `0..65536`, string attributes of at most 65536 entries; the fast path
//! bounds-checks every chunk's offset and size against the file ([`raw`]). HDF5 reads the file through our own
//! read-only driver ([`guard`]), which refuses a damaged global heap collection that HDF5 itself would loop on
//! forever.
//!
//! Fixed-layout chunks of whole samples filtered by fletcher32 and at most one of Blosc and deflate (what `pack`
//! writes) are read by [`raw`] instead, outside HDF5 and in parallel: decompressing is most of a chunk's cost
//! (Fashion-MNIST, 256 samples, on the 2-core dev machine: deflate through zlib inside HDF5 ~720 us, libdeflate
//! ~300 us; pack's default Blosc LZ4HC ~40 us). At open, chunk 0 is read both ways and that path is used only if
//! they agree.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ::hdf5::types::VarLenArray;
use ::hdf5::{Dataset, File, Hyperslab, SliceOrIndex};
use selfsup_augment::Image;

use super::{decode_bytes, DataError, OpenOptions, Sample, Source, SHUFFLE_WINDOW_BLOCKS};
use raw::RawChunks;
use validate::{checked_block, read_checksums, read_labels, string_attr};

mod fletcher32;
mod guard;
mod raw;
mod validate;

/// Decoded chunks kept: a batch touches at most two shuffle windows of blocks; two spare for stragglers.
const CACHE_CHUNKS: usize = 2 * SHUFFLE_WINDOW_BLOCKS + 2;
/// Bytes of chunks each thread keeps handy, all sources together (at most two windows of chunks): see
/// [`RECENT`]. Mostly the same chunks as the shared cache holds.
const RECENT_BYTES: usize = 8 << 20;
/// For data sets that are not chunked, samples read per block: about this many bytes, at most 256 samples.
pub(super) const CONTIGUOUS_BLOCK_BYTES: usize = 1 << 20;
/// How the images are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hdf5Layout {
    /// Dataset `images`: `uint8 [N,H,W,C]`, every sample the same size.
    Fixed { height: u32, width: u32, channels: u8 },
    /// Dataset `encoded`: variable-length `uint8`, one PNG or JPEG file per sample.
    Encoded,
}

pub(crate) fn has_hdf5_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("h5") || e.eq_ignore_ascii_case("hdf5"))
}

pub(crate) fn h5_err(path: &Path, message: impl std::fmt::Display) -> DataError {
    // A read the guarding driver refused surfaces as HDF5's generic read error: say what it refused.
    let message = match guard::take_refusal(path) {
        Some(why) => format!("{why}; HDF5 said: {message}"),
        None => message.to_string(),
    };
    DataError::Hdf5 { path: path.to_path_buf(), message }
}

/// One chunk of samples, as read: pixels back to back (fixed), or the encoded files back to back with their
/// start offsets (`ends[i-1]..ends[i]` is sample i of the chunk).
enum Chunk {
    Pixels(Vec<u8>),
    Encoded { bytes: Vec<u8>, ends: Vec<usize> },
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Chunk::Pixels(p) = self {
            raw::recycle(std::mem::take(p));
        }
    }
}

impl Chunk {
    fn bytes(&self) -> usize {
        match self {
            Chunk::Pixels(p) => p.len(),
            Chunk::Encoded { bytes, ends } => bytes.len() + 8 * ends.len(),
        }
    }
}

type Slot = Arc<OnceLock<Result<Arc<Chunk>, String>>>;

/// The chunks read last (first in, first out: with the block-aware order a chunk's samples come close
/// together). A slot is claimed under the mutex and filled outside it, so one thread reads a chunk while the
/// others use the chunks already there (or wait for that one read, never repeat it).
struct ChunkCache {
    slots: Mutex<VecDeque<(usize, Slot)>>,
}

impl ChunkCache {
    fn get(&self, chunk: usize, read: impl FnOnce() -> Result<Chunk, String>) -> Result<Arc<Chunk>, String> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.iter().find(|(c, _)| *c == chunk) {
                Some((_, slot)) => slot.clone(),
                None => {
                    let slot = Slot::default();
                    slots.push_back((chunk, slot.clone()));
                    if slots.len() > CACHE_CHUNKS {
                        slots.pop_front();
                    }
                    slot
                }
            }
        };
        slot.get_or_init(|| read().map(Arc::new)).clone()
    }

    fn contains(&self, chunk: usize) -> bool {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|(c, _)| *c == chunk)
    }
}

thread_local! {
    /// Per thread, the chunks it used last, as (source id, chunk index, chunk): a hit here touches nothing
    /// shared (no lock, no reference count), which keeps loader threads from contending per sample.
    static RECENT: RefCell<VecDeque<(u64, usize, Arc<Chunk>)>> = const { RefCell::new(VecDeque::new()) };
}
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

pub struct Hdf5Source {
    path: PathBuf,
    /// Kept open for the data set's lifetime (the data set handle keeps the file open too).
    _file: File,
    data: Dataset,
    layout: Hdf5Layout,
    count: usize,
    block: usize,
    labels: Option<Vec<i64>>,
    /// CRC-32 of each encoded sample's bytes (dataset `checksums`), when the file has them.
    checksums: Option<Vec<u32>>,
    classes: Vec<String>,
    channels: u8,
    max_pixels: u64,
    cache: ChunkCache,
    raw: Option<RawChunks>,
    /// Tells this source's chunks apart in [`RECENT`].
    id: u64,
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Hdf5Source>();
};

impl Hdf5Source {
    /// Opens `path`; `channels` (1 or 3) is what encoded samples are decoded to (fixed ones keep theirs).
    pub fn open(path: &Path, channels: u8) -> Result<Self, DataError> {
        Self::open_with(path, OpenOptions::channels(channels))
    }

    /// [`Hdf5Source::open`] with a pixel limit other than the default (for fixed samples, checked at open; for
    /// encoded ones, at decoding).
    pub fn open_with(path: &Path, o: OpenOptions) -> Result<Self, DataError> {
        let channels = o.channels;
        if channels != 1 && channels != 3 {
            return Err(DataError::Invalid {
                path: path.into(),
                message: format!("channels must be 1 or 3, got {channels}"),
            });
        }
        if !path.is_file() {
            return Err(DataError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
        }
        let err = |e: ::hdf5::Error| h5_err(path, e);
        let file_len = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
        let file = guard::open(path).map_err(err)?;
        let (data, layout) = if file.link_exists("images") {
            let data = file.dataset("images").map_err(err)?;
            let desc = data.dtype().and_then(|t| t.to_descriptor()).map_err(err)?;
            if desc != ::hdf5::types::TypeDescriptor::Unsigned(::hdf5::types::IntSize::U1) {
                return Err(h5_err(path, format!("`images` must be uint8, found {desc}")));
            }
            let (h, w, c) = match data.shape()[..] {
                [_, h, w] => (h, w, 1),
                [_, h, w, c @ (1 | 3)] => (h, w, c as u8),
                ref s => {
                    return Err(h5_err(path, format!("`images` must be [N,H,W] or [N,H,W,C] with C 1 or 3, not {s:?}")))
                }
            };
            super::check_sides(w as u64, h as u64, "`images`: image").map_err(|m| h5_err(path, m))?;
            let layout = Hdf5Layout::Fixed { height: h as u32, width: w as u32, channels: c };
            (data, layout)
        } else if file.link_exists("encoded") {
            let data = file.dataset("encoded").map_err(err)?;
            let desc = data.dtype().and_then(|t| t.to_descriptor()).map_err(err)?;
            let want = ::hdf5::types::TypeDescriptor::VarLenArray(Box::new(::hdf5::types::TypeDescriptor::Unsigned(
                ::hdf5::types::IntSize::U1,
            )));
            if desc != want || data.ndim() != 1 {
                return Err(h5_err(path, format!("`encoded` must be 1-D variable-length uint8, found {desc}")));
            }
            (data, Hdf5Layout::Encoded)
        } else {
            return Err(h5_err(path, "neither an `images` nor an `encoded` data set at the root"));
        };
        let count = data.shape()[0];
        let block = checked_block(path, &data, layout, o.max_pixels, file_len)?;
        let labels = if file.link_exists("labels") { Some(read_labels(&file, path, count)?) } else { None };
        let checksums = match layout {
            Hdf5Layout::Encoded if file.link_exists("checksums") => Some(read_checksums(&file, path, count)?),
            _ => None,
        };
        let classes = match string_attr(&file, path, "class_names")? {
            Some(c) => c,
            None => string_attr(&data, path, "class_names")?.unwrap_or_default(),
        };
        let channels = match layout {
            Hdf5Layout::Fixed { channels, .. } => channels,
            Hdf5Layout::Encoded => channels,
        };
        let mut src = Hdf5Source {
            path: path.to_path_buf(),
            _file: file,
            data,
            layout,
            count,
            block,
            labels,
            checksums,
            classes,
            channels,
            max_pixels: o.max_pixels,
            cache: ChunkCache { slots: Mutex::new(VecDeque::new()) },
            raw: None,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        };
        if let Hdf5Layout::Fixed { .. } = layout {
            src.raw = RawChunks::index(path, &src.data, block, count, file_len).filter(|raw| src.agrees(raw));
        }
        Ok(src)
    }

    /// Self-check of the fast path: chunk 0 read through HDF5 and through `raw` must be the same pixels.
    fn agrees(&self, raw: &RawChunks) -> bool {
        match (&self.read_chunk(0), raw.read(0)) {
            (Ok(Chunk::Pixels(want)), Ok(Some(got))) => got.get(..want.len()) == Some(&want[..]),
            _ => false,
        }
    }

    /// Whether chunks are read by the fast path (see the module doc).
    pub fn reads_raw_chunks(&self) -> bool {
        self.raw.is_some()
    }

    /// Refuse encoded images whose header claims more than `max_pixels` pixels.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    pub fn layout(&self) -> Hdf5Layout {
        self.layout
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on chunk `c`: from this thread's recent chunks, else from the shared cache, else read.
    fn with_chunk<R>(&self, c: usize, f: impl FnOnce(&Chunk) -> R) -> Result<R, DataError> {
        RECENT.with(|recent| {
            let mut recent = recent.borrow_mut();
            if let Some((_, _, chunk)) = recent.iter().find(|(id, k, _)| *id == self.id && *k == c) {
                return Ok(f(chunk));
            }
            let chunk = self.cache.get(c, || self.read_chunk(c)).map_err(|m| h5_err(&self.path, m))?;
            let out = f(&chunk);
            recent.push_back((self.id, c, chunk));
            while recent.len() > 2 * SHUFFLE_WINDOW_BLOCKS
                || (recent.len() > 1 && recent.iter().map(|e| e.2.bytes()).sum::<usize>() > RECENT_BYTES)
            {
                recent.pop_front();
            }
            Ok(out)
        })
    }

    /// Sample `index`, the `k`-th of its chunk.
    fn sample(&self, chunk: &Chunk, index: usize, k: usize) -> Result<Image, DataError> {
        match (chunk, self.layout) {
            (Chunk::Pixels(px), Hdf5Layout::Fixed { height, width, channels }) => {
                let n = height as usize * width as usize * channels as usize;
                let px = px.get(k * n..(k + 1) * n).ok_or_else(|| self.short_chunk(index))?;
                Ok(Image { width, height, channels, data: px.to_vec() })
            }
            (Chunk::Encoded { bytes, ends }, Hdf5Layout::Encoded) => {
                let start = if k == 0 { 0 } else { ends.get(k - 1).copied().unwrap_or(usize::MAX) };
                let bytes =
                    ends.get(k).and_then(|&end| bytes.get(start..end)).ok_or_else(|| self.short_chunk(index))?;
                let name = PathBuf::from(self.describe(index));
                if let Some(stored) = self.checksums.as_ref().map(|c| c[index]) {
                    let computed = super::timed_decode(|| libdeflater::crc32(bytes));
                    if computed != stored {
                        let message =
                            format!("checksum mismatch: stored crc32 {stored:#010x}, computed {computed:#010x}");
                        return Err(DataError::Invalid { path: name, message: message + " (corrupt file)" });
                    }
                }
                decode_bytes(bytes, self.channels, self.max_pixels, &name)
            }
            _ => Err(h5_err(&self.path, "internal: chunk read in another layout")),
        }
    }

    fn short_chunk(&self, index: usize) -> DataError {
        h5_err(&self.path, format!("sample {index}: its chunk was read shorter than its samples"))
    }

    /// Reads chunk `c` (samples `c * block ..`) in one hyperslab read.
    fn read_chunk(&self, c: usize) -> Result<Chunk, String> {
        if let Some(pixels) = self.raw.as_ref().and_then(|r| r.read(c).transpose()) {
            return pixels.map(Chunk::Pixels);
        }
        let (start, end) = (c * self.block, ((c + 1) * self.block).min(self.count));
        let mut sel = vec![SliceOrIndex::from(start..end)];
        sel.resize(self.data.ndim(), SliceOrIndex::from(..));
        let sel = Hyperslab::from(sel);
        let e = |e: ::hdf5::Error| format!("reading samples {start}..{end}: {e}");
        match self.layout {
            Hdf5Layout::Fixed { .. } => {
                let a = self.data.read_slice::<u8, _, ndarray::IxDyn>(sel).map_err(e)?;
                let pixels = if a.is_standard_layout() {
                    let (v, offset) = a.into_raw_vec_and_offset();
                    if offset.unwrap_or(0) == 0 {
                        v
                    } else {
                        v[offset.unwrap_or(0)..].to_vec()
                    }
                } else {
                    a.iter().copied().collect()
                };
                Ok(Chunk::Pixels(pixels))
            }
            Hdf5Layout::Encoded => {
                let a = self.data.read_slice_1d::<VarLenArray<u8>, _>(sel).map_err(e)?;
                let mut bytes = Vec::with_capacity(a.iter().map(|v| v.len()).sum());
                let mut ends = Vec::with_capacity(a.len());
                for v in &a {
                    bytes.extend_from_slice(v.as_slice());
                    ends.push(bytes.len());
                }
                Ok(Chunk::Encoded { bytes, ends })
            }
        }
    }
}

impl Source for Hdf5Source {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.count {
            return Err(h5_err(&self.path, format!("index {index} out of range ({})", self.count)));
        }
        let (c, k) = (index / self.block, index % self.block);
        let image = self.with_chunk(c, |chunk| self.sample(chunk, index, k))??;
        Ok(Sample { image, label: self.labels.as_ref().map(|l| l[index]) })
    }

    fn channels(&self) -> u8 {
        self.channels
    }

    fn describe(&self, index: usize) -> String {
        format!("{}#{index}", self.path.display())
    }

    fn num_classes(&self) -> Option<usize> {
        let max = self.labels.as_ref()?.iter().copied().max().map_or(0, |m| usize::try_from(m).map_or(0, |m| m + 1));
        Some(max.max(self.classes.len()))
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn labels(&self) -> Option<Vec<i64>> {
        self.labels.clone()
    }

    fn block_len(&self) -> usize {
        self.block
    }

    fn missing_blocks(&self, indices: &[usize]) -> Vec<usize> {
        let mut blocks: Vec<usize> = indices.iter().filter(|&&i| i < self.count).map(|&i| i / self.block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        blocks.retain(|&c| !self.cache.contains(c));
        // More than the cache holds would evict blocks of this very batch: leave those to the per-sample pass.
        blocks.truncate(CACHE_CHUNKS - SHUFFLE_WINDOW_BLOCKS);
        blocks
    }

    fn load_block(&self, block: usize) {
        // An error stays in the cache slot; `get` reports it for each sample of the block.
        let _ = self.cache.get(block, || self.read_chunk(block));
    }
}
