//! `selfsup inspect`: what a dataset holds before training on it: counts, the image-size histogram, unreadable
//! samples (with where they live and why), what the listing left out (link cycles, second paths to a file, files
//! in no image format read), exact duplicates (same decoded pixels), and class balance.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rayon::prelude::*;
use selfsup_augment::Image;
use serde::Serialize;

use crate::loader::BadSample;
use crate::pack::{fnv1a64, FNV_OFFSET};
use crate::source::{Skipped, Source};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SizeCount {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub count: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClassCount {
    pub class: String,
    pub count: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub count: usize,
    pub readable: usize,
    pub unreadable: Vec<BadSample>,
    /// What the source left out on purpose while listing (folder links that are cycles, second paths to one file).
    pub skipped: Vec<Skipped>,
    /// Distinct (width, height, channels), most frequent first.
    pub sizes: Vec<SizeCount>,
    /// Groups of samples with identical decoded pixels (by a 64-bit FNV-1a hash of size and pixels).
    pub duplicate_groups: Vec<Vec<String>>,
    /// Samples that are a copy of an earlier one.
    pub duplicates: usize,
    /// Samples per class, when the source has labels.
    pub classes: Option<Vec<ClassCount>>,
    pub seconds: f64,
}

/// 64-bit FNV-1a of an image's size, channels and pixels: equal images hash equal.
pub fn content_hash(image: &Image) -> u64 {
    let header = [image.width.to_le_bytes(), image.height.to_le_bytes(), u32::from(image.channels).to_le_bytes()];
    fnv1a64(fnv1a64(FNV_OFFSET, header.as_flattened()), &image.data)
}

/// Reads every sample of `source` once, in parallel on the current rayon pool (`progress`: a bar on stderr).
pub fn inspect(source: &dyn Source, path: &str, progress: bool) -> InspectReport {
    let t0 = Instant::now();
    let n = source.len();
    type Seen = Result<(u32, u32, u8, u64), BadSample>;
    let mut task = crate::progress::Task::new("inspect", "images", n as u64, progress);
    let mut seen: Vec<Seen> = Vec::with_capacity(n);
    // In blocks, so the bar moves; each block in parallel.
    for block in (0..n).collect::<Vec<_>>().chunks(4096) {
        let part: Vec<Seen> = block
            .par_iter()
            .map(|&i| {
                source
                    .get(i)
                    .map(|s| (s.image.width, s.image.height, s.image.channels, content_hash(&s.image)))
                    .map_err(|e| BadSample { index: i, location: source.describe(i), error: e.to_string() })
            })
            .collect();
        task.inc(part.len() as u64);
        seen.extend(part);
    }
    task.finish();
    let mut sizes: HashMap<(u32, u32, u8), usize> = HashMap::new();
    let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut unreadable = Vec::new();
    for (i, r) in seen.into_iter().enumerate() {
        match r {
            Ok((w, h, c, hash)) => {
                *sizes.entry((w, h, c)).or_default() += 1;
                by_hash.entry(hash).or_default().push(i);
            }
            Err(b) => unreadable.push(b),
        }
    }
    let mut sizes: Vec<SizeCount> = sizes
        .into_iter()
        .map(|((width, height, channels), count)| SizeCount { width, height, channels, count })
        .collect();
    sizes.sort_by(|a, b| b.count.cmp(&a.count).then((a.width, a.height).cmp(&(b.width, b.height))));
    let mut groups: Vec<Vec<usize>> = by_hash.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    let duplicates = groups.iter().map(|g| g.len() - 1).sum();
    let duplicate_groups = groups.iter().map(|g| g.iter().map(|&i| source.describe(i)).collect()).collect();
    let classes = source.labels().map(|labels| {
        let names = source.class_names();
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for l in labels {
            *counts.entry(l).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(l, count)| ClassCount {
                class: names.get(l as usize).cloned().unwrap_or_else(|| l.to_string()),
                count,
            })
            .collect()
    });
    InspectReport {
        path: path.to_string(),
        count: n,
        readable: n - unreadable.len(),
        unreadable,
        skipped: source.skipped(),
        sizes,
        duplicate_groups,
        duplicates,
        classes,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

impl std::fmt::Display for InspectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} samples, {} readable, {} unreadable",
            self.path,
            self.count,
            self.readable,
            self.unreadable.len()
        )?;
        if !self.skipped.is_empty() {
            let counts = crate::source::skip_counts(&self.skipped);
            writeln!(f, "left out while listing: {} ({counts})", self.skipped.len())?;
            for s in self.skipped.iter().take(20) {
                writeln!(f, "  skipped {s}")?;
            }
            if self.skipped.len() > 20 {
                writeln!(f, "  ... and {} more (all in the JSON report)", self.skipped.len() - 20)?;
            }
        }
        writeln!(f, "image sizes (width x height x channels):")?;
        for s in self.sizes.iter().take(15) {
            writeln!(f, "  {:>5} x {:<5} x {}  {:>9}", s.width, s.height, s.channels, s.count)?;
        }
        if self.sizes.len() > 15 {
            writeln!(f, "  ... {} more sizes", self.sizes.len() - 15)?;
        }
        writeln!(f, "exact duplicates: {} in {} groups", self.duplicates, self.duplicate_groups.len())?;
        for g in self.duplicate_groups.iter().take(5) {
            writeln!(f, "  {}", g.join("  =  "))?;
        }
        if let Some(classes) = &self.classes {
            let (min, max) = classes.iter().fold((usize::MAX, 0), |(lo, hi), c| (lo.min(c.count), hi.max(c.count)));
            writeln!(f, "classes: {} (smallest {min}, largest {max})", classes.len())?;
            for c in classes.iter().take(20) {
                writeln!(f, "  {:<20} {:>9}", c.class, c.count)?;
            }
        } else {
            writeln!(f, "classes: no labels")?;
        }
        for b in self.unreadable.iter().take(20) {
            writeln!(f, "unreadable: {}: {}", b.location, b.error)?;
        }
        write!(f, "({:.1}s)", self.seconds)
    }
}
