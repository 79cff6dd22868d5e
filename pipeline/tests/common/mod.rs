//! Shared by the pipeline's integration tests: where the real data and the setup venv are.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const FMNIST_TRAIN: &str = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";
pub const FMNIST_TEST: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";

/// Fashion-MNIST is installed by scripts/setup; a test that needs it fails loudly without it.
pub fn fmnist_train() -> &'static Path {
    let p = Path::new(FMNIST_TRAIN);
    assert!(
        p.exists(),
        "{FMNIST_TRAIN} missing: run scripts/setup (Debian package dataset-fashion-mnist)"
    );
    p
}

/// The setup venv's python (TensorBoard's reader, h5py, torch).
pub fn venv_python() -> PathBuf {
    let base = std::env::var_os("SELFSUP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
                })
                .join("selfsup")
        });
    let py = base.join("venv/bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup", py.display());
    py
}

/// Reads a run folder's events with TensorBoard's EventAccumulator (scripts/read_events.py).
pub fn read_events(dir: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/read_events.py");
    let out = std::process::Command::new(venv_python())
        .arg(script)
        .arg(dir)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "read_events.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_events.py prints JSON")
}
