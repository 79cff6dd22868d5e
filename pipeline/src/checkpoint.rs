//! Checkpoints: one folder per checkpoint holding the weights (`model.safetensors`, torchvision names under
//! `backbone.`), the optimizer state (`optimizer.safetensors`), the online probe (`probe.safetensors`, when the
//! run has one), the trainer state (`state.json`), the resolved config (`config.toml`) and a manifest of them all
//! (`SHA256SUMS`, in `sha256sum -c`'s format).
//!
//! Nothing is ever lost to a crash:
//! - a checkpoint is written into a temporary folder, every file synced, then renamed into place; `LATEST`
//!   (naming the newest) is replaced by rename too, and only then are older ones pruned (`train.keep_last`). A
//!   crash at any moment leaves the previous checkpoint intact, `LATEST` naming a complete one, and at worst a
//!   temporary folder that the next run in the folder removes ([`clean_leftovers`]);
//! - the live checkpoint (the one `LATEST` names) is never removed or rewritten, not even when a checkpoint of the
//!   same name is saved again;
//! - no tensor with a NaN or infinity is ever written ([`save`] refuses, naming it);
//! - loading ([`resolve`]) verifies every file against the manifest and `state.json` against the config, with an
//!   error naming the file; [`load_weights`], [`load_backbone`] and [`export_backbone`] refuse non-finite tensors,
//!   naming them.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    // `error`, not `source`: the message already holds it (a source would be printed twice in a chain).
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: not saved: tensor {tensor} holds NaN or infinite values")]
    NonFinite { path: PathBuf, tensor: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io { path: path.to_path_buf(), error }
}

fn invalid(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::Invalid { path: path.to_path_buf(), message: message.to_string() }
}

/// Where training stands, as saved in `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct TrainerState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken (skipped non-finite ones included: the schedule position).
    pub step: u64,
    /// Batches of epoch `epoch` already consumed (0 at an epoch boundary): a resume continues with the next one.
    pub batch: u64,
    /// Steps whose update was skipped for a non-finite loss or gradient (`train.on_nonfinite = "skip"`).
    pub skipped_steps: u64,
    /// The log window in progress (steps since the last log point and their sums), so that the first log
    /// point after a resume averages the same steps as without the interruption.
    pub window: WindowState,
    /// Samples seen and unreadable so far in epoch `epoch` (for `data.max_bad_fraction`).
    pub epoch_seen: usize,
    pub epoch_bad: usize,
    pub selfsup_version: String,
    /// The training samples the run's epochs go over (after `data.limit`; 0 in checkpoints older than this
    /// field): a resume on data of another size would name other batches with the same position.
    pub data_samples: u64,
}

/// The sums of a log window, as saved.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct WindowState {
    pub steps: u64,
    pub images: u64,
    /// The fp32 sums, exactly (f32 round-trips through JSON).
    pub loss: f32,
    pub terms: Vec<(String, f32)>,
    /// The sum of the steps' gradient norms (`train/grad_norm`).
    pub grad_norm: f32,
    /// Online probe: correct predictions and images since the last log point.
    pub probe_hits: i64,
    pub probe_seen: u64,
}

pub const WEIGHTS: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const PROBE: &str = "probe.safetensors";
pub const STATE: &str = "state.json";
pub const CONFIG: &str = "config.toml";
/// The manifest: `<sha256 hex>  <file>` per line, as `sha256sum` writes and checks it.
pub const MANIFEST: &str = "SHA256SUMS";
pub const LATEST: &str = "LATEST";
/// Files every checkpoint has (and its manifest lists).
const REQUIRED: [&str; 4] = [WEIGHTS, OPTIMIZER, STATE, CONFIG];

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The first tensor of `tensors` holding a NaN or an infinity, by name. One reduction per tensor and one read
/// back per device.
pub fn first_nonfinite<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Option<String> {
    let tensors: Vec<(&str, &Tensor)> =
        tensors.into_iter().filter(|(_, t)| t.defined() && t.numel() > 0 && t.is_floating_point()).collect();
    let mut devices: Vec<Device> = tensors.iter().map(|(_, t)| t.device()).collect();
    devices.dedup();
    devices.sort_by_key(|d| format!("{d:?}"));
    devices.dedup();
    for device in devices {
        let (names, flags): (Vec<&str>, Vec<Tensor>) = tch::no_grad(|| {
            tensors
                .iter()
                .filter(|(_, t)| t.device() == device)
                .map(|(n, t)| (*n, t.isfinite().all().to_kind(Kind::Int8)))
                .unzip()
        });
        let ok: Vec<i8> = Vec::try_from(Tensor::stack(&flags, 0).to_device(Device::Cpu)).expect("int8 flags");
        if let Some(i) = ok.iter().position(|&f| f == 0) {
            return Some(names[i].to_string());
        }
    }
    None
}

/// Test-only fault injection: `SELFSUP_FAULT_SLOW_CHECKPOINT_MS=N` pauses N ms between the stages of a checkpoint
/// write, so that a test (scripts/soak) can kill the process in the middle of one.
fn fault_pause() {
    static PAUSE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *PAUSE.get_or_init(|| {
        std::env::var("SELFSUP_FAULT_SLOW_CHECKPOINT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
    });
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// What a checkpoint holds, borrowed from the trainer.
pub struct Contents<'a> {
    pub vs: &'a VarStore,
    pub optimizer: &'a [(String, Tensor)],
    /// The online probe's weights and optimizer state, when the run has one.
    pub probe: Option<&'a [(String, Tensor)]>,
    pub state: &'a TrainerState,
    pub config: &'a Config,
}

/// The name `LATEST` in `dir` gives, if any.
fn latest_name(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(LATEST)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Writes checkpoint `name` (e.g. `epoch-0005`) under `dir`, points `LATEST` at it, then prunes all but the
/// newest `keep_last` checkpoints (0 = keep all; the one `LATEST` names is always kept). Refuses to write a
/// tensor with a non-finite value. Saving again the checkpoint `LATEST` already names leaves it as it is.
pub fn save(dir: &Path, name: &str, c: &Contents, keep_last: usize) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dst = dir.join(name);
    if latest_name(dir).as_deref() == Some(name) && dst.is_dir() {
        return Ok(dst); // the live checkpoint: same name, same step; never rewritten
    }
    let vars = c.vs.variables();
    let named = vars.iter().map(|(n, t)| (n.as_str(), t));
    let others = c.optimizer.iter().chain(c.probe.unwrap_or_default()).map(|(n, t)| (n.as_str(), t));
    if let Some(tensor) = first_nonfinite(named.chain(others)) {
        return Err(CheckpointError::NonFinite { path: dst, tensor });
    }
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let weights = tmp.join(WEIGHTS);
    c.vs.save(&weights).map_err(|e| invalid(&weights, e))?;
    sync_file(&weights)?;
    fault_pause();
    let mut files = vec![WEIGHTS];
    for (file, tensors) in [(OPTIMIZER, Some(c.optimizer)), (PROBE, c.probe)] {
        if let Some(tensors) = tensors {
            let p = tmp.join(file);
            Tensor::write_safetensors(tensors, &p).map_err(|e| invalid(&p, e))?;
            sync_file(&p)?;
            files.push(file);
            fault_pause();
        }
    }
    let json = serde_json::to_vec_pretty(c.state).expect("state serializes");
    write_synced(&tmp.join(STATE), &json)?;
    write_synced(&tmp.join(CONFIG), c.config.to_toml().as_bytes())?;
    files.extend([STATE, CONFIG]);
    let mut manifest = String::new();
    for file in files {
        manifest += &format!("{}  {file}\n", sha256_file(&tmp.join(file))?);
    }
    write_synced(&tmp.join(MANIFEST), manifest.as_bytes())?;
    sync_dir(&tmp)?;
    fault_pause();
    if dst.exists() {
        // Not the live checkpoint (checked above): e.g. one renamed into place by a writer killed before it
        // moved LATEST. Hidden by a rename first, so a kill mid-removal leaves no half folder under a real name.
        let doomed = dir.join(format!(".{name}.del-{}", std::process::id()));
        std::fs::rename(&dst, &doomed).map_err(io(&dst))?;
        std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    fault_pause();
    let latest_tmp = dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, name.as_bytes())?;
    std::fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io(dir))?;
    sync_dir(dir)?;
    if keep_last > 0 {
        fault_pause();
        prune(dir, keep_last)?;
    }
    Ok(dst)
}

/// The checkpoints in `dir` (folders with a `state.json`, temporary ones excluded), oldest first by step.
pub fn list(dir: &Path) -> Vec<(PathBuf, TrainerState)> {
    let mut found: Vec<(PathBuf, TrainerState)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let path = e.path();
            let state = load_state(&path).ok()?;
            Some((path, state))
        })
        .collect();
    found.sort_by(|a, b| (a.1.step, a.1.epoch, &a.0).cmp(&(b.1.step, b.1.epoch, &b.0)));
    found
}

/// Removes all but the newest `keep` checkpoints of `dir`, never the one `LATEST` names. Each is hidden by a
/// rename before it is removed.
fn prune(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    let latest = latest_name(dir);
    let all = list(dir);
    let doomed = all.len().saturating_sub(keep);
    for (path, _) in all.into_iter().take(doomed) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if latest.as_deref() == Some(name.as_str()) {
            continue;
        }
        let hidden = dir.join(format!(".{name}.del-{}", std::process::id()));
        std::fs::rename(&path, &hidden).map_err(io(&path))?;
        std::fs::remove_dir_all(&hidden).map_err(io(&hidden))?;
    }
    Ok(())
}

/// Removes what dead writers left in checkpoint folder `dir`: temporary checkpoint folders (`.<name>.tmp-<pid>`),
/// half-removed ones (`.<name>.del-<pid>`) and temporary `LATEST` files. Call it only while holding the run
/// folder's lock (no live writer then). Returns how many entries were removed.
pub fn clean_leftovers(dir: &Path) -> Result<usize, CheckpointError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && (name.contains(".tmp-") || name.contains(".del-"))) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        result.map_err(io(&path))?;
        removed += 1;
    }
    Ok(removed)
}

/// Checks every file `ckpt`'s manifest lists against its SHA-256, and that the manifest lists the files every
/// checkpoint has. The error names the file.
pub fn verify(ckpt: &Path) -> Result<(), CheckpointError> {
    let mpath = ckpt.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => invalid(
            &mpath,
            format!(
                "missing: the checkpoint cannot be verified (an incomplete copy, or written by a selfsup before \
                 checksums: to vouch for such a one, `cd {} && sha256sum {} > {MANIFEST}`)",
                ckpt.display(),
                REQUIRED.join(" ")
            ),
        ),
        _ => CheckpointError::Io { path: mpath.clone(), error: e },
    })?;
    let mut listed = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let parsed = line.split_once("  ").filter(|(hash, file)| {
            hash.len() == 64
                && hash.bytes().all(|b| b.is_ascii_hexdigit())
                && !file.is_empty()
                && !file.contains('/')
                && !file.starts_with('.')
        });
        let Some((want, file)) = parsed else {
            return Err(invalid(&mpath, format!("line {}: not `<sha256>  <file>`: the manifest is corrupt", i + 1)));
        };
        let fpath = ckpt.join(file);
        let got = sha256_file(&fpath)?;
        if got != want {
            return Err(invalid(
                &fpath,
                format!("checksum mismatch: {MANIFEST} says {want}, the file hashes to {got}: the file is corrupt"),
            ));
        }
        listed.push(file);
    }
    if let Some(missing) = REQUIRED.iter().find(|f| !listed.contains(f)) {
        return Err(invalid(&mpath, format!("does not list {missing}: the manifest is corrupt")));
    }
    Ok(())
}

/// A file read on its own from inside a checkpoint (`--init-from <ckpt>/model.safetensors`): checked against its
/// line in the checkpoint's manifest, as the whole checkpoint is when resumed. A file outside a checkpoint, or not
/// in its manifest, passes.
pub fn verify_if_listed(file: &Path) -> Result<(), CheckpointError> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name().and_then(|n| n.to_str())) else { return Ok(()) };
    let mpath = dir.join(MANIFEST);
    let Ok(text) = std::fs::read_to_string(&mpath) else { return Ok(()) };
    for (want, listed) in text.lines().filter_map(|l| l.split_once("  ")) {
        if listed == name {
            let got = sha256_file(file)?;
            if got != want {
                return Err(invalid(
                    file,
                    format!(
                        "checksum mismatch: {} says {want}, the file hashes to {got}: the file is corrupt",
                        mpath.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks `state` (of checkpoint `ckpt`) against `cfg`: epoch and step within the run's schedule, and with
/// `steps_per_epoch` known (the trainer's), the step and batch consistent with it.
pub fn check_state(
    ckpt: &Path,
    state: &TrainerState,
    cfg: &Config,
    steps_per_epoch: Option<u64>,
) -> Result<(), CheckpointError> {
    let p = ckpt.join(STATE);
    let epochs = cfg.train.epochs;
    if state.epoch > epochs {
        return Err(invalid(&p, format!("epoch {} is beyond train.epochs = {epochs}", state.epoch)));
    }
    if state.epoch == epochs && state.batch > 0 {
        return Err(invalid(&p, format!("batch {} of an epoch past the last one", state.batch)));
    }
    if state.skipped_steps > state.step {
        return Err(invalid(&p, format!("{} skipped steps of {} taken", state.skipped_steps, state.step)));
    }
    if let Some(spe) = steps_per_epoch {
        let total = spe * epochs as u64;
        // Steps never exceed batches (a batch emptied by unreadable samples is consumed without a step).
        let batches = state.epoch as u64 * spe + state.batch;
        if state.batch >= spe {
            return Err(invalid(&p, format!("batch {} of an epoch of {spe} batches", state.batch)));
        }
        if state.step > batches || state.step > total {
            return Err(invalid(
                &p,
                format!(
                    "step {} after {} batches ({} epochs of {spe}, {total} in all): not a state of this run",
                    state.step, batches, state.epoch
                ),
            ));
        }
    } else if state.step > (1 << 48) {
        return Err(invalid(&p, format!("step {} is absurd", state.step)));
    }
    Ok(())
}

/// Finds the checkpoint folder meant by `path` (a checkpoint folder itself, a `checkpoints` folder (its
/// `LATEST`), or a run folder (its `checkpoints/LATEST`)) and verifies it: every file against the manifest,
/// `state.json` against the checkpoint's config. Every command that reads a checkpoint goes through here.
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    let ckpt = find(path)?;
    check(&ckpt).map_err(|e| match e {
        CheckpointError::Invalid { path, message } => {
            CheckpointError::Invalid { message: format!("{message}{}", newest_good_hint(&ckpt)), path }
        }
        e => e,
    })?;
    Ok(ckpt)
}

/// Verifies checkpoint `ckpt`: every file against the manifest, `state.json` against its config.
fn check(ckpt: &Path) -> Result<(), CheckpointError> {
    verify(ckpt)?;
    let cfg = load_config(ckpt)?;
    check_state(ckpt, &load_state(ckpt)?, &cfg, None)
}

/// For a checkpoint `bad` that fails verification: the newest other checkpoint beside it that verifies, and
/// how to continue from it (`LATEST` names the one `--resume` takes); empty when there is none.
fn newest_good_hint(bad: &Path) -> String {
    let Some(dir) = bad.parent() else { return String::new() };
    let good = list(dir).into_iter().rev().map(|(p, _)| p).find(|p| p != bad && check(p).is_ok());
    match good {
        Some(p) => {
            let name = p.file_name().unwrap().to_string_lossy();
            format!(
                ". The newest checkpoint here that verifies is {}: eval, finetune and export take it as it is; to \
                 --resume from it, `echo {name} > {}`",
                p.display(),
                dir.join(LATEST).display()
            )
        }
        None => String::new(),
    }
}

/// The checkpoint folder `path` means, unverified.
fn find(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(STATE).is_file() || path.join(MANIFEST).is_file() || path.join(WEIGHTS).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = dir.join(LATEST);
        if latest.is_file() {
            let name = std::fs::read_to_string(&latest).map_err(io(&latest))?;
            let ckpt = dir.join(name.trim());
            if !name.trim().is_empty() && !name.trim().contains('/') && ckpt.is_dir() {
                return Ok(ckpt);
            }
            let others: Vec<String> =
                list(&dir).iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
            return Err(invalid(
                &latest,
                format!("names {:?}, which is not a checkpoint here (checkpoints: {others:?})", name.trim()),
            ));
        }
    }
    // No LATEST (deleted, or lost with a copy of the folder): the checkpoints themselves may still be here.
    for dir in [path.to_path_buf(), path.join("checkpoints")] {
        let good = list(&dir).into_iter().rev().map(|(p, _)| p).find(|p| check(p).is_ok());
        if let Some(p) = good {
            let name = p.file_name().unwrap().to_string_lossy();
            return Err(invalid(
                &dir.join(LATEST),
                format!(
                    "missing, so no checkpoint is chosen; the newest checkpoint here that verifies is {}: name it                      (`--checkpoint {}`), or to --resume from it, `echo {name} > {}`",
                    p.display(),
                    p.display(),
                    dir.join(LATEST).display()
                ),
            ));
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

/// The tensors of safetensors file `file` of `ckpt`, refused (naming the tensor) if any holds a NaN or an
/// infinity.
fn read_finite(ckpt: &Path, file: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let p = ckpt.join(file);
    let tensors = Tensor::read_safetensors(&p).map_err(|e| invalid(&p, e))?;
    if let Some(name) = first_nonfinite(tensors.iter().map(|(n, t)| (n.as_str(), t))) {
        return Err(invalid(&p, format!("tensor {name} holds NaN or infinite values: refusing these weights")));
    }
    Ok(tensors)
}

/// Loads weights into `vs`; every variable of `vs` must be in the file with its shape. Non-finite weights are
/// refused, naming the tensor.
pub fn load_weights(vs: &mut VarStore, ckpt: &Path) -> Result<(), CheckpointError> {
    let p = ckpt.join(WEIGHTS);
    let saved: std::collections::HashMap<String, Tensor> = read_finite(ckpt, WEIGHTS)?.into_iter().collect();
    let mut copies = Vec::new();
    for (name, var) in vs.variables() {
        let src = saved.get(&name).ok_or_else(|| invalid(&p, format!("has no {name} (a different model?)")))?;
        if src.size() != var.size() {
            return Err(invalid(&p, format!("{name}: shape {:?} in the file, {:?} here", src.size(), var.size())));
        }
        copies.push((var, src));
    }
    tch::no_grad(|| {
        for (mut var, src) in copies {
            var.copy_(src);
        }
    });
    Ok(())
}

pub fn load_optimizer(ckpt: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    read_finite(ckpt, OPTIMIZER)
}

/// The online probe's tensors, if the checkpoint has them.
pub fn load_probe(ckpt: &Path) -> Result<Option<Vec<(String, Tensor)>>, CheckpointError> {
    if !ckpt.join(PROBE).is_file() {
        return Ok(None);
    }
    read_finite(ckpt, PROBE).map(Some)
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
    let saved: std::collections::HashMap<String, Tensor> = read_finite(ckpt, WEIGHTS)?.into_iter().collect();
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
    let tensors: Vec<(String, Tensor)> = read_finite(ckpt, WEIGHTS)?
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
