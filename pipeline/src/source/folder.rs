//! Image folders: JPEG and PNG files found recursively under a root. When the root holds only sub-folders, each
//! first-level sub-folder is a class (sorted by name, like torchvision's ImageFolder). Only the list of paths is
//! kept in memory; each `get` reads and decodes one file.

use std::path::{Path, PathBuf};

use selfsup_augment::Image;

use super::{DataError, Sample, Source};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];
/// Decoding refuses images whose header claims more pixels than this (a 100k x 100k PNG is not allocated).
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

pub struct ImageFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    classes: Vec<String>,
    channels: u8,
    max_pixels: u64,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    pub fn open(root: &Path, channels: u8) -> Result<Self, DataError> {
        if channels != 1 && channels != 3 {
            return Err(DataError::Invalid {
                path: root.into(),
                message: format!("channels must be 1 or 3, got {channels}"),
            });
        }
        let mut top: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| DataError::io(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        top.sort();
        let class_dirs = !top.is_empty() && top.iter().all(|p| p.is_dir());
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut classes = Vec::new();
        if class_dirs {
            for dir in &top {
                let before = files.len();
                walk(dir, &mut files)?;
                labels.extend(std::iter::repeat_n(classes.len() as u32, files.len() - before));
                classes.push(dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
            }
        } else {
            walk(root, &mut files)?;
        }
        if files.is_empty() {
            return Err(DataError::Invalid { path: root.into(), message: "no .jpg/.jpeg/.png files found".into() });
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files,
            labels: class_dirs.then_some(labels),
            classes,
            channels,
            max_pixels: DEFAULT_MAX_PIXELS,
        })
    }

    /// Refuse images whose header claims more than `max_pixels` pixels.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn decode(&self, path: &Path) -> Result<Image, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        decode_bytes(&bytes, self.channels, self.max_pixels, path)
    }

    /// The file behind sample `index` (`pack --encoded` stores its bytes as they are).
    pub fn file(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(PathBuf::as_path)
    }
}

/// Decodes one encoded image (PNG or JPEG, recognised by content) to `channels` (1 or 3) channels, refusing
/// images whose header claims more than `max_pixels` pixels. `path` only names the image in errors.
pub(crate) fn decode_bytes(bytes: &[u8], channels: u8, max_pixels: u64, path: &Path) -> Result<Image, DataError> {
    super::timed_decode(|| decode_bytes_untimed(bytes, channels, max_pixels, path))
}

fn decode_bytes_untimed(bytes: &[u8], channels: u8, max_pixels: u64, path: &Path) -> Result<Image, DataError> {
    let reader = || -> Result<_, DataError> {
        // The format comes from the content, not the extension (a PNG named .jpg still decodes).
        let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?;
        r.limits(limits_for(max_pixels));
        Ok(r)
    };
    let decode_err = |source| DataError::Decode { path: path.to_path_buf(), source };
    // Dimensions from the header are checked against the pixel limit before anything is allocated.
    let (w, h) = reader()?.into_dimensions().map_err(decode_err)?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(DataError::Invalid {
            path: path.into(),
            message: format!("{w}x{h} pixels exceeds the limit of {max_pixels}"),
        });
    }
    let img = reader()?.decode().map_err(decode_err)?;
    let (width, height) = (img.width(), img.height());
    let data = if channels == 1 { img.into_luma8().into_raw() } else { img.into_rgb8().into_raw() };
    Ok(Image { width, height, channels, data })
}

fn limits_for(max_pixels: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(4));
    limits
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let path = self.files.get(index).ok_or_else(|| DataError::Invalid {
            path: self.root.clone(),
            message: format!("index {index} out of range ({})", self.files.len()),
        })?;
        let image = self.decode(path)?;
        Ok(Sample { image, label: self.labels.as_ref().map(|l| l[index] as i64) })
    }

    fn channels(&self) -> u8 {
        self.channels
    }

    fn describe(&self, index: usize) -> String {
        self.files.get(index).map_or_else(|| format!("#{index}"), |p| p.display().to_string())
    }

    fn num_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|_| self.classes.len())
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn labels(&self) -> Option<Vec<i64>> {
        self.labels.as_ref().map(|l| l.iter().map(|&x| x as i64).collect())
    }
}
