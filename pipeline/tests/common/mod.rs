//! Shared by the pipeline's integration tests: where the real data is.

#![allow(dead_code)]

use std::path::Path;

pub const FMNIST_TRAIN: &str = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";

/// Fashion-MNIST is installed by scripts/setup; a test that needs it fails loudly without it.
pub fn fmnist_train() -> &'static Path {
    let p = Path::new(FMNIST_TRAIN);
    assert!(p.exists(), "{FMNIST_TRAIN} missing: run scripts/setup (Debian package dataset-fashion-mnist)");
    p
}
