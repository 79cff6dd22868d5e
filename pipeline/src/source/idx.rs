//! IDX files (the MNIST / Fashion-MNIST format, http://yann.lecun.com/exdb/mnist/): a big-endian header with the
//! dimensions, then raw u8 pixels. Gzipped files are inflated once into a cache file next to the user's cache
//! (atomically: temporary file, then rename); samples are then read with positioned reads, so resident memory
//! stays flat whatever the dataset size. Labels (one byte per sample) are held in memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use selfsup_augment::Image;

use super::{DataError, Sample, Source};

pub struct IdxSource {
    path: PathBuf,
    file: File,
    data_offset: u64,
    count: usize,
    height: u32,
    width: u32,
    labels: Option<Vec<u8>>,
}

fn idx_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Idx { path: path.to_path_buf(), message: message.into() }
}

/// Reads the IDX header: returns (dims, header length). Only unsigned-byte data (type 0x08) is supported.
fn read_header(path: &Path, r: &mut impl Read) -> Result<(Vec<u32>, u64), DataError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|_| idx_err(path, "shorter than its 4-byte magic"))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(idx_err(path, format!("bad magic {magic:02x?}")));
    }
    if magic[2] != 0x08 {
        return Err(idx_err(path, format!("element type 0x{:02x} unsupported (only u8, 0x08)", magic[2])));
    }
    let ndim = magic[3] as usize;
    if ndim == 0 || ndim > 4 {
        return Err(idx_err(path, format!("{ndim} dimensions")));
    }
    let mut dims = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|_| idx_err(path, "truncated header"))?;
        dims.push(u32::from_be_bytes(b));
    }
    Ok((dims, 4 + 4 * ndim as u64))
}

fn is_gzip(path: &Path) -> Result<bool, DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut m = [0u8; 2];
    Ok(f.read(&mut m).map_err(|e| DataError::io(path, e))? == 2 && m == [0x1f, 0x8b])
}

/// Returns a path to the uncompressed bytes of `path`: itself if it is not gzipped, else a cached inflated copy
/// keyed by the source's path, size and modification time.
fn uncompressed(path: &Path) -> Result<PathBuf, DataError> {
    if !is_gzip(path)? {
        return Ok(path.to_path_buf());
    }
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let abs = std::fs::canonicalize(path).map_err(|e| DataError::io(path, e))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(abs.as_os_str(), meta.len(), mtime), &mut h);
    let stem = path.file_name().unwrap_or_default().to_string_lossy().trim_end_matches(".gz").to_string();
    let dir = crate::cache_dir().join("idx");
    let out = dir.join(format!("{stem}-{:016x}", std::hash::Hasher::finish(&h)));
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let tmp = dir.join(format!(".{stem}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut dec = flate2::read::GzDecoder::new(std::io::BufReader::new(File::open(path)?));
        let mut w = std::io::BufWriter::new(File::create(&tmp)?);
        std::io::copy(&mut dec, &mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&tmp, &out)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(DataError::Invalid { path: path.to_path_buf(), message: format!("cannot inflate gzip: {e}") });
    }
    Ok(out)
}

/// `train-images-idx3-ubyte.gz` → `train-labels-idx1-ubyte.gz` (or without `.gz`), if it exists.
fn labels_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let base = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1");
    if base == name {
        return None;
    }
    let base = base.trim_end_matches(".gz");
    [base.to_string(), format!("{base}.gz")].into_iter().map(|n| images.with_file_name(n)).find(|p| p.exists())
}

impl IdxSource {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let raw = uncompressed(path)?;
        let mut file = File::open(&raw).map_err(|e| DataError::io(path, e))?;
        let (dims, data_offset) = read_header(path, &mut file)?;
        let (count, height, width) = match dims[..] {
            [n, h, w] => (n as usize, h, w),
            _ => return Err(idx_err(path, format!("expected 3 dimensions [N,H,W] for images, got {dims:?}"))),
        };
        let want = data_offset + count as u64 * height as u64 * width as u64;
        let have = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        if have < want {
            return Err(idx_err(path, format!("truncated: header promises {want} bytes, file has {have}")));
        }
        let labels = match labels_path(path) {
            Some(lp) => {
                let mut lf = File::open(uncompressed(&lp)?).map_err(|e| DataError::io(&lp, e))?;
                let (ldims, _) = read_header(&lp, &mut lf)?;
                if ldims != [count as u32] {
                    return Err(idx_err(&lp, format!("labels {ldims:?} do not match {count} images")));
                }
                let mut l = Vec::with_capacity(count);
                lf.read_to_end(&mut l).map_err(|e| DataError::io(&lp, e))?;
                if l.len() < count {
                    return Err(idx_err(&lp, "truncated labels"));
                }
                l.truncate(count);
                Some(l)
            }
            None => None,
        };
        Ok(IdxSource { path: path.to_path_buf(), file, data_offset, count, height, width, labels })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for IdxSource {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.count {
            return Err(idx_err(&self.path, format!("index {index} out of range ({})", self.count)));
        }
        let n = (self.height * self.width) as usize;
        let mut data = vec![0u8; n];
        self.file
            .read_exact_at(&mut data, self.data_offset + (index * n) as u64)
            .map_err(|e| DataError::io(&self.path, e))?;
        let image = Image { width: self.width, height: self.height, channels: 1, data };
        Ok(Sample { image, label: self.labels.as_ref().map(|l| l[index] as i64) })
    }

    fn channels(&self) -> u8 {
        1
    }

    fn describe(&self, index: usize) -> String {
        format!("{}#{index}", self.path.display())
    }

    fn num_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|l| l.iter().copied().max().map_or(0, |m| m as usize + 1))
    }

    fn labels(&self) -> Option<Vec<i64>> {
        self.labels.as_ref().map(|l| l.iter().map(|&x| x as i64).collect())
    }
}
