//! What [`Hdf5Source`](super::Hdf5Source) checks at open before it trusts a file: the main data set's shape,
//! chunking and storage against sane limits and against what the file holds, and the per-sample data sets and
//! string attributes before they are read (their shapes size the allocations). Each failure is a
//! [`DataError::Hdf5`] naming the file and the data set or attribute.
//!
//! Global heap collections (variable-length data: the `class_names` and `checksum` attributes, the encoded
//! layout's files) are decoded inside HDF5's C library; the file driver in [`super::guard`] checks each before
//! HDF5 sees it.

use std::path::Path;

use ::hdf5::types::{VarLenAscii, VarLenUnicode};
use ::hdf5::{Dataset, File, Location};

use super::{h5_err, Hdf5Layout, CONTIGUOUS_BLOCK_BYTES};
use crate::source::DataError;

/// The most bytes one block (a chunk, or the rows of a block) may hold: one read allocates it, and the cache keeps
/// `CACHE_CHUNKS` of them. `pack` writes chunks of about 1 MiB, h5py's automatic chunks are at most 1 MiB.
const MAX_BLOCK_BYTES: u128 = 256 << 20;
/// Labels are class indices in `0..MAX_CLASSES` (a probe has one output per class); `class_names` has at most as
/// many entries.
const MAX_CLASSES: i64 = 1 << 16;

/// Reads a string-array attribute stored as variable-length UTF-8 or ASCII (what h5py and `pack` write), of at
/// most [`MAX_CLASSES`] entries (checked before reading).
pub(super) fn string_attr(loc: &Location, path: &Path, name: &str) -> Result<Option<Vec<String>>, DataError> {
    let err = |e: ::hdf5::Error| h5_err(path, format!("attribute `{name}`: {e}"));
    // Opened by name rather than looked up in `attr_names()`: iterating the attributes of a damaged object header
    // panicked inside hdf5-metno's iteration callback in the fuzz (a capacity overflow), whereas H5Aopen reports
    // an error. A damaged attribute whose name no longer matches reads as absent (the attributes are optional).
    let attr = match loc.attr(name) {
        Ok(a) => a,
        Err(e) if e.to_string().contains("can't locate attribute") => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    if attr.size() > MAX_CLASSES as usize {
        return Err(h5_err(path, format!("attribute `{name}` has {} entries (at most {MAX_CLASSES})", attr.size())));
    }
    if let Ok(v) = attr.read_raw::<VarLenUnicode>() {
        return Ok(Some(v.iter().map(|s| s.as_str().to_string()).collect()));
    }
    let v = attr.read_raw::<VarLenAscii>().map_err(err)?;
    Ok(Some(v.iter().map(|s| s.as_str().to_string()).collect()))
}

/// Samples per block (see [`Source::block_len`](crate::source::Source::block_len)), once `data`'s shape, chunks and storage are checked (before
/// anything is read): at least one sample, at most `max_pixels` pixels per fixed sample, blocks and chunks of at
/// most [`MAX_BLOCK_BYTES`], and every chunk stored (contiguous: all the bytes the samples need, within the file).
pub(super) fn checked_block(
    path: &Path,
    data: &Dataset,
    layout: Hdf5Layout,
    max_pixels: u64,
    file_len: u64,
) -> Result<usize, DataError> {
    let shape = data.shape();
    let count = shape[0];
    let (name, sample_bytes, element) = match layout {
        Hdf5Layout::Fixed { height, width, channels } => {
            let pixels = u64::from(height) * u64::from(width);
            if pixels > max_pixels {
                return Err(h5_err(
                    path,
                    format!("`images`: {width}x{height} pixels exceeds the limit of {max_pixels}"),
                ));
            }
            ("`images`", u128::from(pixels) * u128::from(channels), 1)
        }
        // A heap reference per sample; the files' bytes are in the heap.
        Hdf5Layout::Encoded => ("`encoded`", 16, 16),
    };
    if count == 0 {
        return Err(h5_err(path, format!("{name} holds no samples")));
    }
    let Some(chunk) = data.chunk() else {
        let (need, stored) = (count as u128 * sample_bytes, u128::from(data.storage_size()));
        let need = if layout == Hdf5Layout::Encoded { count as u128 } else { need };
        if stored < need || stored > u128::from(file_len) {
            return Err(h5_err(
                path,
                format!(
                    "{name}: {count} samples need {need} bytes, the data set stores {stored} in a {file_len}-byte file"
                ),
            ));
        }
        return Ok(match layout {
            Hdf5Layout::Fixed { .. } => (CONTIGUOUS_BLOCK_BYTES as u128 / sample_bytes.max(1)).clamp(1, 256) as usize,
            Hdf5Layout::Encoded => 64,
        });
    };
    let block = chunk[0].max(1);
    let chunk_bytes = chunk.iter().map(|&d| d as u128).product::<u128>() * element;
    let block_bytes = block as u128 * sample_bytes;
    if chunk.len() != shape.len() || chunk_bytes.max(block_bytes) > MAX_BLOCK_BYTES {
        return Err(h5_err(
            path,
            format!(
                "{name}: chunks of {chunk:?} ({} bytes) exceed the {MAX_BLOCK_BYTES} bytes read at once (rechunk it, \
                 e.g. with `selfsup pack`)",
                chunk_bytes.max(block_bytes)
            ),
        ));
    }
    let want: u128 = shape.iter().zip(&chunk).map(|(&s, &c)| s.div_ceil(c.max(1)) as u128).product();
    let stored = data.num_chunks().ok_or_else(|| h5_err(path, format!("{name}: cannot count its stored chunks")))?;
    if (stored as u128) < want {
        return Err(h5_err(
            path,
            format!(
                "{name}: {count} samples in {want} chunks, but the file stores {stored} of them (unwritten samples \
                 would read as zeros; or the chunk index is damaged)"
            ),
        ));
    }
    Ok(block)
}

/// A per-sample data set (`labels`, `checksums`) must be shaped `[count]`: checked before it is read (its shape
/// sizes the allocation).
fn check_column(path: &Path, name: &str, ds: &Dataset, count: usize) -> Result<(), DataError> {
    match ds.shape()[..] {
        [n] if n == count => Ok(()),
        [n] => Err(h5_err(path, format!("`{name}` has {n} entries for {count} samples"))),
        ref shape => Err(h5_err(path, format!("`{name}` has shape {shape:?}, expected [{count}]"))),
    }
}

/// The `labels` data set: integers shaped `[count]` (checked before reading), each in `0..MAX_CLASSES`.
pub(super) fn read_labels(file: &File, path: &Path, count: usize) -> Result<Vec<i64>, DataError> {
    let err = |e: ::hdf5::Error| h5_err(path, format!("`labels`: {e}"));
    let ds = file.dataset("labels").map_err(err)?;
    check_column(path, "labels", &ds, count)?;
    use ::hdf5::types::TypeDescriptor as T;
    match ds.dtype().and_then(|t| t.to_descriptor()).map_err(err)? {
        T::Integer(_) | T::Unsigned(_) => {}
        other => return Err(h5_err(path, format!("`labels` must be integers, found {other}"))),
    }
    let labels = ds.read_raw::<i64>().map_err(err)?;
    if labels.len() != count {
        return Err(h5_err(path, format!("`labels` has {} entries for {count} samples", labels.len())));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| !(0..MAX_CLASSES).contains(*l)) {
        return Err(h5_err(path, format!("`labels`: entry {i} is {l}, outside 0..{MAX_CLASSES}")));
    }
    Ok(labels)
}

/// The encoded layout's `checksums` data set: one CRC-32 per sample.
pub(super) fn read_checksums(file: &File, path: &Path, count: usize) -> Result<Vec<u32>, DataError> {
    let err = |e: ::hdf5::Error| h5_err(path, e);
    let ds = file.dataset("checksums").map_err(err)?;
    check_column(path, "checksums", &ds, count)?;
    if let Some(algorithm) = string_attr(&ds, path, "checksum")? {
        if algorithm != [crate::pack::CHECKSUM_ALGORITHM] {
            return Err(h5_err(path, format!("`checksums`: unknown checksum {algorithm:?}, this reader knows crc32")));
        }
    }
    let sums = ds.read_raw::<u32>().map_err(err)?;
    if sums.len() != count {
        return Err(h5_err(path, format!("`checksums` has {} entries for {count} samples", sums.len())));
    }
    Ok(sums)
}
