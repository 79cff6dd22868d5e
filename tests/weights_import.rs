//! `--init-from` end to end: `selfsup pretrain --init-from` and `selfsup finetune --init-from` start from files a
//! PyTorch user made (scripts/reference/pytorch_weights.py `tiny`: a torchvision CIFAR-style ResNet with 3-channel
//! stem, a timm ViT for 56 px RGB images) on the gray 28 px tiny presets; a file that does not fit (a ResNet into
//! a ViT config, a truncated file) fails with the listing error and a non-zero exit, before the run folder is
//! touched. The feature-level equality with PyTorch is pipeline/tests/pytorch_weights.rs.

mod common;

use std::path::Path;
use std::process::Command;

use common::{json, selfsup};
use tch::Tensor;

/// The PyTorch files, or `None` (said) without the venv.
fn pytorch_files(dir: &Path) -> Option<()> {
    let py = selfsup_pipeline::venv_python();
    if !py.is_file() {
        eprintln!("SKIPPED: {} is missing (run scripts/setup: torch, torchvision, timm, safetensors)", py.display());
        return None;
    }
    let out =
        Command::new(py).arg("scripts/reference/pytorch_weights.py").arg("tiny").arg(dir).output().expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(())
}

fn tensors(file: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[])
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pretrain_and_finetune_start_from_pytorch_files() {
    let dir = tempfile::tempdir().unwrap();
    let Some(()) = pytorch_files(dir.path()) else { return };
    let (resnet, vit) = (dir.path().join("resnet_cifar_rgb.safetensors"), dir.path().join("vit_rgb_56.safetensors"));

    // Pretraining BYOL from torchvision weights (width 64 as torchvision's, 2 small steps): the backbone and its
    // momentum teacher start from the file, the projector and predictor as usual.
    let run = dir.path().join("byol");
    let out = selfsup(&[
        "pretrain",
        "--config",
        "byol-fmnist-tiny",
        "--init-from",
        resnet.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
        "--set",
        "model.backbone.width=64",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.batch_size=16",
        "--set",
        "data.limit=64",
        "--set",
        "eval.at_end=false",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{}\n{err}", String::from_utf8_lossy(&out.stdout));
    let said = format!("initialised the backbone (and the momentum teacher) from {}: 60 tensors", resnet.display());
    assert!(err.contains(&said), "{err}");
    assert!(err.contains("conv1.weight: the 3 input channels summed into the data's 1"), "{err}");
    assert!(err.contains("left out fc.") && err.contains("12 x num_batches_tracked"), "{err}");
    // The checkpoint's backbone (and teacher) is the file's after 2 LARS steps (trust ratio 0.02: each step moves a tensor by
    // at most 2% x lr of its norm), not a random one.
    let ckpt = run.join("checkpoints").join(std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap().trim());
    let (ours, theirs) = (tensors(&ckpt.join("model.safetensors")), tensors(&resnet));
    let stem = theirs["conv1.weight"].sum_dim_intlist(1, true, None);
    for (name, want) in [("conv1.weight", &stem), ("layer4.0.conv2.weight", &theirs["layer4.0.conv2.weight"])] {
        for whose in ["backbone", "teacher.backbone"] {
            let d = rel_diff(&ours[&format!("{whose}.{name}")], want);
            println!("pretrain --init-from: {whose}.{name} moved by {d:.2e} of its largest value");
            assert!(d < 0.05, "{whose}.{name}: {d}");
        }
    }
    // The run folder records where its weights started (config.toml cannot: it is a flag): the file, its
    // SHA-256, what was loaded; in init_from.json, summary.json and TensorBoard's text tab.
    let sha = String::from_utf8(Command::new("sha256sum").arg(&resnet).output().unwrap().stdout).unwrap();
    let sha = sha.split_whitespace().next().unwrap().to_string();
    let record = json(&run.join("init_from.json"));
    assert_eq!((record["sha256"].as_str(), record["loaded"].as_u64()), (Some(sha.as_str()), Some(60)), "{record}");
    assert_eq!(json(&run.join("summary.json"))["init_from"], record);
    let ev = common::read_events(&run);
    let text = ev["text"]["config/init_from"][0][1].as_str().unwrap().to_string();
    assert!(text.contains(&sha) && text.contains("60 tensors loaded"), "{text}");
    // A resume (two more steps) keeps the record in its summary.
    let out =
        selfsup(&["pretrain", "--resume", "--out", run.to_str().unwrap(), "--quiet", "--set", "train.max_steps=4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&run.join("summary.json"))["init_from"], record);
    assert_eq!(json(&run.join("summary.json"))["steps"], 4);

    // With --resume, --init-from is for the start only: a run with checkpoints continues from them (here: it is
    // finished, so nothing happens and no weights are loaded).
    let out =
        selfsup(&["pretrain", "--resume", "--out", run.to_str().unwrap(), "--init-from", resnet.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is for a run's start") && stderr(&out).contains("nothing to do"),
        "{}",
        stderr(&out)
    );

    // Fine-tuning the timm ViT (56 px RGB) on 28 px gray Fashion-MNIST: positions resampled, stem summed.
    let ft = dir.path().join("ft");
    let out = selfsup(&[
        "finetune",
        "--init-from",
        vit.to_str().unwrap(),
        "--config",
        "mae-fmnist-tiny",
        "--labels-per-class",
        "5",
        "--epochs",
        "1",
        "--set",
        "finetune.test_limit=200",
        "--out",
        ft.to_str().unwrap(),
        "--quiet",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{}\n{err}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(&format!("initialised the backbone from {}: 54 tensors", vit.display())), "{err}");
    assert!(err.contains("pos_embed: resampled 14x14 -> 7x7"), "{err}");
    assert!(err.contains("patch_embed.proj.weight: the 3 input channels summed"), "{err}");
    let r = json(&ft.join("finetune.json"));
    assert_eq!(r["pretrained"], true);
    assert_eq!(r["checkpoint"].as_str(), vit.to_str());
    assert_eq!(r["train_samples"], 50);

    // --init-from needs --config, and not with --checkpoint.
    let out = selfsup(&["finetune", "--init-from", vit.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));
}

#[test]
fn files_that_do_not_fit_fail_with_the_listing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(()) = pytorch_files(dir.path()) else { return };
    let resnet = dir.path().join("resnet_cifar_rgb.safetensors");

    // A ResNet into a ViT config: one error naming the file, the counts, the keys, the families.
    let ft = dir.path().join("ft");
    let args = ["--config", "mae-fmnist-tiny", "--out", ft.to_str().unwrap(), "--quiet"];
    let out = selfsup(&[&["finetune", "--init-from", resnet.to_str().unwrap()][..], &args[..]].concat());
    let err = stderr(&out);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1));
    for want in [
        resnet.to_str().unwrap(),
        "does not fit model.backbone (ViT: depth = 4, width = 96",
        "54 missing, 60 unexpected, 0 with another shape",
        "the file holds a torchvision ResNet, the config asks for a timm ViT",
        "missing (in the backbone, not in the file): blocks.0.attn.proj.bias",
        "unexpected (in the file, not in the backbone): bn1.bias",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }

    // The same in pretraining, refused before the run folder exists.
    let run = dir.path().join("run");
    let out = selfsup(&[
        "pretrain",
        "--config",
        "mae-fmnist-tiny",
        "--init-from",
        resnet.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--init-from") && stderr(&out).contains("54 missing, 60 unexpected"),
        "{}",
        stderr(&out)
    );
    assert!(!run.join("config.toml").exists(), "nothing written for a file that does not fit");

    // A truncated file.
    let bytes = std::fs::read(&resnet).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = selfsup(&[&["finetune", "--init-from", cut.to_str().unwrap()][..], &args[..]].concat());
    let err = stderr(&out);
    println!("{err}");
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(cut.to_str().unwrap()) && err.contains("not a readable safetensors file"), "{err}");
}
