//! Checkpoints: one folder per checkpoint holding the weights (`model.safetensors`, torchvision names under
//! `backbone.`), the optimizer state (`optimizer.safetensors`), the trainer state (`state.json`) and the resolved
//! config (`config.toml`). A checkpoint is written into a temporary folder, synced, then renamed into place, and
//! `LATEST` (naming the newest) is replaced by rename too: a crash at any moment leaves the previous checkpoint
//! intact and never a half-written one under a real name.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn invalid(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::Invalid { path: path.to_path_buf(), message: message.to_string() }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub selfsup_version: String,
}

pub const WEIGHTS: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const CONFIG: &str = "config.toml";
const LATEST: &str = "LATEST";

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Writes checkpoint `name` (e.g. `epoch-0005`) under `dir` and points `LATEST` at it.
pub fn save(
    dir: &Path,
    name: &str,
    vs: &VarStore,
    optimizer_state: &[(String, Tensor)],
    state: &TrainerState,
    config: &Config,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let weights = tmp.join(WEIGHTS);
    vs.save(&weights).map_err(|e| invalid(&weights, e))?;
    sync_file(&weights)?;
    let opt = tmp.join(OPTIMIZER);
    Tensor::write_safetensors(optimizer_state, &opt).map_err(|e| invalid(&opt, e))?;
    sync_file(&opt)?;
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    write_synced(&tmp.join(STATE), &json)?;
    write_synced(&tmp.join(CONFIG), config.to_toml().as_bytes())?;
    let dst = dir.join(name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    let latest_tmp = dir.join(format!(".{LATEST}.tmp"));
    write_synced(&latest_tmp, name.as_bytes())?;
    std::fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io(dir))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(dst)
}

/// Finds the checkpoint folder meant by `path`: a checkpoint folder itself, a `checkpoints` folder (its `LATEST`),
/// or a run folder (its `checkpoints/LATEST`).
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(WEIGHTS).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = dir.join(LATEST);
        if latest.is_file() {
            let name = std::fs::read_to_string(&latest).map_err(io(&latest))?;
            let ckpt = dir.join(name.trim());
            if ckpt.join(WEIGHTS).is_file() {
                return Ok(ckpt);
            }
            return Err(invalid(&latest, format!("names {} which has no {WEIGHTS}", ckpt.display())));
        }
    }
    Err(invalid(path, format!("no checkpoint here (expected {WEIGHTS}, LATEST or checkpoints/LATEST)")))
}

pub fn load_config(ckpt: &Path) -> Result<Config, CheckpointError> {
    let p = ckpt.join(CONFIG);
    Config::load(&p, &[]).map_err(|e| invalid(&p, e))
}

pub fn load_state(ckpt: &Path) -> Result<TrainerState, CheckpointError> {
    let p = ckpt.join(STATE);
    let bytes = std::fs::read(&p).map_err(io(&p))?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(&p, e))
}

/// Loads weights into `vs`; every variable of `vs` must be in the file.
pub fn load_weights(vs: &mut VarStore, ckpt: &Path) -> Result<(), CheckpointError> {
    let p = ckpt.join(WEIGHTS);
    vs.load(&p).map_err(|e| invalid(&p, e))
}

pub fn load_optimizer(ckpt: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let p = ckpt.join(OPTIMIZER);
    Tensor::read_safetensors(&p).map_err(|e| invalid(&p, e))
}

/// Which backbone of a checkpoint: the student's (`backbone.*`) or the momentum teacher's (`teacher.backbone.*`,
/// what DINO and BYOL users publish).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Student,
    Teacher,
}

impl Which {
    pub fn from_teacher(teacher: bool) -> Self {
        if teacher {
            Which::Teacher
        } else {
            Which::Student
        }
    }

    /// The name prefix of this backbone's tensors in `model.safetensors`.
    pub fn prefix(self) -> &'static str {
        match self {
            Which::Student => "backbone.",
            Which::Teacher => "teacher.backbone.",
        }
    }
}

/// Loads backbone `which` of checkpoint `ckpt` into the variables of `vs` named `backbone.*` (the rest of `vs`,
/// e.g. a new classifier head, keeps its initialisation; the checkpoint's objective heads are ignored). Every
/// backbone variable must be in the checkpoint with the same shape. Returns how many tensors were loaded.
pub fn load_backbone(vs: &VarStore, ckpt: &Path, which: Which) -> Result<usize, CheckpointError> {
    let p = ckpt.join(WEIGHTS);
    let saved: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&p).map_err(|e| invalid(&p, e))?.into_iter().collect();
    let mut loaded = 0;
    for (name, var) in vs.variables() {
        if !name.starts_with("backbone.") {
            continue;
        }
        let key = format!("{}{}", which.prefix(), &name["backbone.".len()..]);
        let src = saved.get(&key).ok_or_else(|| match which {
            Which::Teacher if !saved.keys().any(|k| k.starts_with(Which::Teacher.prefix())) => {
                invalid(&p, "has no teacher (the objective keeps none: byol, mocov3 and dino do)")
            }
            _ => invalid(&p, format!("has no {key} (a different backbone?)")),
        })?;
        if src.size() != var.size() {
            return Err(invalid(
                &p,
                format!(
                    "{name}: shape {:?} in the checkpoint, {:?} here (different channels or size?)",
                    src.size(),
                    var.size()
                ),
            ));
        }
        tch::no_grad(|| {
            let mut v = var.shallow_clone();
            v.copy_(src)
        });
        loaded += 1;
    }
    if loaded == 0 {
        return Err(invalid(&p, "no backbone.* tensors to load"));
    }
    Ok(loaded)
}

/// Writes backbone `which` of checkpoint `ckpt` to `out` (safetensors) under its own names, without the prefix:
/// torchvision names for a ResNet (`layer1.0.conv1.weight`), timm names for a ViT (`blocks.0.attn.qkv.weight`), so
/// `load_state_dict` takes it. Objective heads are left out. Returns the number of tensors written. Written to a
/// temporary file, synced, then renamed.
pub fn export_backbone(ckpt: &Path, out: &Path, which: Which) -> Result<usize, CheckpointError> {
    let p = ckpt.join(WEIGHTS);
    let prefix = which.prefix();
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&p)
        .map_err(|e| invalid(&p, e))?
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n.to_string(), t)))
        .collect();
    if tensors.is_empty() {
        let why =
            if which == Which::Teacher { " (the objective keeps no teacher: byol, mocov3 and dino do)" } else { "" };
        return Err(invalid(&p, format!("no {prefix}* tensors{why}")));
    }
    let name = out.file_name().map_or("export".into(), |n| n.to_string_lossy().into_owned());
    // tch picks the format from the extension: keep `.safetensors` last.
    let tmp = out.with_file_name(format!(".{name}.tmp-{}.safetensors", std::process::id()));
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| invalid(&tmp, e))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(tensors.len())
}
