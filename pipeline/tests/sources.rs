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
        ("dog/huge.png", common::huge_png(100_000, 100_000)),
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
    let cfg = LoaderConfig {
        batch_size: 6,
        threads: 2,
        prefetch: 2,
        seed: 1,
        shuffle: true,
        full_shuffle: false,
        drop_last: false,
    };
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

/// A CIFAR record: label byte(s), then planar R, G, B planes of 32x32, with pixel values derived from (record, channel, i).
fn cifar_record(labels: &[u8], r: usize) -> Vec<u8> {
    let mut v = labels.to_vec();
    for c in 0..3 {
        v.extend((0..1024).map(|i| ((r * 7 + c * 50 + i) % 251) as u8));
    }
    v
}

#[test]
fn cifar10_and_cifar100_binary_batches() {
    use selfsup_pipeline::source::{CifarKind, CifarSource};
    let dir = tempfile::tempdir().unwrap();
    // CIFAR-10: two training batches of 3 and 2 records, and class names.
    let b1: Vec<u8> = (0..3).flat_map(|r| cifar_record(&[r as u8], r)).collect();
    let b2: Vec<u8> = (3..5).flat_map(|r| cifar_record(&[r as u8 + 4], r)).collect();
    std::fs::write(dir.path().join("data_batch_1.bin"), b1).unwrap();
    std::fs::write(dir.path().join("data_batch_2.bin"), b2).unwrap();
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(dir.path().join("batches.meta.txt"), names).unwrap();
    let src = source::open(dir.path(), 3).unwrap();
    assert_eq!(src.len(), 5);
    assert_eq!(src.labels().unwrap(), vec![0, 1, 2, 7, 8]);
    assert_eq!(src.class_names()[9], "truck");
    let s = src.get(3).unwrap();
    assert_eq!((s.image.width, s.image.height, s.image.channels, s.label), (32, 32, 3, Some(7)));
    // Interleaved RGB: pixel i has (R, G, B) from the three planes.
    for i in [0usize, 1, 500, 1023] {
        let want = [((21 + i) % 251) as u8, ((21 + 50 + i) % 251) as u8, ((21 + 100 + i) % 251) as u8];
        assert_eq!(&s.image.data[3 * i..3 * i + 3], &want, "pixel {i}");
    }
    assert!(src.describe(4).ends_with("data_batch_2.bin#1"));
    assert!(src.get(5).is_err());

    // CIFAR-100: coarse + fine label; the fine label is the label.
    let d100 = tempfile::tempdir().unwrap();
    let t: Vec<u8> = (0..4).flat_map(|r| cifar_record(&[3, 90 + r as u8], r)).collect();
    std::fs::write(d100.path().join("train.bin"), t).unwrap();
    let c100 = CifarSource::open(d100.path()).unwrap();
    assert_eq!(c100.kind(), CifarKind::Cifar100);
    assert_eq!((c100.len(), c100.num_classes()), (4, Some(100)));
    assert_eq!(c100.labels().unwrap(), vec![90, 91, 92, 93]);
    assert_eq!(c100.get(2).unwrap().image.data[0], 14);

    // A truncated batch is refused with a message, not a panic.
    let bad = dir.path().join("test_batch.bin");
    std::fs::write(&bad, vec![0u8; 3073 * 2 - 5]).unwrap();
    let e = CifarSource::open(&bad).err().unwrap().to_string();
    assert!(e.contains("3073-byte records"), "{e}");
}
