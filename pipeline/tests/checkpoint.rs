//! Checkpoints: round trip of weights, optimizer state, trainer state and config; a crash mid-write (simulated
//! by a leftover temporary folder) never replaces the previous checkpoint; the manifest catches any flipped byte;
//! non-finite tensors are never written and never loaded; the live checkpoint is never removed.

use selfsup_models::{Optimizer, OptimizerConfig};
use selfsup_pipeline::checkpoint::{self, TrainerState};
use selfsup_pipeline::trainer::build_model;
use selfsup_pipeline::Config;
use tch::{Device, Kind, Tensor};

// Every model build here draws from torch's global RNG (build_model seeds it with the config's seed), and two tests
// compare inits of different seeds: every test that draws holds `common::torch_rng`.
mod common;

fn tiny_config() -> Config {
    Config::from_toml(
        "[model.backbone]\nkind = \"resnet\"\nlayers = [1,1,1,1]\nwidth = 4\n[objective]\nkind = \"simclr\"\nproj_hidden = 8\nproj_dim = 4\n",
        "test.toml",
        &[],
    )
    .unwrap()
}

fn save(
    dir: &std::path::Path,
    name: &str,
    vs: &tch::nn::VarStore,
    opt: &Optimizer,
    state: &TrainerState,
    cfg: &Config,
) -> Result<std::path::PathBuf, checkpoint::CheckpointError> {
    let contents = checkpoint::Contents { vs, optimizer: &opt.state(), probe: None, state, config: cfg };
    checkpoint::save(dir, name, &contents, 0)
}

#[test]
fn round_trip_and_crash_safety() {
    let _rng = common::torch_rng(0);
    let dir = tempfile::tempdir().unwrap();
    let ckdir = dir.path().join("checkpoints");
    let cfg = tiny_config();
    let model = build_model(&cfg, 1, Device::Cpu).unwrap();
    let mut opt = Optimizer::new(&model.vs, &OptimizerConfig::default()).unwrap();
    // Take one step so the momentum buffers are non-zero.
    let x = Tensor::randn([4, 1, 8, 8], tch::kind::FLOAT_CPU);
    model.objective.backbone().features(&x, true).sum(Kind::Float).backward();
    opt.step(0.1);
    let state = TrainerState { epoch: 3, step: 42, selfsup_version: "test".into(), ..Default::default() };
    save(&ckdir, "epoch-0003", &model.vs, &opt, &state, &cfg).unwrap();

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
    let _rng = common::torch_rng(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let model = build_model(&cfg, 1, Device::Cpu).unwrap();
    let state = TrainerState { epoch: 1, step: 1, selfsup_version: "test".into(), ..Default::default() };
    let opt = Optimizer::new(&model.vs, &OptimizerConfig::default()).unwrap();
    let ckpt = save(dir.path(), "epoch-0001", &model.vs, &opt, &state, &cfg).unwrap();

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

/// The tiny model, a fresh optimizer and a trainer state at epoch 1, step 5.
fn fixture() -> (Config, selfsup_pipeline::trainer::Model, Optimizer, TrainerState) {
    let cfg = tiny_config();
    let model = build_model(&cfg, 1, Device::Cpu).unwrap();
    let opt = Optimizer::new(&model.vs, &OptimizerConfig::default()).unwrap();
    let state = TrainerState { epoch: 1, step: 5, selfsup_version: "test".into(), ..Default::default() };
    (cfg, model, opt, state)
}

/// Copies the files of checkpoint folder `src` into a new folder `dst`.
fn copy_folder(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir(dst).unwrap();
    for f in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
    }
}

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at % bytes.len();
    bytes[i] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

/// Every file of a checkpoint is in its manifest (`sha256sum -c` checks it too), and a flipped byte anywhere, in
/// any file, makes `resolve` fail naming that file.
#[test]
fn manifest_catches_a_flipped_byte_in_every_file() {
    let _rng = common::torch_rng(0);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, model, opt, state) = fixture();
    let ckpt = save(dir.path(), "epoch-0001", &model.vs, &opt, &state, &cfg).unwrap();
    let out = std::process::Command::new("sha256sum")
        .args(["-c", "--quiet", "SHA256SUMS"])
        .current_dir(&ckpt)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum -c: {}", String::from_utf8_lossy(&out.stdout));
    let files = ["model.safetensors", "optimizer.safetensors", "state.json", "config.toml", "SHA256SUMS"];
    for (k, file) in files.iter().enumerate() {
        for at in [0usize, 17, 4099 + k * 31] {
            let copy = tempfile::tempdir().unwrap();
            let c = copy.path().join("epoch-0001");
            copy_folder(&ckpt, &c);
            flip_byte(&c.join(file), at);
            let e = checkpoint::resolve(&c).unwrap_err().to_string();
            assert!(e.contains(file), "flipped byte {at} of {file}: the error must name it: {e}");
        }
    }
    // A state beyond the config's schedule, with a valid manifest: refused naming state.json.
    let bad = TrainerState { epoch: 99_999, ..state.clone() };
    let e = save(dir.path(), "epoch-99999", &model.vs, &opt, &bad, &cfg).map(|p| checkpoint::resolve(&p));
    let e = e.unwrap().unwrap_err().to_string();
    assert!(e.contains("state.json") && e.contains("99999"), "{e}");
    // With steps per epoch known (the trainer's check), a step beyond the batches is refused too.
    let st = TrainerState { epoch: 1, step: 500, batch: 3, ..state };
    let e = checkpoint::check_state(&ckpt, &st, &cfg, Some(10)).unwrap_err().to_string();
    assert!(e.contains("state.json") && e.contains("step 500"), "{e}");
    checkpoint::check_state(&ckpt, &TrainerState { step: 13, ..st }, &cfg, Some(10)).unwrap();
}

/// A NaN in any weight or optimizer buffer: nothing is written (the previous LATEST stays), the error names the
/// tensor. A checkpoint holding one anyway (written by hand, with a valid manifest) is refused by every loader.
#[test]
fn non_finite_tensors_are_never_saved_nor_loaded() {
    let _rng = common::torch_rng(0);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, model, opt, state) = fixture();
    let good = save(dir.path(), "epoch-0001", &model.vs, &opt, &state, &cfg).unwrap();
    let name = "backbone.layer1.0.conv1.weight";
    tch::no_grad(|| {
        let w = model.vs.variables()[name].shallow_clone();
        let _ = w.get(0).get(0).fill_(f64::NAN);
    });
    let st2 = TrainerState { epoch: 2, step: 10, ..state.clone() };
    let e = save(dir.path(), "epoch-0002", &model.vs, &opt, &st2, &cfg).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    assert!(!dir.path().join("epoch-0002").exists());
    assert_eq!(checkpoint::resolve(dir.path()).unwrap(), good, "LATEST still names the good one");
    assert!(checkpoint::list(dir.path()).len() == 1);

    // By hand: NaN weights with a manifest that matches them.
    let ckpt = dir.path().join("by-hand");
    copy_folder(&good, &ckpt);
    model.vs.save(ckpt.join("model.safetensors")).unwrap();
    let sums = std::process::Command::new("sh")
        .arg("-c")
        .arg("sha256sum model.safetensors optimizer.safetensors state.json config.toml > SHA256SUMS")
        .current_dir(&ckpt)
        .status()
        .unwrap();
    assert!(sums.success());
    checkpoint::resolve(&ckpt).unwrap();
    let mut other = build_model(&cfg, 1, Device::Cpu).unwrap();
    let e = checkpoint::load_weights(&mut other.vs, &ckpt).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("NaN"), "{e}");
    let e = checkpoint::load_backbone(&other.vs, &ckpt, checkpoint::Which::Student).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    let out = dir.path().join("x.safetensors");
    let e = checkpoint::export_backbone(&ckpt, &out, checkpoint::Which::Student).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    assert!(!out.exists());
}

/// Saving again the checkpoint LATEST names leaves it untouched; a stale folder of the same name that LATEST
/// does not name is replaced; keep_last prunes the oldest but never LATEST's; leftovers of dead writers go.
#[test]
fn the_live_checkpoint_is_never_removed_and_pruning_keeps_the_newest() {
    let _rng = common::torch_rng(0);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, model, opt, _) = fixture();
    let put = |name: &str, step: u64, keep: usize| {
        let state = TrainerState { epoch: 0, step, batch: step, ..Default::default() };
        let contents =
            checkpoint::Contents { vs: &model.vs, optimizer: &opt.state(), probe: None, state: &state, config: &cfg };
        checkpoint::save(dir.path(), name, &contents, keep).unwrap();
    };
    for step in 1..=4u64 {
        put(&format!("s{step}"), step, 2);
    }
    let names: Vec<String> =
        checkpoint::list(dir.path()).iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["s3", "s4"]);
    let before = std::fs::metadata(dir.path().join("s4/SHA256SUMS")).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    put("s4", 4, 2);
    let after = std::fs::metadata(dir.path().join("s4/SHA256SUMS")).unwrap().modified().unwrap();
    assert_eq!(before, after, "the live checkpoint was rewritten");
    // A complete folder renamed into place by a writer killed before it moved LATEST: replaced when saved again.
    std::fs::create_dir(dir.path().join("s5")).unwrap();
    std::fs::write(dir.path().join("s5/state.json"), b"{}").unwrap();
    put("s5", 5, 0);
    assert_eq!(checkpoint::resolve(dir.path()).unwrap(), dir.path().join("s5"));
    // Leftovers.
    std::fs::create_dir(dir.path().join(".s6.tmp-1")).unwrap();
    std::fs::create_dir(dir.path().join(".s2.del-1")).unwrap();
    std::fs::write(dir.path().join(".LATEST.tmp-1"), b"s6").unwrap();
    assert_eq!(checkpoint::clean_leftovers(dir.path()).unwrap(), 3);
    assert_eq!(checkpoint::resolve(dir.path()).unwrap(), dir.path().join("s5"));
}
