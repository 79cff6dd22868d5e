//! CIFAR-10 / CIFAR-100 binary batches (https://www.cs.toronto.edu/~kriz/cifar.html): fixed-size records of a label
//! byte (CIFAR-100: coarse then fine label) and 3072 bytes of planar 32x32 RGB. A source is one `.bin` file or a
//! folder holding the training batches (`data_batch_*.bin` for CIFAR-10, `train.bin` for CIFAR-100). Samples are read
//! with positioned reads; only the labels are held in memory. Class names come from `batches.meta.txt` or
//! `fine_label_names.txt` beside the files when present. A file must be a whole number of records, and every label
//! byte in range (0..=9; CIFAR-100: coarse 0..=19, fine 0..=99), or it is refused at open with the record named.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use selfsup_augment::Image;

use super::{DataError, Sample, Source};

const SIDE: u32 = 32;
const PIXELS: usize = (SIDE * SIDE) as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    /// 1 label byte per record.
    Cifar10,
    /// Coarse and fine label bytes per record; the fine label (100 classes) is the label.
    Cifar100,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }
    fn record(self) -> usize {
        self.label_bytes() + 3 * PIXELS
    }
    /// Classes of each label byte (CIFAR-100: coarse, then fine).
    fn classes(self) -> &'static [u8] {
        match self {
            CifarKind::Cifar10 => &[10],
            CifarKind::Cifar100 => &[20, 100],
        }
    }
    fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 => "CIFAR-100",
        }
    }
}

struct Part {
    path: PathBuf,
    file: File,
    records: usize,
}

pub struct CifarSource {
    kind: CifarKind,
    parts: Vec<Part>,
    labels: Vec<u8>,
    classes: Vec<String>,
}

fn invalid(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Invalid { path: path.to_path_buf(), message: message.into() }
}

/// Whether `path` looks like CIFAR binary data (a `.bin` file, or a folder with the standard batch files).
pub fn is_cifar(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("data_batch_1.bin").is_file() || path.join("train.bin").is_file();
    }
    path.extension().is_some_and(|e| e == "bin")
}

fn kind_of(path: &Path, len: u64) -> Result<CifarKind, DataError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let by_name = if name.starts_with("data_batch") || name.starts_with("test_batch") {
        Some(CifarKind::Cifar10)
    } else if name == "train.bin" || name == "test.bin" {
        Some(CifarKind::Cifar100)
    } else {
        None
    };
    let fits = |k: CifarKind| len > 0 && len.is_multiple_of(k.record() as u64);
    match by_name {
        Some(k) if fits(k) => Ok(k),
        Some(k) => Err(invalid(path, format!("{len} bytes is not a whole number of {}-byte records", k.record()))),
        None => match (fits(CifarKind::Cifar10), fits(CifarKind::Cifar100)) {
            (true, false) => Ok(CifarKind::Cifar10),
            (false, true) => Ok(CifarKind::Cifar100),
            _ => Err(invalid(
                path,
                format!("{len} bytes fits neither CIFAR-10 (3073-byte) nor CIFAR-100 (3074-byte) records"),
            )),
        },
    }
}

fn class_names(dir: &Path, kind: CifarKind) -> Vec<String> {
    let file = match kind {
        CifarKind::Cifar10 => "batches.meta.txt",
        CifarKind::Cifar100 => "fine_label_names.txt",
    };
    std::fs::read_to_string(dir.join(file))
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

impl CifarSource {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let batches: Vec<PathBuf> =
                (1..=5).map(|i| path.join(format!("data_batch_{i}.bin"))).filter(|p| p.is_file()).collect();
            if batches.is_empty() {
                vec![path.join("train.bin")]
            } else {
                batches
            }
        } else {
            vec![path.to_path_buf()]
        };
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        let mut kind = None;
        for f in files {
            let file = File::open(&f).map_err(|e| DataError::io(&f, e))?;
            let len = file.metadata().map_err(|e| DataError::io(&f, e))?.len();
            let k = kind_of(&f, len)?;
            if kind.is_some_and(|prev| prev != k) {
                return Err(invalid(&f, "mixes CIFAR-10 and CIFAR-100 records"));
            }
            kind = Some(k);
            let records = (len / k.record() as u64) as usize;
            // The fine label is the last label byte of each record. A label byte out of range means the file is not
            // what its size says (records misaligned, another format) or is corrupt: refused, naming the record.
            let mut b = [0u8; 2];
            let b = &mut b[..k.label_bytes()];
            for r in 0..records {
                file.read_exact_at(b, (r * k.record()) as u64).map_err(|e| DataError::io(&f, e))?;
                for (&label, &classes) in b.iter().zip(k.classes()) {
                    if label >= classes {
                        let what = if classes == 20 { "coarse label" } else { "label" };
                        return Err(invalid(
                            &f,
                            format!(
                                "record {r}: {what} {label} is out of range for {} (0..={})",
                                k.name(),
                                classes - 1
                            ),
                        ));
                    }
                }
                labels.push(b[k.label_bytes() - 1]);
            }
            parts.push(Part { path: f, file, records });
        }
        let kind = kind.ok_or_else(|| invalid(path, "no CIFAR batch files"))?;
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        Ok(CifarSource { kind, parts, labels, classes: class_names(dir, kind) })
    }

    pub fn kind(&self) -> CifarKind {
        self.kind
    }

    fn locate(&self, mut index: usize) -> Option<(&Part, usize)> {
        for p in &self.parts {
            if index < p.records {
                return Some((p, index));
            }
            index -= p.records;
        }
        None
    }
}

impl Source for CifarSource {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (part, r) = self
            .locate(index)
            .ok_or_else(|| invalid(&self.parts[0].path, format!("index {index} out of range ({})", self.len())))?;
        let mut planar = [0u8; 3 * PIXELS];
        let at = (r * self.kind.record() + self.kind.label_bytes()) as u64;
        part.file.read_exact_at(&mut planar, at).map_err(|e| DataError::io(&part.path, e))?;
        // Planar RRR..GGG..BBB → interleaved RGB.
        let mut data = vec![0u8; 3 * PIXELS];
        for (i, px) in data.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&[planar[i], planar[PIXELS + i], planar[2 * PIXELS + i]]);
        }
        let image = Image { width: SIDE, height: SIDE, channels: 3, data };
        Ok(Sample { image, label: Some(i64::from(self.labels[index])) })
    }

    fn channels(&self) -> u8 {
        3
    }

    fn describe(&self, index: usize) -> String {
        match self.locate(index) {
            Some((p, r)) => format!("{}#{r}", p.path.display()),
            None => format!("#{index}"),
        }
    }

    fn num_classes(&self) -> Option<usize> {
        Some(match self.kind {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        })
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn labels(&self) -> Option<Vec<i64>> {
        Some(self.labels.iter().map(|&l| i64::from(l)).collect())
    }
}
