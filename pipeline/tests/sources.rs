//! Sources on real files: IDX (gzip and raw give the same pixels), image folders with class sub-folders, and
//! bad files that are counted and named without stopping the good ones; hostile data (issue 10): folder link
//! cycles, truncated images, and headers (IDX, CIFAR, HDF5) claiming absurd sizes, each a clear error.

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
        slice: (0, 1),
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

fn write_jpeg(path: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8 ^ seed, (y * 5) as u8, seed]));
    img.save_with_format(path, image::ImageFormat::Jpeg).unwrap();
}

/// (device, inode) of a file: what "one real file" means (a hard link has its own canonical path).
fn file_id(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

/// The real files behind every sample, sorted (what "each real file once" is checked on).
fn real_files(src: &dyn Source) -> Vec<(u64, u64)> {
    let mut v: Vec<_> = (0..src.len()).map(|i| file_id(Path::new(&src.describe(i)))).collect();
    v.sort();
    v
}

#[test]
fn folder_links_list_each_real_file_once_and_cycles_are_reported() {
    use selfsup_pipeline::source::SkipKind;
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    let mut want = Vec::new();
    for (i, rel) in ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.png"].iter().enumerate() {
        let p = root.join(rel);
        if rel.ends_with(".jpg") {
            write_jpeg(&p, 20, 10, i as u8)
        } else {
            write_png(&p, 12 + i as u32, 9, i as u8)
        }
        want.push(file_id(&p));
    }
    want.sort();
    // A link to the parent inside a sub-folder, two links to their own folder (before this change: a walk ~40
    // levels deep, and with two such links one that never ends), a second link to a folder, a link and a hard
    // link to a file, and a dangling link named like an image (listed, then unreadable) and one that is not.
    symlink("..", root.join("sub/up")).unwrap();
    symlink(".", root.join("again")).unwrap();
    symlink(".", root.join("sub/deeper/again")).unwrap();
    symlink("sub", root.join("sub-link")).unwrap();
    symlink("a.png", root.join("a-link.png")).unwrap();
    std::fs::hard_link(root.join("sub/c.png"), root.join("c-hard.png")).unwrap();
    symlink("gone.png", root.join("dangling.png")).unwrap();
    symlink("/nonexistent/folder", root.join("dangling-folder")).unwrap();

    let t = std::time::Instant::now();
    let src = source::open(&root, 3).unwrap();
    assert!(t.elapsed().as_secs() < 5, "the listing terminates quickly");
    let dangling = root.join("dangling.png");
    let listed: Vec<_> = (0..src.len()).map(|i| std::path::PathBuf::from(src.describe(i))).collect();
    assert_eq!(src.len(), 5, "4 real files + the dangling image link: {listed:?}");
    let i = listed.iter().position(|p| *p == dangling).expect("the dangling link is a sample");
    let e = src.get(i).unwrap_err().to_string();
    assert!(e.contains("dangling.png") && e.contains("No such file"), "{e}");
    let mut got: Vec<_> = listed.iter().filter(|p| **p != dangling).map(|p| file_id(p)).collect();
    got.sort();
    assert_eq!(got, want, "each real file exactly once: {listed:?}");
    // Real paths win over symlinked ones (real entries are listed first); of two hard links, the first in the
    // walk (depth-first, in name order).
    for path in ["a.png", "c-hard.png", "sub/deeper/d.png"] {
        assert!(listed.contains(&root.join(path)), "{path} in {listed:?}");
    }
    let skipped = src.skipped();
    let count = |k: SkipKind| skipped.iter().filter(|s| s.kind == k).count();
    assert_eq!(count(SkipKind::Cycle), 3, "{skipped:#?}");
    assert_eq!(count(SkipKind::SameFolder), 1, "{skipped:#?}");
    assert_eq!(count(SkipKind::SameFile), 2, "{skipped:#?}");
    assert_eq!(count(SkipKind::Dangling), 1, "{skipped:#?}");
    assert!(skipped.iter().any(|s| s.path.ends_with("sub/up") && s.detail.contains("cycle")), "{skipped:#?}");

    // `inspect` reports the cycles and names the dangling link as unreadable.
    let report = selfsup_pipeline::inspect::inspect(src.as_ref(), "data", false);
    assert_eq!((report.count, report.readable, report.skipped.len()), (5, 4, 7));
    assert!(report.unreadable[0].location.ends_with("dangling.png"));
    let text = report.to_string();
    assert!(text.contains("left out while listing: 7 (Cycle: 3, SameFolder: 1, SameFile: 2, Dangling: 1)"), "{text}");
    assert!(text.contains("sub/up: a cycle"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["skipped"].as_array().unwrap().iter().filter(|s| s["kind"] == "cycle").count(), 3);
}

#[test]
fn a_link_cannot_pull_another_class_into_its_class() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [("cat", 2), ("dog", 3)] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..n {
            write_png(&dir.path().join(format!("{class}/{i}.png")), 10, 10, i as u8);
        }
    }
    symlink("../dog", dir.path().join("cat/more")).unwrap();
    // A top-level link to the root is a folder too, but a cycle, not a class.
    symlink(".", dir.path().join("zz-self")).unwrap();
    let src = source::open(dir.path(), 1).unwrap();
    assert_eq!(src.class_names(), vec!["cat".to_string(), "dog".into()]);
    assert_eq!(src.labels().unwrap(), vec![0, 0, 1, 1, 1], "dog's files keep dog's label");
    assert_eq!(real_files(src.as_ref()).len(), 5);
    assert_eq!(src.skipped().len(), 2, "{:#?}", src.skipped());
}

#[test]
fn truncated_jpegs_and_pngs_are_unreadable_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    write_jpeg(&dir.path().join("good.jpg"), 64, 48, 1);
    write_png(&dir.path().join("good.png"), 64, 48, 2);
    let jpg = std::fs::read(dir.path().join("good.jpg")).unwrap();
    let png = std::fs::read(dir.path().join("good.png")).unwrap();
    std::fs::write(dir.path().join("cut.jpg"), &jpg[..jpg.len() * 6 / 10]).unwrap();
    std::fs::write(dir.path().join("cut-before-eoi.jpg"), &jpg[..jpg.len() - 2]).unwrap();
    std::fs::write(dir.path().join("cut.png"), &png[..png.len() * 6 / 10]).unwrap();
    // Trailing bytes after a JPEG's end marker (what cameras append) are fine.
    let mut trailing = jpg.clone();
    trailing.extend_from_slice(b"APPENDED DATA");
    std::fs::write(dir.path().join("trailing.jpg"), &trailing).unwrap();
    let src = source::open(dir.path(), 3).unwrap();
    let report = selfsup_pipeline::inspect::inspect(src.as_ref(), "cut", false);
    assert_eq!((report.count, report.readable), (6, 3), "{report}");
    let bad: std::collections::BTreeMap<String, String> = report
        .unreadable
        .iter()
        .map(|b| (Path::new(&b.location).file_name().unwrap().to_string_lossy().into_owned(), b.error.clone()))
        .collect();
    assert_eq!(bad.keys().collect::<Vec<_>>(), ["cut-before-eoi.jpg", "cut.jpg", "cut.png"]);
    for (name, error) in &bad {
        assert!(error.contains(name.as_str()), "{error}");
    }
    assert!(bad["cut.jpg"].contains("truncated JPEG") && bad["cut.jpg"].contains("FF D9"), "{}", bad["cut.jpg"]);
    assert!(bad["cut.png"].contains("end of file") || bad["cut.png"].contains("deflate"), "{}", bad["cut.png"]);
}

#[test]
fn real_jpegs_and_pngs_on_this_machine_still_decode() {
    // Whatever photos the machine has (the foolbox ImageNet JPEGs from scripts/setup, system images): the end
    // marker check must not refuse a real file. Nothing found = nothing to check.
    let mut found = Vec::new();
    for dir in [selfsup_pipeline::cache_dir().join("photos/imagenet-512"), "/usr/share/pixmaps".into()] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let ext = e.path().extension().map(|x| x.to_ascii_lowercase());
            if ext.is_some_and(|x| x == "jpg" || x == "jpeg" || x == "png") {
                found.push(e.path());
            }
        }
    }
    for p in &found {
        let (parent, name) = (p.parent().unwrap(), p.file_name().unwrap());
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(p, dir.path().join(name)).unwrap();
        let src = source::open(dir.path(), 3).unwrap();
        assert!(src.get(0).is_ok(), "{}: {}", parent.display(), src.get(0).unwrap_err());
    }
    eprintln!("{} real images decoded", found.len());
}

#[test]
fn idx_headers_with_absurd_sizes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x-images-idx3-ubyte");
    let header = |magic: [u8; 4], dims: &[u32]| -> Vec<u8> {
        let mut v = magic.to_vec();
        dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
        v
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (header([0, 0, 8, 3], &[10, 0, 0]), "width 0 is outside 1..=65535 (0x0 pixels)"),
        (header([0, 0, 8, 3], &[10, 1 << 31, 1 << 31]), "width 2147483648 is outside 1..=65535"),
        (header([0, 0, 8, 3], &[0, 28, 28]), "image count is 0"),
        (header([0, 0, 8, 3], &[u32::MAX, 65535, 65535]), "truncated: header promises"),
        (header([0, 0, 0x0d, 3], &[1, 2, 2]), "element type 0x0d unsupported"),
        (header([0, 0, 8, 9], &[]), "9 dimensions"),
        (header([0, 0, 8, 2], &[3, 4]), "expected 3 dimensions"),
    ];
    for (bytes, want) in cases {
        let mut bytes = bytes;
        bytes.extend_from_slice(&[7u8; 64]);
        std::fs::write(&p, &bytes).unwrap();
        let e = source::open(&p, 1).err().expect(want).to_string();
        assert!(e.contains(want) && e.contains("x-images-idx3-ubyte"), "want {want:?}: {e}");
    }
    // Gzipped: a header promising more than the stream can hold is refused before anything is inflated (no
    // gzip bomb filling the disk), and a stream shorter than its header is truncated.
    let gz = dir.path().join("y-images-idx3-ubyte.gz");
    for (dims, want) in
        [([60_000u32, 28, 28], "truncated: header promises 47040016 bytes"), ([u32::MAX, 65535, 65535], "more than a")]
    {
        // 64 KiB that does not compress: the gzip file could hold the 47 MB the first header promises. Neither
        // case leaves a file in the cache (nothing is inflated, or the partial copy is removed).
        let mut raw = header([0, 0, 8, 3], &dims);
        let mut x = 1u32;
        raw.extend((0..1 << 16).map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        }));
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&raw).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let e = IdxSource::open(&gz).err().expect(want).to_string();
        assert!(e.contains(want) && e.contains("y-images-idx3-ubyte.gz"), "want {want:?}: {e}");
    }
}

#[test]
fn cifar_labels_out_of_range_are_refused_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data_batch_1.bin");
    let mut b: Vec<u8> = (0..3).flat_map(|r| cifar_record(&[r as u8], r)).collect();
    b[2 * 3073] = 10;
    std::fs::write(&p, &b).unwrap();
    let e = source::open(&p, 3).err().unwrap().to_string();
    assert!(e.contains("data_batch_1.bin") && e.contains("record 2: label 10 is out of range for CIFAR-10"), "{e}");
    let p = dir.path().join("train.bin");
    std::fs::write(&p, cifar_record(&[20, 5], 0)).unwrap();
    let e = source::open(&p, 3).err().unwrap().to_string();
    assert!(e.contains("record 0: coarse label 20 is out of range for CIFAR-100"), "{e}");
}

#[test]
fn hdf5_shapes_and_attributes_are_checked_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, build: &dyn Fn(&hdf5::File)| -> std::path::PathBuf {
        let p = dir.path().join(name);
        let f = hdf5::File::create(&p).unwrap();
        build(&f);
        p
    };
    let images = |f: &hdf5::File, shape: &[usize]| {
        f.new_dataset::<u8>().shape(shape.to_vec()).create("images").unwrap();
    };
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (make("zero.h5", &|f| images(f, &[4, 0, 5])), "`images`: image height 0 is outside 1..=65535"),
        (make("huge.h5", &|f| images(f, &[4, 70_000, 5])), "height 70000 is outside"),
        (make("empty.h5", &|f| images(f, &[0, 6, 5])), "`images` holds no samples"),
        // Never written: HDF5 would read zeros (a chunked data set without its chunks, a contiguous one without
        // its storage), and the claimed count would size `labels`.
        (
            make("unwritten.h5", &|f| {
                f.new_dataset::<u8>().shape((1_000_000, 6, 5)).chunk((100, 6, 5)).create("images").unwrap();
            }),
            "1000000 samples in 10000 chunks, but the file stores 0 of them",
        ),
        (
            make("unwritten-contiguous.h5", &|f| images(f, &[1000, 6, 5])),
            "1000 samples need 30000 bytes, the data set stores 0",
        ),
        (
            make("bigchunks.h5", &|f| {
                f.new_dataset::<u8>().shape((4000, 256, 256, 3)).chunk((2000, 256, 256, 3)).create("images").unwrap();
            }),
            "exceed the 268435456 bytes read at once",
        ),
    ];
    for (p, want) in &cases {
        let e = source::open(p, 1).err().unwrap_or_else(|| panic!("{want}")).to_string();
        assert!(e.contains(want) && e.contains(p.file_name().unwrap().to_str().unwrap()), "want {want:?}: {e}");
    }
    let good = make("good.h5", &|f| {
        let ds = f.new_dataset::<u8>().shape((3, 6, 5)).create("images").unwrap();
        ds.write_raw(&[1u8; 90]).unwrap();
        f.new_dataset_builder().with_data(&[0i64, 1, 2]).create("labels").unwrap();
    });
    assert_eq!(source::open(&good, 1).unwrap().labels(), Some(vec![0, 1, 2]));
    for (name, labels, want) in [
        ("neg.h5", vec![0i64, -1, 2], "entry 1 is -1, outside 0..65536"),
        ("short.h5", vec![0, 1], "`labels` has 2 entries for 3 samples"),
    ] {
        let p = make(name, &|f| {
            let ds = f.new_dataset::<u8>().shape((3, 6, 5)).create("images").unwrap();
            ds.write_raw(&[1u8; 90]).unwrap();
            f.new_dataset_builder().with_data(&labels).create("labels").unwrap();
        });
        let e = source::open(&p, 1).err().unwrap().to_string();
        assert!(e.contains(want) && e.contains(name), "want {want:?}: {e}");
    }
}

fn idx_bytes(dims: &[u32], body: impl Iterator<Item = u8>) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
    v.extend(body);
    v
}

fn gzip_with(bytes: &[u8], level: flate2::Compression) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The IDX cache entries (and temporary files) of gzipped files whose name starts with `prefix`: these tests use
/// the user's cache (other tests of this binary read it), so each names its files uniquely and removes its entries.
fn idx_cache_entries(prefix: &str) -> Vec<std::path::PathBuf> {
    let dir = selfsup_pipeline::cache_dir().join("idx");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) || n.starts_with(&format!(".{prefix}"))
        })
        .collect();
    v.sort();
    v
}

fn pixels(src: &dyn Source) -> Vec<u8> {
    (0..src.len()).flat_map(|i| src.get(i).unwrap().image.data).collect()
}

/// Issue: the gzip trailer was never read (the inflation stopped where the header's promise ended), so a flipped
/// CRC-32 or ISIZE bit was accepted, and flips in the deflate data gave other pixels. Every member's trailer is now
/// checked; data beyond the promise, and bytes after the last member, are errors; concatenated members are read as
/// one stream (as gunzip and Python read them). No bad file leaves a cache entry or a temporary file.
#[test]
fn gzip_trailers_are_checked_and_bad_files_leave_no_cache_entry() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("trailer{}", std::process::id());
    let raw = idx_bytes(&[6, 5, 4], (0..120).map(|i| (i * 37 % 256) as u8));
    let gz = gzip_with(&raw, flate2::Compression::default());
    let n = gz.len();
    let flip = |at: usize, bit: u8| {
        let mut v = gz.clone();
        v[at] ^= 1 << bit;
        v
    };
    let mut two_members = gzip_with(&raw[..50], flate2::Compression::default());
    two_members.extend(gzip_with(&raw[50..], flate2::Compression::fast()));
    let mut longer = raw.clone();
    longer.extend_from_slice(&[9; 20]);
    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"junk");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("crc", flip(n - 8, 0), "gzip CRC-32 mismatch: the trailer says"),
        ("crc-high", flip(n - 5, 7), "gzip CRC-32 mismatch"),
        ("isize", flip(n - 4, 0), "gzip ISIZE mismatch: the trailer says 137 bytes, the data inflates to 136"),
        ("isize-high", flip(n - 1, 6), "gzip ISIZE mismatch"),
        ("cut-trailer", gz[..n - 3].to_vec(), "truncated: the file ends inside the gzip trailer"),
        ("longer", gzip_with(&longer, flate2::Compression::default()), "inflates to more than the 136 bytes"),
        ("trailing", trailing, "not another gzip member"),
        ("reserved-flag", flip(3, 6), "reserved flag bits"),
    ];
    for (name, bytes, want) in &cases {
        let p = dir.path().join(format!("{tag}{name}-images-idx3-ubyte.gz"));
        std::fs::write(&p, bytes).unwrap();
        let e = IdxSource::open(&p).err().unwrap_or_else(|| panic!("{name}: accepted")).to_string();
        assert!(e.contains(want) && e.contains(p.to_str().unwrap()), "{name}: want {want:?}: {e}");
    }
    assert_eq!(idx_cache_entries(&tag), Vec::<std::path::PathBuf>::new(), "no entry or temporary file left");
    // Two members: read as one stream, each trailer checked.
    let p = dir.path().join(format!("{tag}two-images-idx3-ubyte.gz"));
    std::fs::write(&p, &two_members).unwrap();
    assert_eq!(pixels(&IdxSource::open(&p).unwrap()), raw[16..]);
    let last = two_members.len() - 8;
    two_members[last] ^= 4;
    std::fs::write(&p, &two_members).unwrap();
    let e = IdxSource::open(&p).err().expect("bad second member").to_string();
    assert!(e.contains("gzip CRC-32 mismatch (gzip member 2)"), "{e}");
    for entry in idx_cache_entries(&tag) {
        std::fs::remove_file(entry).unwrap();
    }
}

/// Issue: the cache was keyed by path, size and mtime in seconds, so a different file with the same size and
/// mtime (`cp -p`, `rsync -t`, tar) was served the first one's pixels.
#[test]
fn a_replaced_gzip_with_the_same_size_and_mtime_gets_its_own_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("replaced{}", std::process::id());
    let p = dir.path().join(format!("{tag}-images-idx3-ubyte.gz"));
    let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
    // Stored (level 0) gzip: the same size for any pixels.
    let write = |fill: u8| {
        let raw = idx_bytes(&[3, 4, 4], (0..48).map(|i| fill ^ i as u8));
        std::fs::write(&p, gzip_with(&raw, flate2::Compression::none())).unwrap();
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(when).unwrap();
        raw[16..].to_vec()
    };
    let first = write(0);
    let meta = std::fs::metadata(&p).unwrap();
    assert_eq!(pixels(&IdxSource::open(&p).unwrap()), first);
    let second = write(0xa5);
    let meta2 = std::fs::metadata(&p).unwrap();
    assert_eq!((meta.len(), meta.modified().unwrap()), (meta2.len(), meta2.modified().unwrap()));
    assert_eq!(pixels(&IdxSource::open(&p).unwrap()), second, "the replaced file's own pixels");
    // Also replaced by a rename (another inode), back to the first content.
    let q = dir.path().join("next.gz");
    std::fs::copy(&p, &q).unwrap();
    let first_again = write(0);
    std::fs::rename(&p, dir.path().join("old")).unwrap();
    std::fs::write(&q, std::fs::read(dir.path().join("old")).unwrap()).unwrap();
    std::fs::File::options().write(true).open(&q).unwrap().set_modified(when).unwrap();
    std::fs::rename(&q, &p).unwrap();
    assert_eq!(pixels(&IdxSource::open(&p).unwrap()), first_again);
    for entry in idx_cache_entries(&tag) {
        std::fs::remove_file(entry).unwrap();
    }
}

/// A cache entry cut short (a full disk, a crash on a file system without ordered writes, a hand edit) is inflated
/// again, not trusted (it was served, and the source then failed as "truncated").
#[test]
fn a_truncated_cache_entry_is_inflated_again() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("cutcache{}", std::process::id());
    let p = dir.path().join(format!("{tag}-images-idx3-ubyte.gz"));
    let raw = idx_bytes(&[5, 6, 7], (0..210).map(|i| (i * 11 % 256) as u8));
    std::fs::write(&p, gzip_with(&raw, flate2::Compression::default())).unwrap();
    assert_eq!(pixels(&IdxSource::open(&p).unwrap()), raw[16..]);
    let entries = idx_cache_entries(&tag);
    assert_eq!(entries.len(), 1, "{entries:?}");
    for cut in [100u64, 0] {
        std::fs::File::options().write(true).open(&entries[0]).unwrap().set_len(cut).unwrap();
        assert_eq!(pixels(&IdxSource::open(&p).unwrap()), raw[16..], "entry cut to {cut} bytes");
        assert_eq!(std::fs::metadata(&entries[0]).unwrap().len(), raw.len() as u64);
    }
    // A header changed in the entry (another file's dims) is not trusted either.
    let mut bad = raw.clone();
    bad[7] = 4;
    std::fs::write(&entries[0], &bad[..bad.len() - 30]).unwrap();
    assert_eq!(pixels(&IdxSource::open(&p).unwrap()), raw[16..]);
    assert_eq!(idx_cache_entries(&tag), entries);
    std::fs::remove_file(&entries[0]).unwrap();
}

/// Issue: image folders listed only .jpg/.jpeg/.png; GIF, WebP, TIFF and BMP files were neither read nor counted,
/// and nor was any other file. Now one real image of each format (written by the `image` crate's encoders) is read
/// with its size and pixels (a GIF's first frame), files in other formats are left out by name (`inspect` and
/// `skipped()` show them), and a corrupt file of each new format is counted unreadable, never a panic.
#[test]
fn image_folders_read_gif_webp_tiff_bmp_and_name_what_they_leave_out() {
    use image::ImageFormat as F;
    let dir = tempfile::tempdir().unwrap();
    // Few colours: a GIF's palette holds them exactly.
    let rgb = |w: u32, h: u32, k: u8| {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([((x + y) % 4) as u8 * 60, k, if x % 2 == 0 { 200 } else { 10 }])
        })
    };
    let encode = |img: &image::RgbImage, format: F| {
        let mut v = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut v), format).unwrap();
        v
    };
    // (file, format, width, height): lossless formats keep every pixel; the JPEG is checked by size only.
    let files = [
        ("a.jpg", F::Jpeg, 20, 10),
        ("b.png", F::Png, 21, 11),
        ("d.webp", F::WebP, 23, 13),
        ("e.tiff", F::Tiff, 24, 14),
        ("f.tif", F::Tiff, 25, 15),
        ("g.bmp", F::Bmp, 26, 16),
        ("h.BMP", F::Bmp, 27, 17),
    ];
    let mut want = std::collections::BTreeMap::new();
    for (i, &(name, format, w, h)) in files.iter().enumerate() {
        let img = rgb(w, h, i as u8 * 30);
        std::fs::write(dir.path().join(name), encode(&img, format)).unwrap();
        want.insert(name.to_string(), (w, h, (format != F::Jpeg).then(|| img.into_raw())));
    }
    // An animated GIF: two frames of different colours; the first is read.
    let (first, second) = (rgb(22, 12, 5), rgb(22, 12, 250));
    let mut gif = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
        let frame = |im: &image::RgbImage| image::Frame::new(image::DynamicImage::ImageRgb8(im.clone()).into_rgba8());
        enc.encode_frames([frame(&first), frame(&second)]).unwrap();
    }
    std::fs::write(dir.path().join("c.gif"), &gif).unwrap();
    want.insert("c.gif".into(), (22, 12, Some(first.into_raw())));
    // Corrupt files of each new format: cut in half, and bytes that are no image at all.
    let corrupt = ["cut.gif", "cut.webp", "cut.tiff", "cut.bmp", "junk.gif", "junk.webp", "junk.tif", "junk.bmp"];
    for name in corrupt {
        let bytes = match name.split_once('.').unwrap() {
            ("cut", "gif") => gif[..gif.len() / 2].to_vec(),
            ("cut", ext) => {
                let full = std::fs::read(dir.path().join(if ext == "webp" { "d.webp" } else { "g.bmp" })).unwrap();
                let full = if ext == "tiff" { std::fs::read(dir.path().join("e.tiff")).unwrap() } else { full };
                full[..full.len() / 2].to_vec()
            }
            _ => b"GIF89a RIFF II*\0 BM not an image".to_vec(),
        };
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    // Files in formats not read, and one without an extension: left out, by name.
    for name in ["notes.txt", "photo.heic", "logo.svg", "README"] {
        std::fs::write(dir.path().join(name), b"not read").unwrap();
    }

    let src = source::open(dir.path(), 3).unwrap();
    assert_eq!(src.len(), want.len() + corrupt.len());
    let mut read = 0;
    for i in 0..src.len() {
        let name = Path::new(&src.describe(i)).file_name().unwrap().to_string_lossy().into_owned();
        let Some((w, h, pixels)) = want.get(&name) else { continue };
        let s = src.get(i).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((s.image.width, s.image.height, s.image.channels), (*w, *h, 3), "{name}");
        if let Some(p) = pixels {
            assert!(s.image.data == *p, "{name}: other pixels");
        }
        read += 1;
    }
    assert_eq!(read, want.len());
    let skipped = src.skipped();
    let left_out: Vec<(String, source::SkipKind)> = skipped
        .iter()
        .map(|s| (Path::new(&s.path).file_name().unwrap().to_string_lossy().into_owned(), s.kind))
        .collect();
    let not_an_image = source::SkipKind::NotAnImage;
    assert_eq!(
        left_out,
        [
            ("README".into(), not_an_image),
            ("logo.svg".into(), not_an_image),
            ("notes.txt".into(), not_an_image),
            ("photo.heic".into(), not_an_image)
        ]
    );
    let heic = skipped.iter().find(|s| s.path.ends_with("photo.heic")).unwrap();
    assert!(heic.detail.contains("extension .heic: not an image format read here (.jpg,"), "{}", heic.detail);
    let report = selfsup_pipeline::inspect::inspect(src.as_ref(), "formats", false);
    assert_eq!((report.count, report.readable, report.unreadable.len()), (src.len(), want.len(), corrupt.len()));
    for name in corrupt {
        let bad = report.unreadable.iter().find(|b| b.location.ends_with(name)).unwrap_or_else(|| panic!("{name}"));
        assert!(bad.error.contains(name), "{bad:?}");
    }
    let text = report.to_string();
    assert!(text.contains("left out while listing: 4 (NotAnImage: 4)") && text.contains("photo.heic"), "{text}");
    // A folder of files in formats not read says so, naming one.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("x.heic"), b"").unwrap();
    let e = source::open(other.path(), 3).err().unwrap().to_string();
    assert!(
        e.contains("no image files found (.jpg, .jpeg, .png, .gif, .webp, .tif, .tiff, .bmp); 1 other files"),
        "{e}"
    );
}
