//! Bottleneck ResNets against torchvision itself (through the setup venv's python): ResNet-50's and ResNet-34's
//! names, shapes and parameter counts; ResNet-50 features equal torchvision's after loading our weights into
//! `torchvision.models.resnet50()` (eval and train mode); `zero_init_residual`; the CIFAR stem; gradients reach every
//! parameter; the basic default path still makes the weights it made before bottleneck blocks existed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use selfsup_models::{Backbone, BackboneConfig, ResNet, ResNetBlock, ResNetConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

// Torch's RNG is global: tests that seed it and tests that draw from it (building models) must not interleave;
// every test here that draws holds `common::torch_rng`.
mod common;

/// The setup venv's python, found as `selfsup_pipeline::venv_python()` finds it (this crate may not depend on
/// the pipeline): `$SELFSUP_CACHE`, else `$XDG_CACHE_HOME/selfsup`, else `~/.cache/selfsup`, then `venv/bin/python`.
fn venv_python() -> PathBuf {
    let cache = std::env::var_os("SELFSUP_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("selfsup")
    });
    let py = cache.join("venv/bin/python");
    assert!(py.is_file(), "{} is missing: run scripts/setup (these tests compare with torchvision)", py.display());
    py
}

fn python_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(venv_python()).args(args).output().expect("running the venv python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("python prints JSON")
}

/// torchvision's `state_dict()` of `arch` without the classifier and without `num_batches_tracked` (tch's batch
/// norm keeps no such counter), as sorted (name, shape).
fn torchvision_state(arch: &str) -> Vec<(String, Vec<i64>)> {
    const SNIPPET: &str = "import json, sys, torchvision\n\
        m = getattr(torchvision.models, sys.argv[1])()\n\
        print(json.dumps({k: list(v.shape) for k, v in m.state_dict().items()\n\
        if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}))";
    let v = python_json(&["-c".as_ref(), SNIPPET.as_ref(), arch.as_ref()]);
    let map: BTreeMap<String, Vec<i64>> = serde_json::from_value(v).unwrap();
    map.into_iter().collect()
}

fn ours(vs: &VarStore) -> Vec<(String, Vec<i64>)> {
    vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect::<BTreeMap<_, _>>().into_iter().collect()
}

fn trainable(vs: &VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

fn resnet(layers: [i64; 4], width: i64, block: ResNetBlock, cifar_stem: bool, zero: bool) -> ResNetConfig {
    ResNetConfig { layers, width, cifar_stem, block, zero_init_residual: zero }
}

fn resnet50() -> ResNetConfig {
    resnet([3, 4, 6, 3], 64, ResNetBlock::Bottleneck, false, false)
}

#[test]
fn resnet50_has_torchvision_names_shapes_and_parameter_count() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &resnet50(), 3);
    assert_eq!(net.dim(), 2048);
    // torchvision.models.resnet50(): 25,557,032 parameters, of which fc has 2048 * 1000 + 1000 = 2,049,000.
    assert_eq!(trainable(&vs), 23_508_032);
    let theirs = torchvision_state("resnet50");
    assert_eq!(theirs.len(), 265, "torchvision's ResNet-50 has 161 parameters + 104 running statistics");
    assert_eq!(ours(&vs), theirs);
    // Stem 0, stage K = K (layer-wise lr decay).
    for (name, id) in [("conv1.weight", 0), ("bn1.running_var", 0), ("layer1.0.downsample.0.weight", 1)] {
        assert_eq!(net.layer_id(name), id, "{name}");
    }
    assert_eq!(net.layer_id("layer3.5.conv3.weight"), 3);
    assert_eq!(net.layer_id("layer4.2.bn3.bias"), 4);
    assert_eq!(net.features(&Tensor::zeros([2, 3, 64, 64], tch::kind::FLOAT_CPU), false).size(), vec![2, 2048]);
}

#[test]
fn resnet34_has_torchvision_names_shapes_and_parameter_count() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &resnet([3, 4, 6, 3], 64, ResNetBlock::Basic, false, false), 3);
    assert_eq!(net.dim(), 512);
    // torchvision.models.resnet34(): 21,797,672 parameters, of which fc has 513,000.
    assert_eq!(trainable(&vs), 21_284_672);
    assert_eq!(ours(&vs), torchvision_state("resnet34"));
}

/// Sets every batch norm (the only rank-1 tensors of a ResNet without fc) to values far from its init, so that a
/// comparison in eval mode sees each norm's weight, bias and running statistics in the right place.
fn randomize_batch_norms(vs: &VarStore) {
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if t.dim() != 1 {
                continue;
            }
            let v = if name.ends_with(".weight") || name.ends_with(".running_var") {
                Tensor::rand_like(&t) + 0.5
            } else {
                0.1 * Tensor::randn_like(&t)
            };
            t.copy_(&v);
        }
    });
}

#[test]
fn resnet50_features_equal_torchvision_with_our_weights() {
    let _rng = common::torch_rng(50);
    let vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &resnet50(), 3);
    randomize_batch_norms(&vs);
    let x = Tensor::randn([2, 3, 224, 224], tch::kind::FLOAT_CPU);
    let dir = std::env::temp_dir().join(format!("selfsup-resnet50-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (weights, input) = (dir.join("resnet50.safetensors"), dir.join("x.safetensors"));
    vs.save(&weights).unwrap();
    Tensor::write_safetensors(&[("x", &x)], &input).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/reference/load_exported.py");
    let r = python_json(&[script.as_ref(), weights.as_os_str(), "resnet50".as_ref(), input.as_os_str()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(r["missing"], serde_json::json!(["fc.bias", "fc.weight"]), "{}", r["missing"]);
    assert_eq!(r["unexpected"], serde_json::json!([]), "{}", r["unexpected"]);
    assert_eq!(r["conv1_equal"], true);
    // Eval first on both sides: a train-mode forward moves the running statistics.
    for (mode, train) in [("features_eval", false), ("features_train", true)] {
        let theirs: Vec<f32> = serde_json::from_value(r[mode].clone()).unwrap();
        let theirs = Tensor::from_slice(&theirs).view([2, 2048]);
        let ours = tch::no_grad(|| net.features(&x, train));
        let scale = theirs.abs().max().double_value(&[]);
        let diff = (&ours - &theirs).abs().max().double_value(&[]);
        println!("{mode}: max |ours - torchvision| = {diff:.3e}, max |torchvision| = {scale:.3e}");
        assert!(scale > 1e-3, "{mode}: degenerate features (max {scale})");
        assert!(diff <= 1e-4 * scale, "{mode}: max abs difference {diff:e} vs scale {scale:e}");
    }
}

/// Whether `name` is the batch norm weight that closes a block's residual branch.
fn is_last_bn_weight(name: &str, block: ResNetBlock) -> bool {
    let last = match block {
        ResNetBlock::Basic => "bn2",
        ResNetBlock::Bottleneck => "bn3",
    };
    let parts: Vec<&str> = name.split('.').collect();
    matches!(parts[..], [stage, _, bn, "weight"] if stage.starts_with("layer") && bn == last)
}

#[test]
fn zero_init_residual_zeroes_exactly_the_last_batch_norm_weight_of_each_block() {
    let _rng = common::torch_rng(0);
    for block in [ResNetBlock::Basic, ResNetBlock::Bottleneck] {
        let build = |zero: bool| {
            tch::manual_seed(7);
            let vs = VarStore::new(Device::Cpu);
            ResNet::new(vs.root(), &resnet([1, 2, 1, 2], 4, block, true, zero), 1);
            vs.variables()
        };
        let (plain, zeroed) = (build(false), build(true));
        assert_eq!(plain.len(), zeroed.len());
        let mut n_zeroed = 0;
        for (name, t) in &zeroed {
            let t0 = &plain[name];
            if is_last_bn_weight(name, block) {
                assert_eq!(t.abs().sum(Kind::Double).double_value(&[]), 0.0, "{block:?} {name} not zeroed");
                assert!(t0.equal(&t0.ones_like()), "{block:?} {name}: 1 without zero_init_residual");
                n_zeroed += 1;
            } else {
                // Same seed, same values: the option draws nothing from the RNG and touches nothing else.
                assert!(t.equal(t0), "{block:?} {name} changed by zero_init_residual");
            }
        }
        assert_eq!(n_zeroed, 6, "{block:?}: one weight per block");
    }
}

/// Copies every variable of `src` that `dst` also has.
fn copy_shared(src: &VarStore, dst: &VarStore) {
    let src = src.variables();
    tch::no_grad(|| {
        for (name, mut t) in dst.variables() {
            if let Some(s) = src.get(&name) {
                t.copy_(s);
            }
        }
    });
}

#[test]
fn zero_init_residual_makes_every_identity_block_an_identity_at_init() {
    // A block with an identity shortcut and a zero residual branch is relu(x) = x on its (post-relu) input, so
    // extra such blocks change no feature, in either mode. Without the option they do.
    let _rng = common::torch_rng(0);
    let x = Tensor::randn([4, 1, 12, 12], tch::kind::FLOAT_CPU);
    for block in [ResNetBlock::Basic, ResNetBlock::Bottleneck] {
        let vs_a = VarStore::new(Device::Cpu);
        let a = ResNet::new(vs_a.root(), &resnet([1, 1, 1, 1], 4, block, true, true), 1);
        for (zero, same) in [(true, true), (false, false)] {
            let vs_b = VarStore::new(Device::Cpu);
            let b = ResNet::new(vs_b.root(), &resnet([1, 3, 1, 2], 4, block, true, zero), 1);
            copy_shared(&vs_a, &vs_b);
            for train in [false, true] {
                let (ya, yb) = tch::no_grad(|| (a.features(&x, train), b.features(&x, train)));
                assert_eq!(ya.equal(&yb), same, "{block:?} zero_init_residual={zero} train={train}");
            }
        }
    }
}

#[test]
fn bottleneck_with_cifar_stem_on_gray_28px_gives_32w_features() {
    let _rng = common::torch_rng(0);
    let cfg: BackboneConfig =
        toml::from_str("kind = \"resnet\"\nlayers = [1, 1, 1, 1]\nwidth = 16\nblock = \"bottleneck\"").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = cfg.build(vs.root(), 1).unwrap();
    assert_eq!(net.dim(), 16 * 8 * 4);
    let y = net.features(&Tensor::randn([3, 1, 28, 28], tch::kind::FLOAT_CPU), true);
    assert_eq!(y.size(), vec![3, 512]);
    let vars = vs.variables();
    let shape = |n: &str| vars.get(n).unwrap_or_else(|| panic!("{n} missing")).size();
    assert_eq!(shape("conv1.weight"), vec![16, 1, 3, 3]);
    // Stage 1 already widens 16 → 64, so its first block has a stride-1 projection, as in torchvision.
    assert_eq!(shape("layer1.0.downsample.0.weight"), vec![64, 16, 1, 1]);
    assert_eq!(shape("layer2.0.conv1.weight"), vec![32, 64, 1, 1]);
    assert_eq!(shape("layer2.0.conv2.weight"), vec![32, 32, 3, 3]);
    assert_eq!(shape("layer4.0.conv3.weight"), vec![512, 128, 1, 1]);
    assert_eq!(shape("layer4.0.bn3.running_mean"), vec![512]);
}

#[test]
fn tiny_bottleneck_backward_reaches_every_parameter() {
    let _rng = common::torch_rng(1);
    let vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &resnet([1, 1, 1, 1], 8, ResNetBlock::Bottleneck, true, false), 1);
    let y = net.features(&Tensor::randn([4, 1, 16, 16], tch::kind::FLOAT_CPU), true);
    assert_eq!(y.size(), vec![4, 256]);
    // A random projection, not a plain sum: batch norm in train mode cancels the gradient of a sum of its outputs.
    (y * Tensor::randn([4, 256], tch::kind::FLOAT_CPU)).sum(Kind::Float).backward();
    let vars = vs.variables();
    let params: Vec<_> = vars.iter().filter(|(_, t)| t.requires_grad()).collect();
    assert_eq!(params.len(), 3 + 4 * (3 + 3 * 2 + 1 + 2), "stem; per block 3 convs, 3 norms, a projection");
    for (name, t) in params {
        let g = t.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name} has a zero gradient");
    }
}

#[test]
fn config_reads_block_and_zero_init_residual_and_names_bad_fields() {
    let cfg: ResNetConfig = toml::from_str("").unwrap();
    assert_eq!((cfg.block, cfg.zero_init_residual), (ResNetBlock::Basic, false), "old configs keep their meaning");
    let cfg: ResNetConfig = toml::from_str("block = \"bottleneck\"\nzero_init_residual = true").unwrap();
    assert_eq!((cfg.block, cfg.zero_init_residual), (ResNetBlock::Bottleneck, true));
    assert_eq!(toml::from_str::<ResNetConfig>(&toml::to_string(&cfg).unwrap()).unwrap(), cfg);
    let err = toml::from_str::<ResNetConfig>("block = \"bottle\"").unwrap_err().to_string();
    assert!(err.contains("block") && err.contains("bottleneck"), "{err}");
    let err = toml::from_str::<ResNetConfig>("zero_init = true").unwrap_err().to_string();
    assert!(err.contains("zero_init"), "{err}");
    let bad = ResNetConfig { width: 0, ..resnet50() };
    assert!(bad.validate().unwrap_err().to_string().contains("model.backbone.width"));
    let bad = ResNetConfig { layers: [3, 4, 0, 3], ..resnet50() };
    assert!(bad.validate().unwrap_err().to_string().contains("model.backbone.layers"));
}

#[test]
fn basic_default_path_makes_the_same_weights_as_before_bottlenecks() {
    // Recorded at commit f0a4789 (before this file): seed 0, layers [1,2,1,1], width 8, CIFAR stem, 1 channel,
    // then the input drawn after the weights. A changed variable order or init moves these by far more than 1e-5.
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let cfg = ResNetConfig { layers: [1, 2, 1, 1], width: 8, ..ResNetConfig::default() };
    let net = BackboneConfig::Resnet(cfg).build(vs.root(), 1).unwrap();
    let x = Tensor::randn([2, 1, 16, 16], tch::kind::FLOAT_CPU);
    let y = net.features(&x, false).to_kind(Kind::Double);
    let w = vs.variables()["layer4.0.conv2.weight"].to_kind(Kind::Double);
    let got = [
        y.sum(Kind::Double).double_value(&[]),
        y.square().sum(Kind::Double).double_value(&[]),
        w.sum(Kind::Double).double_value(&[]),
        w.double_value(&[0, 0, 0, 0]),
    ];
    let want = [2.801234654710e1, 1.252571717612e1, -1.141995198109e0, -1.023575887084e-1];
    for (g, e) in got.iter().zip(want) {
        assert!((g - e).abs() <= 1e-5 * e.abs(), "got {got:?}, recorded {want:?}");
    }
}
