//! HDF5 on real data: Fashion-MNIST packed and read back pixel for pixel (by our reader and by h5py), checksums
//! that catch a corrupt chunk, image folders of mixed sizes packed in the encoded layout with a corrupt file
//! skipped and named, per-sample CRC-32s of encoded files (equal to zlib's in h5py's view, and catching one
//! flipped byte of a packed JPEG), files written by h5py read by us, the loader's block-aware shuffle
//! (bit-identical for any thread count, every index once per epoch), and output that is never half-written.

mod common;

use std::path::Path;
use std::sync::Arc;

use selfsup_augment::{RecipeConfig, Views};
use selfsup_pipeline::loader::{HostBatch, Loader, LoaderConfig};
use selfsup_pipeline::pack::{self, Codec, PackOptions, PackSummary};
use selfsup_pipeline::source::{self, Hdf5Layout, Hdf5Source, ImageFolder, Prefix, Source, SHUFFLE_WINDOW_BLOCKS};

const N: usize = 2000;

fn fmnist_prefix() -> Arc<dyn Source> {
    let idx: Arc<dyn Source> = source::open(common::fmnist_train(), 1).unwrap().into();
    Arc::new(Prefix::new(idx, N))
}

fn pack_fmnist(dir: &Path) -> (std::path::PathBuf, PackSummary) {
    let out = dir.join("fmnist-2000.h5");
    let summary = pack::pack_source(fmnist_prefix().as_ref(), "fmnist-prefix", &out, &PackOptions::default()).unwrap();
    (out, summary)
}

/// The setup venv's Python, started without the descriptors of this process: HDF5 opens files without
/// close-on-exec and `flock`s them, so a child that inherited the descriptor of a file another test thread is
/// writing would hold that lock until it exits, and that test's next open of the file would fail ("unable to
/// lock file").
fn venv_python() -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(selfsup_pipeline::venv_python());
    // SAFETY: between fork and exec only async-signal-safe system calls (close_range, close) run.
    unsafe {
        cmd.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Runs scripts/reference/check_packed.py (h5py, from the setup venv) on `file`.
fn h5py_view(file: &Path, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/check_packed.py");
    let out = venv_python().arg(script).arg(file).args(args).output().unwrap_or_else(|e| {
        panic!("{}: {e} (run scripts/setup)", selfsup_pipeline::venv_python().display());
    });
    assert!(out.status.success(), "check_packed.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn fashion_mnist_round_trips_through_our_reader_and_h5py() {
    let dir = tempfile::tempdir().unwrap();
    let (out, summary) = pack_fmnist(dir.path());
    assert_eq!((summary.count, summary.skipped.len(), summary.layout, summary.chunk_len), (N, 0, "fixed", 256));
    assert_eq!(summary.out, out);
    assert!(summary.bytes > 0 && summary.bytes < (N * 784) as u64, "compressed: {} bytes", summary.bytes);

    let idx = fmnist_prefix();
    let h5 = Hdf5Source::open(&out, 3).unwrap();
    assert_eq!(h5.layout(), Hdf5Layout::Fixed { height: 28, width: 28, channels: 1 });
    assert_eq!((h5.len(), h5.channels(), h5.block_len(), h5.num_classes()), (N, 1, 256, Some(10)));
    assert!(h5.reads_raw_chunks(), "pack's files take the fast path");
    assert_eq!(h5.labels(), idx.labels());
    // Every pixel and label, and the content hash recomputed from the IDX source.
    let mut hash = pack::FNV_OFFSET;
    for i in 0..N {
        let (a, b) = (idx.get(i).unwrap(), h5.get(i).unwrap());
        assert_eq!(a.image, b.image, "sample {i}");
        assert_eq!(a.label, b.label, "label {i}");
        hash = pack::fnv1a64(hash, &(a.image.data.len() as u64).to_le_bytes());
        hash = pack::fnv1a64(hash, &a.image.data);
        hash = pack::fnv1a64(hash, &a.label.unwrap().to_le_bytes());
    }
    assert_eq!(hash, summary.content_hash);
    assert!(h5.get(N).is_err());
    // `source::open` recognises the file by its extension.
    assert_eq!(source::open(&out, 1).unwrap().len(), N);

    // h5py sees the same file: layout, filters, attributes, labels, pixels, hash.
    let v = h5py_view(&out, &["--rows", "0,1,1999", "--hash"]);
    let images = &v["datasets"]["images"];
    assert_eq!(images["shape"], serde_json::json!([N, 28, 28, 1]));
    assert_eq!(images["dtype"], "uint8");
    assert_eq!(images["chunks"], serde_json::json!([256, 28, 28, 1]));
    // pack's default pipeline: Blosc (32001) with LZ4HC (compressor code 2) at level 9, no shuffle, on chunks of
    // 256 x 784 bytes; then fletcher32 (3).
    assert_eq!(images["filters"], serde_json::json!([[32001, [2, 2, 1, 256 * 784, 9, 0, 2]], [3, []]]));
    assert_eq!(images["fletcher32"], true);
    assert_eq!(v["datasets"]["labels"]["dtype"], "int64");
    assert_eq!(v["datasets"]["labels"]["fletcher32"], true);
    let attrs = &v["attrs"];
    assert_eq!(attrs["source"], "fmnist-prefix");
    assert_eq!(attrs["layout"], "fixed");
    assert_eq!(attrs["count"], N);
    assert_eq!(attrs["skipped"], 0);
    assert_eq!(attrs["shape"], serde_json::json!([28, 28, 1]));
    assert_eq!(attrs["content_hash"].as_u64(), Some(summary.content_hash));
    assert_eq!(attrs["content_hash_algorithm"], pack::CONTENT_HASH_ALGORITHM);
    assert_eq!(v["content_hash"], format!("{:016x}", summary.content_hash), "h5py's data hashes the same");
    let labels: Vec<i64> = serde_json::from_value(v["labels"].clone()).unwrap();
    assert_eq!(Some(labels), idx.labels());
    assert_eq!(v["source_index"], serde_json::json!((0..N).collect::<Vec<_>>()));
    for r in [0, 1, 1999] {
        let px: Vec<u8> = serde_json::from_value(v["rows"][r.to_string()].clone()).unwrap();
        assert_eq!(px, idx.get(r).unwrap().image.data, "row {r}");
    }
}

#[test]
fn a_corrupt_chunk_is_an_error_for_its_samples_only() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = pack_fmnist(dir.path());
    let info = hdf5::File::open(&out).unwrap().dataset("images").unwrap().chunk_info(3).unwrap();
    assert_eq!(info.offset, vec![3 * 256, 0, 0, 0]);
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[info.addr as usize + info.size as usize / 2] ^= 0x55;
    let bad = dir.path().join("corrupt.h5");
    std::fs::write(&bad, bytes).unwrap();
    let h5 = Hdf5Source::open(&bad, 1).unwrap();
    assert!(h5.reads_raw_chunks());
    let e = h5.get(3 * 256 + 7).unwrap_err().to_string();
    assert!(e.contains("Fletcher32") && e.contains("corrupt.h5"), "{e}");
    assert!(h5.get(4 * 256 - 1).is_err());
    assert_eq!(h5.get(2 * 256).unwrap().image, fmnist_prefix().get(2 * 256).unwrap().image);
    assert_eq!(h5.get(4 * 256).unwrap().image, fmnist_prefix().get(4 * 256).unwrap().image);
}

#[test]
fn corrupt_blosc_chunks_without_a_checksum_are_errors_not_crashes() {
    // No fletcher32 (as h5py + hdf5plugin write by default), so corrupt bytes reach c-blosc: the header check
    // and blosc's own bounds checks must turn every one into an error or (undetectably) other pixels, never a
    // crash or a read past the buffer. 300 corruptions of chunk 1, header bytes included; chunk 0 stays intact.
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, h5py, hdf5plugin, numpy as np
imgs = (np.arange(64 * 28 * 28, dtype=np.int64).reshape(64, 28, 28, 1) * 13 % 256 // 3 * 3).astype(np.uint8)
with h5py.File(sys.argv[1], "w") as f:
    f.create_dataset("images", data=imgs, chunks=(16, 28, 28, 1), **hdf5plugin.Blosc(cname="lz4hc", clevel=9))
"#;
    let good = dir.path().join("blosc.h5");
    assert!(venv_python().args(["-c", script]).arg(&good).status().unwrap().success());
    let pristine = std::fs::read(&good).unwrap();
    let info = hdf5::File::open(&good).unwrap().dataset("images").unwrap().chunk_info(1).unwrap();
    let (addr, size) = (info.addr as usize, info.size as usize);
    let want: Vec<Vec<u8>> = {
        let h5 = Hdf5Source::open(&good, 1).unwrap();
        assert!(h5.reads_raw_chunks(), "Blosc without fletcher32 takes the fast path");
        (16..32).map(|i| h5.get(i).unwrap().image.data).collect()
    };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize % n
    };
    let (mut errors, mut changed) = (0, 0);
    let bad = dir.path().join("bad.h5");
    for round in 0..300 {
        let mut bytes = pristine.clone();
        for _ in 0..1 + next(4) {
            // Half the hits in blosc's 16-byte header and block offsets, half anywhere in the chunk.
            let at = if round % 2 == 0 { next(size.min(32)) } else { next(size) };
            bytes[addr + at] ^= 1 + next(255) as u8;
        }
        std::fs::write(&bad, &bytes).unwrap();
        let h5 = Hdf5Source::open(&bad, 1).unwrap();
        for (k, i) in (16..32).enumerate() {
            match h5.get(i) {
                Err(e) => {
                    assert!(e.to_string().contains("bad.h5"), "{e}");
                    errors += 1;
                }
                Ok(s) => changed += usize::from(s.image.data != want[k]),
            }
        }
        assert_eq!(h5.get(0).unwrap().image.data.len(), 784, "chunk 0 is intact");
    }
    assert!(errors > 0, "no corruption detected in 300 rounds ({changed} samples changed silently)");
}

fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed]))
        .save(path)
        .unwrap();
}

#[test]
fn folders_of_mixed_sizes_pack_encoded_and_skip_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    for (class, files) in [("cat", 4u8), ("dog", 3)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..files {
            write_png(&root.join(class).join(format!("{k}.png")), 20 + 3 * u32::from(k), 17 + u32::from(k), k + 1);
        }
    }
    let gray = image::GrayImage::from_fn(9, 31, |x, y| image::Luma([(x * 7 + y) as u8]));
    gray.save(root.join("dog/gray.png")).unwrap();
    std::fs::write(root.join("cat/broken.png"), b"\x89PNG\r\n\x1a\n not really a png").unwrap();

    let out = dir.path().join("images.hdf5");
    let opts = PackOptions { channels: 3, ..Default::default() };
    let summary = pack::pack(&root, &out, &opts).unwrap();
    assert_eq!(summary.layout, "encoded");
    assert!(summary.notes.iter().any(|n| n.contains("differ in size")), "{:?}", summary.notes);
    assert_eq!((summary.count, summary.skipped.len()), (8, 1));
    assert!(summary.skipped[0].location.ends_with("cat/broken.png"), "{:?}", summary.skipped);
    assert!(summary.to_string().contains("broken.png"));
    assert!(summary.notes.iter().any(|n| n.contains("sorted by class")), "{:?}", summary.notes);

    let folder = ImageFolder::open(&root, 3).unwrap();
    let h5 = Hdf5Source::open(&out, 3).unwrap();
    assert_eq!(h5.layout(), Hdf5Layout::Encoded);
    assert_eq!(h5.class_names(), vec!["cat", "dog"]);
    assert_eq!((h5.len(), h5.num_classes(), h5.channels()), (8, Some(2), 3));
    // Rows map back to the folder's samples through `source_index` (one was skipped).
    let rows: Vec<i64> = hdf5::File::open(&out).unwrap().dataset("source_index").unwrap().read_raw().unwrap();
    assert_eq!(rows.len(), 8);
    for (r, &i) in rows.iter().enumerate() {
        let (a, b) = (folder.get(i as usize).unwrap(), h5.get(r).unwrap());
        assert_eq!((a.image, a.label), (b.image, b.label), "row {r} = folder sample {i}");
    }
    // The same file decoded to gray, as an image folder would be.
    let gray_h5 = Hdf5Source::open(&out, 1).unwrap();
    assert_eq!(
        gray_h5.get(0).unwrap().image,
        ImageFolder::open(&root, 1).unwrap().get(rows[0] as usize).unwrap().image
    );

    let v = h5py_view(&out, &["--rows", "0", "--hash"]);
    assert_eq!(v["datasets"]["encoded"]["dtype"], "vlen uint8");
    assert_eq!(v["datasets"]["encoded"]["fletcher32"], true);
    assert_eq!(v["datasets"]["checksums"]["dtype"], "uint32");
    assert_eq!(v["checksums"], serde_json::json!({"algorithm": "crc32", "count": 8, "verified": 8, "mismatched": []}));
    assert_eq!(v["attrs"]["layout"], "encoded");
    assert_eq!(v["attrs"]["class_names"], serde_json::json!(["cat", "dog"]));
    assert_eq!(v["content_hash"], format!("{:016x}", summary.content_hash));
    let row0: Vec<u8> = serde_json::from_value(v["rows"]["0"].clone()).unwrap();
    assert_eq!(row0, std::fs::read(folder.file(rows[0] as usize).unwrap()).unwrap(), "the file's bytes as they are");

    // One size: the fixed layout, unless --encoded.
    let same = dir.path().join("same");
    std::fs::create_dir_all(&same).unwrap();
    for k in 0..5 {
        write_png(&same.join(format!("{k}.png")), 12, 10, k + 1);
    }
    let fixed = pack::pack(&same, &dir.path().join("same.h5"), &opts).unwrap();
    assert_eq!((fixed.layout, fixed.count), ("fixed", 5));
    let h5 = Hdf5Source::open(&dir.path().join("same.h5"), 3).unwrap();
    assert_eq!(h5.layout(), Hdf5Layout::Fixed { height: 10, width: 12, channels: 3 });
    assert_eq!(h5.get(4).unwrap().image, ImageFolder::open(&same, 3).unwrap().get(4).unwrap().image);
    // --shuffle: rows in a seeded random order, mapped back by `source_index`.
    let shuffled = dir.path().join("same-shuffled.h5");
    pack::pack(&same, &shuffled, &PackOptions { shuffle: Some(3), ..opts.clone() }).unwrap();
    let rows: Vec<i64> = hdf5::File::open(&shuffled).unwrap().dataset("source_index").unwrap().read_raw().unwrap();
    let mut sorted = rows.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    assert_ne!(rows, sorted);
    let h5 = Hdf5Source::open(&shuffled, 3).unwrap();
    for (r, &i) in rows.iter().enumerate() {
        assert_eq!(h5.get(r).unwrap().image, ImageFolder::open(&same, 3).unwrap().get(i as usize).unwrap().image);
    }
    let forced = PackOptions { encoded: true, ..opts.clone() };
    assert_eq!(pack::pack(&same, &dir.path().join("same-enc.h5"), &forced).unwrap().layout, "encoded");
    let e = pack::pack(common::fmnist_train(), &dir.path().join("x.h5"), &forced).unwrap_err().to_string();
    assert!(e.contains("--encoded needs a folder"), "{e}");
}

/// Noise (from `seed`): JPEG keeps it as kilobytes of entropy-coded data, whose byte runs occur nowhere else.
fn noisy_rgb(w: u32, h: u32, seed: u32) -> image::RgbImage {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    image::RgbImage::from_fn(w, h, |_, _| {
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 24) as u8
        };
        image::Rgb([next(), next(), next()])
    })
}

#[test]
fn encoded_checksums_match_zlib_and_catch_a_flipped_byte_in_one_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mixed");
    for class in ["png", "jpeg"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    for k in 0..4u8 {
        write_png(&root.join(format!("png/{k}.png")), 15 + u32::from(k), 11 + 2 * u32::from(k), k + 1);
        let k = u32::from(k);
        noisy_rgb(40 + 8 * k, 30 + 4 * k, k).save(root.join(format!("jpeg/{k}.jpg"))).unwrap();
    }
    let out = dir.path().join("mixed.h5");
    let summary = pack::pack(&root, &out, &PackOptions { channels: 3, ..Default::default() }).unwrap();
    assert_eq!((summary.layout, summary.count, summary.skipped.len()), ("encoded", 8, 0));
    let file = hdf5::File::open(&out).unwrap();
    let rows: Vec<i64> = file.dataset("source_index").unwrap().read_raw().unwrap();
    let sums: Vec<u32> = file.dataset("checksums").unwrap().read_raw().unwrap();
    drop(file);

    // h5py's view: the data set as specified, and every CRC equal to zlib's.
    let v = h5py_view(&out, &[]);
    let ds = &v["datasets"]["checksums"];
    assert_eq!(
        (&ds["dtype"], &ds["shape"], &ds["attrs"]["checksum"]),
        (&"uint32".into(), &serde_json::json!([8]), &"crc32".into())
    );
    assert_eq!((ds["filters"][0][0].as_u64(), ds["fletcher32"].as_bool()), (Some(32001), Some(true)));
    assert_eq!(v["checksums"], serde_json::json!({"algorithm": "crc32", "count": 8, "verified": 8, "mismatched": []}));

    // Flip one byte in the middle of one JPEG's bytes in the file: a 16-byte run of its entropy-coded data is
    // found exactly once (in the HDF5 global heap, which no filter covers).
    let folder = ImageFolder::open(&root, 3).unwrap();
    let target = rows.iter().position(|&i| folder.file(i as usize).unwrap().ends_with("jpeg/2.jpg")).unwrap();
    let jpeg = std::fs::read(folder.file(rows[target] as usize).unwrap()).unwrap();
    assert!(jpeg.len() > 2000, "{} bytes", jpeg.len());
    let window = &jpeg[jpeg.len() / 2..jpeg.len() / 2 + 16];
    let mut bytes = std::fs::read(&out).unwrap();
    let found: Vec<usize> = bytes.windows(16).enumerate().filter(|(_, w)| *w == window).map(|(p, _)| p).collect();
    assert_eq!(found.len(), 1, "the run occurs once: {found:?}");
    bytes[found[0] + 8] ^= 0x55;
    let corrupt = dir.path().join("corrupt.h5");
    std::fs::write(&corrupt, &bytes).unwrap();

    // That sample, and only that one, fails with the checksum error; the others read as before.
    let (good, bad) = (Hdf5Source::open(&out, 3).unwrap(), Hdf5Source::open(&corrupt, 3).unwrap());
    for r in 0..8 {
        let want = folder.get(rows[r] as usize).unwrap();
        assert_eq!(good.get(r).unwrap().image, want.image, "row {r}");
        if r == target {
            let e = bad.get(r).unwrap_err().to_string();
            let stored = format!("checksum mismatch: stored crc32 {:#010x}, computed 0x", sums[r]);
            assert!(e.contains(&format!("corrupt.h5#{r}: {stored}")) && e.ends_with("(corrupt file)"), "{e}");
        } else {
            let s = bad.get(r).unwrap();
            assert_eq!((s.image, s.label), (want.image, want.label), "row {r}");
        }
    }
    let v = h5py_view(&corrupt, &[]);
    assert_eq!(v["checksums"]["mismatched"], serde_json::json!([target]), "zlib agrees");
    assert_eq!(v["checksums"]["verified"], 7);

    // The loader delivers the other seven and reports that one.
    let recipe = RecipeConfig::simclr(16, 3);
    let views = Views::new(vec![recipe.build(3).unwrap()]);
    let cfg = LoaderConfig {
        batch_size: 3,
        threads: 2,
        prefetch: 2,
        seed: 1,
        shuffle: true,
        full_shuffle: false,
        drop_last: false,
        slice: (0, 1),
    };
    let batches: Vec<HostBatch> = Loader::new(Arc::new(bad), Arc::new(views), cfg).unwrap().epoch(0).collect();
    let mut delivered: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    delivered.sort_unstable();
    assert_eq!(delivered, (0..8).filter(|&r| r != target).collect::<Vec<_>>());
    let reported: Vec<_> = batches.iter().flat_map(|b| b.bad.clone()).collect();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].index, target);
    assert!(reported[0].error.contains("checksum mismatch"), "{:?}", reported[0]);

    // Without `checksums` (as h5py or an older pack writes it), the file reads unchecked: the flipped byte goes
    // unnoticed or surfaces as some other error, which is the gap the checksums close.
    let unchecked = dir.path().join("unchecked.h5");
    std::fs::copy(&corrupt, &unchecked).unwrap();
    hdf5::File::open_rw(&unchecked).unwrap().unlink("checksums").unwrap();
    let h5 = Hdf5Source::open(&unchecked, 3).unwrap();
    for r in (0..8).filter(|&r| r != target) {
        assert_eq!(h5.get(r).unwrap().image, good.get(r).unwrap().image, "row {r}");
    }
    match h5.get(target) {
        Ok(s) => assert_ne!(s.image, good.get(target).unwrap().image),
        Err(e) => assert!(!e.to_string().contains("checksum"), "{e}"),
    }
    // A `checksums` that does not fit the data is refused at open.
    drop(h5);
    let file = hdf5::File::open_rw(&unchecked).unwrap();
    file.new_dataset_builder().with_data(&[1u32, 2, 3]).create("checksums").unwrap();
    drop(file);
    let e = Hdf5Source::open(&unchecked, 3).err().unwrap().to_string();
    assert!(e.contains("`checksums` has 3 entries for 8 samples"), "{e}");
}

#[test]
fn files_written_by_h5py_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, h5py, numpy as np
d = sys.argv[1]
imgs = (np.arange(50 * 6 * 5, dtype=np.int64).reshape(50, 6, 5) * 7 % 251).astype(np.uint8)
with h5py.File(d + "/contiguous.h5", "w") as f:      # not chunked, [N,H,W], uint8 labels, names on the data set
    f["images"] = imgs
    f["labels"] = (np.arange(50) % 3).astype(np.uint8)
    f["images"].attrs["class_names"] = ["a", "b", "c"]
with h5py.File(d + "/shuffled.h5", "w") as f:        # chunked, shuffle + gzip + fletcher32: HDF5's own path
    f.create_dataset("images", data=imgs[..., None], chunks=(8, 6, 5, 1), shuffle=True, compression="gzip", fletcher32=True)
with h5py.File(d + "/gzip.h5", "w") as f:            # gzip + fletcher32 as h5py orders them: the fast path
    f.create_dataset("images", data=imgs[..., None], chunks=(16, 6, 5, 1), compression="gzip", fletcher32=True)
import hdf5plugin                                     # Blosc as hdf5plugin writes it (lz4, byte shuffle): fast path
with h5py.File(d + "/blosc.h5", "w") as f:
    f.create_dataset("images", data=imgs[..., None], chunks=(16, 6, 5, 1), fletcher32=True,
                     **hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
"#;
    let status = venv_python().args(["-c", script]).arg(dir.path()).status().unwrap();
    assert!(status.success());
    let want = |i: usize| -> Vec<u8> { (0..30).map(|k| ((i * 30 + k) as i64 * 7 % 251) as u8).collect() };
    let files =
        [("contiguous.h5", 256, false), ("shuffled.h5", 8, false), ("gzip.h5", 16, true), ("blosc.h5", 16, true)];
    for (name, block, raw) in files {
        let h5 = Hdf5Source::open(&dir.path().join(name), 3).unwrap();
        assert_eq!((h5.len(), h5.channels(), h5.block_len(), h5.reads_raw_chunks()), (50, 1, block, raw), "{name}");
        for i in [0, 7, 8, 17, 49] {
            let s = h5.get(i).unwrap();
            assert_eq!((s.image.width, s.image.height, &s.image.data), (5, 6, &want(i)), "{name} #{i}");
        }
    }
    let h5 = Hdf5Source::open(&dir.path().join("contiguous.h5"), 1).unwrap();
    assert_eq!(
        (h5.get(4).unwrap().label, h5.class_names(), h5.num_classes()),
        (Some(1), vec!["a".to_string(), "b".into(), "c".into()], Some(3))
    );
    let e = Hdf5Source::open(&dir.path().join("missing.h5"), 1).err().unwrap().to_string();
    assert!(e.contains("missing.h5"), "{e}");
    std::fs::write(dir.path().join("not.h5"), b"plain text").unwrap();
    assert!(Hdf5Source::open(&dir.path().join("not.h5"), 1).is_err());
}

fn loader(src: Arc<dyn Source>, threads: usize, shuffle: bool) -> Loader {
    let recipe = RecipeConfig::simclr(28, 1);
    let views = Views::new(vec![recipe.build(1).unwrap(), recipe.build(1).unwrap()]);
    let cfg = LoaderConfig {
        batch_size: 96,
        threads,
        prefetch: 2,
        seed: 7,
        shuffle,
        full_shuffle: false,
        drop_last: false,
        slice: (0, 1),
    };
    Loader::new(src, Arc::new(views), cfg).unwrap()
}

fn bits(batches: &[HostBatch]) -> Vec<Vec<u32>> {
    batches.iter().flat_map(|b| b.views.iter().map(|v| v.iter().map(|x| x.to_bits()).collect())).collect()
}

#[test]
fn loader_shuffles_by_blocks_and_is_bit_identical_for_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = pack_fmnist(dir.path());
    let src: Arc<dyn Source> = Arc::new(Hdf5Source::open(&out, 1).unwrap());
    let (one, three) = (loader(src.clone(), 1, true), loader(src.clone(), 3, true));
    for epoch in [0, 1] {
        let a: Vec<HostBatch> = one.epoch(epoch).collect();
        let b: Vec<HostBatch> = three.epoch(epoch).collect();
        assert_eq!(bits(&a), bits(&b), "epoch {epoch}");
        let order: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(order, b.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>());
        assert_eq!(order, one.order(epoch));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..N).collect::<Vec<_>>(), "every index once");
        assert_ne!(order, (0..N).collect::<Vec<_>>());
        // Block-aware: each window of W blocks' worth of positions draws from at most W chunks, and the order
        // inside a window is mixed (not chunk after chunk).
        let window = SHUFFLE_WINDOW_BLOCKS * 256;
        for w in order.chunks(window) {
            let mut chunks: Vec<usize> = w.iter().map(|i| i / 256).collect();
            chunks.sort_unstable();
            chunks.dedup();
            assert!(chunks.len() <= SHUFFLE_WINDOW_BLOCKS, "{chunks:?}");
        }
        let first_batch: std::collections::BTreeSet<usize> = a[0].indices.iter().map(|i| i / 256).collect();
        assert!(first_batch.len() > 1, "a batch mixes chunks: {first_batch:?}");
        let labels: Vec<i64> = a.iter().flat_map(|b| b.labels.clone().unwrap()).collect();
        assert_eq!(labels, order.iter().map(|&i| src.labels().unwrap()[i]).collect::<Vec<_>>());
    }
    assert_ne!(one.order(0), one.order(1));
    assert_eq!(loader(src.clone(), 2, false).order(0), (0..N).collect::<Vec<_>>());
    // Stage times: inflating chunks is decode time, the rest of getting a sample is read time; an IDX source
    // decodes nothing.
    let ([read, decode, augment, collate], samples) = one.stage_times.snapshot();
    assert_eq!(samples, 2 * N as u64);
    assert!(read > 0 && decode > 0 && augment > 0 && collate > 0, "{read} {decode} {augment} {collate}");
    let idx = loader(fmnist_prefix(), 2, true);
    let _ = idx.epoch(0).count();
    let ([read, decode, ..], samples) = idx.stage_times.snapshot();
    assert_eq!((samples, decode), (N as u64, 0));
    assert!(read > 0);
}

#[test]
fn output_is_never_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PackOptions::default();
    // No such directory: an error, and nothing is created.
    let missing = dir.path().join("no/such/dir/out.h5");
    let e = pack::pack_source(fmnist_prefix().as_ref(), "x", &missing, &opts).unwrap_err().to_string();
    assert!(e.contains("no/such/dir: no such folder"), "{e}");
    assert!(!dir.path().join("no").exists());
    // Nothing readable: an error, and neither the output nor its temporary file is left.
    let junk = dir.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("a.png"), b"not a png").unwrap();
    let out = dir.path().join("junk.h5");
    let e = pack::pack(&junk, &out, &opts).unwrap_err().to_string();
    assert!(e.contains("none of the 1 samples"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("junk")]);
    // A stale temporary file from an interrupted run is not the output, and does not stop the next run.
    let out = dir.path().join("fm.h5");
    let stale = dir.path().join("fm.h5.tmp-999999");
    std::fs::write(&stale, b"half written").unwrap();
    assert!(source::open(&stale, 1).is_err(), "a .tmp-* file is not opened as HDF5");
    let small = Prefix::new(fmnist_prefix(), 10);
    let stored = PackOptions { codec: Codec::Deflate(0), ..opts.clone() }; // stored blocks, still checksummed
    assert_eq!(pack::pack_source(&small, "x", &out, &stored).unwrap().count, 10);
    // The dead run's leftover is cleaned up; a temporary file of a live process (pid 1) is left alone.
    assert!(!stale.exists(), "stale temporary file not removed");
    let live = dir.path().join("fm.h5.tmp-1");
    std::fs::write(&live, b"someone else's").unwrap();
    pack::pack_source(&small, "x", &out, &stored).unwrap();
    assert!(live.exists());
    let h5 = Hdf5Source::open(&out, 1).unwrap();
    assert_eq!((h5.len(), h5.reads_raw_chunks()), (10, true));
    assert_eq!(h5.get(9).unwrap().image, small.get(9).unwrap().image);
    // The other codecs: same pixels, same fast path.
    for codec in [Codec::Deflate(4), Codec::None, Codec::Lz4hc(1)] {
        let file = dir.path().join(format!("{codec}.h5").replace(' ', "-"));
        pack::pack_source(&small, "x", &file, &PackOptions { codec, ..opts.clone() }).unwrap();
        let h5 = Hdf5Source::open(&file, 1).unwrap();
        assert_eq!((h5.len(), h5.reads_raw_chunks()), (10, true), "{codec}");
        for i in 0..10 {
            assert_eq!(h5.get(i).unwrap().image, small.get(i).unwrap().image, "{codec} #{i}");
        }
    }
    // Wrong extension: refused before anything is read.
    let e = pack::pack_source(&small, "x", &dir.path().join("fm.bin"), &opts).unwrap_err().to_string();
    assert!(e.contains(".h5 or .hdf5"), "{e}");
}
