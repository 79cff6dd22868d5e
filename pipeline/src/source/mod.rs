//! Sources: where unlabeled (and optionally labeled) images come from. Every source is streaming: it keeps an
//! index of its samples (offsets, paths, labels) and reads one sample per `get`, so memory does not grow with
//! the dataset. A sample that cannot be read is an error value, never a panic.

mod check;
mod cifar;
mod decode;
mod folder;
mod hdf5;
mod idx;

use std::path::{Path, PathBuf};

pub use check::{check_fits, Classes};
pub(crate) use cifar::is_cifar;
pub use cifar::{CifarKind, CifarSource};
pub(crate) use decode::{decode_bytes, read_file};
pub use decode::{max_file_bytes, DEFAULT_MAX_PIXELS};
pub use folder::ImageFolder;
pub(crate) use hdf5::{h5_err, has_hdf5_extension};
pub use hdf5::{Hdf5Layout, Hdf5Source};
pub use idx::IdxSource;
use selfsup_augment::Image;

/// One decoded image and its label, if the source has labels.
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: Image,
    pub label: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // `error`, not `source`: the message holds it already (a source would be printed twice in an error chain).
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid IDX file: {message}")]
    Idx { path: PathBuf, message: String },
    #[error("{path}: cannot decode image: {error}")]
    Decode { path: PathBuf, error: image::ImageError },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: HDF5: {message}")]
    Hdf5 { path: PathBuf, message: String },
}

/// The largest image side any source accepts (JPEG's own limit): a header claiming more, or 0, is refused before
/// anything is allocated.
pub const MAX_SIDE: u32 = 65_535;

/// Checks a header's image size: both sides in `1..=MAX_SIDE`. `what` names the fields in the message.
pub(crate) fn check_sides(width: u64, height: u64, what: &str) -> Result<(), String> {
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || v > u64::from(MAX_SIDE) {
            return Err(format!("{what} {name} {v} is outside 1..={MAX_SIDE} ({width}x{height} pixels)"));
        }
    }
    Ok(())
}

/// Something a source left out on purpose while listing its samples (a folder link that would list a folder
/// twice or forever, a second path to one file): named in `inspect`'s report and warned about at open.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub path: String,
    pub kind: SkipKind,
    /// Why, in words (what the link points to, which path listed it first).
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// A link to a folder that contains it (`ln -s .. up`, `ln -s . again`): following it would never end.
    Cycle,
    /// A second path to a folder already listed (another link to it, a bind mount).
    SameFolder,
    /// A second path to a file already listed (a symlink or a hard link to it): one file is one sample.
    SameFile,
    /// A link whose target does not exist (and whose name is not an image's, which would be listed and reported
    /// unreadable instead).
    Dangling,
    /// Not a regular file (a FIFO, socket or device named like an image would block or never end).
    NotRegular,
    /// A file whose extension is not one of the image formats read (`.txt`, `.heic`, `.svg`, no extension):
    /// named, so that photos in a format we do not decode are not lost without a word.
    NotAnImage,
}

/// How many of `skipped` there are of each kind, in words: "Cycle: 3, NotAnImage: 2".
pub fn skip_counts(skipped: &[Skipped]) -> String {
    let mut kinds: Vec<SkipKind> = skipped.iter().map(|s| s.kind).collect();
    kinds.sort();
    kinds.dedup();
    let counts: Vec<String> =
        kinds.iter().map(|&k| format!("{k:?}: {}", skipped.iter().filter(|s| s.kind == k).count())).collect();
    counts.join(", ")
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.detail)
    }
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), error: source }
    }
}

pub trait Source: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, index: usize) -> Result<Sample, DataError>;
    /// Channels every sample is delivered with (1 or 3).
    fn channels(&self) -> u8;
    /// Where sample `index` lives, for error reports (a path, or `file#index`).
    fn describe(&self, index: usize) -> String;
    /// Number of classes when the source has labels.
    fn num_classes(&self) -> Option<usize>;
    /// Class names, when known.
    fn class_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// All labels at once (small: one integer per sample), when the source has labels.
    fn labels(&self) -> Option<Vec<i64>>;
    /// Samples per storage block (an HDF5 chunk): reading one sample costs reading its whole block, so the
    /// loader shuffles whole blocks and then samples within windows of [`SHUFFLE_WINDOW_BLOCKS`] consecutive
    /// blocks, and each block is read about once per epoch. 1 (the default) = any order is as cheap as any other.
    fn block_len(&self) -> usize {
        1
    }
    /// The blocks that samples `indices` (a batch the loader is about to build) need and that are not in
    /// memory yet. The loader reads them first, in parallel, one per worker ([`Source::load_block`]), so that
    /// the per-sample pass finds them ready instead of one worker waiting while another reads a shared block.
    fn missing_blocks(&self, _indices: &[usize]) -> Vec<usize> {
        Vec::new()
    }
    /// Reads block `block` into memory (errors are kept and reported by `get` for each sample of the block).
    fn load_block(&self, _block: usize) {}
    /// What was left out while listing the samples (see [`Skipped`]); empty for most sources.
    fn skipped(&self) -> Vec<Skipped> {
        Vec::new()
    }
}

thread_local! {
    static DECODE_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `f`, adding its time to this thread's decode counter ([`thread_decode_ns`]): sources wrap the work
/// that turns stored bytes into pixels (image codecs, chunk decompression) so the loader can report read and
/// decode time apart.
pub fn timed_decode<R>(f: impl FnOnce() -> R) -> R {
    let t = std::time::Instant::now();
    let r = f();
    DECODE_NS.with(|d| d.set(d.get() + t.elapsed().as_nanos() as u64));
    r
}

/// Nanoseconds this thread has spent in [`timed_decode`] so far.
pub fn thread_decode_ns() -> u64 {
    DECODE_NS.with(|d| d.get())
}

/// How many consecutive (already shuffled) blocks the loader mixes samples across when `block_len() > 1`.
/// A block-backed source should cache at least twice this many decoded blocks (a batch can straddle two windows).
/// 16: wider windows mix batches better and make it rarer that two loader threads wait for the same block at
/// the start of a window (bench-loader on packed Fashion-MNIST, 256-sample chunks, 2 threads: 4 blocks ~232k
/// pairs/s, 16 blocks ~255-267k, IDX ~261-275k); the cost is memory, 2 x 16 decoded chunks (6.4 MB here).
pub const SHUFFLE_WINDOW_BLOCKS: usize = 16;

/// Opens a path as a source: CIFAR-10/100 binary batches (a `.bin` file, or a folder with `data_batch_*.bin` /
/// `train.bin`), an IDX images file (`*-idx3-ubyte`, optionally `.gz`; labels are taken from the
/// matching `*-labels-idx1-ubyte[.gz]` beside it), an HDF5 file (`*.h5`, `*.hdf5`: [`Hdf5Source`]; `channels`
/// applies to its encoded layout) or a directory of images (class sub-folders become labels).
/// `channels` is used for image folders (gray images are expanded to RGB when 3, RGB converted to gray when 1).
pub fn open(path: &Path, channels: u8) -> Result<Box<dyn Source>, DataError> {
    open_with(path, OpenOptions::channels(channels))
}

/// How to open a source: the channels image folders and encoded HDF5 files decode to, and the pixel limit above
/// which an image is refused from its header (`data.max_pixels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    pub channels: u8,
    pub max_pixels: u64,
}

impl OpenOptions {
    pub fn channels(channels: u8) -> Self {
        OpenOptions { channels, max_pixels: DEFAULT_MAX_PIXELS }
    }
}

/// [`open`] with every option.
pub fn open_with(path: &Path, o: OpenOptions) -> Result<Box<dyn Source>, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if cifar::is_cifar(path) {
        Ok(Box::new(CifarSource::open(path)?))
    } else if meta.is_dir() {
        Ok(Box::new(ImageFolder::open(path, o.channels)?.with_max_pixels(o.max_pixels)))
    } else if hdf5::has_hdf5_extension(path) {
        Ok(Box::new(Hdf5Source::open_with(path, o)?))
    } else {
        Ok(Box::new(IdxSource::open(path)?))
    }
}

/// The first `len` samples of another source (evaluation on a subset, quick runs).
pub struct Prefix {
    inner: std::sync::Arc<dyn Source>,
    len: usize,
}

impl Prefix {
    pub fn new(inner: std::sync::Arc<dyn Source>, len: usize) -> Self {
        let len = len.min(inner.len());
        Prefix { inner, len }
    }
}

impl Source for Prefix {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        self.inner.get(index)
    }
    fn channels(&self) -> u8 {
        self.inner.channels()
    }
    fn describe(&self, index: usize) -> String {
        self.inner.describe(index)
    }
    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn labels(&self) -> Option<Vec<i64>> {
        self.inner.labels().map(|mut l| {
            l.truncate(self.len);
            l
        })
    }
    fn block_len(&self) -> usize {
        self.inner.block_len()
    }
    fn missing_blocks(&self, indices: &[usize]) -> Vec<usize> {
        self.inner.missing_blocks(indices)
    }
    fn load_block(&self, block: usize) {
        self.inner.load_block(block)
    }
    fn skipped(&self) -> Vec<Skipped> {
        self.inner.skipped()
    }
}

/// Chosen samples of another source, in the given order (low-label subsets).
pub struct Subset {
    inner: std::sync::Arc<dyn Source>,
    indices: Vec<usize>,
}

impl Subset {
    /// `indices` must be in range of `inner`.
    pub fn new(inner: std::sync::Arc<dyn Source>, indices: Vec<usize>) -> Self {
        debug_assert!(indices.iter().all(|&i| i < inner.len()));
        Subset { inner, indices }
    }

    /// `per_class` labeled samples of each class of `inner` (all of a class that has fewer), drawn with `seed`:
    /// the same seed gives the same subset, and a larger `per_class` keeps every sample a smaller one chose.
    /// `None` when `inner` has no labels.
    pub fn per_class(inner: std::sync::Arc<dyn Source>, per_class: usize, seed: u64) -> Option<Self> {
        let labels = inner.labels()?;
        let mut order: Vec<usize> = (0..labels.len()).collect();
        selfsup_augment::Rng::for_sample(seed, u64::MAX, u64::MAX).shuffle(&mut order);
        let mut taken = std::collections::HashMap::<i64, usize>::new();
        let mut indices: Vec<usize> = order
            .into_iter()
            .filter(|&i| {
                let n = taken.entry(labels[i]).or_default();
                *n += 1;
                *n <= per_class
            })
            .collect();
        indices.sort_unstable();
        Some(Subset { inner, indices })
    }

    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl Source for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let i = *self.indices.get(index).ok_or_else(|| DataError::Invalid {
            path: PathBuf::from(self.inner.describe(0)),
            message: format!("subset index {index} out of range ({})", self.indices.len()),
        })?;
        self.inner.get(i)
    }
    fn channels(&self) -> u8 {
        self.inner.channels()
    }
    fn describe(&self, index: usize) -> String {
        self.indices.get(index).map_or_else(|| format!("subset#{index}"), |&i| self.inner.describe(i))
    }
    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn labels(&self) -> Option<Vec<i64>> {
        let all = self.inner.labels()?;
        Some(self.indices.iter().map(|&i| all[i]).collect())
    }
    // The order stays sample by sample (block_len 1: a subset is scattered over the blocks), but a batch's blocks
    // are still read up front, in parallel, by the block source underneath.
    fn missing_blocks(&self, indices: &[usize]) -> Vec<usize> {
        let inner: Vec<usize> = indices.iter().filter_map(|&i| self.indices.get(i).copied()).collect();
        self.inner.missing_blocks(&inner)
    }
    fn load_block(&self, block: usize) {
        self.inner.load_block(block)
    }
    fn skipped(&self) -> Vec<Skipped> {
        self.inner.skipped()
    }
}
