//! Weights in and out of PyTorch, proven by features (the PyTorch side: scripts/reference/pytorch_weights.py, run
//! with the setup venv's torch 2.11.0, torchvision 0.26.0, timm 1.0.31).
//!
//! In: torchvision `resnet18` / `resnet50` and timm `vit_tiny_patch16_224` state dicts, random (seeded) and saved
//! with safetensors as `state_dict()` gives them (classifier and `num_batches_tracked` included), load into our
//! backbones through [`pretrained::load_backbone_file`] and give PyTorch's eval-mode features on the same images
//! to 1e-4 (max abs difference, printed): ResNet after the global average pool (fc = Identity); the ViT with
//! timm's `global_pool='token'` as our `pool = "cls"` and `global_pool='avg', fc_norm=False` as our
//! `pool = "mean"`; and the 224 px ViT file into a 112 px config as timm's `checkpoint_filter_fn` resamples it.
//!
//! Out: our random (seeded) ResNet-18, ResNet-50 and ViT-tiny, written by [`checkpoint::export_backbone`], load
//! into torchvision / timm with `load_state_dict(strict=True)` (no classifier) and give our features to 1e-4.
//!
//! Skipped, saying so, only when the venv is missing (scripts/setup makes it; CI has it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use selfsup_models::{Backbone, BackboneConfig, PosEmbed, ResNetBlock, ResNetConfig, VitConfig, VitPool, VitSize};
use selfsup_pipeline::{checkpoint, pretrained};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/reference/pytorch_weights.py");

/// Torch's RNG is global: tests that seed it must not interleave their draws.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn venv() -> Option<PathBuf> {
    let py = selfsup_pipeline::venv_python();
    if py.is_file() {
        Some(py)
    } else {
        eprintln!("SKIPPED: {} is missing (run scripts/setup: torch, torchvision, timm, safetensors)", py.display());
        None
    }
}

fn python(py: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(py).arg(SCRIPT).args(args).output().expect("running the venv python");
    assert!(out.status.success(), "pytorch_weights.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The PyTorch files, made once for all tests of this file.
fn made(py: &Path) -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let summary = python(py, &["make".as_ref(), dir.path().as_os_str()]);
        eprintln!("pytorch_weights.py make: {summary}");
        dir
    })
    .path()
}

fn read(file: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).into_iter().collect()
}

fn resnet(layers: [i64; 4], block: ResNetBlock) -> BackboneConfig {
    BackboneConfig::Resnet(ResNetConfig { layers, width: 64, cifar_stem: false, block, zero_init_residual: false })
}

fn vit_tiny(image_size: i64, pool: VitPool) -> BackboneConfig {
    let cfg = VitConfig {
        size: VitSize::Tiny,
        image_size,
        patch_size: 16,
        pos_embed: PosEmbed::Learned,
        pool,
        ..Default::default()
    };
    BackboneConfig::Vit(cfg)
}

/// The config of each PyTorch model of `make`, with the input and the features it was run on.
fn case(name: &str) -> (&'static str, BackboneConfig, &'static str) {
    match name {
        "resnet18" => ("resnet18", resnet([2, 2, 2, 2], ResNetBlock::Basic), "x224"),
        "resnet50" => ("resnet50", resnet([3, 4, 6, 3], ResNetBlock::Bottleneck), "x224"),
        "vit_token" => ("vit_tiny_patch16_224", vit_tiny(224, VitPool::Cls), "x224"),
        "vit_avg" => ("vit_tiny_patch16_224", vit_tiny(224, VitPool::Mean), "x224"),
        "vit_avg_112" => ("vit_tiny_patch16_224", vit_tiny(112, VitPool::Mean), "x112"),
        _ => unreachable!(),
    }
}

/// `cfg`'s backbone under `backbone.` in a new VarStore, built while holding the RNG lock (so that the seeded
/// tests draw the same weights whatever runs beside them).
fn build(cfg: &BackboneConfig, channels: i64) -> (VarStore, Box<dyn Backbone>) {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let vs = VarStore::new(Device::Cpu);
    let net = cfg.build(vs.root() / "backbone", channels).unwrap();
    (vs, net)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Imports the PyTorch file of `features` into our backbone and compares the features; returns the max abs
/// difference.
fn import_and_compare(features: &str) -> Option<f64> {
    let py = venv()?;
    let dir = made(&py);
    let (file, cfg, input) = case(features);
    let (vs, net) = build(&cfg, 3);
    let file = dir.join(format!("{file}.safetensors"));
    let imported = pretrained::load_backbone_file(&vs, &file, &cfg).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{imported}");
    let theirs_all = read(&file);
    let expected = theirs_all.keys().filter(|n| !n.starts_with("fc.") && !n.starts_with("head.")).count();
    let counters = theirs_all.keys().filter(|n| n.ends_with("num_batches_tracked")).count();
    assert_eq!(imported.loaded, expected - counters, "every backbone tensor of the file is loaded");
    assert_eq!(imported.dropped.len(), theirs_all.len() - imported.loaded);
    assert!(!imported.teacher);
    let x = &read(&dir.join("images.safetensors"))[input];
    let theirs = &read(&dir.join("features.safetensors"))[features];
    let ours = tch::no_grad(|| net.features(x, false));
    assert_eq!(ours.size(), theirs.size());
    let diff = max_abs_diff(&ours, theirs);
    let scale = theirs.abs().max().double_value(&[]);
    println!("import {features}: max |ours - PyTorch| = {diff:.3e} (features up to {scale:.3})");
    assert!(scale > 0.1, "degenerate features (max {scale})");
    assert!(diff <= 1e-4, "{features}: max abs difference {diff:e} > 1e-4");
    Some(diff)
}

#[test]
fn torchvision_resnet18_imports_with_its_features() {
    import_and_compare("resnet18");
}

#[test]
fn torchvision_resnet50_imports_with_its_features() {
    import_and_compare("resnet50");
}

/// timm's default pooling for this model, `global_pool='token'`, is our `pool = "cls"`.
#[test]
fn timm_vit_tiny_imports_with_its_features_cls_pool() {
    import_and_compare("vit_token");
}

/// `global_pool='avg', fc_norm=False` (the norm before pooling, named `norm.*`) is our `pool = "mean"`. The
/// comparison sees the pooling: the mean-pooled features are far from timm's token-pooled ones.
#[test]
fn timm_vit_tiny_imports_with_its_features_mean_pool() {
    let Some(py) = venv() else { return };
    import_and_compare("vit_avg");
    let f = read(&made(&py).join("features.safetensors"));
    let other = max_abs_diff(&f["vit_avg"], &f["vit_token"]);
    println!("timm token vs mean pooling: features {other:.3} apart");
    assert!(other > 0.1, "token and mean pooling give features {other} apart: the comparison would not see it");
}

/// The 224 px file in a 112 px config: the position table resampled 14x14 -> 7x7 as timm's `checkpoint_filter_fn`
/// does it for `create_model(..., img_size=112)` (bicubic, antialiased), same features.
#[test]
fn timm_vit_tiny_imports_into_another_image_size_as_timm_resamples() {
    let Some(py) = venv() else { return };
    let (file, cfg, _) = case("vit_avg_112");
    let (vs, _net) = build(&cfg, 3);
    let imported = pretrained::load_backbone_file(&vs, &made(&py).join(format!("{file}.safetensors")), &cfg).unwrap();
    assert!(imported.adapted.iter().any(|a| a.contains("resampled 14x14 -> 7x7")), "{imported}");
    import_and_compare("vit_avg_112");
    // What timm does matters: the plain bicubic resampling (no antialias), what the forward pass uses for
    // multi-crop inputs, gives another table.
    let table = &read(&made(&py).join(format!("{file}.safetensors")))["pos_embed"];
    let patches = table.narrow(1, 1, 196);
    let aa = selfsup_models::backbone::resample_pos_embed_antialiased(&patches, (14, 14), (7, 7));
    let plain = selfsup_models::backbone::resample_pos_embed(&patches, (14, 14), (7, 7));
    let loaded = vs.variables()["backbone.pos_embed"].narrow(1, 1, 49);
    assert!(loaded.equal(&aa));
    let apart = max_abs_diff(&aa, &plain);
    println!("pos_embed 14x14 -> 7x7: antialiased vs plain bicubic differ by up to {apart:.3e}");
    assert!(apart > 1e-3, "{apart}");
}

/// Sets the backbone's 1-D tensors away from their init (norm weights in [0.5, 1.5), biases 0.1 N(0, 1)), then
/// gives batch norms the running statistics of their own activations (40 train-mode passes at 64 px; momentum
/// 0.1 leaves 0.9^40 = 1.5% of the init), as a trained network has: so that each running statistic is a
/// different number and ResNet-50's eval-mode features stay O(1).
fn randomize(vs: &VarStore, net: &dyn Backbone, resnet: bool) {
    tch::no_grad(|| {
        // By name: the variables come in a hash map's order, and the draws must not depend on it.
        for (name, mut t) in vs.variables().into_iter().collect::<std::collections::BTreeMap<_, _>>() {
            if t.dim() != 1 || name.contains("running_") {
                continue;
            }
            let v = if name.ends_with(".weight") { Tensor::rand_like(&t) + 0.5 } else { 0.1 * Tensor::randn_like(&t) };
            t.copy_(&v);
        }
        if resnet {
            for _ in 0..40 {
                let _ = net.features(&Tensor::randn([4, 3, 64, 64], tch::kind::FLOAT_CPU), true);
            }
        }
    });
}

/// Builds `cfg` (seeded, randomized), exports it with `export_backbone` as `selfsup export` does, loads the file
/// into `arch` strictly in PyTorch and compares the features on the same images; returns the max abs difference.
fn export_and_compare(arch: &str, cfg: BackboneConfig, seed: i64) -> Option<f64> {
    let py = venv()?;
    let dir = tempfile::tempdir().unwrap();
    let (vs, net, x) = {
        let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let net = cfg.build(vs.root() / "backbone", 3).unwrap();
        randomize(&vs, net.as_ref(), matches!(cfg, BackboneConfig::Resnet(_)));
        (vs, net, Tensor::randn([2, 3, 224, 224], tch::kind::FLOAT_CPU))
    };
    // A checkpoint's weights file (`backbone.*` names), exported as `selfsup export` does.
    vs.save(dir.path().join(checkpoint::WEIGHTS)).unwrap();
    let file = dir.path().join(format!("{arch}.safetensors"));
    let n = checkpoint::export_backbone(dir.path(), &file, checkpoint::Which::Student).unwrap();
    assert_eq!(n, vs.variables().len());
    let images = dir.path().join("images.safetensors");
    Tensor::write_safetensors(&[("x224", &x)], &images).unwrap();
    let out = dir.path().join("features.safetensors");
    let args = ["load".as_ref(), file.as_os_str(), arch.as_ref(), images.as_os_str(), out.as_os_str()];
    let said = python(&py, &args);
    let said: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(said["tensors"].as_u64(), Some(n as u64), "{said}");
    let theirs = &read(&out)["features"];
    let ours = tch::no_grad(|| net.features(&x, false));
    assert_eq!(ours.size(), theirs.size());
    let diff = max_abs_diff(&ours, theirs);
    let scale = theirs.abs().max().double_value(&[]);
    println!(
        "export {arch}: max |ours - PyTorch| = {diff:.3e} (features up to {scale:.3}), strict load of {n} tensors"
    );
    assert!(scale > 0.1, "degenerate features (max {scale})");
    assert!(diff <= 1e-4, "{arch}: max abs difference {diff:e} > 1e-4");
    Some(diff)
}

#[test]
fn our_resnet18_export_loads_strictly_into_torchvision_with_our_features() {
    export_and_compare("resnet18", resnet([2, 2, 2, 2], ResNetBlock::Basic), 18);
}

#[test]
fn our_resnet50_export_loads_strictly_into_torchvision_with_our_features() {
    export_and_compare("resnet50", resnet([3, 4, 6, 3], ResNetBlock::Bottleneck), 50);
}

/// Loads into `timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token")`.
#[test]
fn our_vit_cls_export_loads_strictly_into_timm_with_our_features() {
    export_and_compare("vit_token", vit_tiny(224, VitPool::Cls), 1);
}

/// Loads into `timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="avg", fc_norm=False)`.
#[test]
fn our_vit_mean_export_loads_strictly_into_timm_with_our_features() {
    export_and_compare("vit_avg", vit_tiny(224, VitPool::Mean), 2);
}

/// Errors: one message naming the file and listing missing, unexpected and mis-shaped tensors, with hints naming
/// the config fields; non-finite and truncated files refused; nothing written on failure.
#[test]
fn mismatches_are_one_error_listing_them() {
    let Some(py) = venv() else { return };
    let dir = made(&py);
    let r18 = dir.join("resnet18.safetensors");
    // A ResNet-18 into a ViT config.
    let cfg = vit_tiny(224, VitPool::Cls);
    let (vs, _net) = build(&cfg, 3);
    let before = vs.variables()["backbone.cls_token"].copy();
    let e = pretrained::load_backbone_file(&vs, &r18, &cfg).unwrap_err().to_string();
    println!("{e}");
    for want in [
        "resnet18.safetensors",
        "150 missing, 100 unexpected, 0 with another shape",
        "unexpected (in the file, not in the backbone): bn1.bias",
        "missing (in the backbone, not in the file): blocks.0.attn.proj.bias",
        "the file holds a torchvision ResNet, the config asks for a timm ViT",
        "20 x num_batches_tracked)",
    ] {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }
    assert!(e.contains("(left out as expected: fc.") && e.contains("fc.weight") && e.contains("fc.bias"), "{e}");
    assert!(vs.variables()["backbone.cls_token"].equal(&before), "nothing is written on failure");

    // ResNet-18 into a CIFAR-stem, width-32 ResNet-18 for 1 channel: the stem's 3 -> 1 channels are adapted (summed)
    // but its kernel and the widths are not.
    let cfg = BackboneConfig::Resnet(ResNetConfig { width: 32, cifar_stem: true, ..Default::default() });
    let (vs, _net) = build(&cfg, 1);
    let e = pretrained::load_backbone_file(&vs, &r18, &cfg).unwrap_err().to_string();
    println!("{e}");
    for want in [
        "0 missing, 0 unexpected, 100 with another shape",
        "shape mismatch: conv1.weight: expected [32, 1, 3, 3], got [64, 3, 7, 7]",
        "shape mismatch: bn1.running_mean: expected [32], got [64]",
        "hint: conv1.weight: a 7x7 stem in the file, 3x3 here: model.backbone.cifar_stem = false",
        "hint: a ResNet's shapes follow model.backbone.width",
        "(80 more shape mismatches)",
    ] {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }

    // An RGB ResNet-18 into 1-channel data: summed over the input channels (timm's adapt_input_conv), which is the
    // RGB network on the gray image repeated three times.
    let cfg = resnet([2, 2, 2, 2], ResNetBlock::Basic);
    let (vs, net) = build(&cfg, 1);
    let imported = pretrained::load_backbone_file(&vs, &r18, &cfg).unwrap();
    assert!(imported.adapted.iter().any(|a| a.contains("conv1.weight: the 3 input channels summed")), "{imported}");
    let (rgb_vs, rgb) = build(&cfg, 3);
    pretrained::load_backbone_file(&rgb_vs, &r18, &cfg).unwrap();
    let gray = Tensor::from_slice(&(0..2 * 64 * 64).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect::<Vec<_>>())
        .view([2, 1, 64, 64]);
    let d =
        tch::no_grad(|| max_abs_diff(&net.features(&gray, false), &rgb.features(&gray.repeat([1, 3, 1, 1]), false)));
    println!("gray stem vs RGB on repeated gray: max abs difference {d:.3e}");
    assert!(d <= 1e-4, "{d}");
    // 3-channel data and a 1-channel file is not adapted: an error naming data.channels.
    let gray_file = tempfile::tempdir().unwrap();
    let one = gray_file.path().join("gray.safetensors");
    vs.save(&one).unwrap(); // backbone.* names: taken as a selfsup model file
    let e = pretrained::load_backbone_file(&rgb_vs, &one, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("conv1.weight: expected [64, 3, 7, 7], got [64, 1, 7, 7]") && e.contains("data.channels"),
        "{e}"
    );

    // Non-finite: refused, naming the tensor.
    let mut tensors: Vec<(String, Tensor)> = read(&r18).into_iter().collect();
    for (name, t) in &mut tensors {
        if name == "layer2.1.bn2.running_var" {
            *t = t.copy();
            let _ = t.get(3).fill_(f64::NAN);
        }
    }
    let nan = gray_file.path().join("nan.safetensors");
    Tensor::write_safetensors(&tensors, &nan).unwrap();
    let e = pretrained::load_backbone_file(&rgb_vs, &nan, &cfg).unwrap_err().to_string();
    assert!(e.contains("nan.safetensors") && e.contains("layer2.1.bn2.running_var holds NaN"), "{e}");

    // Truncated: not readable, naming the file.
    let bytes = std::fs::read(&r18).unwrap();
    let cut = gray_file.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = pretrained::load_backbone_file(&rgb_vs, &cut, &cfg).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("not a readable safetensors file"), "{e}");
    let e = pretrained::load_backbone_file(&rgb_vs, &gray_file.path().join("none.safetensors"), &cfg).unwrap_err();
    assert!(e.to_string().contains("none.safetensors"), "{e}");
}
