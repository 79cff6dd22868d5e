//! Runs that survive (issue 10), tried on the real binary with real signals: SIGTERM mid-epoch then `--resume`
//! gives bit-identical weights; SIGUSR1 checkpoints and goes on; a second signal exits at once; NaN steps stop
//! the run (naming the step and the last good checkpoint) or are skipped and counted; two processes on one run
//! folder; a flipped byte in any checkpoint file refused by every command; a finished run resumed does nothing;
//! a wrong `data.test` fails before training; a closed stdout is not a panic; a short soak of SIGKILLs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_selfsup");

/// BYOL (momentum teacher, predictor, online probe: every piece of state a resume must restore), shrunk: 12 steps
/// per epoch of batch 32, 2 epochs, a width-8 ResNet.
const SMALL: [&str; 20] = [
    "--set",
    "data.limit=384",
    "--set",
    "train.batch_size=32",
    "--set",
    "model.backbone.width=8",
    "--set",
    "train.epochs=2",
    "--set",
    "eval.at_end=false",
    "--set",
    "eval.knn_every=0",
    "--set",
    "train.log_every=3",
    "--set",
    "optimizer.warmup_epochs=0.5",
    "--set",
    "train.progress_every_s=0",
    "--set",
    "train.checkpoint_every=0",
];

fn pretrain_cmd(out: &Path, resume: bool, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["pretrain", "--out", out.to_str().unwrap()]);
    if resume {
        c.arg("--resume");
    } else {
        c.args(["--config", "byol-fmnist-tiny"]);
        c.args(SMALL);
    }
    c.args(extra);
    c
}

fn run_err(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} should fail:\n{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{c:?} panicked:\n{err}");
    err
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
    assert!(ok.success(), "kill -{sig}");
}

/// Waits until `dir` has an event file (the signal handlers are installed just before it is created).
fn wait_started(dir: &Path, child: &mut Child) {
    let start = Instant::now();
    loop {
        let started = std::fs::read_dir(dir)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("events.out")))
            .unwrap_or(false);
        if started {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited before starting: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no event file in {} after 60 s", dir.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pseudo-random number in [0, 1) from the clock, printed by the caller so a failure can be replayed.
fn clock_random() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    f64::from(nanos.wrapping_mul(2_654_435_761) % 1_000_000) / 1e6
}

fn final_weights(run: &Path) -> Vec<u8> {
    let ckpt = selfsup_pipeline::checkpoint::resolve(run).unwrap();
    std::fs::read(ckpt.join("model.safetensors")).unwrap()
}

fn latest_step(run: &Path) -> u64 {
    let ckpt = selfsup_pipeline::checkpoint::resolve(run).unwrap();
    selfsup_pipeline::checkpoint::load_state(&ckpt).unwrap().step
}

#[test]
fn sigterm_mid_epoch_then_resume_is_bit_identical_and_sigusr1_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let started = Instant::now();
    run_ok(pretrain_cmd(&whole, false, &[]));
    let whole_seconds = started.elapsed().as_secs_f64();

    // SIGUSR1 as soon as the handlers are installed (most often before the first step, which has nothing to save:
    // the request must wait for it, not be dropped), then SIGTERM at a random moment after SIGUSR1's checkpoint.
    let mut child = pretrain_cmd(&split, false, &[]).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = StderrLog::start(&mut child);
    let delay = 0.2 * clock_random() * whole_seconds;
    eprintln!("uninterrupted run {whole_seconds:.1} s; SIGTERM {delay:.2} s after the SIGUSR1 checkpoint");
    wait_started(&split, &mut child);
    signal(&child, "USR1");
    stderr.wait_for(&mut child, "SIGUSR1: wrote");
    std::thread::sleep(Duration::from_secs_f64(delay));
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    let err = stderr.finish();
    assert_eq!(status.code(), Some(143), "SIGTERM exits with 143:\n{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    let summary = json(&split.join("summary.json"));
    assert_eq!(summary["interrupted"], "SIGTERM");
    let stopped = summary["steps"].as_u64().unwrap();
    assert!(stopped < 24, "the run finished before SIGTERM ({stopped} steps)");
    assert_eq!(latest_step(&split), stopped, "the checkpoint is at the step it stopped at");
    let names: Vec<String> = selfsup_pipeline::checkpoint::list(&split.join("checkpoints"))
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "the SIGUSR1 checkpoint and the SIGTERM one: {names:?}");
    eprintln!("stopped at step {stopped} of 24; checkpoints {names:?}");

    run_ok(pretrain_cmd(&split, true, &[]));
    assert!(final_weights(&whole) == final_weights(&split), "resumed weights differ from the uninterrupted run's");
    let (a, b) = (curve(&whole, "train/loss"), curve(&split, "train/loss"));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "the loss curve of the resumed run differs");
    assert_eq!(curve(&whole, "train/online_probe_top1"), curve(&split, "train/online_probe_top1"));

    // Resuming the finished run does nothing and says so: no checkpoint, event file or summary is touched.
    let listing = |d: &Path| {
        let mut v: Vec<(PathBuf, std::time::SystemTime)> = walk(d)
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(&p).unwrap().modified().unwrap();
                (p, m)
            })
            .collect();
        v.retain(|(p, _)| !p.ends_with(".lock") && !p.ends_with("config.toml"));
        v.sort();
        v
    };
    let before = listing(&split);
    let err = run_ok(pretrain_cmd(&split, true, &[]));
    assert!(err.contains("nothing to do"), "{err}");
    assert_eq!(before, listing(&split), "a no-op resume changed files");
}

/// A child's stderr, read by a thread as it comes, so the test can wait for a line while the child runs.
struct StderrLog {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl StderrLog {
    fn start(child: &mut Child) -> Self {
        use std::io::Read;
        let mut pipe = child.stderr.take().expect("stderr piped");
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        StderrLog { text, reader }
    }

    /// Waits (at most 120 s) until the stderr so far contains `needle`; fails if the child exits first.
    fn wait_for(&self, child: &mut Child, needle: &str) {
        let start = Instant::now();
        while !self.text.lock().unwrap().contains(needle) {
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("exited ({status}) before printing {needle:?}:\n{}", self.text.lock().unwrap());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no {needle:?} after 120 s:\n{}",
                self.text.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// All of stderr, once the child has exited.
    fn finish(self) -> String {
        self.reader.join().unwrap();
        std::sync::Arc::try_unwrap(self.text).unwrap().into_inner().unwrap()
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_second_sigint_exits_at_once_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let slow = ["--set", "train.checkpoint_every_steps=2", "--set", "data.limit=3200"];
    let mut child = pretrain_cmd(&run, false, &slow).stderr(Stdio::piped()).spawn().unwrap();
    wait_started(&run, &mut child);
    // Wait for a first checkpoint, then two SIGINTs back to back.
    let start = Instant::now();
    while !run.join("checkpoints/LATEST").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, "INT");
    signal(&child, "INT");
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(5), "the second SIGINT took {:?}", t.elapsed());
    // Whatever was being written, LATEST names a complete, verified checkpoint.
    selfsup_pipeline::checkpoint::resolve(&run).unwrap();
}

#[test]
fn nan_stops_naming_the_step_and_the_last_good_checkpoint_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    // Stop (the default): NaN at step 10, checkpoints every 4 steps, logs every 3. Steps 10 and 11 run with NaN,
    // the log point at 12 stops the run before the checkpoint at 12.
    let run = dir.path().join("stop");
    let mut c = pretrain_cmd(&run, false, &["--set", "train.checkpoint_every_steps=4"]);
    c.env("SELFSUP_FAULT_NAN_STEPS", "10");
    let err = run_err(c);
    assert!(err.contains("step 10:") && err.contains("NaN"), "{err}");
    assert!(err.contains("epoch-0000-step-8"), "the error names the last good checkpoint:\n{err}");
    assert_eq!(latest_step(&run), 8);
    assert_eq!(selfsup_pipeline::checkpoint::list(&run.join("checkpoints")).len(), 2);
    // Checkpoint before the log point: the checkpoint at 8 sees step 7's NaN and refuses.
    let run = dir.path().join("stop-at-checkpoint");
    let mut c = pretrain_cmd(&run, false, &["--set", "train.checkpoint_every_steps=4", "--set", "train.log_every=10"]);
    c.env("SELFSUP_FAULT_NAN_STEPS", "7");
    let err = run_err(c);
    assert!(err.contains("step 7:") && err.contains("epoch-0000-step-4"), "{err}");
    assert_eq!(latest_step(&run), 4);
    for (ckpt, _) in selfsup_pipeline::checkpoint::list(&run.join("checkpoints")) {
        let tensors = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
        let named = tensors.iter().map(|(n, t)| (n.as_str(), t));
        assert_eq!(selfsup_pipeline::checkpoint::first_nonfinite(named), None, "{}", ckpt.display());
    }

    // Skip: those updates are skipped and counted; the run finishes with finite weights.
    let run = dir.path().join("skip");
    let mut c = pretrain_cmd(&run, false, &["--set", "train.on_nonfinite=\"skip\"", "--set", "train.max_steps=12"]);
    c.env("SELFSUP_FAULT_NAN_STEPS", "3,7");
    let err = run_ok(c);
    assert!(err.contains("step 3: non-finite") && err.contains("step 7: non-finite"), "{err}");
    assert_eq!(json(&run.join("summary.json"))["skipped_steps"], 2);
    let skipped = curve(&run, "train/skipped_steps");
    assert_eq!(skipped, vec![(3, 0.0), (6, 1.0), (9, 2.0), (12, 2.0)]);
    assert!(curve(&run, "train/loss").iter().all(|(_, v)| v.is_finite()));
    // ... and stops once more than train.max_skipped were.
    let run = dir.path().join("skip-too-many");
    let mut c = pretrain_cmd(&run, false, &["--set", "train.on_nonfinite=\"skip\"", "--set", "train.max_skipped=1"]);
    c.env("SELFSUP_FAULT_NAN_STEPS", "3,7");
    let err = run_err(c);
    assert!(err.contains("2 steps skipped") && err.contains("train.max_skipped = 1"), "{err}");
}

#[test]
fn one_process_per_run_folder_and_no_silent_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut first = pretrain_cmd(&run, false, &["--set", "data.limit=3200"]).stderr(Stdio::null()).spawn().unwrap();
    wait_started(&run, &mut first);
    // "Within a second" of starting: measured against the binary's own start-up (loading libtorch), which on a
    // loaded 2-core machine alone takes seconds.
    let t = Instant::now();
    assert!(Command::new(BIN).arg("--version").output().unwrap().status.success());
    let startup = t.elapsed();
    let t = Instant::now();
    let err = run_err(pretrain_cmd(&run, true, &[]));
    let took = t.elapsed();
    assert!(took < startup + Duration::from_secs(1), "the second process took {took:?} to fail (start-up {startup:?})");
    eprintln!("the second process failed after {took:?} (the binary's start-up alone: {startup:?})");
    assert!(err.contains(&format!("PID {}", first.id())) && err.contains("in use"), "{err}");
    let err = run_err(pretrain_cmd(&run, false, &[]));
    assert!(err.contains(&format!("PID {}", first.id())), "{err}");
    let err = run_err({
        let mut c = Command::new(BIN);
        c.args(["eval", "--checkpoint", run.to_str().unwrap()]);
        c
    });
    assert!(err.contains(&format!("PID {}", first.id())) || err.contains("no checkpoint"), "{err}");
    signal(&first, "KILL");
    let _ = first.wait();

    // The holder is gone (SIGKILL): the lock went with it. A fresh pretrain into the run is refused...
    let err = run_err(pretrain_cmd(&run, false, &[]));
    assert!(err.contains("already holds a run") && err.contains("--overwrite"), "{err}");
    // ... unless --overwrite.
    run_ok(pretrain_cmd(&run, false, &["--overwrite", "--set", "train.max_steps=3"]));
    assert_eq!(json(&run.join("summary.json"))["steps"], 3);
}

#[test]
fn a_resume_refuses_what_its_checkpoint_cannot_continue_and_records_recipe_changes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(pretrain_cmd(&run, false, &["--set", "train.max_steps=5"]));
    let files = |run: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        // `.lock` holds the PID and command of the last process that took the lock: every process writes it.
        let files = walk(run).into_iter().filter(|p| p.is_file() && !p.ends_with(".lock"));
        files.map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
    };
    let before = files(&run);

    // The batch size, the seed, the data or the network: the checkpoint's position or weights mean nothing under
    // them. Every such key is named, with the way out, and nothing in the folder changes.
    let err = run_err(pretrain_cmd(
        &run,
        true,
        &[
            "--set",
            "train.max_steps=0",
            "--set",
            "train.batch_size=16",
            "--set",
            "seed=7",
            "--set",
            "model.backbone.width=4",
        ],
    ));
    for named in ["train.batch_size = 32 -> 16", "seed = 0 -> 7", "model.backbone.width = 8 -> 4", "--init-from"] {
        assert!(err.contains(named), "{named:?} not in:\n{err}");
    }
    assert!(!err.contains("max_steps"), "a bookkeeping key named as refused:\n{err}");
    let after = files(&run);
    let touched: Vec<_> = after.iter().filter(|f| !before.contains(f)).map(|f| &f.0).collect();
    assert!(touched.is_empty() && after.len() == before.len(), "a refused resume touched the run folder: {touched:?}");

    // The data at another path is fine if it is the same size (a requeued job's node-local copy); of another
    // size it is refused by the sample count the checkpoint keeps, before anything is written.
    let err = run_err(pretrain_cmd(&run, true, &["--set", "train.max_steps=0", "--set", "data.limit=320"]));
    assert!(err.contains("written over 384 training samples") && err.contains("gives 320"), "{err}");
    let after = files(&run);
    assert!(after.len() == before.len() && after.iter().all(|f| before.contains(f)), "a refused resume wrote");
    let copy = dir.path().join("scratch");
    std::fs::create_dir(&copy).unwrap();
    for f in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"] {
        std::fs::copy(Path::new("/usr/share/datasets/fashion-mnist").join(f), copy.join(f)).unwrap();
    }
    let moved = format!("data.train={}", copy.join("train-images-idx3-ubyte.gz").display());

    // A lower learning rate and more steps: allowed, said, and recorded where the run's history is read.
    let said = run_ok(pretrain_cmd(
        &run,
        true,
        &["--set", "train.max_steps=8", "--set", "optimizer.base_lr=0.05", "--set", &moved],
    ));
    assert!(
        said.contains("resume changes the recipe from step 5") && said.contains("optimizer.base_lr = 1.0 -> 0.05"),
        "{said}"
    );
    let kept = run.join("config-before-step-5.toml");
    let ckpt5 = run.join("checkpoints").join(
        std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.ends_with("-step-5"))
            .expect("the step-5 checkpoint"),
    );
    assert_eq!(std::fs::read(&kept).unwrap(), std::fs::read(ckpt5.join("config.toml")).unwrap());
    let old = selfsup_pipeline::Config::load(&kept, &[]).unwrap();
    let new = selfsup_pipeline::Config::load(&run.join("config.toml"), &[]).unwrap();
    assert_eq!((old.optimizer.base_lr, new.optimizer.base_lr), (1.0, 0.05));
    assert_eq!(latest_step(&run), 8);
    let ev = read_events(&run);
    let changes = &ev["text"]["config/changes"];
    assert_eq!(changes[0][0], 5, "{changes}");
    let md = changes[0][1].as_str().unwrap();
    assert!(md.contains("`optimizer.base_lr` | `1.0` | `0.05`") && md.contains("`data.train`"), "{md}");
    assert!(!md.contains("max_steps"), "bookkeeping is not a recipe change:\n{md}");
    // --overwrite takes the kept config away with the rest of the old run.
    run_ok(pretrain_cmd(&run, false, &["--overwrite", "--set", "train.max_steps=2"]));
    assert!(!kept.exists());
}

/// Copies run folder `src` to `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

#[test]
fn a_flipped_byte_in_any_checkpoint_file_is_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(pretrain_cmd(&run, false, &["--set", "train.max_steps=3"]));
    let ckpt = selfsup_pipeline::checkpoint::resolve(&run).unwrap();
    let files =
        ["model.safetensors", "optimizer.safetensors", "probe.safetensors", "state.json", "config.toml", "SHA256SUMS"];
    for (k, file) in files.iter().enumerate() {
        let bad = dir.path().join(format!("bad-{k}"));
        copy_dir(&run, &bad);
        let target = bad.join("checkpoints").join(ckpt.file_name().unwrap()).join(file);
        let mut bytes = std::fs::read(&target).unwrap();
        let at = (bytes.len() * (k + 1) / (files.len() + 1)).min(bytes.len() - 1);
        bytes[at] ^= 0x01;
        std::fs::write(&target, bytes).unwrap();
        let b = bad.to_str().unwrap();
        let export = dir.path().join("x.safetensors");
        let commands: [(&str, Vec<&str>); 4] = [
            ("resume", vec!["pretrain", "--resume", "--out", b, "--set", "train.max_steps=6"]),
            ("eval", vec!["eval", "--checkpoint", b]),
            ("finetune", vec!["finetune", "--checkpoint", b, "--epochs", "1", "--labels-per-class", "2", "--quiet"]),
            ("export", vec!["export", "--checkpoint", b, "--out", export.to_str().unwrap()]),
        ];
        for (what, args) in commands {
            let out = Command::new(BIN).args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what} accepted a flipped byte in {file}");
            assert!(err.contains(file), "{what}, flipped byte in {file}: the error must name the file:\n{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
        assert!(!export.exists());
    }
}

#[test]
fn a_corrupt_latest_checkpoint_names_the_newest_good_one_and_resuming_from_it_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(pretrain_cmd(&run, false, &["--set", "train.max_steps=6", "--set", "train.checkpoint_every_steps=2"]));
    let ckpts = selfsup_pipeline::checkpoint::list(&run.join("checkpoints"));
    let steps: Vec<u64> = ckpts.iter().map(|(_, st)| st.step).collect();
    assert_eq!(steps, [2, 4, 6]);
    let uninterrupted = final_weights(&run);
    let weights = ckpts[2].0.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&weights, bytes).unwrap();
    let err = run_err(pretrain_cmd(&run, true, &[]));
    let good = ckpts[1].0.file_name().unwrap().to_string_lossy().into_owned();
    let latest = run.join("checkpoints").join("LATEST");
    let fix = format!("`echo {good} > {}`", latest.display());
    assert!(err.contains("model.safetensors") && err.contains("checksum mismatch") && err.contains(&fix), "{err}");
    // What the hint says to do, then --resume: steps 5 and 6 again, the same weights as before the damage.
    std::fs::write(&latest, format!("{good}\n")).unwrap();
    let said = run_ok(pretrain_cmd(&run, true, &[]));
    assert!(said.contains("step 4"), "{said}");
    assert_eq!(latest_step(&run), 6);
    assert!(final_weights(&run) == uninterrupted, "resumed from step 4: weights differ from the uninterrupted run");
}

#[test]
fn a_signal_during_the_final_evaluation_stops_it_and_a_resume_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // An evaluation that would take hours: a million epochs of linear probe.
    let mut child = pretrain_cmd(
        &run,
        false,
        &[
            "--set",
            "train.max_steps=3",
            "--set",
            "eval.at_end=true",
            "--set",
            "eval.train_limit=1000",
            "--set",
            "eval.projector_samples=16",
            "--set",
            "eval.probe_epochs=1000000",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The projector is written once the features are extracted, just before the probes.
    let start = Instant::now();
    while !run.join("projector_config.pbtxt").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited before its evaluation: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no projector after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "INT");
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("still evaluating 30 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("stopped {:?} after SIGINT", t.elapsed());
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT: the final evaluation stopped") && err.contains("--resume"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(json(&run.join("summary.json"))["interrupted"], "SIGINT");
    assert!(!run.join("eval.json").exists());
    assert_eq!(latest_step(&run), 3);
    // The resume has nothing to train and evaluates (here with a probe of a sensible length).
    let said = run_ok(pretrain_cmd(&run, true, &["--set", "eval.probe_epochs=2"]));
    assert!(run.join("eval.json").exists(), "{said}");
    assert!(json(&run.join("summary.json"))["interrupted"].is_null());
    assert_eq!(latest_step(&run), 3);
}

#[test]
fn one_command_line_starts_a_job_resumes_it_and_restarts_one_killed_before_its_first_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    // What a SLURM script runs on its first start and on every requeue.
    let job = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["pretrain", "--resume", "--config", "byol-fmnist-tiny", "--out", r]).args(SMALL).args(extra);
        c
    };
    // 1. Killed (-9) before its first checkpoint: the folder holds a config and an event file, no checkpoint.
    let mut first = job(&["--set", "train.max_steps=12"]).stderr(Stdio::null()).spawn().unwrap();
    wait_started(&run, &mut first);
    signal(&first, "KILL");
    let _ = first.wait();
    assert!(!run.join("checkpoints").join("LATEST").exists(), "the kill came after the first checkpoint");
    // 2. The requeue starts it again from step 0 with its own config (a plain --resume does too).
    let said = run_ok(pretrain_cmd(&run, true, &[]));
    assert!(said.contains("no checkpoint yet") && said.contains("from step 0"), "{said}");
    assert_eq!(latest_step(&run), 12);
    let restarted = final_weights(&run);
    // The same as a run that was never killed.
    let clean = dir.path().join("clean");
    run_ok(pretrain_cmd(&clean, false, &["--set", "train.max_steps=12"]));
    assert!(final_weights(&clean) == restarted, "a restarted run differs from an uninterrupted one");
    // 3. The same command line again: a run with checkpoints continues (here: it is finished).
    let said = run_ok(job(&["--set", "train.max_steps=12"]));
    assert!(said.contains("resuming run") && said.contains("nothing to do"), "{said}");
    // Without --config, a folder without a run is an error saying how to start one.
    let err = run_err(pretrain_cmd(&dir.path().join("none"), true, &[]));
    assert!(err.contains("no run to resume there") && err.contains("--config"), "{err}");
}

#[test]
fn bad_paths_fail_before_training_and_leftovers_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let t = Instant::now();
    let err = run_err(pretrain_cmd(
        &run,
        false,
        &["--set", "data.test=\"/nonexistent/t10k.idx3\"", "--set", "eval.at_end=true"],
    ));
    assert!(err.contains("data.test") && err.contains("/nonexistent/t10k.idx3"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}: not before training", t.elapsed());
    assert!(!run.join("checkpoints").exists(), "no training before the error");

    // A temporary checkpoint folder of a writer that was killed: removed by the next run in the folder.
    let run = dir.path().join("leftover");
    run_ok(pretrain_cmd(&run, false, &["--set", "train.max_steps=3"]));
    let tmp = run.join("checkpoints/.epoch-0000-step-6.tmp-4242");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"half").unwrap();
    let err = run_ok(pretrain_cmd(&run, true, &["--set", "train.max_steps=6"]));
    assert!(err.contains("removed 1 temporary"), "{err}");
    assert!(!tmp.exists());
    assert_eq!(latest_step(&run), 6);
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let script = format!(
        "{BIN} inspect /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --json {} | head -c 1 >/dev/null; \
         echo \"status=${{PIPESTATUS[0]}}\"",
        json.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("status=0"), "inspect with a closed stdout: {stdout}\n{stderr}");
    assert!(json.is_file(), "the report was still written");
}

/// The short soak: SIGKILL at random moments and inside checkpoint writes, resume each time; the end result is
/// bit-identical to the uninterrupted run and no kill leaves a dangling LATEST or a corrupt checkpoint.
#[test]
fn soak_short() {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak"))
        .env("SELFSUP_BIN", BIN)
        .env("KILLS", "4")
        .env("SOAK_SHORT", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/soak failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.contains("bit-identical: yes"), "{stdout}");
    assert!(stdout.contains("dangling LATEST: 0") && stdout.contains("corrupt checkpoints: 0"), "{stdout}");
}
