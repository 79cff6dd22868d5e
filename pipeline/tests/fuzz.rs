//! Bad data never breaks a run: 1,000 corrupt, truncated, zero-byte, wrong-extension and absurd-dimension files among
//! good images. The loader must not panic, must name every file it cannot read, and must deliver every good image.

mod common;

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use selfsup_augment::{RecipeConfig, Views};
use selfsup_pipeline::loader::{Loader, LoaderConfig};
use selfsup_pipeline::source::{self, Source};

/// A small deterministic generator (the test must be reproducible).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn encode(w: u32, h: u32, seed: u8, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8 ^ seed, (y * 3) as u8, seed]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// A JPEG that starts like a real one but whose frame header claims 65500 x 65500 pixels.
fn huge_jpeg(seed: u8) -> Vec<u8> {
    let mut v = encode(16, 16, seed, image::ImageFormat::Jpeg);
    let sof = v.windows(2).position(|w| w == [0xff, 0xc0]).expect("baseline JPEG has SOF0");
    v[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xdc, 0xff, 0xdc]);
    v
}

#[test]
fn a_thousand_bad_files_never_break_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Lcg(2024);
    let mut good = BTreeSet::new();
    let mut bad = BTreeSet::new();
    let mut maybe = BTreeSet::new(); // damage no decoder can always detect (bit flips in compressed data)
    let put = |name: String, bytes: &[u8], set: &mut BTreeSet<String>| {
        std::fs::write(dir.path().join(&name), bytes).unwrap();
        set.insert(name);
    };
    for i in 0..100u32 {
        let (w, h) = (8 + rng.below(57) as u32, 8 + rng.below(57) as u32);
        let (fmt, ext) = if i % 2 == 0 { (image::ImageFormat::Png, "png") } else { (image::ImageFormat::Jpeg, "jpg") };
        put(format!("good-{i:03}.{ext}"), &encode(w, h, i as u8, fmt), &mut good);
    }
    let png = encode(40, 30, 9, image::ImageFormat::Png);
    let jpg = encode(40, 30, 9, image::ImageFormat::Jpeg);
    for i in 0..1000u32 {
        match i % 8 {
            0 => put(format!("bad-{i:04}-zero.png"), &[], &mut bad),
            1 => {
                let junk: Vec<u8> = (0..1 + rng.below(4000)).map(|_| rng.next() as u8).collect();
                put(format!("bad-{i:04}-junk.jpg"), &junk, &mut bad)
            }
            2 => {
                let cut = 8 + rng.below(png.len() as u64 - 20) as usize;
                put(format!("bad-{i:04}-truncated.png"), &png[..cut], &mut bad)
            }
            3 => {
                let cut = 2 + rng.below(jpg.len() as u64 - 4) as usize;
                // Cut before its end-of-image marker: an error, never pixels filled in grey.
                put(format!("bad-{i:04}-truncated.jpeg"), &jpg[..cut], &mut bad)
            }
            4 => put(format!("bad-{i:04}-text.png"), b"<html>not an image</html>", &mut bad),
            5 => put(format!("bad-{i:04}-huge.png"), &common::huge_png(100_000, 100_000), &mut bad),
            6 => put(format!("bad-{i:04}-huge.jpg"), &huge_jpeg(i as u8), &mut bad),
            _ => {
                let mut flipped = png.clone();
                for _ in 0..4 {
                    let at = 8 + rng.below(flipped.len() as u64 - 8) as usize;
                    flipped[at] ^= 1 << rng.below(8);
                }
                put(format!("maybe-{i:04}-bitflip.png"), &flipped, &mut maybe)
            }
        }
    }
    assert_eq!(good.len() + bad.len() + maybe.len(), 1100);

    let src: Arc<dyn Source> = source::open(dir.path(), 3).unwrap().into();
    assert_eq!(src.len(), 1100);
    let recipe = RecipeConfig::simclr(24, 3);
    let views = Arc::new(Views::new(vec![recipe.build(3).unwrap(), recipe.build(3).unwrap()]));
    let cfg = LoaderConfig {
        batch_size: 64,
        threads: 2,
        prefetch: 2,
        seed: 3,
        shuffle: true,
        full_shuffle: false,
        drop_last: false,
        slice: (0, 1),
    };
    let loader = Loader::new(src.clone(), views, cfg).unwrap();
    let name = |loc: &str| Path::new(loc).file_name().unwrap().to_string_lossy().into_owned();
    let (mut delivered, mut reported) = (BTreeSet::new(), BTreeSet::new());
    let mut errors = std::collections::BTreeMap::new();
    let start = std::time::Instant::now();
    for batch in loader.epoch(0) {
        assert_eq!(batch.views[0].len(), batch.len() * 3 * 24 * 24);
        assert!(batch.views.iter().flatten().all(|x| x.is_finite()));
        delivered.extend(batch.indices.iter().map(|&i| name(&src.describe(i))));
        for b in &batch.bad {
            assert!(!b.error.is_empty());
            assert!(reported.insert(name(&b.location)), "{} reported twice", b.location);
            errors.insert(name(&b.location), b.error.clone());
        }
    }
    assert!(start.elapsed().as_secs() < 60, "refusing huge images must be cheap");
    assert_eq!(delivered.len() + reported.len(), 1100, "every file is either delivered or reported");
    assert!(good.is_subset(&delivered), "missing good images: {:?}", good.difference(&delivered).collect::<Vec<_>>());
    assert!(
        bad.is_subset(&reported),
        "bad files not reported: {:?}",
        bad.difference(&reported).take(5).collect::<Vec<_>>()
    );
    assert!(reported.is_subset(&bad.union(&maybe).cloned().collect()), "a good file was reported");
    // Absurd dimensions are refused by the pixel limit, from the header, before any allocation.
    for (file, error) in errors.iter().filter(|(f, _)| f.contains("-huge.")) {
        assert!(error.contains("exceeds the limit"), "{file}: {error}");
    }
}
