//! Image folders: JPEG, PNG, GIF (its first frame), WebP, TIFF and BMP files found recursively under a root,
//! recognised by extension ([`EXTENSIONS`]) and decoded by content. When the root holds only sub-folders, each
//! first-level sub-folder is a class (sorted by name, like torchvision's ImageFolder). Only the list of paths is
//! kept in memory; each `get` reads and decodes one file ([`decode_bytes`](super::decode_bytes)).
//!
//! Links: every real folder is listed once, whatever the paths to it. A symlinked folder is followed only if its
//! target ((device, inode)) was not listed yet, so a link to an ancestor (`ln -s .. up`) or to its own folder
//! (`ln -s . again`) is a cycle that is skipped, not a walk ~40 levels deep (or, with two such links, one that never
//! ends), and two links to one folder list it once. Likewise a file reached by two paths (a symlink or a hard link to
//! a file already listed) is one sample: one file, one sample, as with folders. Real entries are listed before
//! linked ones (symlinks are followed after the whole real tree), so a file found both ways is named by its real
//! path, and a link cannot pull another class's folder into its own class. What was left out is kept
//! ([`Source::skipped`]: `inspect` reports it) and warned about on stderr at open.
//!
//! A dangling link named like an image is listed: reading it fails, so it is counted and named as an unreadable
//! sample like any other; a dangling link with another name is skipped (and reported). Only regular files are
//! listed: a FIFO or a device named `x.png` would block or never end.
//!
//! Every other file is left out by name ([`SkipKind::NotAnImage`]: `.heic`, `.svg`, `.txt`, no extension), hidden
//! files and sidecars (`.DS_Store`, `Thumbs.db`, `.xmp`) included: the warning at open is one line of counts and
//! ten names, a small price next to photos in a format we do not read vanishing without a word. A hidden file
//! named like an image (macOS's `._IMG_1.jpg`) is listed, and reported unreadable if it is not one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use selfsup_augment::Image;

use super::{decode_bytes, read_file, DataError, Sample, SkipKind, Skipped, Source, DEFAULT_MAX_PIXELS};

/// The extensions (any case) of the files listed as samples: the formats `decode` reads (the `image` crate's
/// jpeg, png, gif, webp, tiff and bmp decoders).
pub const EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "gif", "webp", "tif", "tiff", "bmp"];
/// Skipped entries named one by one in the warning at open (all are in [`Source::skipped`]).
const WARN_NAMED: usize = 10;

pub struct ImageFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    classes: Vec<String>,
    channels: u8,
    max_pixels: u64,
    skipped: Vec<Skipped>,
}

fn is_image_name(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The formats read, for messages: ".jpg, .jpeg, ...".
fn formats() -> String {
    EXTENSIONS.map(|e| format!(".{e}")).join(", ")
}

/// Why a file not named as an image is left out.
fn not_an_image(p: &Path) -> String {
    match p.extension() {
        Some(e) => format!("extension .{}: not an image format read here ({})", e.to_string_lossy(), formats()),
        None => format!("no extension: not an image format read here ({})", formats()),
    }
}

/// (device, inode): what makes two paths one file or folder.
type FileId = (u64, u64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino())
}

/// The listing in progress: real folders depth-first in name order, symlinks queued and followed afterwards.
#[derive(Default)]
struct Walk {
    /// (label, path) of every sample, in listing order.
    files: Vec<(u32, PathBuf)>,
    /// Every folder listed (or being listed), with the path it was listed under.
    dirs: HashMap<FileId, PathBuf>,
    /// Files listed that another path may reach again: hard-linked files (more than one link) and link targets.
    /// A file with one link reached through its real entry needs no entry: its folder is listed once.
    shared_files: HashSet<FileId>,
    /// Symlinks met (with the label of the class they were met in), followed after the real tree.
    links: VecDeque<(PathBuf, u32)>,
    skipped: Vec<Skipped>,
}

fn sorted_entries(dir: &Path) -> Result<Vec<(PathBuf, std::fs::FileType)>, DataError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().and_then(|e| Some((e.path(), e.file_type().ok()?))))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

impl Walk {
    fn skip(&mut self, path: &Path, kind: SkipKind, detail: String) {
        self.skipped.push(Skipped { path: path.display().to_string(), kind, detail });
    }

    /// Lists folder `dir` (already recorded in `dirs`) and the real folders under it, depth-first in name order
    /// (an explicit stack: no recursion limit on deep trees); symlinks are queued.
    fn folder(&mut self, dir: &Path, label: u32) -> Result<(), DataError> {
        let mut stack = vec![sorted_entries(dir)?.into_iter()];
        while let Some(top) = stack.last_mut() {
            let Some((path, kind)) = top.next() else {
                stack.pop();
                continue;
            };
            if kind.is_symlink() {
                self.links.push_back((path, label));
            } else if kind.is_dir() {
                let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
                if let Some(first) = self.dirs.get(&file_id(&meta)) {
                    let detail = format!("the same folder as {} (a bind mount?), listed once", first.display());
                    self.skip(&path, SkipKind::SameFolder, detail);
                    continue;
                }
                self.dirs.insert(file_id(&meta), path.clone());
                stack.push(sorted_entries(&path)?.into_iter());
            } else if is_image_name(&path) {
                if !kind.is_file() {
                    self.skip(&path, SkipKind::NotRegular, "not a regular file (FIFO, socket or device)".into());
                    continue;
                }
                match std::fs::metadata(&path) {
                    // Gone since the listing: listed, and reported unreadable when read.
                    Err(_) => self.files.push((label, path)),
                    Ok(meta) => self.real_file(path, &meta, label),
                }
            } else {
                let detail = not_an_image(&path);
                self.skip(&path, SkipKind::NotAnImage, detail);
            }
        }
        Ok(())
    }

    /// A regular file met through its folder: listed unless a link (or another hard link) listed it already.
    fn real_file(&mut self, path: PathBuf, meta: &std::fs::Metadata, label: u32) {
        let id = file_id(meta);
        if self.shared_files.contains(&id) {
            self.skip(&path, SkipKind::SameFile, "another path to a file already listed (through a link)".into());
            return;
        }
        if meta.nlink() > 1 {
            self.shared_files.insert(id);
        }
        self.files.push((label, path));
    }

    /// Follows the queued symlinks (and those found in the folders they lead to).
    fn follow_links(&mut self) -> Result<(), DataError> {
        while let Some((link, label)) = self.links.pop_front() {
            let meta = match std::fs::metadata(&link) {
                Ok(m) => m,
                // Named like an image: a sample that is reported unreadable ("No such file"), like a missing file.
                Err(_) if is_image_name(&link) => {
                    self.files.push((label, link));
                    continue;
                }
                Err(e) => {
                    let target = std::fs::read_link(&link).map(|t| t.display().to_string()).unwrap_or_default();
                    self.skip(&link, SkipKind::Dangling, format!("dangling link to {target:?} ({e})"));
                    continue;
                }
            };
            let id = file_id(&meta);
            if meta.is_dir() {
                if let Some(first) = self.dirs.get(&id) {
                    let (kind, detail) = self.revisit(&link, first);
                    self.skip(&link, kind, detail);
                    continue;
                }
                self.dirs.insert(id, link.clone());
                self.folder(&link, label)?;
            } else if !is_image_name(&link) {
                let detail = format!("a link to a file: {}", not_an_image(&link));
                self.skip(&link, SkipKind::NotAnImage, detail);
            } else if !meta.is_file() {
                self.skip(&link, SkipKind::NotRegular, "links to something not a regular file".into());
            } else if let Some(first) = self.listed_as(&link, &meta) {
                self.skip(&link, SkipKind::SameFile, format!("another path to {first}, listed once"));
            } else {
                self.shared_files.insert(id);
                self.files.push((label, link));
            }
        }
        Ok(())
    }

    /// Whether the file behind `link` is listed already, and under which path.
    fn listed_as(&self, link: &Path, meta: &std::fs::Metadata) -> Option<String> {
        if self.shared_files.contains(&file_id(meta)) {
            return Some("a file already listed".into());
        }
        // One link: its only real entry is its canonical path, listed iff its folder was and it has an image name.
        let real = std::fs::canonicalize(link).ok()?;
        let dir = std::fs::metadata(real.parent()?).ok()?;
        let listed = self.dirs.get(&file_id(&dir))?;
        let name = real.file_name()?;
        (meta.nlink() == 1 && is_image_name(&real)).then(|| listed.join(name).display().to_string())
    }

    /// Why a link to the already listed folder `first` is skipped: a cycle when it points to a folder above it.
    fn revisit(&self, link: &Path, first: &Path) -> (SkipKind, String) {
        let target = std::fs::canonicalize(link).ok();
        let here = link.parent().and_then(|p| std::fs::canonicalize(p).ok());
        match (target, here) {
            (Some(t), Some(h)) if h.starts_with(&t) => {
                (SkipKind::Cycle, format!("a cycle: links to {}, a folder that contains it", first.display()))
            }
            _ => (SkipKind::SameFolder, format!("another path to {}, listed once", first.display())),
        }
    }
}

fn warn_skipped(root: &Path, skipped: &[Skipped]) {
    if skipped.is_empty() {
        return;
    }
    let counts = super::skip_counts(skipped);
    crate::say!("warning: {}: {} entries left out while listing ({counts})", root.display(), skipped.len());
    for s in skipped.iter().take(WARN_NAMED) {
        crate::say!("  {s}");
    }
    if skipped.len() > WARN_NAMED {
        crate::say!("  ... and {} more (selfsup inspect lists them all)", skipped.len() - WARN_NAMED);
    }
}

impl ImageFolder {
    pub fn open(root: &Path, channels: u8) -> Result<Self, DataError> {
        if channels != 1 && channels != 3 {
            return Err(DataError::Invalid {
                path: root.into(),
                message: format!("channels must be 1 or 3, got {channels}"),
            });
        }
        let top = sorted_entries(root)?;
        // Sub-folders (or links to folders) only: each is a class.
        let class_dirs = !top.is_empty() && top.iter().all(|(p, _)| p.is_dir());
        let mut walk = Walk::default();
        let root_meta = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
        walk.dirs.insert(file_id(&root_meta), root.to_path_buf());
        let mut classes = Vec::new();
        if class_dirs {
            for (dir, _) in &top {
                let meta = std::fs::metadata(dir).map_err(|e| DataError::io(dir, e))?;
                if let Some(first) = walk.dirs.get(&file_id(&meta)) {
                    let (kind, detail) = walk.revisit(dir, first);
                    walk.skip(dir, kind, detail + " (not a class)");
                    continue;
                }
                walk.dirs.insert(file_id(&meta), dir.clone());
                walk.folder(dir, classes.len() as u32)?;
                classes.push(dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
            }
        } else {
            walk.folder(root, 0)?;
        }
        walk.follow_links()?;
        // Files reached through links come last; keep each class's files together (a stable sort: in listing order).
        walk.files.sort_by_key(|&(label, _)| label);
        if walk.files.is_empty() {
            let others: Vec<&Skipped> = walk.skipped.iter().filter(|s| s.kind == SkipKind::NotAnImage).collect();
            let message = match others.first() {
                None => format!("no image files found ({})", formats()),
                Some(first) => format!(
                    "no image files found ({}); {} other files left out, e.g. {}",
                    formats(),
                    others.len(),
                    first.path
                ),
            };
            return Err(DataError::Invalid { path: root.into(), message });
        }
        warn_skipped(root, &walk.skipped);
        let (labels, files): (Vec<u32>, Vec<PathBuf>) = walk.files.into_iter().unzip();
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files,
            labels: class_dirs.then_some(labels),
            classes,
            channels,
            max_pixels: DEFAULT_MAX_PIXELS,
            skipped: walk.skipped,
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
        let bytes = read_file(path, self.max_pixels)?;
        decode_bytes(&bytes, self.channels, self.max_pixels, path)
    }

    /// The file behind sample `index` (`pack --encoded` stores its bytes as they are).
    pub fn file(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(PathBuf::as_path)
    }
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

    fn skipped(&self) -> Vec<Skipped> {
        self.skipped.clone()
    }
}
