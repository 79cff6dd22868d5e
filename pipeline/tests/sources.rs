//! Sources on real files: IDX (gzip and raw give the same pixels), image folders with class sub-folders, and
//! bad files that are counted and named without stopping the good ones.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use selfsup_augment::{RecipeConfig, Views};
use selfsup_pipeline::loader::{Loader, LoaderConfig};
use selfsup_pipeline::source::{self, IdxSource, ImageFolder, Source};

#[test]
fn idx_gzip_and_raw_agree_and_labels_are_found() {
    let gz = IdxSource::open(common::fmnist_train()).unwrap();
    assert_eq!(gz.len(), 60_000);
    assert_eq!(gz.num_classes(), Some(10));
    let labels = gz.labels().unwrap();
    assert_eq!(labels.len(), 60_000);
    // Fashion-MNIST's first training label is 9 (ankle boot) and classes are balanced (6000 each).
    assert_eq!(labels[0], 9);
    assert!((0..10).all(|c| labels.iter().filter(|&&l| l == c).count() == 6000));

    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("train-images-idx3-ubyte");
    let mut dec = flate2::read::GzDecoder::new(std::fs::File::open(common::fmnist_train()).unwrap());
    std::io::copy(&mut dec, &mut std::fs::File::create(&raw).unwrap()).unwrap();
    let raw_src = IdxSource::open(&raw).unwrap();
    assert_eq!(raw_src.labels(), None, "no labels file beside the raw copy");
    for i in [0, 1, 12_345, 59_999] {
        let (a, b) = (gz.get(i).unwrap(), raw_src.get(i).unwrap());
        assert_eq!(a.image, b.image);
        assert_eq!((a.image.width, a.image.height, a.image.channels), (28, 28, 1));
        assert_eq!(a.label, Some(labels[i]));
    }
    assert!(gz.get(60_000).is_err());
}

#[test]
fn truncated_or_bad_idx_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x-images-idx3-ubyte");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&[0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28]).unwrap();
    f.write_all(&[0u8; 100]).unwrap();
    let e = IdxSource::open(&p).err().expect("truncated").to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&p, b"not an idx file").unwrap();
    assert!(IdxSource::open(&p).err().unwrap().to_string().contains("magic"));
}

fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
    img.save(path).unwrap();
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A well-formed PNG whose header claims `w` x `h` RGB pixels, followed by a few bytes of image data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut v, b"IHDR", &ihdr);
    chunk(&mut v, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(&mut v, b"IEND", &[]);
    v
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn image_folder_with_classes_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [("cat", 5), ("dog", 4)] {
        let d = dir.path().join(class);
        std::fs::create_dir_all(d.join("nested")).unwrap();
        for i in 0..n {
            write_png(&d.join(format!("{i}.png")), 40 + i, 30, i as u8);
        }
        // A real JPEG in a nested folder, and a PNG with a .jpg extension (decoded by content).
        image::RgbImage::from_pixel(33, 33, image::Rgb([200, 10, 10])).save(d.join("nested/a.jpeg")).unwrap();
        write_png(&d.join("nested/b.png"), 20, 20, 7);
        std::fs::rename(d.join("nested/b.png"), d.join("nested/b.jpg")).unwrap();
    }
    let bad = [
        ("cat/zero.png", Vec::new()),
        ("cat/garbage.jpg", b"this is not a jpeg at all".to_vec()),
        ("dog/huge.png", png_header(100_000, 100_000)),
        ("dog/truncated.png", {
            let mut v = Vec::new();
            image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
                .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
                .unwrap();
            v.truncate(v.len() / 2);
            v
        }),
    ];
    for (name, bytes) in &bad {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    std::fs::write(dir.path().join("cat/notes.txt"), "ignored: not an image extension").unwrap();

    let folder = ImageFolder::open(dir.path(), 3).unwrap();
    assert_eq!(folder.len(), 5 + 2 + 4 + 2 + bad.len());
    assert_eq!(folder.class_names(), vec!["cat".to_string(), "dog".into()]);
    assert_eq!(folder.num_classes(), Some(2));
    let huge = (0..folder.len()).find(|&i| folder.describe(i).ends_with("huge.png")).unwrap();
    let e = folder.get(huge).unwrap_err().to_string();
    assert!(e.contains("exceeds the limit"), "{e}");

    let src: Arc<dyn Source> = source::open(dir.path(), 3).unwrap().into();
    let recipe = RecipeConfig::simclr(16, 3);
    let views = Arc::new(Views::new(vec![recipe.build(3).unwrap(), recipe.build(3).unwrap()]));
    let cfg = LoaderConfig { batch_size: 6, threads: 2, prefetch: 2, seed: 1, shuffle: true, drop_last: false };
    let loader = Loader::new(src, views, cfg).unwrap();
    let batches: Vec<_> = loader.epoch(0).collect();
    let good: usize = batches.iter().map(|b| b.len()).sum();
    let reported: Vec<String> = batches.iter().flat_map(|b| b.bad.iter().map(|x| x.location.clone())).collect();
    assert_eq!(good, 13, "every good image delivered");
    assert_eq!(reported.len(), bad.len(), "every bad file counted: {reported:?}");
    for (name, _) in &bad {
        assert!(reported.iter().any(|r| r.ends_with(name)), "{name} named in {reported:?}");
    }
    for b in &batches {
        assert_eq!(b.views[0].len(), b.len() * 3 * 16 * 16, "rows compacted over dropped samples");
        assert_eq!(b.labels.as_ref().map(Vec::len), Some(b.len()));
    }
}
