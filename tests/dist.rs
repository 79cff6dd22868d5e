//! Data-parallel training on the CPU (issue 11), for real: ranks launched by `selfsup pretrain --nproc-per-node`,
//! Gloo over 127.0.0.1 on a free port, bounded timeouts. Two ranks with global batch B train the weights one
//! process trains with batch B; a rank killed ends the run with an error naming it; SIGTERM to the launcher
//! leaves one valid checkpoint, and a 2-rank run resumed by one process continues its loss curve.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_selfsup");

/// MAE (ViT, layer norm only: no batch statistics, so the only difference between 1 and 2 ranks is the order of
/// floating-point sums), 20 steps of global batch 32.
fn mae() -> Vec<String> {
    let mut args = vec!["--config".to_string(), "mae-fmnist-tiny".into()];
    args.extend(sets(&[
        "data.limit=640",
        "train.batch_size=32",
        "train.epochs=1",
        "eval.at_end=false",
        "eval.knn_every=0",
        "train.log_every=2",
        "train.checkpoint_every=0",
        "train.progress_every_s=0",
        "train.threads=1",
        "dist.timeout_s=60",
    ]));
    args
}

fn pretrain(out: &Path, nproc: Option<usize>, extra: &[String]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["pretrain", "--out", out.to_str().unwrap(), "--quiet"]);
    if let Some(n) = nproc {
        c.args(["--nproc-per-node", &n.to_string()]);
    }
    c.args(extra);
    c
}

fn weights(run: &Path) -> Vec<(String, tch::Tensor)> {
    let ckpt = selfsup_pipeline::checkpoint::resolve(run).unwrap();
    let mut w = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    wa.iter()
        .zip(&wb)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn max_curve_diff(a: &[(i64, f64)], b: &[(i64, f64)]) -> f64 {
    assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), b.iter().map(|p| p.0).collect::<Vec<_>>());
    a.iter().zip(b).map(|(x, y)| (x.1 - y.1).abs()).fold(0.0, f64::max)
}

/// The projector's feature rows (`features.tsv`).
fn projector_rows(run: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(run.join("projector/features.tsv")).unwrap();
    text.lines().map(|l| l.split('\t').map(|v| v.parse().unwrap()).collect()).collect()
}

/// Also the end-of-run evaluation, sharded over the two ranks (each extracts its slice of every batch): the same
/// report and projector as one process's, to the weights' own difference.
#[test]
fn mae_on_two_ranks_trains_the_weights_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let test = fmnist_test_subset(dir.path(), 2000);
    let mut args = mae();
    args.extend(sets(&[&format!("data.test=\"{}\"", test.display())]));
    // Two epochs of 10 steps: a k-NN after the first (every rank extracts its share), the full evaluation at the end.
    args.extend(sets(&[
        "data.limit=320",
        "train.epochs=2",
        "eval.knn_every=1",
        "eval.val_bank_size=2000",
        "eval.at_end=true",
        "eval.train_limit=2000",
        "eval.probe_epochs=5",
        "eval.projector_samples=100",
    ]));
    run_ok(pretrain(&one, None, &args));
    let err = run_ok(pretrain(&two, Some(2), &args));
    assert!(err.contains("rank 0 of 2") && err.contains("global batch 32"), "{err}");
    // One run folder: rank 0's files only, one event file, one checkpoint set.
    let events = std::fs::read_dir(&two)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events"))
        .count();
    assert_eq!(events, 1);
    let diff = max_weight_diff(&one, &two);
    let loss_diff = max_curve_diff(&curve(&one, "train/loss"), &curve(&two, "train/loss"));
    eprintln!(
        "MAE, 20 steps, 1 process vs 2 ranks: weights differ by at most {diff:.2e}, the loss curve by {loss_diff:.2e}"
    );
    // Each rank's gradient is the mean over half the batch and the two are averaged: the same sum in another
    // order, a few ulps per step (fp32, ~1e-7 relative) that 20 AdamW steps do not grow past 1e-5.
    assert!(diff < 1e-5, "{diff}");
    assert!(loss_diff < 1e-5, "{loss_diff}");
    let s = json(&two.join("summary.json"));
    assert_eq!(s["steps"], 20);

    let (e1, e2) = (json(&one.join("eval.json")), json(&two.join("eval.json")));
    eprintln!(
        "eval, 1 process vs 2 ranks: k-NN {} vs {}, linear {} vs {}",
        e1["knn"]["top1"], e2["knn"]["top1"], e1["linear"]["top1"], e2["linear"]["top1"]
    );
    for key in ["train_samples", "test_samples", "feature_dim", "unreadable_samples"] {
        assert_eq!(e1[key], e2[key], "{key}");
    }
    assert_eq!((e2["train_samples"].as_u64(), e2["test_samples"].as_u64()), (Some(2000), Some(2000)));
    // Features that differ by ~1e-6 may move a vote among 2,000 test images, no more.
    let (k1, k2) = (curve(&one, "val/knn_top1"), curve(&two, "val/knn_top1"));
    assert_eq!(k1.len(), 2, "the validation k-NN after each epoch: {k1:?}");
    assert!(max_curve_diff(&k1, &k2) <= 1e-3, "{k1:?} vs {k2:?}");
    let (k1, k2) = (curve(&one, "eval/knn_top1"), curve(&two, "eval/knn_top1"));
    assert_eq!(k1.len(), 1, "the evaluation at the end: {k1:?}");
    assert!(max_curve_diff(&k1, &k2) <= 1e-3, "{k1:?} vs {k2:?}");
    for probe in ["knn", "linear"] {
        let (a, b) = (e1[probe]["top1"].as_f64().unwrap(), e2[probe]["top1"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-3, "{probe}: {a} vs {b}");
    }
    let (p1, p2) = (projector_rows(&one), projector_rows(&two));
    assert_eq!((p1.len(), p1[0].len()), (p2.len(), p2[0].len()));
    assert_eq!(p1.len(), 100);
    let d = p1.iter().flatten().zip(p2.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(d < 1e-3, "projector rows (the first 100 test images, in order) differ by {d}");
    assert_eq!(
        std::fs::read(one.join("projector/metadata.tsv")).unwrap(),
        std::fs::read(two.join("projector/metadata.tsv")).unwrap()
    );
}

#[test]
fn a_global_batch_that_does_not_split_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = mae();
    args.extend(sets(&["train.batch_size=33"]));
    let out = pretrain(&dir.path().join("r"), Some(2), &args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("train.batch_size = 33") && err.contains("2 ranks"), "{err}");
}

fn long_run() -> Vec<String> {
    let mut args = mae();
    args.extend(sets(&["data.limit=6400", "train.checkpoint_every_steps=4"]));
    args
}

/// Waits for a checkpoint in `run`, failing after 120 s.
fn wait_for_checkpoint(run: &Path, child: &mut std::process::Child) {
    let t = Instant::now();
    while !run.join("checkpoints/LATEST").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ranks (children of the launcher `pid`), oldest first, from /proc (no procps needed).
fn children(pid: u32) -> Vec<u32> {
    let mut found: Vec<(u64, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // After the parenthesized command name: state, ppid, ...; field 22 is the start time.
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
            (fields.get(1)?.parse::<u32>().ok()? == pid).then(|| Some((fields.get(19)?.parse().ok()?, child)))?
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, c)| c).collect()
}

#[test]
fn a_killed_rank_ends_the_run_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let mut child = pretrain(&run, Some(2), &long_run()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_checkpoint(&run, &mut child);
    let ranks = children(child.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let t = Instant::now();
    // The second rank started is rank 1.
    Command::new("kill").args(["-9", &ranks[1].to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let waited = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("rank 1 killed: the run ended after {waited:?}");
    assert!(!out.status.success());
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    assert!(err.contains("rank 1 exited"), "{err}");
    // What was saved stays valid.
    selfsup_pipeline::checkpoint::resolve(&run).unwrap();
}

#[test]
fn sigterm_to_the_launcher_leaves_one_checkpoint_and_one_process_resumes_the_curve() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let mut args = long_run();
    args.extend(sets(&["train.max_steps=40"]));
    run_ok(pretrain(&whole, None, &args));

    let mut child = pretrain(&split, Some(2), &args).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_checkpoint(&split, &mut child);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    let summary = json(&split.join("summary.json"));
    assert_eq!(summary["interrupted"], "SIGTERM", "{err}");
    let stopped = summary["steps"].as_u64().unwrap();
    assert!(stopped < 40, "{stopped}");
    let ckpt = selfsup_pipeline::checkpoint::resolve(&split).unwrap();
    assert_eq!(selfsup_pipeline::checkpoint::load_state(&ckpt).unwrap().step, stopped);

    // One process takes over the 2-rank run: the same global batches, so the same curve.
    let mut resume = Command::new(BIN);
    resume.args(["pretrain", "--out", split.to_str().unwrap(), "--resume", "--quiet"]);
    run_ok(resume);
    let (a, b) = (curve(&whole, "train/loss"), curve(&split, "train/loss"));
    let d = max_curve_diff(&a, &b);
    eprintln!("stopped at step {stopped} of 40 on 2 ranks, resumed on 1: loss curve within {d:.2e} of one process");
    assert!(d < 1e-4, "{d}");
    assert!(max_weight_diff(&whole, &split) < 1e-4);
}

/// The venv's real `torchrun`: beside the torch that `.libtorch` links to (scripts/setup makes both, wherever
/// `SELFSUP_CACHE` puts the venv).
fn torchrun() -> std::path::PathBuf {
    let torch = std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch")).unwrap();
    // <venv>/lib/python3.X/site-packages/torch
    let venv = torch.ancestors().nth(4).unwrap();
    let path = venv.join("bin/torchrun");
    assert!(path.exists(), "{} missing: run scripts/setup", path.display());
    path
}

#[test]
fn torchrun_launches_two_ranks_into_one_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_ok(pretrain(&one, None, &mae()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = Command::new(torchrun());
    c.args(["--no-python", "--nproc-per-node", "2", "--master-port", &port.to_string(), BIN, "pretrain"]);
    c.args(["--out", two.to_str().unwrap(), "--quiet"]).args(mae());
    let err = run_ok(c);
    assert!(err.contains("rank 0 of 2 (torchrun)"), "{err}");
    let files: Vec<String> =
        std::fs::read_dir(&two).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.iter().filter(|f| f.starts_with("events.out")).count(), 1, "{files:?}");
    assert!(files.contains(&"summary.json".into()) && files.contains(&"config.toml".into()), "{files:?}");
    assert_eq!(json(&two.join("summary.json"))["steps"], 20);
    let diff = max_weight_diff(&one, &two);
    assert!(diff < 1e-5, "{diff}");
}

/// SimCLR on a ResNet (batch norm in the backbone and the projector) with `model.sync_bn` and gathered
/// negatives: 2 ranks log the one-process loss at step 0 and along 20 steps. With AdamW at a small lr: the tiny
/// preset's LARS at lr 0.3 (or 0.05) amplifies float reordering itself (one process with 1 vs 2 intra-op
/// threads: 5e-5 apart by step 6, 5e-3 by step 19, measured 2026-12-01), which no 2-rank run can beat.
#[test]
fn simclr_with_sync_bn_and_gathered_negatives_follows_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let mut args = vec!["--config".to_string(), "simclr-fmnist-tiny".into()];
    args.extend(sets(&[
        "data.limit=640",
        "train.batch_size=32",
        "train.epochs=1",
        "train.max_steps=20",
        "model.backbone.width=8",
        "eval.at_end=false",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.threads=1",
        "model.sync_bn=true",
        "optimizer.kind=\"adamw\"",
        "optimizer.base_lr=0.0005",
        "dist.timeout_s=60",
    ]));
    let (alone, after) = (dir.path().join("alone"), dir.path().join("after"));
    run_ok(pretrain(&one, None, &args));
    // Small buckets (50 KB: several for this model), averaged while backward runs (the default) ...
    args.extend(sets(&["dist.bucket_mb=0.05"]));
    run_ok(pretrain(&two, Some(2), &args));
    // ... or after it: the same sums, bit for bit.
    let mut later = args.clone();
    later.extend(sets(&["dist.overlap=false"]));
    run_ok(pretrain(&after, Some(2), &later));
    assert_eq!(max_weight_diff(&two, &after), 0.0, "averaging during backward changed the result");
    let early = |run: &Path| json(&run.join("summary.json"))["grad_buckets_started_in_backward"].as_f64().unwrap();
    assert!(early(&two) >= 1.0, "no bucket started during backward: {}", early(&two));
    assert_eq!(early(&after), 0.0);
    // A group of one (`--nproc-per-node 1`: every gather, all-reduce and broadcast through Gloo) is the
    // one-process run, bit for bit.
    let err = run_ok(pretrain(&alone, Some(1), &args));
    assert!(err.contains("rank 0 of 1"), "{err}");
    assert_eq!(curve(&one, "train/loss"), curve(&alone, "train/loss"));
    assert_eq!(max_weight_diff(&one, &alone), 0.0);
    let seconds = |run: &Path| json(&run.join("summary.json"))["grad_allreduce_seconds"].as_f64().unwrap();
    assert!(seconds(&alone) > seconds(&one), "the group of one all-reduces: {} vs {}", seconds(&alone), seconds(&one));
    let (a, b) = (curve(&one, "train/loss"), curve(&two, "train/loss"));
    assert_eq!(a.len(), 20);
    let first = (a[0].1 - b[0].1).abs();
    let d = max_curve_diff(&a, &b);
    eprintln!(
        "per step: {:?}",
        a.iter().zip(&b).map(|(x, y)| format!("{:.1e}", (x.1 - y.1).abs())).collect::<Vec<_>>()
    );
    eprintln!("SimCLR + sync_bn, 2 ranks vs 1 process: step-0 loss {:.6} vs {:.6} (diff {first:.2e}), 20-step curve within {d:.2e}", a[0].1, b[0].1);
    assert!(first < 1e-5, "{first}");
    assert!(d < 1e-4, "{d}");
}

/// Ctrl-C at a terminal signals the whole process group: the ranks must still get one SIGINT (the launcher's),
/// not two (a second one exits at once, without the final checkpoint), and the launcher must wait for them.
#[test]
fn ctrl_c_to_the_process_group_stops_every_rank_with_one_checkpoint() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let mut c = pretrain(&run, Some(2), &long_run());
    c.process_group(0).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for_checkpoint(&run, &mut child);
    // The launcher leads its own group, as a shell's foreground job.
    Command::new("kill").args(["-INT", "--", &format!("-{}", child.id())]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("stopping the other ranks"), "{err}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["interrupted"], "SIGINT", "{err}");
    let ckpt = selfsup_pipeline::checkpoint::resolve(&run).unwrap();
    assert_eq!(selfsup_pipeline::checkpoint::load_state(&ckpt).unwrap().step, summary["steps"].as_u64().unwrap());
}
