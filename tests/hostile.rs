//! What users hit first, tried as a hostile user would (issue 18): a test set the network cannot take, closed
//! pipes, configs past what the machine can do, outputs onto inputs and into checkpoints, a run folder that lost
//! `LATEST` or `config.toml`, a damaged checkpoint file fed to `--init-from`, a buffer that overflows. Each ends
//! in one clear line (never a panic), before any work it would waste, and with nothing lost.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_selfsup");

/// SimCLR tiny, shrunk to seconds: 8 steps per epoch of batch 32 on 256 images, a width-8 ResNet, no evaluation.
const TINY: [&str; 14] = [
    "--set",
    "data.limit=256",
    "--set",
    "train.batch_size=32",
    "--set",
    "model.backbone.width=8",
    "--set",
    "train.epochs=1",
    "--set",
    "eval.at_end=false",
    "--set",
    "eval.knn_every=0",
    "--set",
    "train.progress_every_s=0",
];

fn pretrain(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["pretrain", "--config", "simclr-fmnist-tiny", "--out", out.to_str().unwrap(), "--quiet"]);
    c.args(TINY).args(extra);
    c
}

/// Runs `c`, expects it to fail cleanly (exit 1, no panic) and returns its stderr.
fn fails(mut c: Command) -> String {
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{c:?} should fail with exit 1:\n{}\n{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{c:?} panicked:\n{err}");
    err
}

/// A failed start leaves no trace: the folder it made for the run is gone again.
fn assert_no_run(out: &Path) {
    let left: Vec<String> = std::fs::read_dir(out)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!out.exists(), "a failed start left {} with {left:?}", out.display());
}

/// A folder of 4 classes x 3 RGB 28 px PNGs (class sub-folders: labels).
fn rgb_folder(dir: &Path) -> PathBuf {
    let root = dir.join("rgb");
    for (c, class) in ["a", "b", "c", "d"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3u8 {
            let img =
                image::RgbImage::from_fn(28, 28, |x, y| image::Rgb([(x * 9) as u8 ^ i, (y * 9) as u8, (c as u8) * 60]));
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    root
}

#[test]
fn a_test_set_the_network_cannot_take_fails_before_training_not_after() {
    let dir = tempfile::tempdir().unwrap();
    // A 3-channel HDF5 test set beside 1-channel Fashion-MNIST training data.
    let h5 = dir.path().join("rgb.h5");
    ok(&["pack", rgb_folder(dir.path()).to_str().unwrap(), h5.to_str().unwrap(), "--channels", "3"]);
    let out = dir.path().join("run");
    let test = format!("data.test={}", h5.display());
    let t0 = Instant::now();
    let err = fails(pretrain(&out, &["--set", &test, "--set", "eval.at_end=true"]));
    assert!(err.contains("data.test") && err.contains("3-channel") && err.contains("takes 1 channel"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "failed only after {:?}", t0.elapsed());
    assert_no_run(&out);
    // The corrected command line is not refused as "already holds a run".
    run_ok(pretrain(&out, &["--set", "train.max_steps=2"]));

    // `eval` of that run on the same set: refused before extracting anything, naming the key.
    let mut c = Command::new(BIN);
    c.args(["eval", "--checkpoint", out.to_str().unwrap(), "--set", &test, "--out", dir.path().to_str().unwrap()]);
    let err = fails(c);
    assert!(err.contains("data.test") && err.contains("3-channel"), "{err}");

    // Test labels outside the classes: label 255 with 10 class names.
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    std::fs::create_dir(&good).unwrap();
    std::fs::create_dir(&bad).unwrap();
    let good = fmnist_test_subset(&good, 64);
    let images = fmnist_test_subset(&bad, 64);
    let labels = bad.join("test-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&labels).unwrap();
    bytes[8 + 17] = 255;
    std::fs::write(&labels, bytes).unwrap();
    let set = format!("data.test={}", images.display());
    let err = fails(pretrain(&dir.path().join("run2"), &["--set", &set, "--set", "eval.at_end=true"]));
    assert!(err.contains("label 255") && err.contains("#17") && err.contains("10 names"), "{err}");
    // Fine-tuning on it (no class names: the training set's labels 0..9 are the classes): the same check,
    // naming the flag's key.
    let mut c = Command::new(BIN);
    c.args(["finetune", "--checkpoint", out.to_str().unwrap(), "--data", good.to_str().unwrap()]);
    c.args(["--test", images.to_str().unwrap(), "--epochs", "1", "--quiet"]);
    c.args(["--out", dir.path().join("ft").to_str().unwrap()]);
    let err = fails(c);
    assert!(err.contains("finetune.test") && err.contains("label 255") && err.contains("labels 0..9"), "{err}");
    assert!(!dir.path().join("ft/config.toml").exists(), "a refused fine-tune wrote its folder");
}

#[test]
fn closed_stdout_and_stderr_are_not_a_panic_and_the_work_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Both pipes' readers gone before the first line (`selfsup ... 2>&1 | true`).
    let mut c = pretrain(&out, &["--set", "train.max_steps=4", "--set", "train.log_every=1"]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "pretrain with closed pipes: {status}");
    assert_eq!(json(&out.join("summary.json"))["steps"], 4);

    let report = dir.path().join("report.json");
    let mut c = Command::new(BIN);
    c.args(["inspect", "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", "--json"]);
    let mut child = c.arg(&report).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    assert!(child.wait().unwrap().success());
    assert_eq!(json(&report)["count"], 10000, "the report is written");
}

#[test]
fn config_values_past_the_machine_are_refused_by_name_before_the_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for (set, key) in [
        ("train.threads=100000", "train.threads"),
        ("optimizer.base_lr=inf", "optimizer.base_lr"),
        ("finetune.base_lr=nan", "finetune.base_lr"),
        ("augment.crop_scale=[0.2, inf]", "augment.crop_scale"),
        ("train.batch_size=100000000", "train.batch_size"),
        ("augment.size=100000", "augment.size"),
    ] {
        let t0 = Instant::now();
        let err = fails(pretrain(&out, &["--set", set]));
        assert!(err.contains(key), "{set}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{set}: refused only after {:?}", t0.elapsed());
    }
    // More than the data holds: found when the data is opened, before the folder is written.
    let err = fails(pretrain(&out, &["--set", "data.limit=100", "--set", "train.batch_size=128"]));
    assert!(err.contains("train.batch_size") && err.contains("100 samples"), "{err}");
    assert_no_run(&out);

    // --config: a device, a file too large, a link loop: each its own error, quickly.
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let lp = dir.path().join("loop.toml");
    std::os::unix::fs::symlink(&lp, &lp).unwrap();
    for (config, says) in [
        ("/dev/zero", "not a regular file"),
        (big.to_str().unwrap(), "larger than"),
        (lp.to_str().unwrap(), "symbolic links"),
    ] {
        let t0 = Instant::now();
        let mut c = Command::new(BIN);
        c.args(["pretrain", "--config", config, "--out", out.to_str().unwrap()]);
        let err = fails(c);
        assert!(err.contains(says) && !err.contains("not a preset"), "{config}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{config}: {:?}", t0.elapsed());
    }
}

fn sha(path: &Path) -> String {
    selfsup_pipeline::checkpoint::sha256_file(path).unwrap()
}

#[test]
fn no_command_writes_onto_its_inputs_or_into_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(pretrain(&run, &["--set", "train.max_steps=2"]));
    let ckpt = selfsup_pipeline::checkpoint::resolve(&run).unwrap();
    let weights = ckpt.join("model.safetensors");
    let before = sha(&weights);
    let r = run.to_str().unwrap();
    for target in [weights.clone(), ckpt.join("backbone.safetensors"), run.join("checkpoints/x.safetensors")] {
        for flags in [&[][..], &["--overwrite"][..]] {
            let mut c = Command::new(BIN);
            c.args(["export", "--checkpoint", r, "--out", target.to_str().unwrap()]).args(flags);
            let err = fails(c);
            assert!(err.contains("inside checkpoint"), "{}: {err}", target.display());
        }
    }
    assert_eq!(sha(&weights), before, "export wrote into the checkpoint");
    assert!(!ckpt.join("backbone.safetensors").exists());
    selfsup_pipeline::checkpoint::resolve(&run).expect("the checkpoint still verifies");
    // Exporting twice to one file: the second needs --overwrite.
    let export = dir.path().join("b.safetensors");
    let e = export.to_str().unwrap();
    ok(&["export", "--checkpoint", r, "--out", e]);
    let mut c = Command::new(BIN);
    c.args(["export", "--checkpoint", r, "--out", e]);
    assert!(fails(c).contains("--overwrite"));
    ok(&["export", "--checkpoint", r, "--out", e, "--overwrite"]);

    // A run folder inside the data it trains on (its checkpoints would be listed with the images).
    let rgb = rgb_folder(dir.path());
    let train = format!("data.train={}", rgb.display());
    let err = fails(pretrain(&rgb.join("run"), &["--set", &train, "--set", "train.batch_size=4"]));
    assert!(err.contains("an input of this command"), "{err}");
    assert!(!rgb.join("run").exists());

    // inspect DATA --json DATA: refused, --overwrite or not; the data stays as it was.
    let data = dir.path().join("t10k-images-idx3-ubyte.gz");
    std::fs::copy("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", &data).unwrap();
    let data_sha = sha(&data);
    for flags in [&[][..], &["--overwrite"][..]] {
        let mut c = Command::new(BIN);
        c.args(["inspect", data.to_str().unwrap(), "--json", data.to_str().unwrap()]).args(flags);
        assert!(fails(c).contains("is an input"));
    }
    assert_eq!(sha(&data), data_sha, "inspect wrote over its input");

    // finetune --out twice: the second is refused unless --overwrite, and the first's results stay.
    let ft = dir.path().join("ft");
    let finetune = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["finetune", "--checkpoint", r, "--out", ft.to_str().unwrap(), "--epochs", "1"]);
        c.args(["--labels-per-class", "2", "--quiet", "--set", "finetune.test_limit=64"]).args(extra);
        c
    };
    run_ok(finetune(&[]));
    let first = sha(&ft.join("finetuned.safetensors"));
    let err = fails(finetune(&[]));
    assert!(err.contains("finetune.json") && err.contains("--overwrite"), "{err}");
    assert_eq!(sha(&ft.join("finetuned.safetensors")), first);
    run_ok(finetune(&["--overwrite"]));
}

#[test]
fn a_run_that_lost_latest_or_its_config_resumes_by_the_line_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let every = ["--set", "train.checkpoint_every_steps=2", "--set", "train.max_steps=4"];
    run_ok(pretrain(&run, &every));
    let latest = run.join("checkpoints/LATEST");
    let name = std::fs::read_to_string(&latest).unwrap().trim().to_string();
    std::fs::remove_file(&latest).unwrap();
    let resume = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["pretrain", "--resume", "--out", run.to_str().unwrap(), "--quiet"]).args(extra);
        c
    };
    let err = fails(resume(&["--set", "train.max_steps=6"]));
    let line = format!("echo {name} > {}", latest.display());
    assert!(err.contains("missing") && err.contains(&line), "{err}");
    std::fs::write(&latest, format!("{name}\n")).unwrap();
    // And without config.toml: the checkpoint's own config serves.
    std::fs::remove_file(run.join("config.toml")).unwrap();
    let out = resume(&["--set", "train.max_steps=6"]).output().unwrap();
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{err}");
    assert!(err.contains("config.toml: missing"), "{err}");
    assert!(run.join("config.toml").is_file());
    // The summary says what this process did.
    assert!(stdout.contains("pretrained to step 6 (2 in this process, resumed at 4)"), "{stdout}");
    assert_eq!(json(&run.join("summary.json"))["steps_this_process"], 2);
}

#[test]
fn init_from_a_checkpoint_file_that_fails_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(pretrain(&run, &["--set", "train.max_steps=2"]));
    let weights = selfsup_pipeline::checkpoint::resolve(&run).unwrap().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 9;
    bytes[at] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();
    let err = fails(pretrain(&dir.path().join("b"), &["--init-from", weights.to_str().unwrap()]));
    assert!(err.contains("checksum mismatch") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_non_finite_buffer_stops_naming_the_last_good_checkpoint_or_is_skipped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let every = ["--set", "train.checkpoint_every_steps=2", "--set", "train.max_steps=6"];
    let stop = dir.path().join("stop");
    let mut c = pretrain(&stop, &every);
    c.env("SELFSUP_FAULT_INF_BUFFER_STEPS", "3");
    let err = fails(c);
    let good = stop.join("checkpoints/epoch-0000-step-2");
    assert!(err.contains("NaN or infinite") && err.contains("running_"), "{err}");
    assert!(err.contains(&format!("the last good checkpoint is {}", good.display())), "{err}");

    let skip = dir.path().join("skip");
    let mut c = pretrain(&skip, &[&every[..], &["--set", "train.on_nonfinite=skip"]].concat());
    c.env("SELFSUP_FAULT_INF_BUFFER_STEPS", "3");
    run_ok(c);
    let summary = json(&skip.join("summary.json"));
    assert_eq!((summary["steps"].as_u64(), summary["skipped_steps"].as_u64()), (Some(6), Some(1)));
    // The final checkpoint holds finite buffers (save refuses others), and it verifies.
    selfsup_pipeline::checkpoint::resolve(&skip).unwrap();
}

/// Every message goes through `say!` / `out!` (which drop a line a closed pipe refuses): `eprintln!` and
/// `println!` panic on one. Test modules are left out (cut at `#[cfg(test)]`).
#[test]
fn no_source_prints_with_a_macro_that_panics_on_a_closed_pipe() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offenders = Vec::new();
    let mut stack: Vec<PathBuf> =
        ["src", "pipeline/src", "models/src", "augment/src"].iter().map(|d| root.join(d)).collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if p.extension().is_some_and(|e| e == "rs") && p.file_name().is_some_and(|n| n != "tests.rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (i, line) in code.lines().enumerate() {
                let l = line.trim_start();
                if !l.starts_with("//")
                    && (l.contains("eprintln!(") || l.contains("println!(") || l.contains("eprint!("))
                {
                    offenders.push(format!("{}:{}: {l}", p.display(), i + 1));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "use say!/out! instead:\n{}", offenders.join("\n"));
}

/// Whether process `pid` catches signal `sig` (its handler is installed): bit `sig - 1` of `SigCgt`.
fn catches(pid: u32, sig: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(mask, 16).unwrap_or(0) >> (sig - 1) & 1 == 1
}

#[test]
fn signals_during_the_setup_are_honored_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut c = pretrain(&out, &["--set", "train.max_steps=2"]);
    let mut child = c.env("SELFSUP_FAULT_SLOW_SETUP_MS", "4000").stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while !(catches(child.id(), 10) && catches(child.id(), 15)) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no SIGUSR1/SIGTERM handlers after 30 s");
        assert!(child.try_wait().unwrap().is_none(), "exited before installing its handlers");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SLURM's SIGUSR1 before the first step: not the default action (which kills); then SIGTERM: honored.
    let pid = child.id().to_string();
    let kill = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    kill("-USR1");
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 during the setup killed the process");
    kill("-TERM");
    let out_ = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out_.stderr);
    assert_eq!(out_.status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM: stopped before the first step; nothing written"), "{err}");
    assert_no_run(&out);
}
