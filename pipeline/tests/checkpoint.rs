//! Checkpoints: round trip of weights, optimizer state, trainer state and config; a crash mid-write (simulated
//! by a leftover temporary folder) never replaces the previous checkpoint.

use selfsup_models::{Optimizer, OptimizerConfig};
use selfsup_pipeline::checkpoint::{self, TrainerState};
use selfsup_pipeline::trainer::build_model;
use selfsup_pipeline::Config;
use tch::{Device, Kind, Tensor};

fn tiny_config() -> Config {
    Config::from_toml(
        "[model.backbone]\nkind = \"resnet\"\nlayers = [1,1,1,1]\nwidth = 4\n[objective]\nkind = \"simclr\"\nproj_hidden = 8\nproj_dim = 4\n",
        "test.toml",
        &[],
    )
    .unwrap()
}

#[test]
fn round_trip_and_crash_safety() {
    let dir = tempfile::tempdir().unwrap();
    let ckdir = dir.path().join("checkpoints");
    let cfg = tiny_config();
    let model = build_model(&cfg, 1, Device::Cpu).unwrap();
    let mut opt = Optimizer::new(&model.vs, &OptimizerConfig::default()).unwrap();
    // Take one step so the momentum buffers are non-zero.
    let x = Tensor::randn([4, 1, 8, 8], tch::kind::FLOAT_CPU);
    model.objective.backbone().features(&x, true).sum(Kind::Float).backward();
    opt.step(0.1);
    let state = TrainerState { epoch: 3, step: 42, selfsup_version: "test".into() };
    checkpoint::save(&ckdir, "epoch-0003", &model.vs, &opt.state(), &state, &cfg).unwrap();

    // torchvision names, under the backbone prefix.
    let names: Vec<String> = Tensor::read_safetensors(ckdir.join("epoch-0003/model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for want in [
        "backbone.conv1.weight",
        "backbone.layer1.0.conv1.weight",
        "backbone.layer2.0.downsample.0.weight",
        "backbone.bn1.running_mean",
        "projector.0.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }

    // A crash while writing the next checkpoint leaves only a temporary folder behind.
    std::fs::create_dir_all(ckdir.join(".epoch-0004.tmp-999")).unwrap();
    std::fs::write(ckdir.join(".epoch-0004.tmp-999/model.safetensors"), b"half").unwrap();
    for p in [dir.path().to_path_buf(), ckdir.clone(), ckdir.join("epoch-0003")] {
        assert_eq!(checkpoint::resolve(&p).unwrap(), ckdir.join("epoch-0003"));
    }

    let ckpt = checkpoint::resolve(dir.path()).unwrap();
    assert_eq!(checkpoint::load_state(&ckpt).unwrap(), state);
    assert_eq!(checkpoint::load_config(&ckpt).unwrap(), cfg);
    let mut other = build_model(&Config { seed: 99, ..cfg.clone() }, 1, Device::Cpu).unwrap();
    let w = |m: &selfsup_pipeline::trainer::Model| m.vs.variables()["backbone.conv1.weight"].copy();
    assert!(w(&other).not_equal_tensor(&w(&model)).any().int64_value(&[]) == 1, "different seed, different init");
    checkpoint::load_weights(&mut other.vs, &ckpt).unwrap();
    assert!(w(&other).equal(&w(&model)));
    let mut opt2 = Optimizer::new(&other.vs, &OptimizerConfig::default()).unwrap();
    opt2.load_state(&checkpoint::load_optimizer(&ckpt).unwrap()).unwrap();
    for ((n1, a), (n2, b)) in opt.state().iter().zip(opt2.state().iter()) {
        assert_eq!(n1, n2);
        assert!(a.equal(b), "{n1}");
    }
    assert!(opt.state().iter().any(|(_, t)| t.abs().sum(Kind::Float).double_value(&[]) > 0.0));
}

#[test]
fn resolve_explains_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let e = checkpoint::resolve(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

/// Fine-tuning loads only the backbone: every `backbone.*` tensor equals the checkpoint's, the new head keeps
/// its own initialisation, and a backbone of another shape is refused with the tensor's name.
#[test]
fn load_backbone_copies_the_backbone_only_and_refuses_other_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    tch::manual_seed(1);
    let model = build_model(&cfg, 1, Device::Cpu).unwrap();
    let state = TrainerState { epoch: 1, step: 1, selfsup_version: "test".into() };
    let opt = Optimizer::new(&model.vs, &OptimizerConfig::default()).unwrap();
    let ckpt = checkpoint::save(dir.path(), "epoch-0001", &model.vs, &opt.state(), &state, &cfg).unwrap();

    // A classifier: another seed, the same backbone config, plus a head.
    let mut other = cfg.clone();
    other.seed = 99;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    tch::manual_seed(99);
    let _bb = other.model.backbone.build(vs.root() / "backbone", 1).unwrap();
    let head = selfsup_models::linear(vs.root() / "head", 32, 10);
    let head_before = head.ws.copy();
    let before = vs.variables()["backbone.conv1.weight"].copy();
    let n = checkpoint::load_backbone(&vs, &ckpt, checkpoint::Which::Student).unwrap();
    let saved: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap().into_iter().collect();
    let vars = vs.variables();
    assert_eq!(n, vars.keys().filter(|k| k.starts_with("backbone.")).count());
    for (name, t) in &vars {
        if name.starts_with("backbone.") {
            assert!(t.equal(&saved[name]), "{name}");
        }
    }
    assert!(!before.equal(&vars["backbone.conv1.weight"]), "the load changed nothing");
    assert!(head.ws.equal(&head_before), "the head must keep its initialisation");

    // Wider backbone: refused, naming the tensor and both shapes.
    let wide = Config::from_toml(&cfg.to_toml(), "wide.toml", &["model.backbone.width=8".into()]).unwrap();
    let vs2 = tch::nn::VarStore::new(Device::Cpu);
    let _ = wide.model.backbone.build(vs2.root() / "backbone", 1).unwrap();
    let e = checkpoint::load_backbone(&vs2, &ckpt, checkpoint::Which::Student).unwrap_err().to_string();
    assert!(e.contains("backbone.") && e.contains("shape"), "{e}");
}
