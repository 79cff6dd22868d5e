//! End-to-end tests of the joint-embedding family through the CLI on real Fashion-MNIST: every `-tiny` preset
//! trains (loss finite and falling, its terms, the collapse monitor and the teacher's schedule in TensorBoard),
//! checkpoints (with its teacher) and evaluates; BYOL and DINO resume exactly at an epoch boundary; the teacher's
//! backbone exports to torchvision and is what `eval --teacher` and `finetune --teacher` use.

mod common;

use std::path::Path;

use common::{curve, json, ok, selfsup, QUICK};

/// Runs `preset` with the QUICK overrides and checks what every joint-embedding method must show.
fn trains_checkpoints_and_evaluates(preset: &str, terms: &[&str], teacher: bool) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["pretrain", "--config", preset, "--out", run.to_str().unwrap(), "--quiet"];
    args.extend(QUICK);
    // 12 steps are all inside the presets' warm-up (0.2 epochs): start at the peak learning rate instead, so that
    // every method must visibly learn.
    args.extend(["--set", "optimizer.warmup_epochs=0"]);
    let stdout = ok(&args);
    assert!(stdout.contains("collapse monitor: embedding_std"), "{stdout}");

    let loss = curve(&run, "train/loss");
    assert_eq!(loss.iter().map(|p| p.0).collect::<Vec<_>>(), vec![4, 8, 12], "{preset}");
    assert!(loss.iter().all(|p| p.1.is_finite()), "{preset}: {loss:?}");
    assert!(loss[2].1 < loss[0].1, "{preset}: the loss must fall over 12 steps: {loss:?}");
    for term in terms {
        let c = curve(&run, &format!("train/loss/{term}"));
        assert_eq!(c.len(), 3, "{preset} {term}");
        assert!(c.iter().all(|p| p.1.is_finite()), "{preset} {term}: {c:?}");
    }
    // The collapse monitor: a spread in (0, ~1] and an effective rank between 1 and the embedding width.
    let std = curve(&run, "train/embedding_std");
    let rank = curve(&run, "train/effective_rank");
    assert_eq!((std.len(), rank.len()), (3, 3), "{preset}");
    assert!(std.iter().all(|p| p.1 > 0.0 && p.1 < 1.5), "{preset}: {std:?}");
    assert!(rank.iter().all(|p| p.1 >= 1.0 && p.1 <= 1024.0), "{preset}: {rank:?}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["embedding_std"].as_f64().unwrap(), std[2].1);
    assert_eq!(summary["effective_rank"].as_f64().unwrap(), rank[2].1);

    // The checkpoint carries the teacher (and no optimizer state for it).
    let ckpt = run.join("checkpoints").join(std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap().trim());
    let names: Vec<String> =
        tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap().into_iter().map(|(n, _)| n).collect();
    let teacher_names: Vec<&String> = names.iter().filter(|n| n.starts_with("teacher.")).collect();
    assert_eq!(!teacher_names.is_empty(), teacher, "{preset}: teacher tensors {teacher_names:?}");
    if teacher {
        assert!(names.contains(&"teacher.backbone.conv1.weight".to_string()), "{preset}");
        let m = curve(&run, "train/teacher_momentum");
        assert!(m.iter().all(|p| (0.99..1.0).contains(&p.1)) && m[2].1 > m[0].1, "{preset}: cosine schedule {m:?}");
        let opt: Vec<String> = tch::Tensor::read_safetensors(ckpt.join("optimizer.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(opt.iter().all(|n| !n.contains("teacher.")), "{preset}: the optimizer holds teacher state");
    }
    // Evaluation: features carry class information after 12 steps (chance: 10%).
    let report = json(&run.join("eval.json"));
    let (knn, linear) = (report["knn"]["top1"].as_f64().unwrap(), report["linear"]["top1"].as_f64().unwrap());
    assert!(knn > 0.3 && linear > 0.3, "{preset}: knn {knn}, linear {linear}");
}

#[test]
fn byol_tiny_preset_end_to_end() {
    trains_checkpoints_and_evaluates("byol-fmnist-tiny", &[], true);
}

#[test]
fn mocov3_tiny_preset_end_to_end() {
    trains_checkpoints_and_evaluates("mocov3-fmnist-tiny", &[], true);
}

#[test]
fn dino_tiny_preset_end_to_end_with_multi_crop() {
    trains_checkpoints_and_evaluates("dino-fmnist-tiny", &["dino"], true);
}

#[test]
fn barlow_tiny_preset_end_to_end() {
    trains_checkpoints_and_evaluates("barlow-fmnist-tiny", &["on_diagonal", "off_diagonal"], false);
}

#[test]
fn vicreg_tiny_preset_end_to_end() {
    trains_checkpoints_and_evaluates("vicreg-fmnist-tiny", &["invariance", "variance", "covariance"], false);
}

#[test]
fn byol_resumes_exactly_at_an_epoch_boundary() {
    let dir = tempfile::tempdir().unwrap();
    common::resume_at_epoch_boundary_reproduces("byol-fmnist-tiny", dir.path());
}

#[test]
fn dino_resumes_exactly_at_an_epoch_boundary() {
    let dir = tempfile::tempdir().unwrap();
    common::resume_at_epoch_boundary_reproduces("dino-fmnist-tiny", dir.path());
}

fn read(file: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

/// `export --teacher` writes the EMA teacher's ResNet-18 under torchvision names (it loads into torchvision's
/// resnet18, only `fc` missing), equal to the checkpoint's `teacher.backbone.*` and not to the student; `eval` and
/// `finetune` take it with `--teacher`; objectives without a teacher refuse it, naming the key.
#[test]
fn the_teacher_exports_to_torchvision_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("byol");
    let mut args = vec!["pretrain", "--config", "byol-fmnist", "--out", run.to_str().unwrap(), "--quiet"];
    args.extend([
        "--set",
        "train.device=\"cpu\"",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.limit=64",
        "--set",
        "eval.at_end=false",
        "--set",
        "objective.proj_hidden=64",
        "--set",
        "objective.pred_hidden=64",
    ]);
    ok(&args);
    let (teacher, student) = (dir.path().join("teacher.safetensors"), dir.path().join("student.safetensors"));
    let r = run.to_str().unwrap();
    let stdout = ok(&["export", "--checkpoint", r, "--out", teacher.to_str().unwrap(), "--teacher"]);
    assert!(stdout.contains("teacher backbone tensors"), "{stdout}");
    ok(&["export", "--checkpoint", r, "--out", student.to_str().unwrap()]);
    let out = std::process::Command::new(selfsup_pipeline::venv_python())
        .arg("scripts/reference/load_exported.py")
        .arg(&teacher)
        .arg("resnet18-cifar-gray")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r18: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r18["missing"], serde_json::json!(["fc.bias", "fc.weight"]), "{r18}");
    assert_eq!(r18["unexpected"], serde_json::json!([]), "{r18}");
    let ckpt = selfsup_pipeline::checkpoint::resolve(&run).unwrap();
    let (t, s, c) = (read(&teacher), read(&student), read(&ckpt.join("model.safetensors")));
    assert_eq!(t.len(), s.len());
    for (name, tensor) in &t {
        assert!(tensor.equal(&c[&format!("teacher.backbone.{name}")]), "{name}");
    }
    // Two steps of EMA at 0.99: the teacher trails the student.
    assert!(!t["conv1.weight"].equal(&s["conv1.weight"]), "teacher and student exports are the same");

    // eval / finetune --teacher on it; --teacher where there is none is refused, naming the key.
    let stdout = ok(&[
        "eval",
        "--checkpoint",
        r,
        "--teacher",
        "--set",
        "eval.train_limit=500",
        "--set",
        "eval.probe_epochs=1",
        "--set",
        "eval.projector_samples=0",
        "--set",
        "eval.raw_pixel_baseline=false",
        "--set",
        "data.test=\"/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz\"",
    ]);
    assert!(stdout.contains("linear probe top-1"), "{stdout}");
    let ft = dir.path().join("ft");
    let stdout = ok(&[
        "finetune",
        "--checkpoint",
        r,
        "--teacher",
        "--labels-per-class",
        "5",
        "--epochs",
        "1",
        "--linear",
        "--quiet",
        "--out",
        ft.to_str().unwrap(),
        "--set",
        "finetune.test_limit=200",
    ]);
    assert!(stdout.contains("top-1"), "{stdout}");
    assert_eq!(json(&ft.join("finetune.json"))["recipe"]["teacher"], true);

    let simclr = dir.path().join("simclr");
    let mut args = vec!["pretrain", "--config", "simclr-fmnist-tiny", "--out", simclr.to_str().unwrap(), "--quiet"];
    args.extend([
        "--set",
        "train.max_steps=1",
        "--set",
        "train.batch_size=8",
        "--set",
        "data.limit=64",
        "--set",
        "eval.at_end=false",
    ]);
    ok(&args);
    let out = selfsup(&["eval", "--checkpoint", simclr.to_str().unwrap(), "--teacher"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("eval.teacher") && err.contains("simclr"), "{err}");
    let out = selfsup(&[
        "export",
        "--checkpoint",
        simclr.to_str().unwrap(),
        "--out",
        teacher.to_str().unwrap(),
        "--teacher",
        "--overwrite",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("keeps no teacher"), "{err}");
}

/// View sizes a ViT cannot take and view counts the objective does not take are config errors naming the key.
#[test]
fn view_sizes_and_counts_are_checked_against_backbone_and_objective() {
    let out =
        selfsup(&["pretrain", "--config", "mae-fmnist-tiny", "--set", "augment.size=30", "--out", "/nonexistent/x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("augment.size") && err.contains("patch_size 4"), "{err}");
    let out = selfsup(&[
        "pretrain",
        "--config",
        "dino-fmnist-tiny",
        "--set",
        "objective.local_crops=3",
        "--out",
        "/nonexistent/x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`views`") && err.contains("takes 5"), "{err}");
}
