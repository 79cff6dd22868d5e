//! `selfsup pack`: converts a source (IDX file, CIFAR batches, image folder) into one chunked, compressed HDF5
//! file with a fletcher32 checksum per chunk (compression: [`Codec`], by default Blosc LZ4HC), which [`Hdf5Source`](crate::source::Hdf5Source) reads back
//! chunk by chunk. Layouts (see [`crate::source::Hdf5Layout`]):
//! - `fixed`: `images` `uint8 [N,H,W,C]`, the decoded pixels; needs every sample to have one size;
//! - `encoded`: `encoded` variable-length `uint8`, each image file's bytes as they are (image folders only;
//!   chosen automatically when the folder's images differ in size). HDF5 filters act on a vlen data set's
//!   heap references, not on the bytes, so here fletcher32 covers only the references; the bytes are covered
//!   by `checksums` (below), as JPEG has no checksum of its own and a flipped byte would decode silently.
//!
//! Also written: `labels` `int64 [N]` (when the source has labels), `source_index` `int64 [N]` (row → index in
//! the source: rows shift after skipped samples, and with `shuffle`), in the encoded layout `checksums`
//! `uint32 [N]` (CRC-32 of each row's file bytes, IEEE polynomial as zlib's `crc32`, with the data set
//! attribute `checksum = "crc32"`; the reader verifies each sample before decoding it) and root attributes
//! `source`, `count`, `layout`, `shape` (H,W,C; fixed only), `class_names` (when known), `skipped`,
//! `content_hash` and `content_hash_algorithm`. The content hash is 64-bit FNV-1a ([`fnv1a64`]) over, for every
//! row in order: its byte count as u64 little-endian, its bytes (pixels, or the encoded file), then its label as
//! i64 little-endian when there are labels.
//!
//! Unreadable samples are skipped, counted and listed. The file is written as `OUT.tmp-<pid>` beside OUT and
//! renamed when complete, so OUT is never half-written; on an error the temporary file is removed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ::hdf5::types::{VarLenArray, VarLenUnicode};
use ::hdf5::{Dataset, File, Location};
use rayon::prelude::*;
use selfsup_augment::Rng;

use crate::loader::BadSample;
use crate::source::{self, DataError, ImageFolder, Source};

/// Target bytes per chunk (uncompressed): chunks hold `clamp(CHUNK_BYTES / sample bytes, 1, MAX_CHUNK_LEN)`.
const CHUNK_BYTES: usize = 1 << 20;
const MAX_CHUNK_LEN: usize = 256;
/// What `content_hash_algorithm` says.
pub const CONTENT_HASH_ALGORITHM: &str =
    "fnv1a64 over rows in order: u64le(byte count), bytes, i64le(label) when labeled";
/// The `checksum` attribute of the encoded layout's `checksums` data set: CRC-32 (IEEE, zlib's `crc32`).
pub const CHECKSUM_ALGORITHM: &str = "crc32";

#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Channels image folders are decoded to (1 or 3); other sources keep theirs.
    pub channels: u8,
    /// Store each image file's bytes instead of decoded pixels (image folders only).
    pub encoded: bool,
    /// Write the rows in a random order from this seed (for class-sorted folders: the loader's block shuffle
    /// mixes samples only across a few neighbouring chunks).
    pub shuffle: Option<u64>,
    /// How chunks are compressed (each then checksummed with fletcher32).
    pub codec: Codec,
    /// A progress line on stderr (rows written so far), at most once a second.
    pub progress: bool,
}

/// The compression of every data set `pack` writes; fletcher32 follows it. Fashion-MNIST's training images (47 MB)
/// as an example: Blosc LZ4HC 9 keeps 0.59 of the bytes and decompresses at 0.14 us per image, deflate 4 keeps
/// 0.57 but inflates at 1.2 us (libdeflate; the 2-core dev machine), which made loading from HDF5 slower than
/// from the IDX files; see scripts/bench-hdf5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Blosc (HDF5 filter 32001, as PyTables, h5py + hdf5plugin, and HDF5's filter plugins write it) with LZ4HC
    /// at this level (1-9), no shuffle. h5py reads it after `import hdf5plugin`; other HDF5 tools need the Blosc
    /// filter plugin.
    Lz4hc(u8),
    /// Deflate (gzip, HDF5 filter 1) at this level (0-9; 0 stores the chunks uncompressed in deflate's framing):
    /// every HDF5 reader has it.
    Deflate(u8),
    /// No compression: checksummed chunks only.
    None,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::Lz4hc(9)
    }
}

impl Codec {
    /// The HDF5 filter pipeline: this codec, then fletcher32 (the checksum covers the stored bytes).
    fn filters(self) -> Vec<::hdf5::filters::Filter> {
        use ::hdf5::filters::{Blosc, BloscShuffle, Filter};
        let mut f = match self {
            Codec::Lz4hc(level) => vec![Filter::Blosc(Blosc::LZ4HC, level.clamp(1, 9), BloscShuffle::None)],
            Codec::Deflate(level) => vec![Filter::Deflate(level.min(9))],
            Codec::None => Vec::new(),
        };
        f.push(Filter::Fletcher32);
        f
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Lz4hc(l) => write!(f, "blosc lz4hc {l}"),
            Codec::Deflate(l) => write!(f, "deflate {l}"),
            Codec::None => write!(f, "none"),
        }
    }
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions { channels: 1, encoded: false, shuffle: None, codec: Codec::default(), progress: false }
    }
}

#[derive(Clone, Debug)]
pub struct PackSummary {
    pub out: PathBuf,
    /// "fixed" or "encoded".
    pub layout: &'static str,
    /// Rows written.
    pub count: usize,
    pub chunk_len: usize,
    pub skipped: Vec<BadSample>,
    /// Size of the written file.
    pub bytes: u64,
    pub seconds: f64,
    pub content_hash: u64,
    /// Decisions worth telling the user (layout chosen automatically, sorted labels).
    pub notes: Vec<String>,
}

impl std::fmt::Display for PackSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        for b in &self.skipped {
            match b.error.contains(&b.location) {
                true => writeln!(f, "skipped: {}", b.error)?,
                false => writeln!(f, "skipped {}: {}", b.location, b.error)?,
            }
        }
        write!(
            f,
            "packed {} samples ({} layout, {} per chunk), skipped {}, into {}: {:.1} MB in {:.1}s, content_hash {:016x}",
            self.count,
            self.layout,
            self.chunk_len,
            self.skipped.len(),
            self.out.display(),
            self.bytes as f64 / 1e6,
            self.seconds,
            self.content_hash
        )
    }
}

/// 64-bit FNV-1a (<http://www.isthe.com/chongo/tech/comp/fnv/>), continued from `h` (start: [`FNV_OFFSET`]).
pub fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Packs the source at `src` (anything [`source::open`] reads) into `out` (`.h5` or `.hdf5`).
pub fn pack(src: &Path, out: &Path, opts: &PackOptions) -> Result<PackSummary, DataError> {
    let start = Instant::now();
    check_output(out)?;
    let name = src.display().to_string();
    // An image folder is what `source::open` reads as one (not, say, a folder of CIFAR batches); opened once, so
    // that its listing (and any warning about links it skipped) happens once.
    let folder =
        if src.is_dir() && !source::is_cifar(src) { Some(ImageFolder::open(src, opts.channels)?) } else { None };
    let Some(folder) = folder else {
        let generic = source::open(src, opts.channels)?;
        if opts.encoded {
            return Err(DataError::Invalid {
                path: src.into(),
                message: "--encoded needs a folder of image files".into(),
            });
        }
        return pack_source(generic.as_ref(), &name, out, opts);
    };
    let mut notes = Vec::new();
    if !folder.skipped().is_empty() {
        notes.push(format!(
            "{} entries of the folder were left out while listing (link cycles, second paths to one file; \
             `selfsup inspect` lists them)",
            folder.skipped().len()
        ));
    }
    let sizes = if opts.encoded { Vec::new() } else { distinct_sizes(&folder) };
    let summary = if opts.encoded {
        write(&Input::Encoded(&folder), &name, out, opts, notes)
    } else if sizes.len() > 1 {
        notes.push(format!(
            "the images differ in size ({} sizes, e.g. {}x{} and {}x{}): the fixed layout needs one size, so the \
             encoded layout is used (original file bytes, decoded when read)",
            sizes.len(),
            sizes[0].0,
            sizes[0].1,
            sizes[1].0,
            sizes[1].1
        ));
        write(&Input::Encoded(&folder), &name, out, opts, notes)
    } else {
        write(&Input::Decoded(&folder), &name, out, opts, notes)
    };
    summary.map(|s| PackSummary { seconds: start.elapsed().as_secs_f64(), ..s })
}

fn check_output(out: &Path) -> Result<(), DataError> {
    if !source::has_hdf5_extension(out) {
        return Err(DataError::Invalid {
            path: out.into(),
            message: "the output must end in .h5 or .hdf5 (that is how sources recognise HDF5)".into(),
        });
    }
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(DataError::Invalid { path: dir.into(), message: "no such folder".into() }),
        _ => Ok(()),
    }
}

/// Packs the decoded samples of `source` in the fixed layout; `name` goes into the `source` attribute.
pub fn pack_source(source: &dyn Source, name: &str, out: &Path, opts: &PackOptions) -> Result<PackSummary, DataError> {
    write(&Input::Decoded(source), name, out, opts, Vec::new())
}

enum Input<'a> {
    Decoded(&'a dyn Source),
    Encoded(&'a ImageFolder),
}

/// (width, height) of every image whose header reads, distinct, sorted.
fn distinct_sizes(folder: &ImageFolder) -> Vec<(u32, u32)> {
    let mut sizes: Vec<(u32, u32)> = (0..folder.len())
        .into_par_iter()
        .filter_map(|i| {
            let bytes = source::read_file(folder.file(i)?, source::DEFAULT_MAX_PIXELS).ok()?;
            image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
        })
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// One row ready to write: its bytes (pixels or file), its shape when decoded, its label, and the CRC-32 of
/// its bytes when encoded.
struct Row {
    bytes: Vec<u8>,
    shape: Option<[usize; 3]>,
    label: Option<i64>,
    crc32: Option<u32>,
}

fn write(
    input: &Input,
    name: &str,
    out: &Path,
    opts: &PackOptions,
    notes: Vec<String>,
) -> Result<PackSummary, DataError> {
    check_output(out)?;
    remove_stale_temporaries(out);
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let start = Instant::now();
    let result = write_file(input, name, &tmp, opts, notes).and_then(|mut summary| {
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| DataError::io(out, e))?;
        summary.out = out.to_path_buf();
        summary.bytes = std::fs::metadata(out).map_err(|e| DataError::io(out, e))?.len();
        summary.seconds = start.elapsed().as_secs_f64();
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `OUT.tmp-<pid>` files left by packs of OUT that were killed (their process is gone): they were never
/// read as output, but they hold disk space. A pack still running (its pid alive) keeps its file.
fn remove_stale_temporaries(out: &Path) {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name().and_then(|n| n.to_str())) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!("{name}.tmp-");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn write_file(
    input: &Input,
    name: &str,
    tmp: &Path,
    opts: &PackOptions,
    mut notes: Vec<String>,
) -> Result<PackSummary, DataError> {
    let h5 = |e: ::hdf5::Error| source::h5_err(tmp, e);
    let (src, encoded): (&dyn Source, bool) = match input {
        Input::Decoded(s) => (*s, false),
        Input::Encoded(f) => (*f, true),
    };
    if src.is_empty() {
        return Err(DataError::Invalid { path: name.into(), message: "no samples to pack".into() });
    }
    let labels = src.labels();
    let mut order: Vec<usize> = (0..src.len()).collect();
    if let Some(seed) = opts.shuffle {
        Rng::new(seed).shuffle(&mut order);
    } else if labels.as_ref().is_some_and(|l| l.windows(2).all(|w| w[0] <= w[1]) && l.first() != l.last()) {
        notes.push(
            "the labels are sorted by class: the loader's block shuffle mixes only a few neighbouring chunks per \
             batch, so consider --shuffle SEED"
                .into(),
        );
    }
    // One sample (or the mean file size) sets the chunk length.
    let sample_bytes = match input {
        Input::Decoded(s) => order.iter().take(64).find_map(|&i| s.get(i).ok()).map_or(1, |s| s.image.data.len()),
        Input::Encoded(f) => {
            let sizes: Vec<u64> =
                order.iter().take(256).filter_map(|&i| std::fs::metadata(f.file(i)?).ok()).map(|m| m.len()).collect();
            (sizes.iter().sum::<u64>() as usize / sizes.len().max(1)).max(1)
        }
    };
    let chunk_len = (CHUNK_BYTES / sample_bytes.max(1)).clamp(1, MAX_CHUNK_LEN);
    let file = File::create(tmp).map_err(h5)?;
    let mut data: Option<(Dataset, Option<[usize; 3]>)> = None;
    let (mut kept_index, mut kept_labels, mut kept_sums, mut skipped) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hash = FNV_OFFSET;
    let mut task = crate::progress::Task::new("packing", "samples", src.len() as u64, opts.progress);
    for idx in order.chunks(chunk_len) {
        let rows: Vec<Result<Row, DataError>> = idx.par_iter().map(|&i| read_row(input, i, opts.channels)).collect();
        let mut good = Vec::with_capacity(rows.len());
        for (&i, row) in idx.iter().zip(rows) {
            let row = row.and_then(|r| match (&data, r.shape) {
                (Some((_, Some(want))), Some(got)) if *want != got => Err(DataError::Invalid {
                    path: src.describe(i).into(),
                    message: format!("size {got:?} (H,W,C) differs from the data set's {want:?}"),
                }),
                _ => Ok(r),
            });
            match row {
                Ok(r) => {
                    if data.is_none() {
                        data = Some((create_data(&file, r.shape, chunk_len, opts.codec).map_err(h5)?, r.shape));
                    }
                    hash = fnv1a64(hash, &(r.bytes.len() as u64).to_le_bytes());
                    hash = fnv1a64(hash, &r.bytes);
                    if let Some(l) = r.label.or_else(|| labels.as_ref().map(|l| l[i])) {
                        hash = fnv1a64(hash, &l.to_le_bytes());
                        kept_labels.push(l);
                    }
                    kept_sums.extend(r.crc32);
                    kept_index.push(i as i64);
                    good.push(r);
                }
                Err(e) => skipped.push(BadSample { index: i, location: src.describe(i), error: e.to_string() }),
            }
        }
        if let Some((ds, shape)) = &data {
            append(ds, *shape, kept_index.len() - good.len(), &good).map_err(h5)?;
        }
        task.inc(idx.len() as u64);
        if !skipped.is_empty() {
            task.set_message(format!("{} skipped", skipped.len()));
        }
    }
    task.finish();
    let Some((_, shape)) = data else {
        return Err(DataError::Invalid {
            path: name.into(),
            message: format!("none of the {} samples could be read", src.len()),
        });
    };
    let count = kept_index.len();
    if labels.is_some() && kept_labels.len() == count {
        column(&file, "labels", &kept_labels, opts.codec).map_err(h5)?;
    }
    column(&file, "source_index", &kept_index, opts.codec).map_err(h5)?;
    if encoded {
        debug_assert_eq!(kept_sums.len(), count);
        let ds = column(&file, "checksums", &kept_sums, opts.codec).map_err(h5)?;
        str_attr(&ds, "checksum", CHECKSUM_ALGORITHM).map_err(h5)?;
    }
    let root: &Location = &file;
    str_attr(root, "source", name).map_err(h5)?;
    str_attr(root, "layout", if encoded { "encoded" } else { "fixed" }).map_err(h5)?;
    str_attr(root, "content_hash_algorithm", CONTENT_HASH_ALGORITHM).map_err(h5)?;
    let scalar = |n: &str, v: u64| root.new_attr::<u64>().shape(()).create(n).and_then(|a| a.write_scalar(&v));
    scalar("count", count as u64).map_err(h5)?;
    scalar("skipped", skipped.len() as u64).map_err(h5)?;
    scalar("content_hash", hash).map_err(h5)?;
    if let (Some(s), false) = (shape, encoded) {
        let s: Vec<u64> = s.iter().map(|&d| d as u64).collect();
        root.new_attr_builder().with_data(&s[..]).create("shape").map_err(h5)?;
    }
    let classes = src.class_names();
    if !classes.is_empty() {
        let v: Vec<VarLenUnicode> = classes.iter().map(|c| vlen_str(c)).collect();
        root.new_attr_builder().with_data(&v[..]).create("class_names").map_err(h5)?;
    }
    file.flush().map_err(h5)?;
    drop(file);
    let layout = if encoded { "encoded" } else { "fixed" };
    Ok(PackSummary {
        out: tmp.into(),
        layout,
        count,
        chunk_len,
        skipped,
        bytes: 0,
        seconds: 0.0,
        content_hash: hash,
        notes,
    })
}

fn read_row(input: &Input, i: usize, channels: u8) -> Result<Row, DataError> {
    match input {
        Input::Decoded(s) => {
            let sample = s.get(i)?;
            let im = &sample.image;
            let shape = [im.height as usize, im.width as usize, im.channels as usize];
            Ok(Row { bytes: sample.image.data, shape: Some(shape), label: sample.label, crc32: None })
        }
        Input::Encoded(f) => {
            let path = f
                .file(i)
                .ok_or_else(|| DataError::Invalid { path: f.root().into(), message: format!("no sample {i}") })?;
            let bytes = source::read_file(path, source::DEFAULT_MAX_PIXELS)?;
            // Decoded once here so that a file the reader could not decode is skipped now, not at training time.
            source::decode_bytes(&bytes, channels, source::DEFAULT_MAX_PIXELS, path)?;
            let crc32 = Some(libdeflater::crc32(&bytes));
            Ok(Row { bytes, shape: None, label: None, crc32 })
        }
    }
}

/// Writes the 1-D data set `name` (labels, source indices, checksums): chunked, compressed and fletcher32-checked
/// like the data.
fn column<T: ::hdf5::H5Type>(file: &File, name: &str, values: &[T], codec: Codec) -> ::hdf5::Result<Dataset> {
    let ds = file
        .new_dataset::<T>()
        .chunk(values.len().clamp(1, 1 << 16))
        .set_filters(&codec.filters())
        .shape(values.len())
        .create(name)?;
    ds.write_raw(values)?;
    Ok(ds)
}

/// Creates the (growable) data set: `images [0.., H, W, C]` for decoded rows, `encoded [0..]` otherwise.
fn create_data(file: &File, shape: Option<[usize; 3]>, chunk: usize, codec: Codec) -> ::hdf5::Result<Dataset> {
    match shape {
        Some([h, w, c]) => file
            .new_dataset::<u8>()
            .chunk((chunk, h, w, c))
            .set_filters(&codec.filters())
            .shape((0.., h, w, c))
            .create("images"),
        None => file
            .new_dataset::<VarLenArray<u8>>()
            .chunk(chunk)
            .set_filters(&codec.filters())
            .shape(0..)
            .create("encoded"),
    }
}

/// Appends `rows` at row `at` (one whole chunk at a time, so each chunk is compressed once).
fn append(ds: &Dataset, shape: Option<[usize; 3]>, at: usize, rows: &[Row]) -> ::hdf5::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let end = at + rows.len();
    match shape {
        Some([h, w, c]) => {
            ds.resize((end, h, w, c))?;
            let flat: Vec<u8> = rows.iter().flat_map(|r| r.bytes.iter().copied()).collect();
            let view = ndarray::ArrayView4::from_shape((rows.len(), h, w, c), &flat).map_err(|e| e.to_string())?;
            ds.write_slice(view, (at..end, .., .., ..))
        }
        None => {
            ds.resize(end)?;
            let v: Vec<VarLenArray<u8>> = rows.iter().map(|r| VarLenArray::from_slice(&r.bytes)).collect();
            ds.write_slice(&v[..], at..end)
        }
    }
}

fn vlen_str(s: &str) -> VarLenUnicode {
    // Only an interior NUL can fail; such a name is stored without it.
    s.replace('\0', "").parse().unwrap_or_default()
}

fn str_attr(loc: &Location, name: &str, value: &str) -> ::hdf5::Result<()> {
    loc.new_attr::<VarLenUnicode>().shape(()).create(name)?.write_scalar(&vlen_str(value))
}
