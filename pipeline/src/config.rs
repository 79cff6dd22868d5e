//! The run configuration: one serde tree with `deny_unknown_fields`, loaded from a TOML preset plus
//! `--set key=value` overrides. Defaults live only in the `Default` impls; `validate()` names the bad field.
//! The resolved config is written next to the run and into every checkpoint.

use std::path::{Path, PathBuf};

use selfsup_augment::RecipeConfig;
use selfsup_models::{BackboneConfig, ObjectiveConfig, OptimizerConfig, OptimizerKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: `{key}`: {message}")]
    Key { file: String, key: String, message: String },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    // `error`, not `source`: the message already holds it (a source would be printed twice in a chain).
    #[error("cannot read {file}: {error}")]
    Io { file: String, error: std::io::Error },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run name; the default output folder is `runs/<name>-<time>`.
    pub name: String,
    /// The master seed: shuffling, augmentation and initialisation all derive from it.
    pub seed: u64,
    pub data: DataConfig,
    /// The recipe of every view, unless `views` is given.
    pub augment: RecipeConfig,
    /// One recipe per view, in the order the objective consumes them (asymmetric recipes such as BYOL's). In the
    /// TOML, each `[[views]]` table inherits every key it does not set from `[augment]`, and `count = k` repeats
    /// it k times (multi-crop). Empty: every view uses `augment`.
    pub views: Vec<RecipeConfig>,
    pub model: ModelConfig,
    pub objective: ObjectiveConfig,
    pub optimizer: OptimizerConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    /// Fine-tuning on labeled data: the recipe `selfsup finetune` uses for this run's checkpoints, and (with
    /// `at_end`) a fine-tune of the pretrained backbone and of the same backbone from scratch after pretraining.
    pub finetune: FinetuneConfig,
    /// More than one process (launched by `torchrun`, SLURM's `srun`, or `selfsup pretrain --nproc-per-node`).
    pub dist: DistConfig,
    /// What goes to TensorBoard besides the curves of every log point.
    pub log: LogConfig,
}

/// TensorBoard extras (the curves themselves follow `train.log_every`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Histograms of every trainable parameter's values and gradient (`weights/*`, `gradients/*`) and of the
    /// per-parameter gradient norms (`grad_norm/per_parameter`), at the first log point and then at the first log
    /// point at or after every this many steps (0 = never). Computed on the device (one small read per
    /// parameter); see the README for the measured cost.
    pub histogram_every: usize,
    /// Buckets per histogram (equal width between the tensor's min and max).
    pub histogram_bins: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { histogram_every: 500, histogram_bins: 30 }
    }
}

/// Data-parallel training (see README, "More GPUs, more machines"). `train.batch_size` stays the global batch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// `auto`: NCCL on CUDA, Gloo on CPU.
    pub backend: DistBackend,
    /// How long the rendezvous and any collective wait for the slowest rank before the run stops with an error
    /// naming it (a dead or hung rank). torch's default is 30 minutes; what rank 0 does alone between two steps
    /// (fitting the k-NN on the gathered features, writing a checkpoint) must fit in it.
    pub timeout_s: f64,
    /// Average the gradients while backward runs (each bucket's all-reduce starts as soon as its gradients are
    /// ready, as DDP does); `false`: all buckets after backward.
    pub overlap: bool,
    /// Gradient bucket size in MB of fp32 (DDP's `bucket_cap_mb`): one all-reduce per bucket.
    pub bucket_mb: f64,
}

impl DistConfig {
    /// [`DistConfig::bucket_mb`] in fp32 elements (at least 1).
    pub fn bucket_numel(&self) -> i64 {
        ((self.bucket_mb * 1024.0 * 1024.0 / 4.0) as i64).max(1)
    }
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { backend: DistBackend::Auto, timeout_s: 1800.0, overlap: true, bucket_mb: 25.0 }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DistBackend {
    Auto,
    Nccl,
    Gloo,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// Every backbone parameter trains (with layer-wise lr decay when `layer_decay < 1`).
    Full,
    /// The backbone is frozen (eval mode); only the linear head trains.
    Linear,
}

/// The fine-tuning recipe. Optimizer keys are flat here (not a nested `[finetune.optimizer]` table) so that
/// setting one of them never resets the others to the pretraining optimizer's defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Labeled training data (default: `data.train`).
    pub train: Option<PathBuf>,
    /// Labeled test data (default: `data.test`).
    pub test: Option<PathBuf>,
    /// Class names for reports (default: `data.class_names` when the data is the pretraining data).
    pub class_names: Vec<String>,
    pub mode: FinetuneMode,
    pub epochs: usize,
    pub batch_size: usize,
    /// Keep this many labeled images per class (a fixed subset drawn with `seed`); 0 = all.
    pub labels_per_class: usize,
    /// Evaluate on at most this many test images (0 = all): for quick runs and tests.
    pub test_limit: usize,
    pub label_smoothing: f64,
    pub optimizer: OptimizerKind,
    /// Learning rate for a batch of 256, scaled linearly with `batch_size`.
    pub base_lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Layer-wise learning-rate decay (BEiT/MAE): layer l of L gets lr * layer_decay^(L - l); 1 = off (the
    /// default; the ViT presets set 0.75).
    pub layer_decay: f64,
    pub warmup_epochs: f64,
    /// Max global gradient norm (0 = no clipping).
    pub clip_grad: f64,
    /// Augmentation: the pretraining view's size and normalization, a random resized crop of this area range
    /// and a horizontal flip with this probability (set 0 for digits and text).
    pub crop_scale: (f32, f32),
    pub flip_p: f32,
    /// Evaluate on the test data every this many epochs (0 = only at the end).
    pub eval_every: usize,
    /// After pretraining, fine-tune the pretrained backbone and the same backbone from scratch with this recipe
    /// and report both side by side (transfer presets).
    pub at_end: bool,
    /// Fine-tune the momentum teacher's backbone instead of the student's (objectives with a teacher).
    pub teacher: bool,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            train: None,
            test: None,
            class_names: Vec::new(),
            mode: FinetuneMode::Full,
            epochs: 8,
            batch_size: 256,
            labels_per_class: 0,
            test_limit: 0,
            label_smoothing: 0.1,
            optimizer: OptimizerKind::Adamw,
            base_lr: 1e-3,
            weight_decay: 0.05,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            layer_decay: 1.0,
            warmup_epochs: 1.0,
            clip_grad: 0.0,
            crop_scale: (0.6, 1.0),
            flip_p: 0.5,
            eval_every: 1,
            at_end: false,
            teacher: false,
        }
    }
}

impl FinetuneConfig {
    /// The optimizer these keys describe.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            base_lr: self.base_lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            layer_decay: self.layer_decay,
            warmup_epochs: self.warmup_epochs,
            clip_grad: self.clip_grad,
            final_lr_fraction: 0.0,
            ..OptimizerConfig::default()
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Pretraining images: an IDX images file (`*-idx3-ubyte[.gz]`), CIFAR batches, an HDF5 file, or a folder of
    /// images (JPEG, PNG, GIF, WebP, TIFF, BMP).
    pub train: PathBuf,
    /// Held-out labeled images for evaluation (same kinds as `train`); empty = no evaluation.
    pub test: Option<PathBuf>,
    /// Channels for image folders (1 or 3); IDX files are gray.
    pub channels: u8,
    /// The run stops if more than this fraction of an epoch's samples cannot be read.
    pub max_bad_fraction: f64,
    /// Class names for reports (IDX files carry none).
    pub class_names: Vec<String>,
    /// `auto`: block-aware shuffle for sources read in blocks (HDF5 chunks), sample by sample otherwise;
    /// `full`: always sample by sample (then an HDF5 file is read in exactly the order of its IDX original).
    pub shuffle: ShuffleMode,
    /// Images whose header claims more pixels than this are refused before decoding (counted as unreadable).
    pub max_pixels: u64,
    /// Pretrain on the first N training images only (0 = all): quick looks and tests.
    pub limit: usize,
}

impl DataConfig {
    pub fn open_options(&self) -> crate::source::OpenOptions {
        crate::source::OpenOptions { channels: self.channels, max_pixels: self.max_pixels }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: PathBuf::from("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
            test: Some(PathBuf::from("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")),
            channels: 3,
            max_bad_fraction: 0.01,
            class_names: Vec::new(),
            shuffle: ShuffleMode::Auto,
            max_pixels: crate::source::DEFAULT_MAX_PIXELS,
            limit: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShuffleMode {
    Auto,
    Full,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub backbone: BackboneConfig,
    /// With more than one rank: every batch norm in training mode uses the global batch's statistics (as one
    /// process would; torch.nn.SyncBatchNorm's maths), at the cost of two small all-reduces per batch norm per
    /// step. Off: each rank normalizes with its own slice's statistics (DDP's default).
    pub sync_bn: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA when visible, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// The global batch: split evenly over the ranks when more than one process trains (each loads its slice of
    /// every batch), so the run means the same on 1 GPU or 8. Must be divisible by the number of ranks.
    pub batch_size: usize,
    /// Loader worker threads (0 = all cores).
    pub threads: usize,
    /// Batches prepared ahead of the trainer.
    pub prefetch: usize,
    /// Steps between reading the loss back from the device and logging.
    pub log_every: usize,
    /// Epochs between checkpoints (0 = only at the end).
    pub checkpoint_every: usize,
    pub device: DeviceChoice,
    /// bf16 autocast on CUDA (ignored on CPU).
    pub bf16: bool,
    /// Stop after this many steps (0 = no limit): for smoke tests and quick looks.
    pub max_steps: usize,
    /// View pairs shown in the TensorBoard grid at the start of training.
    pub preview_pairs: usize,
    /// Masked-image objectives: log a grid of original / masked / reconstructed images every this many epochs
    /// (and at the end; 0 = never).
    pub recon_every: usize,
    /// Diagnostics: after 10 warm-up steps, synchronize the device after each phase of a step (forward, backward,
    /// optimizer, online probe) for this many steps, and report per phase the host's time to issue the work and
    /// the device's time to finish it after that (summary.json `profile`). Slows those steps; 0 = off.
    pub profile_steps: usize,
    /// The collapse monitor warns (progress line, end of run) when `train/embedding_std` falls below this...
    pub collapse_warn_std: f64,
    /// ... or `train/effective_rank` below this.
    pub collapse_warn_rank: f64,
    /// Also checkpoint every this many optimizer steps (0 = off), in the middle of an epoch too: `--resume`
    /// continues from the next batch, exactly as if never stopped.
    pub checkpoint_every_steps: usize,
    /// Also checkpoint when this many minutes have passed since the last checkpoint (0 = off). With the
    /// default, a crash or SIGKILL loses at most half an hour.
    pub checkpoint_every_minutes: f64,
    /// Keep only the newest this many checkpoints (0 = keep all). The one `LATEST` names is never removed.
    pub keep_last: usize,
    /// A step whose loss or gradient norm is NaN or infinite: "stop" (the run stops at the next log point or
    /// checkpoint, naming the step and the last good checkpoint; no sync per step) or "skip" (that update is not
    /// applied, `train/skipped_steps` counts it; costs one device sync per step).
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip"`: stop once more than this many steps were skipped.
    pub max_skipped: usize,
    /// When stderr is not a terminal (CI logs, files), print the progress line at most every this many seconds
    /// (0 = at every log point).
    pub progress_every_s: f64,
}

/// What to do about a step with a non-finite loss or gradient norm (`train.on_nonfinite`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch_size: 512,
            threads: 0,
            prefetch: 4,
            log_every: 20,
            checkpoint_every: 5,
            device: DeviceChoice::Auto,
            bf16: true,
            max_steps: 0,
            preview_pairs: 16,
            recon_every: 1,
            profile_steps: 0,
            collapse_warn_std: 0.1,
            collapse_warn_rank: 2.0,
            checkpoint_every_steps: 0,
            checkpoint_every_minutes: 30.0,
            keep_last: 0,
            on_nonfinite: OnNonFinite::Stop,
            max_skipped: 20,
            progress_every_s: 15.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate (k-NN and linear probe) at the end of pretraining.
    pub at_end: bool,
    /// Labeled images for the k-NN bank and the linear probe's training set (same kinds as `data.train`; a
    /// folder of class sub-folders has labels). Default: `data.train`, when it has labels; pretraining on an
    /// unlabeled folder without this skips the evaluation (said at the start and in the summary).
    pub train: Option<PathBuf>,
    /// The validation curve `val/knn_top1`: a k-NN top-1 every this many epochs during pretraining (and after
    /// the last), on the subset `val_bank_size` / `val_test_size` (0 = never).
    pub knn_every: usize,
    /// The validation k-NN's bank: the first this many labeled training images (0 = all).
    pub val_bank_size: usize,
    /// The validation k-NN's queries: the first this many test images (0 = all).
    pub val_test_size: usize,
    pub knn_k: usize,
    pub knn_temperature: f64,
    pub probe_epochs: usize,
    pub probe_lr: f64,
    pub probe_batch: usize,
    pub probe_weight_decay: f64,
    /// Also fit the linear probe on raw pixels with the same code, as the baseline to beat.
    pub raw_pixel_baseline: bool,
    /// Use only the first N labeled training images as the k-NN bank / probe training set (0 = all).
    pub train_limit: usize,
    /// Write the features of this many test images for TensorBoard's embedding projector (0 = none).
    pub projector_samples: usize,
    /// Train a linear classifier on the (detached) backbone features of each training batch while pretraining,
    /// when the training data has labels, and log its accuracy (`train/online_probe_top1`): a live learning curve.
    /// The labels never reach the backbone.
    pub online_probe: bool,
    /// The online probe's SGD learning rate (momentum 0.9, no decay).
    pub online_probe_lr: f64,
    /// Evaluate the momentum teacher's backbone instead of the student's (objectives with a teacher; DINO's
    /// teacher is usually the better one).
    pub teacher: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            at_end: true,
            train: None,
            knn_every: 1,
            val_bank_size: 10_000,
            val_test_size: 2_000,
            knn_k: 200,
            knn_temperature: 0.1,
            probe_epochs: 30,
            probe_lr: 0.1,
            probe_batch: 256,
            probe_weight_decay: 1e-5,
            raw_pixel_baseline: true,
            train_limit: 0,
            projector_samples: 1000,
            online_probe: true,
            online_probe_lr: 0.1,
            teacher: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "run".into(),
            seed: 0,
            data: DataConfig::default(),
            augment: RecipeConfig::simclr(28, 1),
            views: Vec::new(),
            model: ModelConfig::default(),
            objective: ObjectiveConfig::default(),
            optimizer: OptimizerConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
            finetune: FinetuneConfig::default(),
            dist: DistConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// The largest batch any key accepts (a million images of a view is already far past any device's memory).
pub const MAX_BATCH: usize = 1 << 20;
/// The most loader threads (`train.threads`): each is an OS thread started before the first step.
pub const MAX_THREADS: usize = 1024;
/// The most batches prepared ahead (`train.prefetch`): each holds a whole batch of views in memory.
pub const MAX_PREFETCH: usize = 1024;
/// The largest view side in pixels (DINOv2 trains at 518; dense tasks at 1024-2048).
pub const MAX_VIEW_SIDE: u32 = 8192;
/// The largest config file read (a preset is a few KB; `--config /dev/zero` would read until memory runs out).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file: a regular file (after links) of at most [`MAX_CONFIG_BYTES`], as UTF-8.
fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file (a config is a TOML file)"));
    }
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        let msg = format!("larger than {MAX_CONFIG_BYTES} bytes: not a config (presets are a few KB)");
        return Err(Error::new(ErrorKind::InvalidData, msg));
    }
    Ok(text)
}

fn check(file: &str, key: &str, ok: bool, message: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Key { file: file.into(), key: key.into(), message: message() })
    }
}

impl Config {
    /// Loads `path`, applies `key=value` overrides (values in TOML syntax; bare words are strings), validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = read_config_file(path).map_err(|error| ConfigError::Io { file: file.clone(), error })?;
        Self::from_toml(&text, &file, overrides)
    }

    pub fn from_toml(text: &str, file: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse { file: file.into(), message: e.to_string() })?;
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        // An `[augment]` that sets some keys keeps the default recipe's other values (without this, one key set
        // would bring back the 224 px RGB defaults of the recipe type for all the others).
        let recipe = toml::Value::try_from(Config::default().augment).expect("a recipe always serializes");
        let augment = match value.remove("augment") {
            Some(user) => merge_over(recipe, user),
            None => recipe,
        };
        value.insert("augment".into(), augment);
        expand_views(&mut value).map_err(|message| ConfigError::Key {
            file: file.into(),
            key: "views".into(),
            message,
        })?;
        let whole = toml::Value::Table(value);
        // Before the types: an infinity or NaN is refused wherever it is written (no value of ours means it; `inf`
        // passed every `> 0` check).
        let mut floats = Vec::new();
        flatten("", &whole, &mut floats);
        for (key, v) in &floats {
            let bad = match v {
                toml::Value::Float(x) => !x.is_finite(),
                toml::Value::Array(a) => a.iter().any(|x| x.as_float().is_some_and(|x| !x.is_finite())),
                _ => false,
            };
            if bad {
                let message = format!("must be a finite number, got {v}");
                return Err(ConfigError::Key { file: file.into(), key: key.clone(), message });
            }
        }
        let cfg: Config = serde_path_to_error::deserialize(whole.clone()).map_err(|e| {
            let (key, message) = tagged_field_error(&whole, &e.path().to_string())
                .unwrap_or_else(|| (e.path().to_string(), e.inner().to_string()));
            // toml's own "in `key`" line repeats what the key already says.
            let message = match message.trim_end().rsplit_once("\nin `") {
                Some((head, tail)) if !tail.contains('\n') => head.trim_end().to_string(),
                _ => message,
            };
            ConfigError::Key { file: file.into(), key, message }
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let t = &self.train;
        check(file, "dist.timeout_s", self.dist.timeout_s.is_finite() && self.dist.timeout_s > 0.0, || {
            format!("must be > 0 seconds, got {}", self.dist.timeout_s)
        })?;
        check(file, "dist.bucket_mb", self.dist.bucket_mb.is_finite() && self.dist.bucket_mb > 0.0, || {
            format!("must be > 0 MB, got {}", self.dist.bucket_mb)
        })?;
        check(file, "train.epochs", t.epochs >= 1, || "must be >= 1".into())?;
        check(file, "train.batch_size", (2..=MAX_BATCH).contains(&t.batch_size), || {
            format!("must be in 2..={MAX_BATCH}, got {}", t.batch_size)
        })?;
        // Threads are OS threads started before the first step: bounded where the machine is, not by usize.
        check(file, "train.threads", t.threads <= MAX_THREADS, || {
            format!("must be at most {MAX_THREADS} (0 = one per core), got {}", t.threads)
        })?;
        check(file, "train.prefetch", t.prefetch <= MAX_PREFETCH, || {
            format!("must be at most {MAX_PREFETCH} batches, got {}", t.prefetch)
        })?;
        check(file, "eval.probe_batch", self.eval.probe_batch <= MAX_BATCH, || {
            format!("must be at most {MAX_BATCH}, got {}", self.eval.probe_batch)
        })?;
        check(file, "finetune.batch_size", self.finetune.batch_size <= MAX_BATCH, || {
            format!("must be at most {MAX_BATCH}, got {}", self.finetune.batch_size)
        })?;
        for (i, v) in self.view_recipes().iter().enumerate() {
            let key = if self.views.is_empty() { "augment.size".to_string() } else { format!("views[{i}].size") };
            check(file, &key, (1..=MAX_VIEW_SIDE).contains(&v.size), || {
                format!("must be in 1..={MAX_VIEW_SIDE} pixels, got {}", v.size)
            })?;
        }
        check(file, "train.log_every", t.log_every >= 1, || "must be >= 1".into())?;
        check(file, "log.histogram_bins", (1..=10_000).contains(&self.log.histogram_bins), || {
            format!("must be in 1..=10000, got {}", self.log.histogram_bins)
        })?;
        check(file, "train.progress_every_s", t.progress_every_s.is_finite() && t.progress_every_s >= 0.0, || {
            "must be >= 0".into()
        })?;
        let minutes = t.checkpoint_every_minutes;
        check(file, "train.checkpoint_every_minutes", minutes.is_finite() && minutes >= 0.0, || {
            format!("must be >= 0 (0 = off), got {minutes}")
        })?;
        check(file, "data.channels", matches!(self.data.channels, 1 | 3), || "must be 1 or 3".into())?;
        check(file, "data.max_pixels", self.data.max_pixels >= 1, || "must be >= 1".into())?;
        check(file, "data.max_bad_fraction", (0.0..=1.0).contains(&self.data.max_bad_fraction), || {
            "must be in [0, 1]".into()
        })?;
        let e = &self.eval;
        check(file, "eval.knn_k", e.knn_k >= 1, || "must be >= 1".into())?;
        check(file, "eval.knn_temperature", e.knn_temperature > 0.0, || "must be > 0".into())?;
        check(file, "eval.probe_batch", e.probe_batch >= 1, || "must be >= 1".into())?;
        check(file, "eval.probe_epochs", e.probe_epochs >= 1, || {
            "must be >= 1 (an untrained probe reports chance as a result; eval.at_end = false skips the evaluation)"
                .into()
        })?;
        check(file, "eval.probe_lr", e.probe_lr > 0.0, || "must be > 0".into())?;
        let model_err = |e: selfsup_models::ModelError| match e {
            selfsup_models::ModelError::InvalidConfig { field, message } => {
                ConfigError::Key { file: file.into(), key: field, message }
            }
            other => ConfigError::Parse { file: file.into(), message: other.to_string() },
        };
        self.model.backbone.validate().map_err(model_err)?;
        self.objective.validate().map_err(model_err)?;
        self.optimizer.validate().map_err(model_err)?;
        let teacher_ok =
            || format!("objective {:?} keeps no momentum teacher (byol, mocov3 and dino do)", self.objective_kind());
        check(file, "eval.teacher", !e.teacher || self.objective.has_teacher(), teacher_ok)?;
        let f = &self.finetune;
        check(file, "finetune.teacher", !f.teacher || self.objective.has_teacher(), teacher_ok)?;
        check(file, "finetune.epochs", f.epochs >= 1, || format!("must be >= 1, got {}", f.epochs))?;
        check(file, "finetune.test", !(f.train.is_some() && f.test.is_none()), || {
            "must be set when finetune.train is (test data with the same labels as the training data)".into()
        })?;
        check(file, "finetune.test", !f.at_end || f.test.is_some() || self.data.test.is_some(), || {
            "finetune.at_end needs test data: set finetune.test or data.test".into()
        })?;
        check(file, "finetune.batch_size", f.batch_size >= 2, || format!("must be >= 2, got {}", f.batch_size))?;
        check(file, "finetune.label_smoothing", (0.0..1.0).contains(&f.label_smoothing), || {
            "must be in [0, 1)".into()
        })?;
        let (lo, hi) = f.crop_scale;
        check(file, "finetune.crop_scale", 0.0 < lo && lo <= hi && hi <= 1.0, || {
            format!("must be 0 < lo <= hi <= 1, got [{lo}, {hi}]")
        })?;
        check(file, "finetune.flip_p", (0.0..=1.0).contains(&f.flip_p), || "must be in [0, 1]".into())?;
        f.optimizer_config().validate().map_err(|e| match e {
            selfsup_models::ModelError::InvalidConfig { field, message } => {
                ConfigError::Key { file: file.into(), key: field.replacen("optimizer.", "finetune.", 1), message }
            }
            other => ConfigError::Parse { file: file.into(), message: other.to_string() },
        })?;
        self.augment.validate(self.channels_hint()).map_err(|e| ConfigError::Key {
            file: file.into(),
            key: "augment".into(),
            message: e.to_string(),
        })?;
        let want = self.objective.num_views();
        check(file, "views", self.views.is_empty() || self.views.len() == want, || {
            format!("{} views given, the objective takes {want}", self.views.len())
        })?;
        for (i, v) in self.views.iter().enumerate() {
            v.validate(self.channels_hint()).map_err(|e| ConfigError::Key {
                file: file.into(),
                key: format!("views[{i}]"),
                message: e.to_string(),
            })?;
        }
        // Every view must fit the backbone (a ViT takes sides that are multiples of its patch).
        for (i, v) in self.view_recipes().iter().enumerate() {
            let side = i64::from(v.size);
            self.model.backbone.check_input(i64::from(self.channels_hint()), side, side).map_err(|e| {
                let key = if self.views.is_empty() { "augment.size".to_string() } else { format!("views[{i}].size") };
                ConfigError::Key { file: file.into(), key, message: e.to_string() }
            })?;
        }
        Ok(())
    }

    /// The labeled images evaluation fits its k-NN bank and linear probe on, and the key that names them.
    pub fn eval_bank(&self) -> (&Path, &'static str) {
        match &self.eval.train {
            Some(p) => (p, "eval.train"),
            None => (&self.data.train, "data.train"),
        }
    }

    /// Every data path the config reads (training, test, evaluation and fine-tuning sets): what no output may
    /// be written onto or into ([`crate::output::check`]).
    pub fn inputs(&self) -> Vec<&Path> {
        let d = &self.data;
        let optional = [&d.test, &self.eval.train, &self.finetune.train, &self.finetune.test];
        std::iter::once(d.train.as_path()).chain(optional.into_iter().filter_map(|p| p.as_deref())).collect()
    }

    /// The objective's `kind` as written in the TOML.
    pub fn objective_kind(&self) -> String {
        toml::Value::try_from(&self.objective)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
            .unwrap_or_default()
    }

    /// The recipe of each of the objective's views.
    pub fn view_recipes(&self) -> Vec<RecipeConfig> {
        if self.views.is_empty() {
            vec![self.augment.clone(); self.objective.num_views()]
        } else {
            self.views.clone()
        }
    }

    /// Channels the data will have, as far as the config can tell (IDX files are gray).
    pub fn channels_hint(&self) -> u8 {
        let is_idx = self.data.train.to_string_lossy().contains("idx3");
        if is_idx {
            1
        } else {
            self.data.channels
        }
    }

    /// The config as TOML, with the f32 fields written as the decimals they were given in (`0.2`, not
    /// `0.20000000298023224`).
    pub fn to_toml(&self) -> String {
        let mut value = toml::Value::try_from(self).expect("a Config always serializes");
        shortest_floats(&mut value);
        toml::to_string_pretty(&value).expect("a Config always serializes")
    }

    /// Every key whose value differs from `old`'s, as dotted paths (`optimizer.base_lr`; arrays, `[[views]]`
    /// included, compare whole), in the config's order.
    pub fn changes_from(&self, old: &Config) -> Vec<Change> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flatten("", &toml::Value::try_from(old).expect("a Config always serializes"), &mut a);
        flatten("", &toml::Value::try_from(self).expect("a Config always serializes"), &mut b);
        let mut out = Vec::new();
        for (key, new) in &b {
            let old = a.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            if old != Some(new) {
                out.push(Change { key: key.clone(), old: old.map_or("(unset)".into(), show), new: show(new) });
            }
        }
        for (key, old) in &a {
            if !b.iter().any(|(k, _)| k == key) {
                out.push(Change { key: key.clone(), old: show(old), new: "(unset)".into() });
            }
        }
        out
    }
}

/// One config key that differs between two configs: its dotted path and both values as TOML.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {} -> {}", self.key, self.old, self.new)
    }
}

/// What changing a key does to a run continued by `--resume` from a checkpoint written under the old value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResumeEffect {
    /// Logging, checkpoint cadence, evaluation, threads, where to stop: the trained weights do not depend on it.
    Bookkeeping,
    /// The run goes on under another recipe from the checkpoint's step (a lower learning rate after a NaN, more
    /// epochs, another device): allowed, said and recorded.
    Recipe,
    /// The checkpoint cannot continue under it: the reason.
    Refused(&'static str),
}

/// How a `--resume` treats a change of `key` (a dotted path of [`Config::changes_from`]).
pub fn resume_effect(key: &str) -> ResumeEffect {
    const POSITION: &str = "the checkpoint's place in the run (epoch, batch within it) names batches of the data, \
                            order and batch size it was written with";
    const NETWORK: &str = "the checkpoint holds the weights of the network it was written with";
    let (section, field) = key.split_once('.').unwrap_or(("", key));
    match (section, field) {
        ("", "seed") => ResumeEffect::Refused("the batch order and every augmentation are drawn from the seed"),
        // A moved copy of the same data (node-local scratch on a requeued job) is fine: `data.train` and
        // `data.limit` are recipe changes, and the resume checks the sample count against the checkpoint's.
        ("train", "batch_size") | ("data", "shuffle") => ResumeEffect::Refused(POSITION),
        ("data", "train" | "limit") => ResumeEffect::Recipe,
        ("data", "channels") | ("objective", "kind") => ResumeEffect::Refused(NETWORK),
        ("model", _) => ResumeEffect::Refused(NETWORK),
        ("", "name") | ("data", _) | ("eval", _) | ("log", _) | ("finetune", _) | ("dist", _) => {
            ResumeEffect::Bookkeeping
        }
        (
            "train",
            "threads"
            | "prefetch"
            | "log_every"
            | "checkpoint_every"
            | "checkpoint_every_steps"
            | "checkpoint_every_minutes"
            | "keep_last"
            | "on_nonfinite"
            | "max_skipped"
            | "progress_every_s"
            | "preview_pairs"
            | "recon_every"
            | "profile_steps"
            | "collapse_warn_std"
            | "collapse_warn_rank"
            | "max_steps",
        ) => ResumeEffect::Bookkeeping,
        _ => ResumeEffect::Recipe,
    }
}

/// The key and message of an error serde reports at a tagged enum's table (`objective`, `model.backbone`) as a
/// whole: its variant's own struct, deserialized alone, names the field (`objective.local_crops`).
fn tagged_field_error(config: &toml::Value, path: &str) -> Option<(String, String)> {
    use selfsup_models::backbone::{ResNetConfig, VitConfig};
    use selfsup_models::objective::*;
    fn precise<T: serde::de::DeserializeOwned>(table: toml::Table) -> Option<(String, String)> {
        let e = serde_path_to_error::deserialize::<_, T>(toml::Value::Table(table)).err()?;
        Some((e.path().to_string(), e.inner().to_string()))
    }
    let mut table = path.split('.').try_fold(config, |v, k| v.get(k))?.as_table()?.clone();
    let kind = table.remove("kind")?.as_str()?.to_string();
    let found = match (path, kind.as_str()) {
        ("objective", "simclr") => precise::<SimClrConfig>(table),
        ("objective", "byol") => precise::<ByolConfig>(table),
        ("objective", "mocov3") => precise::<MocoV3Config>(table),
        ("objective", "dino") => precise::<DinoConfig>(table),
        ("objective", "barlow") => precise::<BarlowConfig>(table),
        ("objective", "vicreg") => precise::<VicregConfig>(table),
        ("objective", "mae") => precise::<MaeConfig>(table),
        ("objective", "simmim") => precise::<SimMimConfig>(table),
        ("model.backbone", "resnet") => precise::<ResNetConfig>(table),
        ("model.backbone", "vit") => precise::<VitConfig>(table),
        _ => None,
    };
    found.map(|(key, message)| (format!("{path}.{key}"), message))
}

/// `user` over `base`: tables merge key by key (recursively), any other value of `user` replaces.
fn merge_over(base: toml::Value, user: toml::Value) -> toml::Value {
    match (base, user) {
        (toml::Value::Table(mut b), toml::Value::Table(u)) => {
            for (k, v) in u {
                let merged = match b.remove(&k) {
                    Some(old) => merge_over(old, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            toml::Value::Table(b)
        }
        (_, user) => user,
    }
}

/// `(dotted key, value)` for every non-table value under `value`.
fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        v => out.push((prefix.to_string(), v.clone())),
    }
}

/// A value as one line of TOML.
fn show(v: &toml::Value) -> String {
    let mut v = v.clone();
    shortest_floats(&mut v);
    v.to_string()
}

/// Replaces every float that is exactly an f32 by the shortest decimal that reads back as that f32 (what the
/// user wrote), leaving other floats alone.
fn shortest_floats(value: &mut toml::Value) {
    match value {
        toml::Value::Float(x) => {
            let single = *x as f32;
            if f64::from(single) == *x && x.is_finite() {
                *x = format!("{single}").parse().expect("a float's Display parses");
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(shortest_floats),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| shortest_floats(v)),
        _ => {}
    }
}

/// Resolves `[[views]]`: each entry inherits what it does not set from `[augment]`; `count = k` repeats it.
fn expand_views(table: &mut toml::Table) -> Result<(), String> {
    let Some(views) = table.remove("views") else { return Ok(()) };
    let toml::Value::Array(entries) = views else { return Err("must be an array of tables ([[views]])".into()) };
    let base = match table.get("augment") {
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => return Err("`augment` must be a table".into()),
        None => toml::Table::new(),
    };
    let mut out = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let toml::Value::Table(mut entry) = entry else { return Err(format!("views[{i}] must be a table")) };
        let count = match entry.remove("count") {
            None => 1,
            Some(toml::Value::Integer(n)) if n >= 1 => n as usize,
            Some(v) => return Err(format!("views[{i}].count must be an integer >= 1, got {v}")),
        };
        let mut merged = base.clone();
        deep_merge(&mut merged, entry);
        out.extend(std::iter::repeat_n(toml::Value::Table(merged), count));
    }
    table.insert("views".into(), toml::Value::Array(out));
    Ok(())
}

fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `train.batch_size=256` → sets that key in the table, creating intermediate tables.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Override { arg: arg.into(), message };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected key=value".into()))?;
    let key = key.trim();
    // Parse the value as TOML (numbers, booleans, arrays, quoted strings); anything else is a bare string.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("bad key `{key}`")));
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| err(format!("`{p}` is not a table")))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_toml_writes_f32_fields_as_given_and_reads_back_equal() {
        let cfg =
            Config::from_toml("[augment]\ncrop_scale = [0.2, 1.0]\n[optimizer]\nbase_lr = 0.3\n", "t", &[]).unwrap();
        let text = cfg.to_toml();
        assert!(text.contains("0.2,") && !text.contains("0.20000000298023224"), "{text}");
        assert!(text.contains("base_lr = 0.3\n"), "{text}");
        let back = Config::from_toml(&text, "t", &[]).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.to_toml(), text);
        // Every preset survives the round trip exactly, f32 and f64 fields alike.
        let presets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&presets).unwrap().flatten() {
            let name = entry.path().display().to_string();
            let cfg = Config::from_toml(&std::fs::read_to_string(entry.path()).unwrap(), &name, &[]).unwrap();
            assert_eq!(Config::from_toml(&cfg.to_toml(), &name, &[]).unwrap(), cfg, "{name}");
            n += 1;
        }
        assert!(n >= 10, "{n} presets in {}", presets.display());
    }

    #[test]
    fn a_bad_value_inside_a_tagged_table_names_its_field() {
        let cases = [
            ("[objective]\nkind = \"dino\"\nlocal_crops = -1\n", "objective.local_crops", "usize"),
            ("[objective]\nkind = \"simclr\"\ntemperature = \"warm\"\n", "objective.temperature", "f64"),
            ("[model.backbone]\nkind = \"vit\"\npatch_size = 2.5\n", "model.backbone.patch_size", "i64"),
            ("[model.backbone]\nkind = \"resnet\"\nlayers = 3\n", "model.backbone.layers", ""),
        ];
        for (text, key, message) in cases {
            match Config::from_toml(text, "t.toml", &[]) {
                Err(ConfigError::Key { key: k, message: m, .. }) => {
                    assert_eq!(k, key, "{text}: {m}");
                    assert!(m.contains(message), "{text}: {m}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // An unknown kind names the kind key and the kinds there are.
        let err = Config::from_toml("[objective]\nkind = \"swav\"\n", "t.toml", &[]).unwrap_err().to_string();
        assert!(err.contains("`objective.kind`") && err.contains("simclr"), "{err}");
    }

    #[test]
    fn changes_name_exactly_the_changed_keys_and_resume_classifies_them() {
        let base = Config::from_toml("", "t", &[]).unwrap();
        assert!(base.changes_from(&base).is_empty());
        let sets = ["optimizer.base_lr=0.01", "train.threads=3", "augment.crop_scale=[0.5, 1.0]", "seed=9"];
        let changed = Config::from_toml("", "t", &sets.map(String::from)).unwrap();
        let c = changed.changes_from(&base);
        let keys: Vec<&str> = c.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["seed", "augment.crop_scale", "optimizer.base_lr", "train.threads"]);
        let crop = c.iter().find(|c| c.key == "augment.crop_scale").unwrap();
        assert_eq!((crop.old.as_str(), crop.new.as_str()), ("[0.08, 1.0]", "[0.5, 1.0]"));
        use ResumeEffect::*;
        assert!(matches!(resume_effect("seed"), Refused(_)));
        for k in ["train.batch_size", "data.shuffle", "model.backbone.width", "objective.kind"] {
            assert!(matches!(resume_effect(k), Refused(_)), "{k}");
        }
        for k in [
            "optimizer.base_lr",
            "train.epochs",
            "train.bf16",
            "augment.crop_scale",
            "views",
            "data.train",
            "data.limit",
        ] {
            assert_eq!(resume_effect(k), Recipe, "{k}");
        }
        for k in [
            "train.threads",
            "train.max_steps",
            "train.keep_last",
            "eval.knn_every",
            "log.histogram_every",
            "data.test",
            "name",
        ] {
            assert_eq!(resume_effect(k), Bookkeeping, "{k}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_path_and_file() {
        let e = Config::from_toml("[train]\nbatchsize = 3\n", "x.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("train.batchsize") && e.contains("unknown field"), "{e}");
        let e = Config::from_toml("", "y.toml", &["optimizer.lr=0.1".into()]).unwrap_err().to_string();
        assert!(e.contains("optimizer.lr"), "{e}");
    }

    #[test]
    fn invalid_value_names_the_field() {
        let e = Config::from_toml("[train]\nbatch_size = 1\n", "x.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("train.batch_size"), "{e}");
        let e = Config::from_toml("[objective]\nkind = \"simclr\"\ntemperature = -1.0\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("objective.temperature"), "{e}");
        let e = Config::from_toml("[objective]\nkind = \"nope\"\n", "x.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("objective") && e.contains("nope"), "{e}");
    }

    #[test]
    fn views_inherit_from_augment_and_count_repeats() {
        let text = "[augment]\nsize = 28\nflip_p = 0.3\n[[views]]\nblur = { p = 1.0 }\n[[views]]\nsize = 20\nsolarize_p = 0.2\n";
        let c = Config::from_toml(text, "x.toml", &[]).unwrap();
        let v = c.view_recipes();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].size, v[0].flip_p, v[0].blur.p), (28, 0.3, 1.0));
        assert_eq!((v[1].size, v[1].flip_p, v[1].blur.p, v[1].solarize_p), (20, 0.3, c.augment.blur.p, 0.2));
        assert_eq!(Config::from_toml(&c.to_toml(), "resolved.toml", &[]).unwrap(), c);
        // SimCLR takes two views: three is an error naming `views`; count expands.
        let e = Config::from_toml("[[views]]\ncount = 3\n", "x.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("`views`") && e.contains("3 views"), "{e}");
        let e = Config::from_toml("[[views]]\ncount = 0\n", "x.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("count"), "{e}");
        let e = Config::from_toml("[[views]]\nflip_p = 2.0\n[[views]]\n", "x.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("views[0]"), "{e}");
        assert_eq!(Config::from_toml("", "x.toml", &[]).unwrap().view_recipes().len(), 2);
    }

    #[test]
    fn overrides_apply_and_round_trip() {
        let c = Config::from_toml("[train]\nepochs = 3\n", "x.toml", &["train.epochs=7".into(), "name=demo".into()])
            .unwrap();
        assert_eq!((c.train.epochs, c.name.as_str()), (7, "demo"));
        let again = Config::from_toml(&c.to_toml(), "resolved.toml", &[]).unwrap();
        assert_eq!(again, c);
    }
}
