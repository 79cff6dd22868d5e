//! End-to-end tests of the `selfsup` binary on real Fashion-MNIST with a tiny model: pretrain → checkpoint →
//! eval, the TensorBoard file read by TensorBoard's own reader, resume, bench-loader, and config errors.

mod common;

use std::path::Path;
use std::process::Command;

use common::{json, ok, read_events, selfsup, QUICK};

#[test]
fn pretrain_checkpoint_eval_and_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args =
        vec!["pretrain", "--config", "configs/simclr-fmnist-tiny.toml", "--out", run.to_str().unwrap(), "--quiet"];
    args.extend(QUICK);
    let stdout = ok(&args);
    assert!(stdout.contains("k-NN (k=200, T=0.1) top-1"), "{stdout}");
    assert!(stdout.contains("worst class"), "{stdout}");

    // Run folder contents.
    assert!(run.join("config.toml").is_file());
    let ckpt = run.join("checkpoints").join(std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap().trim());
    assert!(ckpt.join("model.safetensors").is_file() && ckpt.join("optimizer.safetensors").is_file());
    let report = json(&run.join("eval.json"));
    let knn = report["knn"]["top1"].as_f64().unwrap();
    let linear = report["linear"]["top1"].as_f64().unwrap();
    // 12 steps of a tiny net are far from converged, but features must carry class information (chance: 10%).
    assert!(knn > 0.4 && linear > 0.4, "knn {knn}, linear {linear}");
    assert_eq!(report["test_samples"], 10_000);
    assert_eq!(report["train_samples"], 2000);
    assert_eq!(report["linear"]["per_class"].as_array().unwrap().len(), 10);
    assert_eq!(report["linear"]["per_class"][9]["class"], "Ankle boot");
    assert!(report["raw_pixels_linear"]["top1"].as_f64().unwrap() > 0.7);
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["steps"], 12);

    // TensorBoard's reader sees the tags, the steps, and the view grid at its true size.
    let ev = read_events(&run);
    for tag in ["train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction"] {
        let steps: Vec<i64> = ev["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("{tag} missing"))
            .iter()
            .map(|p| p[0].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![4, 8, 12], "{tag}");
    }
    let losses: Vec<f64> =
        ev["scalars"]["train/loss"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    let wait = ev["scalars"]["train/data_wait_fraction"][0][1].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&wait));
    let knn_tb = ev["scalars"]["eval/knn_top1"][0][1].as_f64().unwrap();
    assert!((knn_tb - knn).abs() < 1e-6);
    assert!(ev["scalars"]["eval/linear_top1"].is_array());
    // 16 pairs, 8 tiles per row (4 pairs), 28 px views shown at 56 px with 2 px borders: 8*58+2 by 4*58+2.
    assert_eq!(ev["images"]["views/pairs"][0], serde_json::json!([0, 466, 234]));

    // The online probe's accuracy, logged with the loss: a real classifier on the live features (chance is 10%).
    let probe: Vec<f64> =
        ev["scalars"]["train/online_probe_top1"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert_eq!(probe.len(), 3, "{probe:?}");
    assert!(probe.iter().all(|a| (0.0..=1.0).contains(a)) && probe[2] > 0.2 && probe[2] > probe[0], "{probe:?}");

    // The embedding projector's files, read as TensorBoard's projector plugin reads them.
    let out = Command::new(selfsup_pipeline::venv_python())
        .arg("scripts/reference/check_projector.py")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &p[0];
    assert_eq!(e["shape"], serde_json::json!([1000, 128]), "{e}");
    assert_eq!(e["declared_shape"], e["shape"]);
    assert_eq!((e["all_rows_same_width"].as_bool(), e["finite"].as_bool()), (Some(true), Some(true)));
    assert_eq!((e["metadata_header"].as_str(), e["metadata_rows"].as_u64()), (Some("class\tlabel"), Some(1000)));
    assert_eq!(e["classes"].as_array().unwrap().len(), 10, "{e}");
    assert!(e["classes"].as_array().unwrap().contains(&serde_json::json!("Ankle boot")));
    assert_eq!(e["sprite_size"], e["sprite_expected"]);
    assert_eq!(e["sprite_size"], serde_json::json!([32 * 28, 32 * 28]));

    // `eval` on the checkpoint reproduces the k-NN result exactly (deterministic features and vote).
    let out2 = dir.path().join("eval2");
    let stdout = ok(&["eval", "--checkpoint", run.to_str().unwrap(), "--out", out2.to_str().unwrap()]);
    assert!(stdout.contains("linear probe top-1"), "{stdout}");
    let again = json(&out2.join("eval.json"));
    assert_eq!(again["knn"]["top1"].as_f64().unwrap(), knn);
    assert_eq!(again["linear"]["top1"].as_f64().unwrap(), linear);

    // Resume continues from the checkpoint's step.
    let stdout = ok(&[
        "pretrain",
        "--resume",
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.max_steps=16",
        "--set",
        "eval.at_end=false",
    ]);
    assert!(stdout.contains("pretrained to step 16 (4 in this process, resumed at 12)"), "{stdout}");
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[train]\nbatch_sise = 64\n").unwrap();
    let out =
        selfsup(&["pretrain", "--config", bad.to_str().unwrap(), "--out", dir.path().join("r").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("train.batch_sise"), "{err}");

    let out = selfsup(&[
        "pretrain",
        "--config",
        "simclr-fmnist-tiny",
        "--set",
        "optimizer.base_lr=-1",
        "--out",
        dir.path().join("r2").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("optimizer.base_lr"), "{err}");

    let out = selfsup(&["pretrain", "--config", "no-such-preset"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("simclr-fmnist-tiny"), "lists the presets");
}

#[test]
fn bench_loader_and_info() {
    let stdout = ok(&["bench-loader", "--config", "simclr-fmnist-tiny", "--seconds", "1", "--threads", "1"]);
    let last = stdout.lines().last().unwrap();
    let v: f64 = last.strip_prefix("pairs_per_s=").expect(last).parse().unwrap();
    assert!(v > 100.0, "{last}");
    let info = ok(&["info"]);
    assert!(info.contains("libtorch  2.11.0") && info.contains("/usr/share/datasets/fashion-mnist"), "{info}");
}

#[test]
fn presets_completions_and_resume_messages() {
    // Every configs/*.toml, each with its description and the facts that tell presets apart.
    let list = ok(&["presets"]);
    let files: Vec<String> = std::fs::read_dir("configs")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(str::to_string))
        .collect();
    assert!(files.len() >= 16);
    for name in &files {
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("{name}"));
        assert!(line.len() > name.len() + 20, "{name} has no description: {line:?}");
    }
    assert!(list.contains("dino ViT(") || list.contains("dino ResNet("), "{list}");
    assert!(!list.contains("does not load"), "{list}");
    // Completion scripts name the subcommands and their flags.
    let bash = ok(&["completions", "bash"]);
    assert!(bash.contains("_selfsup()") && bash.contains("--nproc-per-node") && bash.contains("presets"));
    assert!(ok(&["completions", "zsh"]).contains("#compdef selfsup"));
    // --resume of a folder with no run names the folder, not a missing --config.
    let dir = tempfile::tempdir().unwrap();
    let out = common::selfsup(&["pretrain", "--resume", "--out", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no run to resume there"), "{err}");
    assert!(!err.contains("no --config given"), "{err}");
}

#[test]
fn inspect_reports_sizes_duplicates_unreadable_and_classes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pets");
    for (class, n) in [("cat", 3), ("dog", 2)] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..n {
            image::RgbImage::from_pixel(20 + i, 10, image::Rgb([i as u8, if class == "cat" { 0 } else { 200 }, 0]))
                .save(data.join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    // An exact copy under another name, and a corrupt file.
    std::fs::copy(data.join("cat/1.png"), data.join("dog/copy.png")).unwrap();
    std::fs::write(data.join("dog/broken.jpg"), b"nope").unwrap();
    let json = dir.path().join("report.json");
    let stdout = ok(&["inspect", data.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    assert!(stdout.contains("broken.jpg"), "{stdout}");
    let r = self::json(&json);
    assert_eq!((r["count"].as_u64(), r["readable"].as_u64()), (Some(7), Some(6)));
    assert_eq!(r["unreadable"].as_array().unwrap().len(), 1);
    assert_eq!(r["duplicates"], 1);
    let group: Vec<String> =
        r["duplicate_groups"][0].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(group[0].ends_with("cat/1.png") && group[1].ends_with("dog/copy.png"), "{group:?}");
    assert_eq!(r["classes"], serde_json::json!([{"class": "cat", "count": 3}, {"class": "dog", "count": 4}]));
    // 21x10 appears three times (cat/1.png, its copy, dog/1.png); 20x10 twice; 22x10 once.
    assert_eq!(r["sizes"][0], serde_json::json!({"width": 21, "height": 10, "channels": 3, "count": 3}));

    // Fashion-MNIST: 60,000 28x28 gray images, 6,000 per class.
    let r = {
        let j = dir.path().join("fm.json");
        ok(&["inspect", "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", "--json", j.to_str().unwrap()]);
        self::json(&j)
    };
    assert_eq!(r["sizes"], serde_json::json!([{"width": 28, "height": 28, "channels": 1, "count": 60000}]));
    assert!(r["classes"].as_array().unwrap().iter().all(|c| c["count"] == 6000));
}

#[test]
fn the_pixel_limit_is_a_config_key() {
    // 40x30 images, a limit of 1000 pixels: every image is refused and the run stops with a clear message.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("imgs");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..8u8 {
        image::RgbImage::from_pixel(40, 30, image::Rgb([i, 0, 0])).save(data.join(format!("{i}.png"))).unwrap();
    }
    let train = format!("data.train=\"{}\"", data.display());
    let out = selfsup(&[
        "pretrain",
        "--config",
        "simclr-fmnist-tiny",
        "--quiet",
        "--set",
        &train,
        "--set",
        "data.max_pixels=1000",
        "--set",
        "train.batch_size=4",
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("exceeds the limit of 1000") && err.contains("data.max_bad_fraction"), "{err}");
}

#[test]
fn packed_hdf5_gives_the_same_loss_curve_as_idx() {
    // Pack the real Fashion-MNIST training set, then pretrain 8 steps from each with the same seed. With a full
    // (sample by sample) shuffle both see the same samples in the same order, so the loss curves must be identical.
    let dir = tempfile::tempdir().unwrap();
    let idx = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";
    let h5 = dir.path().join("fmnist.h5");
    ok(&["pack", idx, h5.to_str().unwrap()]);
    let losses = |train: &str, shuffle: &str, name: &str| -> Vec<f64> {
        let run = dir.path().join(name);
        ok(&[
            "pretrain",
            "--config",
            "simclr-fmnist-tiny",
            "--quiet",
            "--out",
            run.to_str().unwrap(),
            "--set",
            &format!("data.train=\"{train}\""),
            "--set",
            &format!("data.shuffle=\"{shuffle}\""),
            "--set",
            "train.max_steps=8",
            "--set",
            "train.batch_size=64",
            "--set",
            "train.log_every=2",
            "--set",
            "eval.at_end=false",
        ]);
        read_events(&run)["scalars"]["train/loss"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect()
    };
    let from_idx = losses(idx, "full", "idx");
    let from_h5 = losses(h5.to_str().unwrap(), "full", "h5");
    assert_eq!(from_idx.len(), 4);
    assert_eq!(from_idx, from_h5);
    // The default block-aware shuffle reads HDF5 chunk by chunk: another order, another curve.
    assert_ne!(losses(h5.to_str().unwrap(), "auto", "h5-auto"), from_idx);
}

/// The tiny MAE preset end to end (a few steps), its reconstruction grid read back with TensorBoard's reader, then
/// `selfsup finetune` on that MAE checkpoint (low-label, pretrained and from scratch) and on a SimCLR checkpoint
/// (linear mode).
#[test]
fn mae_pretrain_reconstructs_and_finetune_works_on_mae_and_simclr_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mae");
    let quick = [
        "--set",
        "train.max_steps=8",
        "--set",
        "train.batch_size=64",
        "--set",
        "eval.train_limit=1000",
        "--set",
        "eval.probe_epochs=2",
        "--set",
        "train.log_every=4",
        "--set",
        "optimizer.warmup_epochs=0",
    ];
    // With the transfer step of mae-fmnist-mnist: fine-tune on MNIST, pretrained and from scratch, side by side.
    let transfer = [
        "--set",
        "finetune.at_end=true",
        "--set",
        "finetune.train=\"/usr/share/datasets/mnist/train-images-idx3-ubyte\"",
        "--set",
        "finetune.test=\"/usr/share/datasets/mnist/t10k-images-idx3-ubyte\"",
        "--set",
        "finetune.labels_per_class=5",
        "--set",
        "finetune.epochs=1",
        "--set",
        "finetune.test_limit=300",
    ];
    let mut args = vec!["pretrain", "--config", "mae-fmnist-tiny", "--out", run.to_str().unwrap(), "--quiet"];
    args.extend(quick);
    args.extend(transfer);
    let stdout = ok(&args);
    assert!(stdout.contains("linear probe top-1"), "{stdout}");
    assert!(stdout.contains("pretrained") && stdout.contains("from scratch") && stdout.contains(" points"), "{stdout}");
    let cmp = json(&run.join("finetune/comparison.json"));
    for side in ["pretrained", "scratch"] {
        assert_eq!(cmp[side]["train_samples"].as_u64(), Some(50), "{side}");
        assert_eq!(cmp[side]["test_samples"].as_u64(), Some(300), "{side}");
        assert!(cmp[side]["train_data"].as_str().unwrap().contains("mnist/train"), "{side}");
        assert!(run.join("finetune").join(side).join("finetune.json").is_file());
    }
    assert_eq!(
        (cmp["pretrained"]["pretrained"].as_bool(), cmp["scratch"]["pretrained"].as_bool()),
        (Some(true), Some(false))
    );
    let ev = read_events(&run);
    let loss = ev["scalars"]["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 2, "{loss:?}");
    assert!(loss.iter().all(|p| p[1].as_f64().unwrap().is_finite()));
    // 8 test images per row, three rows (original, masked, reconstruction), 28 px shown at 56 px, 2 px borders.
    let recon = ev["images"]["reconstruction/original_masked_reconstructed"].as_array().unwrap();
    assert_eq!(recon.len(), 1, "{recon:?}");
    assert_eq!((recon[0][0].as_i64(), recon[0][1].as_i64(), recon[0][2].as_i64()), (Some(8), Some(466), Some(176)));

    // Fine-tune the MAE ViT with 10 labels per class, pretrained and from scratch.
    let ft = dir.path().join("ft");
    // 10 labels per class, batch 20, 3 epochs: 15 steps.
    let common = [
        "--labels-per-class",
        "10",
        "--epochs",
        "3",
        "--set",
        "finetune.test_limit=500",
        "--set",
        "finetune.batch_size=20",
        "--set",
        "finetune.warmup_epochs=0",
        "--set",
        "finetune.base_lr=0.01",
        "--quiet",
    ];
    let mut args = vec!["finetune", "--checkpoint", run.to_str().unwrap(), "--out", ft.to_str().unwrap()];
    args.extend(common);
    let stdout = ok(&args);
    assert!(stdout.contains("test top-1") && stdout.contains("worst class"), "{stdout}");
    let r = json(&ft.join("finetune.json"));
    assert_eq!(r["pretrained"], true);
    assert_eq!((r["train_samples"].as_u64(), r["test_samples"].as_u64()), (Some(100), Some(500)));
    assert_eq!(r["test"]["per_class"].as_array().unwrap().len(), 10);
    assert_eq!(r["curve"].as_array().unwrap().len(), 3);
    let top1 = r["top1"].as_f64().unwrap();
    assert!(top1 > 0.15 && top1 <= 1.0, "{top1}");
    assert!(ft.join("finetuned.safetensors").is_file());
    let fev = read_events(&ft);
    assert_eq!(fev["scalars"]["finetune/test_top1"].as_array().unwrap().len(), 3);
    // One confusion matrix per evaluation: 10 classes of 48 px cells, the names (class indices here: one 8 px
    // glyph) left of and above the matrix after an 8+6 px axis title and a 6 px gap: 28 + 480 + 8 wide, and a
    // 14 px colour bar with its 8 px legend under it: 28 + 480 + 8 + 14 + 8 + 12 high.
    let cm = fev["images"]["finetune/confusion_matrix"].as_array().unwrap();
    assert_eq!(cm.len(), 3);
    assert_eq!((cm[2][1].as_i64(), cm[2][2].as_i64()), (Some(516), Some(550)));
    // The curves have a point every epoch, and the report is in the Text tab.
    assert_eq!(fev["scalars"]["finetune/lr"].as_array().unwrap().len(), 3);
    let text = fev["text"]["finetune/report"][0][1].as_str().unwrap();
    let worst = r["test"]["worst_class"].as_str().unwrap();
    assert!(
        text.contains(&format!("| {worst} |")) && text.contains("Worst class") && text.contains("| **all** |"),
        "{text}"
    );
    let conf = r["test"]["confusion"].as_array().unwrap();
    let total: u64 = conf.iter().flat_map(|row| row.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 500, "every test image in the confusion matrix once");
    assert!(fev["scalars"]["finetune/train_loss"].as_array().is_some());

    let scratch = dir.path().join("scratch");
    let mut args =
        vec!["finetune", "--checkpoint", run.to_str().unwrap(), "--out", scratch.to_str().unwrap(), "--from-scratch"];
    args.extend(common);
    ok(&args);
    let s = json(&scratch.join("finetune.json"));
    assert_eq!(s["pretrained"], false);
    // Same subset, same recipe: only the initialisation differs (pipeline/tests/checkpoint.rs checks the load).
    assert_eq!(s["train_samples"], r["train_samples"]);
    assert!(s["checkpoint"].is_null() && r["checkpoint"].as_str().unwrap().contains("checkpoints"), "{r}");

    // A SimCLR ResNet checkpoint, linear mode.
    let simclr = dir.path().join("simclr");
    let mut args = vec![
        "pretrain",
        "--config",
        "simclr-fmnist-tiny",
        "--out",
        simclr.to_str().unwrap(),
        "--quiet",
        "--set",
        "eval.at_end=false",
    ];
    args.extend(QUICK);
    ok(&args);
    let lin = dir.path().join("lin");
    let mut args =
        vec!["finetune", "--checkpoint", simclr.to_str().unwrap(), "--out", lin.to_str().unwrap(), "--linear"];
    args.extend(common);
    ok(&args);
    let l = json(&lin.join("finetune.json"));
    assert_eq!((l["mode"].as_str(), l["pretrained"].as_bool()), (Some("linear"), Some(true)));
    assert!(l["backbone"].as_str().unwrap().starts_with("ResNet"), "{l}");

    // Bad input names the problem: a checkpoint whose backbone does not fit, missing test data.
    let out = selfsup(&["finetune", "--checkpoint", dir.path().join("nope").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_preset_file_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir("configs").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = selfsup_pipeline::Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(Some(cfg.name.as_str()), path.file_stem().and_then(|s| s.to_str()), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 6, "{n} presets");
}

/// Resuming at an epoch boundary continues exactly: 1 epoch + resume to 2 logs the same losses as 2 epochs in one
/// go (MAE: weights, AdamW moments and step, the loader's order and the masks all restored or re-derived).
#[test]
fn resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    common::resume_at_epoch_boundary_reproduces("mae-fmnist-tiny", dir.path());
}

/// `selfsup export` writes the backbone under torchvision names: a SimCLR ResNet-18 (CIFAR stem, gray) loads into
/// torchvision's resnet18 with only `fc` missing; a ViT export has timm names and no objective heads.
#[test]
fn exported_backbones_load_in_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r18");
    let one_step = [
        "--set",
        "train.device=\"cpu\"",
        "--set",
        "train.max_steps=1",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.limit=64",
        "--set",
        "eval.at_end=false",
        "--quiet",
    ];
    let mut args = vec!["pretrain", "--config", "simclr-fmnist", "--out", run.to_str().unwrap()];
    args.extend(one_step);
    ok(&args);
    let file = dir.path().join("r18.safetensors");
    let stdout = ok(&["export", "--checkpoint", run.to_str().unwrap(), "--out", file.to_str().unwrap()]);
    assert!(stdout.contains("torchvision ResNet names"), "{stdout}");
    let py = |file: &Path, kind: &str| -> serde_json::Value {
        let script = Path::new("scripts/reference/load_exported.py");
        let out = Command::new(selfsup_pipeline::venv_python()).arg(script).arg(file).arg(kind).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = py(&file, "resnet18-cifar-gray");
    assert_eq!(r["missing"], serde_json::json!(["fc.bias", "fc.weight"]), "{r}");
    assert_eq!(r["unexpected"], serde_json::json!([]), "{r}");
    assert_eq!(r["conv1_equal"], true);
    assert_eq!(r["feature_dim"], serde_json::json!([2, 512]));

    let vit = dir.path().join("vit");
    let mut args = vec!["pretrain", "--config", "mae-fmnist-tiny", "--out", vit.to_str().unwrap()];
    args.extend(one_step);
    ok(&args);
    let file = dir.path().join("vit.safetensors");
    ok(&["export", "--checkpoint", vit.to_str().unwrap(), "--out", file.to_str().unwrap()]);
    let v = py(&file, "names");
    let names: Vec<&str> = v["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    for want in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "norm.weight"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(names.iter().all(|n| !n.starts_with("backbone.") && !n.starts_with("decoder") && *n != "mask_token"));
    assert_eq!(v["shapes"]["blocks.0.attn.qkv.weight"], serde_json::json!([288, 96]));
    // Not a .safetensors name: refused before anything is written.
    let out = selfsup(&["export", "--checkpoint", vit.to_str().unwrap(), "--out", "x.pt"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(".safetensors"));
}

/// The SimMIM preset end to end (a few steps): it trains, checkpoints, and logs its reconstruction grid.
#[test]
fn simmim_preset_trains_and_logs_reconstructions() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("simmim");
    let stdout = ok(&[
        "pretrain",
        "--config",
        "simmim-fmnist-tiny",
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.log_every=3",
        "--set",
        "eval.at_end=false",
    ]);
    assert!(stdout.contains("pretrained 6 steps"), "{stdout}");
    let ev = read_events(&run);
    let loss: Vec<f64> =
        ev["scalars"]["train/loss"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert!(loss.len() == 2 && loss.iter().all(|l| l.is_finite() && *l > 0.0), "{loss:?}");
    let recon = ev["images"]["reconstruction/original_masked_reconstructed"].as_array().unwrap();
    assert_eq!((recon[0][1].as_i64(), recon[0][2].as_i64()), (Some(466), Some(176)));
    assert!(run.join("checkpoints/LATEST").is_file());
}
