//! ResNet matches torchvision's ResNet-18 (names, shapes, parameter count); SimCLR smoke test: a tiny backbone
//! trains for 3 steps with a finite loss, every weight moves, and batch-norm statistics update.

use selfsup_models::{BackboneConfig, Batch, ObjectiveConfig, Optimizer, OptimizerConfig, ResNetConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

// Torch's RNG is global: tests that seed it and tests that draw from it (building models) must not interleave,
// or the seeded test's initial weights depend on thread timing (seen: 2 failures in 80 runs). Both hold
// `common::torch_rng`.
mod common;

#[test]
fn resnet18_has_torchvision_names_shapes_and_parameter_count() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let cfg = ResNetConfig { layers: [2, 2, 2, 2], width: 64, cifar_stem: false, ..Default::default() };
    let net = BackboneConfig::Resnet(cfg).build(vs.root(), 3).unwrap();
    assert_eq!(net.dim(), 512);
    let vars = vs.variables();
    // torchvision.models.resnet18() has 11,689,512 parameters, of which the classifier fc has 513,000.
    let trainable: i64 = vars.values().filter(|t| t.requires_grad()).map(|t| t.numel() as i64).sum();
    assert_eq!(trainable, 11_176_512);
    let shape = |n: &str| vars.get(n).unwrap_or_else(|| panic!("{n} missing")).size();
    assert_eq!(shape("conv1.weight"), vec![64, 3, 7, 7]);
    assert_eq!(shape("layer1.1.conv2.weight"), vec![64, 64, 3, 3]);
    assert_eq!(shape("layer2.0.downsample.0.weight"), vec![128, 64, 1, 1]);
    assert_eq!(shape("layer4.1.bn2.running_var"), vec![512]);
    assert!(!vars.contains_key("layer1.0.downsample.0.weight"), "no projection shortcut where shapes match");
    // Every key follows torchvision's pattern.
    for name in vars.keys() {
        let ok = name.starts_with("conv1.") || name.starts_with("bn1.") || name.starts_with("layer");
        assert!(ok, "unexpected parameter {name}");
    }
    // Standard stem: 224 px → 7x7 before pooling; the CIFAR stem keeps 28 px at stage 1.
    let y = net.features(&Tensor::zeros([2, 3, 64, 64], tch::kind::FLOAT_CPU), false);
    assert_eq!(y.size(), vec![2, 512]);
}

#[test]
fn simclr_three_steps_train_every_weight() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let backbone = BackboneConfig::Resnet(ResNetConfig { layers: [1, 1, 1, 1], width: 4, ..Default::default() });
    let obj_cfg: ObjectiveConfig = toml::from_str("kind = \"simclr\"\nproj_hidden = 16\nproj_dim = 8").unwrap();
    let mut objective = obj_cfg.build(&vs, &backbone, 1).unwrap();
    let mut opt = Optimizer::new(&vs, &OptimizerConfig::default()).unwrap();
    let before: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let x = Tensor::randn([16, 1, 12, 12], tch::kind::FLOAT_CPU);
    let batch = Batch::new(vec![&x + 0.1 * Tensor::randn_like(&x), &x + 0.1 * Tensor::randn_like(&x)]);
    let mut losses = Vec::new();
    for _ in 0..3 {
        let step = objective.loss(&batch, true);
        assert_eq!(step.features.size(), vec![16, 32]);
        assert!(!step.features.requires_grad(), "probe features are detached");
        opt.zero_grad();
        step.loss.backward();
        opt.step(0.5);
        losses.push(step.loss.double_value(&[]));
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[2] < losses[0], "the same batch three times: the loss must fall {losses:?}");
    let after = vs.variables();
    for (name, t0) in &before {
        let moved = (after[name].to_kind(Kind::Double) - t0.to_kind(Kind::Double)).abs().max().double_value(&[]);
        assert!(moved > 0.0, "{name} did not move");
    }
}
