//! Shared by the pipeline's integration tests: where the real data is, and the lock on torch's global RNG.

#![allow(dead_code)]

use std::path::Path;

pub const FMNIST_TRAIN: &str = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";

/// Fashion-MNIST is installed by scripts/setup; a test that needs it fails loudly without it.
pub fn fmnist_train() -> &'static Path {
    let p = Path::new(FMNIST_TRAIN);
    assert!(p.exists(), "{FMNIST_TRAIN} missing: run scripts/setup (Debian package dataset-fashion-mnist)");
    p
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

/// A well-formed PNG whose header claims `w` x `h` RGB pixels, followed by a few bytes of image data: what a
/// decoder must refuse by its pixel limit instead of allocating.
pub fn huge_png(w: u32, h: u32) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let ihdr: Vec<u8> = [w.to_be_bytes(), h.to_be_bytes()].concat().into_iter().chain([8, 2, 0, 0, 0]).collect();
    for (kind, data) in
        [(*b"IHDR", ihdr), (*b"IDAT", vec![0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]), (*b"IEND", vec![])]
    {
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = v.len();
        v.extend_from_slice(&kind);
        v.extend_from_slice(&data);
        let crc = crc32(&v[start..]);
        v.extend_from_slice(&crc.to_be_bytes());
    }
    v
}

static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Locks this test binary's torch RNG lock (also after a test panicked holding it) and seeds torch's global RNG
/// with `seed`. The tests of a binary are threads of one process and every model build, `randn` and training step
/// draws from that one generator: once a binary uses this, every test of it that draws holds it for its whole
/// body (docs/testing.md). `let _rng = common::torch_rng(0);`
pub fn torch_rng(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    let guard = TORCH_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    guard
}
