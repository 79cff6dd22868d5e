//! Helpers shared by the CLI tests: run the binary, read its JSON and TensorBoard output.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub fn selfsup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_selfsup")).args(args).output().expect("running selfsup")
}

pub fn ok(args: &[&str]) -> String {
    let out = selfsup(args);
    assert!(
        out.status.success(),
        "selfsup {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `c` and returns its stderr; fails the test (with both outputs) if it does not succeed.
pub fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{c:?} failed:\n{}\n{err}", String::from_utf8_lossy(&out.stdout));
    err
}

/// `--set` arguments: `sets(&["a=1", "b=2"])` is `["--set", "a=1", "--set", "b=2"]`.
pub fn sets(keys: &[&str]) -> Vec<String> {
    keys.iter().flat_map(|k| ["--set".to_string(), k.to_string()]).collect()
}

pub fn read_events(dir: &Path) -> serde_json::Value {
    selfsup_pipeline::tensorboard::read_back(dir).unwrap()
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The tiny preset cut down to seconds: 12 steps of batch 64, evaluation on 2000 labeled train images.
pub const QUICK: [&str; 10] = [
    "--set",
    "train.max_steps=12",
    "--set",
    "train.batch_size=64",
    "--set",
    "eval.train_limit=2000",
    "--set",
    "eval.probe_epochs=3",
    "--set",
    "train.log_every=4",
];

/// The first `n` images of Fashion-MNIST's test set and their labels, written into `dir` as an IDX pair (raw,
/// `test-images-idx3-ubyte` beside `test-labels-idx1-ubyte`): a real labeled set that evaluates in a fraction of
/// the time. Returns the images file.
pub fn fmnist_test_subset(dir: &Path, n: usize) -> std::path::PathBuf {
    use std::io::Read;
    let read = |name: &str| {
        let f = std::fs::File::open(Path::new("/usr/share/datasets/fashion-mnist").join(name)).unwrap();
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(f).read_to_end(&mut bytes).unwrap();
        bytes
    };
    let (images, labels) = (read("t10k-images-idx3-ubyte.gz"), read("t10k-labels-idx1-ubyte.gz"));
    let count = (n as u32).to_be_bytes();
    let mut img = [&[0, 0, 8, 3][..], &count, &28u32.to_be_bytes(), &28u32.to_be_bytes()].concat();
    img.extend_from_slice(&images[16..16 + n * 784]);
    let lab = [&[0, 0, 8, 1][..], &count, &labels[8..8 + n]].concat();
    let path = dir.join("test-images-idx3-ubyte");
    std::fs::write(&path, img).unwrap();
    std::fs::write(dir.join("test-labels-idx1-ubyte"), lab).unwrap();
    path
}

/// The loss curve `(step, value)` of tag `tag` in the run folder `dir`.
pub fn curve(dir: &Path, tag: &str) -> Vec<(i64, f64)> {
    read_events(dir)["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("{tag} missing from {}", dir.display()))
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// Pretrains `preset` for 2 epochs of 8 steps in one go and split at the epoch boundary (stopped by
/// `train.max_steps`, then `--resume`d), and checks that both runs log exactly the same losses.
pub fn resume_at_epoch_boundary_reproduces(preset: &str, dir: &Path) {
    let run = |out: &Path, max_steps: &str, resume: bool| {
        let mut args = vec!["pretrain", "--out", out.to_str().unwrap(), "--quiet"];
        if resume {
            args.push("--resume");
        } else {
            args.extend(["--config", preset]);
        }
        let max_steps = format!("train.max_steps={max_steps}");
        args.extend([
            "--set",
            "data.limit=512",
            "--set",
            "train.batch_size=64",
            "--set",
            "train.log_every=4",
            "--set",
            "train.epochs=2",
            "--set",
            "eval.at_end=false",
            "--set",
            "eval.knn_every=0",
            "--set",
            "optimizer.warmup_epochs=0.5",
            "--set",
            &max_steps,
        ]);
        ok(&args);
    };
    let (whole, split) = (dir.join(format!("{preset}-whole")), dir.join(format!("{preset}-split")));
    run(&whole, "0", false);
    run(&split, "8", false);
    run(&split, "0", true);
    let (a, b) = (curve(&whole, "train/loss"), curve(&split, "train/loss"));
    assert_eq!(a.len(), 4, "{preset}: {a:?}");
    assert_eq!(a, b, "{preset}: the resumed run diverged");
}
