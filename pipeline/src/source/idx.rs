//! IDX files (the MNIST / Fashion-MNIST format, http://yann.lecun.com/exdb/mnist/): a big-endian header with the
//! dimensions, then raw u8 pixels. Gzipped files are inflated once into a cache file next to the user's cache
//! (atomically: temporary file, then rename), named by the SHA-256 of the gzip file and written only once every
//! gzip member's CRC-32 and ISIZE matched ([`uncompressed`], `idx/gunzip.rs`); samples are then read with
//! positioned reads, so resident memory stays flat whatever the dataset size. Labels (one byte per sample) are held
//! in memory.
//!
//! The header is checked before anything is allocated or inflated: the magic (element type u8, 1 to 4
//! dimensions), at least one image, sides in 1..=65535, and a file (or gzip stream) long enough for what the
//! header promises.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use selfsup_augment::Image;

use super::{DataError, Sample, Source};

mod gunzip;
use gunzip::Gunzip;

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

/// Deflate expands data at most ~1032-fold: a gzipped IDX file cannot hold more than this many bytes per byte.
const MAX_INFLATE_RATIO: u64 = 1032;

/// Reads the IDX header: returns (dims, header length). Only unsigned-byte data (type 0x08) is supported.
fn read_header(path: &Path, r: &mut impl Read) -> Result<(Vec<u32>, u64), DataError> {
    let short = |what: &str, e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => idx_err(path, format!("shorter than its {what}")),
        _ => idx_err(path, format!("cannot read its {what}: {e}")),
    };
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|e| short("4-byte magic", e))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(idx_err(path, format!("bad magic {magic:02x?}")));
    }
    if magic[2] != 0x08 {
        return Err(idx_err(path, format!("magic: element type 0x{:02x} unsupported (only u8, 0x08)", magic[2])));
    }
    let ndim = magic[3] as usize;
    if ndim == 0 || ndim > 4 {
        return Err(idx_err(path, format!("magic: {ndim} dimensions (1 to 4)")));
    }
    let mut dims = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|e| short("header", e))?;
        dims.push(u32::from_be_bytes(b));
    }
    Ok((dims, 4 + 4 * ndim as u64))
}

/// What an IDX file holds: images `[N,H,W]`, or the labels `[N]` of the `N` images in file `images`.
#[derive(Clone, Copy)]
enum Holds<'a> {
    Images,
    Labels(u32, &'a Path),
}

/// Bytes a file with header `dims` must have (header included), once the dimensions are checked: images need at
/// least one image, each side in 1..=65535; labels one per image. Checked before anything is read or allocated.
fn expected_len(path: &Path, dims: &[u32], holds: Holds) -> Result<u64, DataError> {
    let header = 4 + 4 * dims.len() as u64;
    match (holds, dims) {
        (Holds::Images, &[n, h, w]) => {
            if n == 0 {
                return Err(idx_err(path, "header: image count is 0"));
            }
            super::check_sides(w.into(), h.into(), "header: image").map_err(|m| idx_err(path, m))?;
            // At most (2^32 - 1) * 65535^2 bytes: fits u64.
            Ok(header + u64::from(n) * u64::from(h) * u64::from(w))
        }
        (Holds::Images, _) => Err(idx_err(path, format!("expected 3 dimensions [N,H,W] for images, got {dims:?}"))),
        (Holds::Labels(n, _), &[m]) if m == n => Ok(header + u64::from(n)),
        (Holds::Labels(n, images), _) => {
            Err(idx_err(path, format!("labels {dims:?} do not match the {n} images of {}", images.display())))
        }
    }
}

fn is_gzip(path: &Path, file: &File) -> Result<bool, DataError> {
    let mut m = [0u8; 2];
    Ok(file.read_at(&mut m, 0).map_err(|e| DataError::io(path, e))? == 2 && m == [0x1f, 0x8b])
}

/// Reads through `inner`, hashing every byte read (SHA-256): what the cache entry's name must match.
struct Hashing<R> {
    inner: R,
    sha: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.sha, &buf[..n]);
        Ok(n)
    }
}

fn sha256_hex16(sha: sha2::Sha256) -> String {
    let d = sha2::Digest::finalize(sha);
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the cache entry `out` holds what an IDX file with header `dims` and `want` bytes must: its header and
/// its length (an entry cut short by a full disk, or edited, is inflated again rather than trusted).
fn cached_entry_is_whole(out: &Path, dims: &[u32], want: u64) -> bool {
    let Ok(f) = File::open(out) else { return false };
    let mut header = vec![0u8; 4 + 4 * dims.len()];
    let expected: Vec<u8> =
        [0, 0, 0x08, dims.len() as u8].into_iter().chain(dims.iter().flat_map(|d| d.to_be_bytes())).collect();
    f.metadata().is_ok_and(|m| m.len() == want) && f.read_exact_at(&mut header, 0).is_ok() && header == expected
}

/// A name no other inflation in flight (any thread, any process) uses for its temporary file.
fn temp_name(stem: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{stem}.{}.{n}.tmp", std::process::id())
}

/// Returns a path to the uncompressed bytes of `path`: itself if it is not gzipped, else a cached inflated copy
/// named by the SHA-256 of the gzip file's bytes. A name from metadata (path, size, times, inode) can be shared by
/// two files: `cp -p`, `rsync -t` and tar restore the size and mtime, a deleted file's inode is reused at once,
/// and ctime ticks coarsely on many kernels and file systems; so the content names the entry, and a different
/// file can never be served another's pixels (at the cost of reading the gzip file once per open, ~65 ms for
/// Fashion-MNIST's 26 MB). An entry is used only if its header and length are the ones the file's header promises.
///
/// Inflating: only what the header promises is inflated, after the header is checked ([`expected_len`]) and found
/// to fit the gzip file (a gzip bomb, or a header claiming terabytes, fills no disk); then the stream must end
/// there, with every member's CRC-32 and ISIZE matching its trailer ([`Gunzip`]): a stream that ends sooner is a
/// truncated file, one that holds more is a corrupt or mismatched one (one byte past the promise is read, no more).
/// The bytes inflated are hashed again and must be the bytes that named the entry (a file rewritten meanwhile is an
/// error). A bad file leaves neither a temporary file nor an entry.
fn uncompressed(path: &Path, holds: Holds) -> Result<PathBuf, DataError> {
    let io = |e| DataError::io(path, e);
    let file = File::open(path).map_err(io)?;
    if !is_gzip(path, &file)? {
        return Ok(path.to_path_buf());
    }
    let len = file.metadata().map_err(io)?.len();
    let mut sha = sha2::Sha256::default();
    std::io::copy(&mut &file, &mut sha).map_err(io)?;
    let key = sha256_hex16(sha);
    let stem = path.file_name().unwrap_or_default().to_string_lossy().trim_end_matches(".gz").to_string();
    let dir = crate::cache_dir().join("idx");
    let out = dir.join(format!("{stem}-{key}"));

    (&file).seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    let hashing = Hashing { inner: file, sha: sha2::Sha256::default() };
    let mut dec = Gunzip::new(std::io::BufReader::with_capacity(1 << 16, hashing));
    let (dims, header_len) = read_header(path, &mut dec)?;
    let want = expected_len(path, &dims, holds)?;
    if want > len.saturating_mul(MAX_INFLATE_RATIO) {
        return Err(idx_err(path, format!("header promises {want} bytes, more than a {len}-byte gzip file can hold")));
    }
    if cached_entry_is_whole(&out, &dims, want) {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let tmp = dir.join(temp_name(&stem));
    let result = inflate_into(path, &mut dec, &tmp, (&dims, header_len, want)).and_then(|()| {
        if sha256_hex16(dec.r.into_inner().sha) != key {
            return Err(DataError::Invalid { path: path.into(), message: "changed while it was being read".into() });
        }
        std::fs::rename(&tmp, &out).map_err(|e| DataError::io(&out, e))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(out)
}

/// Writes the IDX header `dims` and the rest of `dec`'s stream (`want` bytes in all, header included) to `tmp`,
/// synced; the stream must end exactly there (see [`uncompressed`]).
fn inflate_into(
    path: &Path,
    dec: &mut impl Read,
    tmp: &Path,
    (dims, header_len, want): (&[u32], u64, u64),
) -> Result<(), DataError> {
    let bad = |e: std::io::Error| DataError::Invalid { path: path.into(), message: e.to_string() };
    let write_err = |e| DataError::io(tmp, e);
    let mut w = std::io::BufWriter::new(File::create(tmp).map_err(write_err)?);
    w.write_all(&[0, 0, 0x08, dims.len() as u8]).map_err(write_err)?;
    for d in dims {
        w.write_all(&d.to_be_bytes()).map_err(write_err)?;
    }
    let (mut left, mut buf) = (want - header_len, vec![0u8; 1 << 16]);
    while left > 0 {
        let n = dec.read(&mut buf[..left.min(1 << 16) as usize]).map_err(bad)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).map_err(write_err)?;
        left -= n as u64;
    }
    if left > 0 {
        return Err(idx_err(path, format!("truncated: header promises {want} bytes, file has {}", want - left)));
    }
    // The stream must end here (its last trailer is checked by this read): more data is not the file its header
    // describes. One byte is asked for, so a bomb after the promised data inflates no further.
    if dec.read(&mut [0u8; 1]).map_err(bad)? != 0 {
        return Err(idx_err(
            path,
            format!("the gzip stream inflates to more than the {want} bytes its header promises"),
        ));
    }
    w.flush().map_err(write_err)?;
    w.get_ref().sync_all().map_err(write_err)
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
        let raw = uncompressed(path, Holds::Images)?;
        let mut file = File::open(&raw).map_err(|e| DataError::io(path, e))?;
        let (dims, data_offset) = read_header(path, &mut file)?;
        let want = expected_len(path, &dims, Holds::Images)?;
        let (count, height, width) = (dims[0] as usize, dims[1], dims[2]);
        let have = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        if have < want {
            return Err(idx_err(path, format!("truncated: header promises {want} bytes, file has {have}")));
        }
        let labels = match labels_path(path) {
            Some(lp) => {
                let holds = Holds::Labels(dims[0], path);
                let mut lf = File::open(uncompressed(&lp, holds)?).map_err(|e| DataError::io(&lp, e))?;
                let (ldims, header) = read_header(&lp, &mut lf)?;
                let want = expected_len(&lp, &ldims, holds)?;
                let have = lf.metadata().map_err(|e| DataError::io(&lp, e))?.len();
                if have < want {
                    return Err(idx_err(
                        &lp,
                        format!("truncated labels: header promises {want} bytes, file has {have}"),
                    ));
                }
                // `count` bytes: no more than the images file holds pixels.
                let mut l = vec![0u8; count];
                lf.read_exact_at(&mut l, header).map_err(|e| DataError::io(&lp, e))?;
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
        let n = self.height as usize * self.width as usize;
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
