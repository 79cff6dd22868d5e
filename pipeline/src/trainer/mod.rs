//! The one training loop for every objective. [`Trainer`] owns the loader, model, optimizer, schedule, checkpoints
//! and logging, in named phases: [`Trainer::build`], [`Trainer::resume`], [`Trainer::step`],
//! [`Trainer::end_epoch`], [`Trainer::checkpoint`], [`Trainer::finish`] (evaluation). Nothing in it knows which
//! objective it trains: method-specific state (momentum teachers, centers, temperature schedules) lives in the
//! objective, which the trainer tells where training stands ([`TrainProgress`]).
//!
//! GPU sync points are deliberate: losses, loss terms and the collapse monitor are accumulated on the device and
//! read back together every `log_every` steps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use selfsup_augment::Views;
use selfsup_models::{layer_decay_scale, Backbone, Batch, Objective, Optimizer, ParamSpec, TrainProgress};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::config::{resume_effect, Change, Config, OnNonFinite, ResumeEffect, ShuffleMode};
use crate::launch::Launch;
use crate::loader::{BadSample, HostBatch, Loader, LoaderConfig};
use crate::progress::{Line, Progress};
use crate::source::{self, Source};
use crate::tensorboard::Sink;
use crate::transfer::{self, EvalContext, EvalReport};
use crate::{prepare_device, signals, Error, Result};
use selfsup_models::dist::{Dist, DistError, Overlap};

mod monitor;
mod probe;
mod profile;
pub mod report;
mod visuals;

pub use monitor::collapse_metrics;
use monitor::{Clock, Readout, Window};
use probe::OnlineProbe;
pub use profile::StepProfile;
use profile::{Phases, PROFILE_WARMUP};
use visuals::{log_reconstruction, preview, recon_batch};

pub struct RunOptions {
    /// The run folder: resolved config, event file, checkpoints, eval.json.
    pub out: PathBuf,
    /// Continue from the latest checkpoint in `out`.
    pub resume: bool,
    /// No progress line.
    pub quiet: bool,
    /// This process's place in a multi-process run ([`Launch::single`] for one process).
    pub launch: Launch,
    /// Start the backbone (and a momentum teacher's) from this weights file, torchvision / timm names
    /// ([`crate::pretrained`]); the heads start as usual. Not with `resume`.
    pub init_from: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub out: PathBuf,
    pub device: String,
    /// Optimizer steps of the whole run (a resumed run's earlier processes included) ...
    pub steps: u64,
    /// ... and those this process took.
    pub steps_this_process: u64,
    pub epochs: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Time inside the training loop (steps only: no checkpoints, k-NN or final evaluation).
    pub train_seconds: f64,
    /// Time the training loop spent blocked waiting for the loader, and its fraction of `train_seconds`.
    pub data_wait_seconds: f64,
    pub data_wait_fraction: f64,
    pub final_loss: f64,
    /// The last logged loss terms (`train/loss/<name>`).
    pub final_terms: Vec<(String, f64)>,
    /// The collapse monitor at the last log point: `train/embedding_std` and `train/effective_rank`.
    pub embedding_std: Option<f64>,
    pub effective_rank: Option<f64>,
    /// Set when the monitor fell below `train.collapse_warn_std` / `train.collapse_warn_rank` at the end.
    pub collapse_warning: Option<String>,
    pub unreadable_samples: usize,
    /// Steps whose update was skipped for non-finite values (`train.on_nonfinite = "skip"`).
    pub skipped_steps: u64,
    /// The signal that stopped the run early (`SIGINT`, `SIGTERM`); evaluation is skipped then.
    pub interrupted: Option<String>,
    /// The checkpoint the run ended with.
    pub checkpoint: Option<PathBuf>,
    pub eval: Option<EvalReport>,
    /// Why the run was not evaluated when `eval.at_end` asked for it (no `data.test`; unlabeled training data
    /// and no `eval.train`).
    pub eval_skipped: Option<String>,
    /// Where a step's time goes (`train.profile_steps`).
    pub profile: Option<StepProfile>,
    /// Processes that trained (1 without distribution), their c10d backend (`"gloo"`, `"nccl"`; none without a
    /// launcher), and rank 0's time averaging gradients over them.
    pub world_size: usize,
    pub dist_backend: Option<String>,
    /// With `dist.overlap`: gradient buckets whose all-reduce started while backward ran, per step (the rest
    /// waited for its end; DINO's frozen last layer, for one, holds back the buckets after its own).
    pub grad_buckets_started_in_backward: f64,
    pub grad_allreduce_seconds: f64,
    /// The weights the backbone started from (`pretrain --init-from`), as `init_from.json` in the run folder.
    pub init_from: Option<crate::pretrained::Imported>,
}

/// The run folder's record of `pretrain --init-from`: file, SHA-256, what was loaded, left out and adapted.
pub const INIT_FROM: &str = "init_from.json";

/// The model of a run: variables and the objective (with its backbone, heads and teacher).
pub struct Model {
    pub vs: VarStore,
    pub objective: Box<dyn Objective>,
}

impl Model {
    /// The backbone that evaluation judges: the student's, or the momentum teacher's with `eval.teacher` (which
    /// config validation allows only for objectives that keep one).
    pub fn eval_backbone(&self, cfg: &Config) -> &dyn Backbone {
        match self.objective.teacher_backbone() {
            Some(teacher) if cfg.eval.teacher => teacher,
            _ => self.objective.backbone(),
        }
    }
}

/// Builds the variables of `cfg`'s model on `device` (seeded, so weights are reproducible).
pub fn build_model(cfg: &Config, channels: u8, device: Device) -> Result<Model> {
    tch::manual_seed(cfg.seed as i64);
    let vs = VarStore::new(device);
    let objective = cfg.objective.build(&vs, &cfg.model.backbone, i64::from(channels))?;
    Ok(Model { vs, objective })
}

/// How each variable is optimized: weight decay only on matrices and kernels (not biases, norms, the ViT's
/// cls/position tokens or mask tokens); with `layer_decay < 1`, backbone layer l of L (as the backbone numbers
/// them) gets lr x layer_decay^(L - l) and everything outside the backbone (heads) the full lr.
pub fn param_spec(backbone: &dyn Backbone, layer_decay: f64) -> impl Fn(&str, &Tensor) -> ParamSpec + '_ {
    move |name: &str, t: &Tensor| {
        let inner = name.strip_prefix("backbone.");
        let layers = backbone.num_layers();
        let layer = inner.map_or(layers, |n| backbone.layer_id(n).min(layers));
        let lr_scale = if layer_decay < 1.0 { layer_decay_scale(layer, layers, layer_decay) } else { 1.0 };
        let exempt = inner.is_some_and(|n| backbone.no_weight_decay(n)) || name.ends_with("mask_token");
        ParamSpec { lr_scale, weight_decay: t.dim() > 1 && !exempt }
    }
}

/// Labels to `device` the way batches go: pinned and asynchronous on CUDA, so the step never waits on the copy.
pub fn labels_to_device(labels: &[i64], device: Device) -> Tensor {
    selfsup_models::device::host_to_device(labels, &[labels.len() as i64], device)
}

/// Moves a host batch to `device` as `[N, C, H, W]` tensors: on CUDA one copy into pinned memory, then an
/// asynchronous copy to the device.
pub fn to_device(batch: &HostBatch, device: Device) -> Vec<Tensor> {
    batch
        .views
        .iter()
        .zip(&batch.shapes)
        .map(|(v, s)| {
            let shape = [batch.len() as i64, s[0] as i64, s[1] as i64, s[2] as i64];
            selfsup_models::device::host_to_device(v, &shape, device)
        })
        .collect()
}

/// The seed of torch's global RNG for optimizer step `step`: torch's random draws in a step (masks, dropout,
/// stochastic depth) are a pure function of (seed, step), so a run resumed at any step draws what the
/// uninterrupted one drew, with no generator state to save.
fn step_seed(seed: u64, step: u64) -> i64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9)) as i64
        & i64::MAX
}

/// Test-only fault injection: `SELFSUP_FAULT_NAN_STEPS=5,9` makes the loss of those (0-based) steps NaN, and
/// `SELFSUP_FAULT_INF_BUFFER_STEPS=5` the first buffer (a batch norm's running statistics: what overflowed in a
/// real run) infinite in those steps' forward pass, to test what the trainer does with non-finite values.
fn fault_steps(var: &str) -> Vec<u64> {
    std::env::var(var).map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect()).unwrap_or_default()
}

/// The variables a step changes outside the optimizer (batch norm's running statistics, a teacher's weights, an
/// objective's center), sorted by name: what `on_nonfinite = "skip"` restores when it skips a step.
fn step_buffers(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut b: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| !t.requires_grad()).collect();
    b.sort_by(|x, y| x.0.cmp(&y.0));
    b
}

/// One optimizer update from `loss`: zero the gradients, backpropagate, clip their global norm to `clip` (0 = no
/// clipping), step with learning rate `lr`. The same for pretraining and fine-tuning.
pub fn optimizer_step(opt: &mut Optimizer, loss: &Tensor, clip: f64, lr: f64) {
    let _ = backward(opt, loss, clip);
    opt.step(lr);
}

/// The gradients of `loss` in place of the previous ones, their global norm clipped to `clip` (0 = no clipping).
/// Returns the global norm before clipping (0-dim fp32 on the device).
fn backward(opt: &mut Optimizer, loss: &Tensor, clip: f64) -> Tensor {
    opt.zero_grad();
    loss.backward();
    clip_or_norm(opt, clip)
}

/// How the gradients are averaged over the ranks: while backward runs (`dist.overlap`), or after it.
struct Averaging<'a> {
    dist: &'a Dist,
    overlap: Option<&'a mut Overlap>,
    bucket_numel: i64,
    /// Accumulates the time spent waiting for the averages after backward (for `--nproc-per-node` benchmarks).
    seconds: &'a mut f64,
    /// Accumulates the buckets started during backward.
    early: &'a mut u64,
}

/// [`backward`] in a process group: the gradients averaged over the ranks before clipping. A collective that
/// failed (inside the loss's gathers, during backward, or in the averaging) is an error naming it.
fn backward_dist(opt: &mut Optimizer, loss: &Tensor, clip: f64, avg: Averaging) -> Result<Tensor> {
    opt.zero_grad();
    let mut overlap = avg.overlap;
    if let Some(o) = overlap.as_mut() {
        o.arm();
    }
    let backward = loss.f_backward();
    if let Some(e) = avg.dist.take_error() {
        return Err(dist_stopped(e));
    }
    backward.map_err(|e| Error::Other(format!("backward: {e}")))?;
    let t = Instant::now();
    match overlap {
        Some(o) => {
            o.finish().map_err(dist_stopped)?;
            *avg.early += o.started_during_backward() as u64;
        }
        None => opt.average_gradients(avg.dist, avg.bucket_numel).map_err(dist_stopped)?,
    }
    *avg.seconds += t.elapsed().as_secs_f64();
    Ok(clip_or_norm(opt, clip))
}

/// The error that ends a data-parallel run whose collective failed.
fn dist_stopped(e: DistError) -> Error {
    Error::Other(format!("data-parallel training stopped: {e}"))
}

fn clip_or_norm(opt: &mut Optimizer, clip: f64) -> Tensor {
    if clip > 0.0 {
        opt.clip_grad_norm(clip)
    } else {
        opt.grad_norm()
    }
}

/// Reports an epoch's unreadable samples (`bad`, plus `earlier` ones counted before a resume) and fails when they
/// are more than `max_fraction` of the `seen` samples.
pub(crate) fn report_bad(
    epoch: usize,
    bad: &[BadSample],
    earlier: usize,
    seen: usize,
    max_fraction: f64,
) -> Result<()> {
    if bad.is_empty() && earlier == 0 {
        return Ok(());
    }
    let resumed = if earlier > 0 { format!(" (and {earlier} before the resume)") } else { String::new() };
    crate::say!("\nepoch {}: {} unreadable sample(s) skipped{resumed}:", epoch + 1, bad.len());
    for b in bad.iter().take(20) {
        crate::say!("  {}: {}", b.location, b.error);
    }
    if bad.len() > 20 {
        crate::say!("  ... and {} more", bad.len() - 20);
    }
    let frac = (bad.len() + earlier) as f64 / seen.max(1) as f64;
    if frac > max_fraction {
        return Err(Error::Other(format!(
            "{:.2}% of epoch {}'s samples were unreadable, above data.max_bad_fraction = {}",
            100.0 * frac,
            epoch + 1,
            max_fraction
        )));
    }
    Ok(())
}

/// Pretrains `cfg` into `opts.out`, then evaluates if configured. The loop is the same for every objective.
/// Returns `None` when `--resume` finds the run already finished (nothing is written then).
///
/// Between two batches the loop polls the signal flags ([`crate::signals`]): SIGINT / SIGTERM end the run with a
/// checkpoint (the summary says which signal), SIGUSR1 writes one and goes on; step and minute checkpoints
/// (`train.checkpoint_every_steps`, `train.checkpoint_every_minutes`) happen there too.
pub fn pretrain(cfg: &Config, opts: &RunOptions, sink: &mut dyn Sink) -> Result<Option<RunSummary>> {
    match prepare(cfg, opts)? {
        Some(run) => run.run(sink).map(Some),
        None => Ok(None),
    }
}

/// A run checked and built, with nothing written yet: the data opened and checked against the model and the
/// evaluation ([`transfer::plan`]), the model built (and loaded from `--init-from` or the checkpoint a resume
/// continues). Every mistake in the config or the data that can be found before training is an error here,
/// while the run folder is as it was (a corrected command line is not refused as "already holds a run").
pub struct Prepared<'a> {
    trainer: Trainer<'a>,
    resumed: Option<Resumed>,
}

/// Checks and builds the run `cfg` into `opts.out` without writing anything; `None` when `--resume` finds the run
/// already finished (said on stderr).
pub fn prepare<'a>(cfg: &'a Config, opts: &'a RunOptions) -> Result<Option<Prepared<'a>>> {
    // Test-only: `SELFSUP_FAULT_SLOW_SETUP_MS=N` makes the setup take N ms longer (a signal test needs a window).
    if let Some(ms) = std::env::var("SELFSUP_FAULT_SLOW_SETUP_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let mut trainer = Trainer::build(cfg, opts)?;
    let resumed = if opts.resume { trainer.resume()? } else { None };
    if opts.resume && resumed.is_none() {
        return Ok(None);
    }
    Ok(Some(Prepared { trainer, resumed }))
}

impl Prepared<'_> {
    /// Writes the run folder (resolved config, `init_from.json`), trains, evaluates; see [`pretrain`].
    pub fn run(self, sink: &mut dyn Sink) -> Result<RunSummary> {
        let Prepared { trainer, resumed } = self;
        trainer.write_folder()?;
        trainer.train(resumed, sink)
    }
}

impl Trainer<'_> {
    /// The run folder's files this run writes before its first step (the main rank only).
    fn write_folder(&self) -> Result<()> {
        if !self.dist.is_main() {
            return Ok(());
        }
        let out = self.out;
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| Error::Other(format!("{}: {e}", p.display()))
        };
        std::fs::create_dir_all(out).map_err(io(out))?;
        let resolved = out.join("config.toml");
        std::fs::write(&resolved, self.cfg.to_toml()).map_err(io(&resolved))?;
        let removed = checkpoint::clean_leftovers(&out.join("checkpoints"))?;
        if removed > 0 {
            crate::say!("removed {removed} temporary file(s) of an interrupted checkpoint write in {}", out.display());
        }
        if let (Some(imported), false) = (&self.init_from, self.resumed_run) {
            crate::say!("{imported}");
            // The run folder says where its weights started: config.toml cannot (it is a flag).
            crate::write_json_atomic(&out.join(INIT_FROM), imported)?;
        }
        Ok(())
    }

    /// The training loop, the same for every objective, then [`Trainer::finish`].
    fn train(mut self, resumed: Option<Resumed>, sink: &mut dyn Sink) -> Result<RunSummary> {
        let main = self.dist.is_main();
        if !self.resumed_run && main {
            self.preview(sink);
        }
        if main {
            self.describe(sink);
        }
        self.start(resumed)?;
        'epochs: while self.epoch < self.cfg.train.epochs && self.step < self.max_steps {
            let mut batches = self.loader.epoch_from(self.epoch as u64, self.batch as usize);
            while self.step < self.max_steps {
                if self.between_batches()? {
                    break 'epochs;
                }
                let wait_start = Instant::now();
                let Some(batch) = batches.next() else { break };
                self.clock.wait += wait_start.elapsed().as_secs_f64();
                self.tally.add(&batch);
                self.batch += 1;
                // A batch emptied by unreadable samples below 2 has nothing to contrast: skipped. Not in a process
                // group, where every rank must take every step: there it ends the run, naming the batch.
                if batch.len() < 2 && self.dist.world() > 1 {
                    return Err(Error::Other(format!(
                        "rank {}: only {} readable sample(s) in its slice of batch {} of epoch {} (see the unreadable \
                         samples reported above); a data-parallel step needs at least 2 per rank",
                        self.dist.rank(),
                        batch.len(),
                        self.batch,
                        self.epoch + 1
                    )));
                }
                let readout = if batch.len() >= 2 { self.step(&batch)? } else { None };
                self.clock.time += wait_start.elapsed().as_secs_f64();
                if let Some(readout) = readout {
                    self.log(&readout, sink)?;
                }
            }
            drop(batches);
            self.end_epoch(sink)?;
            if self.cut_short {
                break;
            }
        }
        self.finish(sink)
    }
}

/// `Some(message)` when a `--resume` of run folder `out`, whose latest checkpoint holds `st`, has nothing to do:
/// training finished (all epochs, or `max_steps` when known, else `train.max_steps`) and the summary of a
/// complete run is written. (A run that finished training but died in, or was stopped before, its final
/// evaluation has no such summary: the resume evaluates.)
pub fn nothing_to_do(cfg: &Config, out: &Path, st: &TrainerState, max_steps: Option<u64>) -> Option<String> {
    let limit = max_steps.or((cfg.train.max_steps > 0).then_some(cfg.train.max_steps as u64));
    let finished = st.epoch >= cfg.train.epochs || limit.is_some_and(|m| st.step >= m);
    // A summary of a run stopped by a signal (which skips the evaluation) does not count.
    let summarized = std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["interrupted"].is_null());
    (finished && summarized).then(|| {
        format!(
            "nothing to do: {} finished at step {} (epoch {}) and its summary is written; raise train.epochs or \
             train.max_steps with --set to train further",
            out.display(),
            st.step,
            st.epoch
        )
    })
}

/// What a `--resume` under `cfg` changes against the config checkpoint `ckpt` was written under. A change the
/// checkpoint cannot continue under (the seed, the batch size, the data, the network) is an error naming every
/// such key and how to start a new run from these weights instead. Returns the recipe changes (to be said and
/// recorded: [`record_resume_changes`]) and the bookkeeping ones.
pub fn resume_changes(cfg: &Config, ckpt: &Path) -> Result<(Vec<Change>, Vec<Change>)> {
    let old = checkpoint::load_config(ckpt)?;
    let moved = cfg.data.train != old.data.train || cfg.data.limit != old.data.limit;
    if moved {
        // Another path is fine for the same data (a requeued job's node-local copy); another size is not.
        let st = checkpoint::load_state(ckpt)?;
        let source = source::open_with(&cfg.data.train, cfg.data.open_options())?;
        check_data_samples(ckpt, &st, cfg, source.len())?;
    }
    let (mut recipe, mut bookkeeping, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    for c in cfg.changes_from(&old) {
        match resume_effect(&c.key) {
            ResumeEffect::Bookkeeping => bookkeeping.push(c),
            ResumeEffect::Recipe => recipe.push(c),
            ResumeEffect::Refused(why) => refused.push(format!("{c} ({why})")),
        }
    }
    if !refused.is_empty() {
        return Err(Error::Other(format!(
            "--resume cannot continue checkpoint {} under this config:\n  {}\nTo train on from its weights under \
             the new values, start a new run: selfsup pretrain --init-from {} --config <config> --out <new folder> \
             (the backbone's weights; heads and optimizer start anew)",
            ckpt.display(),
            refused.join("\n  "),
            ckpt.join(checkpoint::WEIGHTS).display()
        )));
    }
    Ok((recipe, bookkeeping))
}

/// Refuses to continue checkpoint `ckpt` (state `st`) on training data of `len` samples (before `data.limit`)
/// when it was written over another number: its position would name other batches.
fn check_data_samples(ckpt: &Path, st: &TrainerState, cfg: &Config, len: usize) -> Result<()> {
    let samples = if cfg.data.limit > 0 { len.min(cfg.data.limit) } else { len } as u64;
    if st.data_samples == 0 || st.data_samples == samples {
        return Ok(()); // the same size (or a checkpoint from before the count was kept)
    }
    Err(Error::Other(format!(
        "{}: written over {} training samples, but data.train = {} gives {samples} (data.limit = {}): the \
         checkpoint's position (epoch {}, batch {}) names batches of its own data; resume on the same data",
        ckpt.join("state.json").display(),
        st.data_samples,
        cfg.data.train.display(),
        cfg.data.limit,
        st.epoch,
        st.batch
    )))
}

/// Says and records the recipe changes of a `--resume` continuing checkpoint `ckpt` (at `step`) in run folder
/// `out`: on stderr, as the text tag `config/changes` at that step, and by keeping the config the run had until
/// then as `config-before-step-<step>.toml` (config.toml becomes the new one).
pub fn record_resume_changes(out: &Path, ckpt: &Path, step: u64, recipe: &[Change], sink: &mut dyn Sink) -> Result<()> {
    if recipe.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = recipe.iter().map(ToString::to_string).collect();
    crate::say!(
        "resume changes the recipe from step {step} on (the run is no longer the one its first config describes):\n  {}",
        lines.join("\n  ")
    );
    let kept = out.join(format!("config-before-step-{step}.toml"));
    let from = ckpt.join(checkpoint::CONFIG);
    std::fs::copy(&from, &kept).map_err(|e| Error::Other(format!("{} -> {}: {e}", from.display(), kept.display())))?;
    let mut md = format!(
        "Resumed from `{}` with a changed recipe; until step {step} the run followed `{}`.\n\n| key | until step {step} | from step {step} |\n|---|---|---|",
        ckpt.display(),
        kept.file_name().unwrap().to_string_lossy()
    );
    for c in recipe {
        md += &format!("\n| `{}` | `{}` | `{}` |", c.key, c.old.replace('|', "\\|"), c.new.replace('|', "\\|"));
    }
    sink.text("config/changes", step as i64, &md);
    Ok(())
}

/// What one epoch consumed: samples, and the unreadable ones (those before a resume only counted).
#[derive(Default)]
struct EpochTally {
    seen: usize,
    bad: Vec<BadSample>,
    earlier_bad: usize,
}

impl EpochTally {
    fn add(&mut self, batch: &HostBatch) {
        self.seen += batch.len() + batch.bad.len();
        self.bad.extend(batch.bad.iter().cloned());
    }
}

/// What a resume restores once the online probe exists.
struct Resumed {
    probe: Option<Vec<(String, Tensor)>>,
    probe_counts: (i64, u64),
}

/// A pretraining run in progress.
struct Trainer<'a> {
    cfg: &'a Config,
    out: &'a Path,
    quiet: bool,
    device: Device,
    autocast: bool,
    source: Arc<dyn Source>,
    views: Arc<Views>,
    loader: Loader,
    model: Model,
    opt: Optimizer,
    probe: Option<OnlineProbe>,
    /// Fixed images for reconstruction grids (masked-image objectives).
    recon: Option<Tensor>,
    steps_per_epoch: u64,
    /// The schedule's length (epochs x steps per epoch), and where this run stops (`train.max_steps`).
    total_steps: u64,
    max_steps: u64,
    peak_lr: f64,
    /// Epochs completed and optimizer steps taken; `first_step` is where this process started.
    epoch: usize,
    step: u64,
    first_step: u64,
    window: Window,
    clock: Clock,
    /// The learning rate of the last step, and the last readout.
    lr: f64,
    last: Readout,
    progress: Progress,
    profile: Option<StepProfile>,
    run_start: Instant,
    train_seconds: f64,
    wait_seconds: f64,
    images_seen: u64,
    unreadable: usize,
    last_saved: Option<u64>,
    /// The newest checkpoint written or resumed from, and when this process last wrote one.
    last_checkpoint: Option<PathBuf>,
    last_checkpoint_at: Instant,
    /// Stopped by `train.max_steps` in the middle of an epoch.
    cut_short: bool,
    /// Batches of the current epoch consumed (the position a checkpoint saves).
    batch: u64,
    /// What the current epoch consumed so far (a checkpoint saves its counts).
    tally: EpochTally,
    /// Steps whose update was skipped (`train.on_nonfinite = "skip"`).
    skipped: u64,
    /// The signal that stopped the run.
    interrupted: Option<i32>,
    /// Test-only: steps whose loss is made NaN, and steps whose first buffer is made infinite.
    fault_nan: Vec<u64>,
    fault_inf_buffer: Vec<u64>,
    /// The process group (a no-op in one process). Only its main rank writes files and logs.
    dist: Arc<Dist>,
    /// Hooks that average the gradients while backward runs (`dist.overlap`, in a group), and how many buckets
    /// they started during backward passes.
    overlap: Option<Overlap>,
    early_buckets: u64,
    /// Time spent averaging gradients over the ranks after backward (host clock; on CUDA it includes waiting for
    /// backward).
    allreduce_seconds: f64,
    /// The step of the last parameter histograms (`log.histogram_every`).
    last_histogram: Option<u64>,
    /// What `--init-from` loaded (this process, or the run's first one: `init_from.json`).
    init_from: Option<crate::pretrained::Imported>,
    /// Why this run is not evaluated (see [`transfer::plan`]); `None` when it is.
    eval_skipped: Option<String>,
    /// This process continues a run from its checkpoint (`--resume`).
    resumed_run: bool,
}

impl<'a> Trainer<'a> {
    /// Writes the resolved config, opens the data, builds the model, loader and optimizer.
    fn build(cfg: &'a Config, opts: &'a RunOptions) -> Result<Self> {
        let launch = &opts.launch;
        let (mut device, autocast) = prepare_device(cfg.train.device, cfg.train.bf16)?;
        if launch.launched() {
            if device.is_cuda() {
                // Each rank binds the GPU of its local rank.
                device = Device::Cuda(launch.local_rank);
            }
            // Each rank takes its share of the machine's cores (torch's intra-op threads; the loader's below).
            tch::set_num_threads(launch.cpu_share() as i32);
            if !cfg.train.batch_size.is_multiple_of(launch.world) {
                return Err(Error::Other(format!(
                    "train.batch_size = {} is the global batch and must be divisible by the {} ranks",
                    cfg.train.batch_size, launch.world
                )));
            }
        }
        let dist = Arc::new(if launch.launched() {
            Dist::connect(&launch.group_spec(&cfg.dist, device)?, device)
                .map_err(|e| Error::Other(format!("{}: {e} (dist.timeout_s bounds the wait)", launch.by)))?
        } else {
            Dist::single(device)
        });
        selfsup_models::dist::set_sync_batch_norm(cfg.model.sync_bn.then(|| dist.clone()));
        let mut source: Arc<dyn Source> = source::open_with(&cfg.data.train, cfg.data.open_options())?.into();
        if cfg.data.limit > 0 && cfg.data.limit < source.len() {
            source = Arc::new(source::Prefix::new(source, cfg.data.limit));
        }
        let channels = source.channels();
        // A recipe made for other images (28 px gray presets on 512 px photos) is said now, or refused where it
        // cannot be right.
        for w in crate::recipe_fit::check(cfg, source.as_ref())? {
            if dist.is_main() {
                crate::say!("warning: {w}");
            }
        }
        // Before the model: a test set that cannot be evaluated fails now, not after the training it would waste.
        let eval_skipped = if cfg.eval.at_end || cfg.eval.knn_every > 0 {
            transfer::plan(cfg, channels).map_err(|e| Error::Other(format!("checking the evaluation data: {e}")))?
        } else {
            None
        };
        if cfg.finetune.at_end {
            // The fine-tuning data now: a missing or mismatched set should fail before hours of pretraining.
            let (train, _, _) = crate::finetune::open_data(cfg)
                .map_err(|e| Error::Other(format!("checking the finetune data (finetune.at_end = true): {e}")))?;
            if train.channels() != channels {
                return Err(Error::Other(format!(
                    "finetune.train: {}-channel images, but the pretrained network takes {channels} (those of \
                     data.train)",
                    train.channels()
                )));
            }
        }
        if let (Some(why), true) = (&eval_skipped, dist.is_main()) {
            crate::say!("no evaluation: {why}");
        }
        let model = build_model(cfg, channels, device)?;
        let init_file = opts.out.join(INIT_FROM);
        let init_from = match opts.init_from.as_ref().filter(|_| !opts.resume) {
            Some(file) => Some(crate::pretrained::load_backbone_file(&model.vs, file, &cfg.model.backbone)?),
            // A resumed run started from the weights its first process recorded.
            None => std::fs::read(&init_file).ok().and_then(|b| serde_json::from_slice(&b).ok()),
        };
        let recipes = cfg.view_recipes().iter().map(|r| r.build(channels)).collect::<Result<Vec<_>, _>>()?;
        let views = Arc::new(Views::new(recipes));
        let t = &cfg.train;
        let loader_cfg = LoaderConfig {
            batch_size: t.batch_size,
            threads: if t.threads == 0 && launch.world > 1 { launch.cpu_share() } else { t.threads },
            prefetch: t.prefetch,
            seed: cfg.seed,
            shuffle: true,
            full_shuffle: cfg.data.shuffle == ShuffleMode::Full,
            drop_last: true,
            slice: (launch.rank, launch.world),
        };
        let loader = Loader::new(source.clone(), views.clone(), loader_cfg).map_err(|e| Error::Other(e.to_string()))?;
        let steps_per_epoch = loader.batches_per_epoch() as u64;
        if steps_per_epoch == 0 {
            return Err(Error::Other(format!(
                "train.batch_size = {}: more than the {} samples of data.train = {}",
                t.batch_size,
                source.len(),
                cfg.data.train.display()
            )));
        }
        let opt = Optimizer::new_with(
            &model.vs,
            &cfg.optimizer,
            param_spec(model.objective.backbone(), cfg.optimizer.layer_decay),
        )?;
        let overlap = if cfg.dist.overlap {
            dist.overlap(&opt.parameters(), cfg.dist.bucket_numel()).map_err(dist_stopped)?
        } else {
            None
        };
        let recon = recon_batch(cfg, source.as_ref(), device, 8);
        let total_steps = steps_per_epoch * t.epochs as u64;
        let max_steps = if t.max_steps > 0 { (t.max_steps as u64).min(total_steps) } else { total_steps };
        Ok(Trainer {
            cfg,
            out: &opts.out,
            quiet: opts.quiet,
            device,
            autocast,
            source,
            views,
            loader,
            model,
            opt,
            probe: None,
            recon,
            steps_per_epoch,
            total_steps,
            max_steps,
            peak_lr: cfg.optimizer.base_lr * t.batch_size as f64 / 256.0,
            epoch: 0,
            step: 0,
            first_step: 0,
            window: Window::new(device),
            clock: Clock::default(),
            lr: 0.0,
            last: Readout::default(),
            progress: Progress::new(max_steps, 0, true),
            profile: None,
            run_start: Instant::now(),
            train_seconds: 0.0,
            wait_seconds: 0.0,
            images_seen: 0,
            unreadable: 0,
            last_saved: None,
            last_checkpoint: None,
            last_checkpoint_at: Instant::now(),
            cut_short: false,
            batch: 0,
            tally: EpochTally::default(),
            skipped: 0,
            interrupted: None,
            fault_nan: fault_steps("SELFSUP_FAULT_NAN_STEPS"),
            fault_inf_buffer: fault_steps("SELFSUP_FAULT_INF_BUFFER_STEPS"),
            dist,
            overlap,
            early_buckets: 0,
            allreduce_seconds: 0.0,
            last_histogram: None,
            init_from,
            eval_skipped,
            resumed_run: opts.resume,
        })
    }

    /// Continues from the run folder's latest checkpoint, verified (checksums, state against the config): weights
    /// (teacher and objective buffers included), optimizer state, epoch, step and batch (from which the
    /// objective's schedules and torch's RNG are positioned), the log window. Returns what [`Trainer::start`]
    /// restores (the online probe), or `None` when the run is already finished and summarized: nothing to do.
    fn resume(&mut self) -> Result<Option<Resumed>> {
        let ckpt = checkpoint::resolve(self.out)?;
        let st = checkpoint::load_state(&ckpt)?;
        checkpoint::check_state(&ckpt, &st, self.cfg, Some(self.steps_per_epoch))?;
        check_data_samples(&ckpt, &st, self.cfg, self.source.len())?;
        if let Some(done) = nothing_to_do(self.cfg, self.out, &st, Some(self.max_steps)) {
            crate::say!("{done}");
            return Ok(None);
        }
        checkpoint::load_weights(&mut self.model.vs, &ckpt)?;
        self.opt.load_state(&checkpoint::load_optimizer(&ckpt)?)?;
        (self.epoch, self.step, self.batch, self.skipped) = (st.epoch, st.step, st.batch, st.skipped_steps);
        self.window.restore(&st.window);
        self.clock.images = st.window.images;
        self.tally = EpochTally { seen: st.epoch_seen, bad: Vec::new(), earlier_bad: st.epoch_bad };
        self.last_saved = Some(st.step);
        self.last_checkpoint = Some(ckpt.clone());
        let at = if st.batch > 0 { format!(", batch {} of {}", st.batch, self.steps_per_epoch) } else { String::new() };
        crate::say!("resuming from {} (epoch {}, step {}{at})", ckpt.display(), st.epoch, st.step);
        Ok(Some(Resumed {
            probe: checkpoint::load_probe(&ckpt)?,
            probe_counts: (st.window.probe_hits, st.window.probe_seen),
        }))
    }

    /// Every rank starts from rank 0's parameters and buffers (built from the same seed, or resumed from the
    /// same checkpoint, they already agree: this makes sure), one broadcast per variable, sorted by name.
    fn broadcast_model(&mut self) -> Result<()> {
        if !self.dist.in_group() {
            return Ok(());
        }
        let mut vars: Vec<(String, Tensor)> = self.model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (name, t) in &mut vars {
                self.dist.broadcast(t, 0).map_err(|e| Error::Other(format!("broadcasting {name} from rank 0: {e}")))?;
            }
            Ok(())
        })
    }

    /// The grid of augmented views at step 0 (`views/pairs`; `views/single` for single-view objectives), and the
    /// run's description: hyperparameters (HParams tab), resolved config and command line (Text tab).
    fn preview(&self, sink: &mut dyn Sink) {
        let (source, cfg) = (self.source.as_ref(), self.cfg);
        if let Some(img) = preview(source, &self.views, &self.loader.order(0), cfg.seed, cfg.train.preview_pairs) {
            let tag = if self.views.recipes.len() > 1 { "views/pairs" } else { "views/single" };
            sink.image(tag, 0, &img);
        }
    }

    /// What a run says about itself at its start (a resume too: its command line is its own).
    fn describe(&self, sink: &mut dyn Sink) {
        sink.hparams(&report::session(self.cfg, self.dist.world(), self.autocast));
        sink.text("config/resolved", self.step as i64, &report::config_markdown(self.cfg));
        sink.text("config/command_line", self.step as i64, &report::command_line_markdown());
        if let Some(i) = &self.init_from {
            sink.text("config/init_from", self.step as i64, &report::init_from_markdown(i));
        }
        sink.flush();
    }

    /// Starts the clock and the online probe (drawn from torch's RNG after the model, so its weights do not
    /// depend on resuming).
    fn start(&mut self, resumed: Option<Resumed>) -> Result<()> {
        self.progress = Progress::new(self.max_steps, self.step, self.quiet).every(self.cfg.train.progress_every_s);
        self.run_start = Instant::now();
        self.last_checkpoint_at = Instant::now();
        self.first_step = self.step;
        self.broadcast_model()?;
        let e = &self.cfg.eval;
        if let Some(classes) = self.source.num_classes().filter(|&c| e.online_probe && c > 1) {
            let dim = self.model.objective.backbone().dim();
            let mut probe = OnlineProbe::new(dim, classes as i64, e.online_probe_lr, self.device)?;
            if let Some(r) = resumed {
                if let Some(saved) = &r.probe {
                    probe.load_state(saved)?;
                    probe.restore_counts(r.probe_counts.0, r.probe_counts.1);
                }
            }
            self.probe = Some(probe);
        }
        Ok(())
    }

    /// Between two batches: a stop requested by a signal (returns true: the loop ends and [`Trainer::finish`]
    /// checkpoints), a checkpoint asked for by SIGUSR1 or due by step count or time.
    fn between_batches(&mut self) -> Result<bool> {
        // At the end of an epoch (all its batches consumed) the stop waits for the epoch's bookkeeping.
        let in_epoch = self.batch < self.steps_per_epoch;
        let t = &self.cfg.train;
        // Nothing to save before the first step, nor between an epoch's last batch and its bookkeeping: a
        // SIGUSR1 then stays pending until the next point that can be saved (it is never dropped).
        let can_save = in_epoch && self.step > 0;
        // In a process group the ranks decide together (signals reach the ranks at different moments; rank 0's
        // clock times the minute checkpoints), at log points only: the vote is a collective, read on the host.
        // Step checkpoints need no vote: every rank counts the same steps.
        let by_steps = t.checkpoint_every_steps > 0 && self.step.is_multiple_of(t.checkpoint_every_steps as u64);
        let voting = self.dist.world() > 1;
        let (stop, asked, by_time) = if voting && !self.step.is_multiple_of(t.log_every as u64) {
            (None, false, false)
        } else {
            let by_time = t.checkpoint_every_minutes > 0.0
                && self.dist.is_main()
                && self.last_checkpoint_at.elapsed().as_secs_f64() >= 60.0 * t.checkpoint_every_minutes;
            let stop = signals::stop_requested().filter(|_| in_epoch);
            let asked = can_save && signals::take_checkpoint_request();
            if voting {
                self.vote(stop, asked, by_time)?
            } else {
                (stop, asked, by_time)
            }
        };
        if let Some(sig) = stop {
            if self.dist.is_main() {
                crate::say!("\n{} received: stopping after step {} with a checkpoint", signals::name(sig), self.step);
            }
            self.interrupted = Some(sig);
            return Ok(true);
        }
        if (asked || by_steps || by_time) && can_save {
            let name = self.checkpoint_name();
            let fresh = self.last_saved != Some(self.step);
            if fresh {
                self.checkpoint(&name)?;
            }
            if asked && self.dist.is_main() {
                let what = if fresh { "wrote" } else { "the checkpoint of this step is already written:" };
                crate::say!("\nSIGUSR1: {what} {name}, continuing");
            }
        }
        Ok(false)
    }

    /// The ranks' vote between two batches: a stop if any rank was asked to stop (SIGTERM before SIGINT), a
    /// checkpoint if any rank got SIGUSR1 or rank 0's clock says so. One all-reduce of four host numbers.
    fn vote(&self, stop: Option<i32>, asked: bool, by_time: bool) -> Result<(Option<i32>, bool, bool)> {
        let mut v = [
            i64::from(stop == Some(libc::SIGINT)),
            i64::from(stop == Some(libc::SIGTERM)),
            i64::from(asked),
            i64::from(by_time),
        ];
        self.dist.all_reduce_host(&mut v).map_err(dist_stopped)?;
        let stop = if v[1] > 0 {
            Some(libc::SIGTERM)
        } else if v[0] > 0 {
            Some(libc::SIGINT)
        } else {
            None
        };
        Ok((stop, v[2] > 0, v[3] > 0))
    }

    /// `epoch-0003` at an epoch boundary, `epoch-0003-step-1234` within epoch 3 (0-based: 3 epochs done).
    fn checkpoint_name(&self) -> String {
        if self.batch > 0 {
            format!("epoch-{:04}-step-{}", self.epoch, self.step)
        } else {
            format!("epoch-{:04}", self.epoch)
        }
    }

    fn train_progress(&self) -> TrainProgress {
        TrainProgress { step: self.step, steps_per_epoch: self.steps_per_epoch, total_steps: self.total_steps }
    }

    /// One optimizer step on `batch`: forward, backward, update, the objective's after-step (EMA teachers), the
    /// online probe. Returns the window's readout when this step is a log point.
    fn step(&mut self, batch: &HostBatch) -> Result<Option<Readout>> {
        let (cfg, t) = (self.cfg, &self.cfg.train);
        let progress = self.train_progress();
        tch::manual_seed(step_seed(cfg.seed, self.step));
        let lr = cfg.optimizer.lr_at(self.peak_lr, progress.epoch(), t.epochs as f64);
        self.lr = lr;
        // Issued before the forward pass (also when profiling, so that its phases cover the model only, as the
        // PyTorch reference's do).
        let views = to_device(batch, self.device);
        // `skip` undoes a skipped step entirely: what the forward pass changed outside the optimizer too.
        let skip_mode = t.on_nonfinite == OnNonFinite::Skip;
        let buffers = if skip_mode { step_buffers(&self.model.vs) } else { Vec::new() };
        let saved: Vec<Tensor> = tch::no_grad(|| buffers.iter().map(|(_, b)| b.copy()).collect());
        let (objective, autocast) = (&mut self.model.objective, self.autocast);
        let dist = self.dist.clone();
        let forward =
            || selfsup_models::device::autocast(autocast, || objective.loss(&Batch { views, progress, dist }, true));
        // Counted from this run's first step, so a resumed run profiles too.
        let run_step = self.step - self.first_step;
        let profiling =
            t.profile_steps > 0 && (PROFILE_WARMUP..PROFILE_WARMUP + t.profile_steps as u64).contains(&run_step);
        let profile = profiling.then(|| self.profile.get_or_insert_with(StepProfile::new));
        let mut phases = Phases::new(profile, self.device);
        let mut out = phases.run(0, forward);
        if self.fault_nan.contains(&self.step) {
            out.loss = &out.loss * f64::NAN;
        }
        let avg = Averaging {
            dist: &self.dist,
            overlap: self.overlap.as_mut(),
            bucket_numel: cfg.dist.bucket_numel(),
            seconds: &mut self.allreduce_seconds,
            early: &mut self.early_buckets,
        };
        let opt = &mut self.opt;
        let grad_norm = phases.run(1, || backward_dist(opt, &out.loss, cfg.optimizer.clip_grad, avg))?;
        if self.fault_inf_buffer.contains(&self.step) {
            if let Some((_, b)) = step_buffers(&self.model.vs).first() {
                let _ = tch::no_grad(|| b.shallow_clone().fill_(f64::INFINITY));
            }
        }
        // Checked on the device; read back only to skip (`on_nonfinite = "skip"`), else at the next log point or
        // checkpoint.
        let mut ok = out.loss.detach().isfinite().logical_and(&grad_norm.isfinite());
        if skip_mode && !buffers.is_empty() {
            let finite: Vec<Tensor> = tch::no_grad(|| buffers.iter().map(|(_, b)| b.isfinite().all()).collect());
            ok = ok.logical_and(&Tensor::stack(&finite, 0).all());
        }
        let skip = skip_mode && ok.int64_value(&[]) == 0;
        let at = self.step;
        self.step += 1;
        // The global batch's images (each rank trains its slice of it).
        let images = (batch.len() * self.dist.world()) as u64;
        self.clock.images += images;
        self.images_seen += images;
        if skip {
            self.skipped += 1;
            tch::no_grad(|| {
                for ((_, b), s) in buffers.iter().zip(&saved) {
                    b.shallow_clone().copy_(s);
                }
            });
            crate::say!(
                "\nstep {at}: non-finite loss, gradient norm or buffer, update skipped ({} so far)",
                self.skipped
            );
            if self.skipped > t.max_skipped as u64 {
                return Err(Error::Other(format!(
                    "{} steps skipped for non-finite values, more than train.max_skipped = {}; {}",
                    self.skipped,
                    t.max_skipped,
                    self.nonfinite_advice()
                )));
            }
        } else {
            phases.run(2, || {
                opt.step(lr);
                self.model.objective.after_step(&progress);
            });
            if let (Some(p), Some(labels)) = (self.probe.as_mut(), batch.labels.as_ref()) {
                // On the global batch: every rank's probe takes the same step, as one process would.
                let dist = &self.dist;
                phases.run(3, || -> Result<()> {
                    let y = labels_to_device(labels, self.device);
                    let (f, y) = (dist.all_gather(&out.features), dist.all_gather(&y));
                    p.step(&f.map_err(dist_stopped)?, &y.map_err(dist_stopped)?);
                    Ok(())
                })?;
            }
            self.window.add(&out, &grad_norm, &ok, at);
        }
        if !(self.step.is_multiple_of(t.log_every as u64) || self.step >= self.max_steps) {
            return Ok(None);
        }
        self.window.reduce(&self.dist).map_err(dist_stopped)?;
        Ok(Some(self.window.read()))
    }

    /// Where to go from a non-finite step: the last good checkpoint and the usual causes.
    fn nonfinite_advice(&self) -> String {
        let last = match &self.last_checkpoint {
            Some(p) => format!("the last good checkpoint is {} (--resume continues from it)", p.display()),
            None => "no checkpoint was written yet".to_string(),
        };
        format!(
            "{last}. Likely causes: a learning rate too high for the batch (optimizer.base_lr, optimizer.warmup_epochs), \
             no gradient clipping (optimizer.clip_grad), bf16 overflow (try train.bf16 = false), or extreme inputs; \
             train.on_nonfinite = \"skip\" skips such steps instead of stopping"
        )
    }

    /// The error for a non-finite step in `stop` mode.
    fn nonfinite_error(&self, step: u64) -> Error {
        Error::Other(format!(
            "step {step}: the loss or the gradient norm is NaN or infinite (train.on_nonfinite = \"stop\"): stopped, \
             nothing non-finite was saved; {}",
            self.nonfinite_advice()
        ))
    }

    /// Writes a log point: loss, terms, schedule values, speed, data wait, collapse monitor, online probe.
    fn log(&mut self, r: &Readout, sink: &mut dyn Sink) -> Result<()> {
        let (cfg, step) = (self.cfg, self.step as i64);
        let w = std::mem::take(&mut self.clock);
        let (ips, wait) = (w.images as f64 / w.time, w.wait / w.time);
        self.train_seconds += w.time;
        self.wait_seconds += w.wait;
        sink.scalar("train/loss", step, r.loss);
        for (name, v) in &r.terms {
            sink.scalar(&format!("train/loss/{name}"), step, *v);
        }
        for (name, v) in self.model.objective.schedule_values() {
            sink.scalar(&format!("train/{name}"), step, v);
        }
        sink.scalar("train/lr", step, self.lr);
        sink.scalar("train/epoch", step, self.train_progress().epoch());
        sink.scalar("train/grad_norm", step, r.grad_norm);
        sink.scalar("train/images_per_s", step, ips);
        sink.scalar("train/data_wait_fraction", step, wait);
        if let Some((std, rank)) = r.collapse {
            sink.scalar("train/embedding_std", step, std);
            sink.scalar("train/effective_rank", step, rank);
        }
        if let Some(acc) = self.probe.as_mut().and_then(OnlineProbe::take_accuracy) {
            sink.scalar("train/online_probe_top1", step, acc);
        }
        if cfg.train.on_nonfinite == OnNonFinite::Skip {
            sink.scalar("train/skipped_steps", step, self.skipped as f64);
        }
        let every = cfg.log.histogram_every as u64;
        if every > 0 && self.last_histogram.is_none_or(|last| self.step / every > last / every) {
            self.last_histogram = Some(self.step);
            log_histograms(&self.model.vs, cfg.log.histogram_bins, sink, step);
        }
        let note = collapse_warning(cfg, r).map(|w| format!("WARNING {w}")).unwrap_or_default();
        let line = Line {
            epoch: self.epoch,
            epochs: cfg.train.epochs,
            done: self.step,
            loss: r.loss,
            img_per_s: ips,
            wait,
            note: &note,
        };
        self.progress.update(&line, self.step >= self.max_steps);
        if let Some(at) = r.first_nonfinite {
            sink.flush();
            return Err(self.nonfinite_error(at));
        }
        self.last = r.clone();
        Ok(())
    }

    /// After an epoch's batches: unreadable samples reported (and the run stopped if too many), then the epoch's
    /// checkpoint, reconstruction grid and k-NN as configured.
    fn end_epoch(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let cfg = self.cfg;
        let tally = std::mem::take(&mut self.tally);
        report_bad(self.epoch, &tally.bad, tally.earlier_bad, tally.seen, cfg.data.max_bad_fraction)?;
        self.unreadable += tally.bad.len();
        if self.batch < self.steps_per_epoch {
            // Stopped by train.max_steps in the middle of the epoch: the counts go into the checkpoint.
            self.tally = EpochTally { earlier_bad: tally.earlier_bad + tally.bad.len(), bad: Vec::new(), ..tally };
            self.cut_short = true;
            return Ok(());
        }
        self.epoch += 1;
        self.batch = 0;
        let (t, epoch) = (&cfg.train, self.epoch);
        if t.checkpoint_every > 0 && epoch % t.checkpoint_every == 0 {
            self.checkpoint(&format!("epoch-{epoch:04}"))?;
        }
        if t.recon_every > 0 && (epoch % t.recon_every == 0 || epoch == t.epochs) {
            log_reconstruction(self.model.objective.as_mut(), self.recon.as_ref(), cfg, sink, self.step as i64);
        }
        // The validation curve, after the last epoch too. Every rank extracts its share of the features; the main
        // one scores and logs.
        let e = &cfg.eval;
        if e.knn_every > 0 && (epoch % e.knn_every == 0 || epoch == t.epochs) && self.eval_skipped.is_none() {
            let subset = (e.val_bank_size, e.val_test_size);
            match transfer::knn_only(self.model.eval_backbone(cfg), &self.eval_context(), subset) {
                Ok(Some(top1)) => sink.scalar("val/knn_top1", self.step as i64, top1),
                Ok(None) => {}
                // A stop asked for during the validation pass: no point this epoch; the loop stops next.
                Err(Error::Stopped(_)) => {}
                Err(e) => return Err(e),
            }
        }
        sink.flush();
        Ok(())
    }

    /// Saves checkpoint `name`: weights (with any teacher), optimizer state, online probe, epoch, step, batch, the
    /// log window and the epoch's tally, config. Refused if a step since the last log point was non-finite (the
    /// weights are then not worth keeping).
    fn checkpoint(&mut self, name: &str) -> Result<()> {
        if let Some(at) = self.window.first_nonfinite() {
            return Err(self.nonfinite_error(at));
        }
        // Every rank takes part (the window's mean over the ranks); rank 0 alone writes the one checkpoint.
        self.window.reduce(&self.dist).map_err(dist_stopped)?;
        if !self.dist.is_main() {
            self.last_saved = Some(self.step);
            self.last_checkpoint_at = Instant::now();
            return Ok(());
        }
        let mut window = self.window.snapshot(self.clock.images);
        if let Some(p) = &self.probe {
            (window.probe_hits, window.probe_seen) = p.counts();
        }
        let tally = &self.tally;
        let state = TrainerState {
            epoch: self.epoch,
            step: self.step,
            batch: self.batch,
            skipped_steps: self.skipped,
            window,
            epoch_seen: tally.seen,
            epoch_bad: tally.earlier_bad + tally.bad.len(),
            selfsup_version: env!("CARGO_PKG_VERSION").into(),
            data_samples: self.source.len() as u64,
        };
        let dir = self.out.join("checkpoints");
        let probe = self.probe.as_ref().map(OnlineProbe::state);
        let contents = checkpoint::Contents {
            vs: &self.model.vs,
            optimizer: &self.opt.state(),
            probe: probe.as_deref(),
            state: &state,
            config: self.cfg,
        };
        let path = match checkpoint::save(&dir, name, &contents, self.cfg.train.keep_last) {
            Ok(p) => p,
            // Finite loss and gradients, yet a tensor that is not (a buffer: batch norm's running statistics):
            // said as any non-finite step is, with the checkpoint to go back to.
            Err(checkpoint::CheckpointError::NonFinite { tensor, .. }) => {
                return Err(Error::Other(format!(
                    "step {}: {tensor} holds NaN or infinite values: stopped, nothing non-finite was saved; {}",
                    self.step,
                    self.nonfinite_advice()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        self.last_saved = Some(self.step);
        self.last_checkpoint = Some(path);
        self.last_checkpoint_at = Instant::now();
        Ok(())
    }

    fn eval_context(&self) -> EvalContext<'_> {
        let cfg = self.cfg;
        EvalContext {
            cfg,
            device: self.device,
            threads: cfg.train.threads,
            autocast: self.autocast,
            projector_dir: Some(self.out),
            dist: Some(&self.dist),
            progress: !self.quiet && self.dist.is_main(),
        }
    }

    /// The end of the run: the last reconstruction grid and checkpoint, the evaluation, the summary.
    fn finish(mut self, sink: &mut dyn Sink) -> Result<RunSummary> {
        let cfg = self.cfg;
        self.progress.finish();
        let every = cfg.train.recon_every;
        // The last epoch end logged one if training stopped right there.
        let at_boundary = !self.cut_short && self.batch == 0 && self.epoch > 0;
        let logged_at_epoch_end = at_boundary && (self.epoch % every.max(1) == 0 || self.epoch == cfg.train.epochs);
        if every > 0 && !logged_at_epoch_end {
            // Stopped early (train.max_steps, a signal): still show what the model reconstructs.
            log_reconstruction(self.model.objective.as_mut(), self.recon.as_ref(), cfg, sink, self.step as i64);
        }
        if self.last_saved != Some(self.step) {
            // The final checkpoint; a run cut short (train.max_steps, a signal) is named by its step too.
            let name = self.checkpoint_name();
            self.checkpoint(&name)?;
        }
        let seconds = self.run_start.elapsed().as_secs_f64();
        // A stop requested during training (or since) skips the evaluation: the user wants the process gone. In a
        // process group the ranks agree on it first (each extracts its share of the features, or none does).
        self.interrupted = self.interrupted.or_else(signals::stop_requested);
        if self.dist.world() > 1 && self.interrupted.is_none() {
            self.interrupted = self.vote(signals::stop_requested(), false, false)?.0;
        }
        let evaluating = cfg.eval.at_end && self.eval_skipped.is_none() && self.interrupted.is_none();
        let eval = if evaluating {
            match transfer::evaluate(self.model.eval_backbone(cfg), &self.eval_context(), sink, self.step as i64) {
                Ok(report) => {
                    if let Some(r) = &report {
                        transfer::write_report(r, self.out)?;
                    }
                    report
                }
                // A stop asked for during the final evaluation cuts it short: the checkpoint is written, and a
                // --resume of the run evaluates.
                Err(Error::Stopped(sig)) => {
                    crate::say!(
                        "{}: the final evaluation stopped; `selfsup pretrain --resume --out {}` evaluates",
                        signals::name(sig),
                        self.out.display()
                    );
                    self.interrupted = Some(sig);
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        if self.dist.is_main() {
            sink.hparams_end(self.interrupted.is_none());
        }
        sink.flush();
        let collapse_warning = collapse_warning(cfg, &self.last);
        if let Some(w) = &collapse_warning {
            crate::say!("WARNING: {w}");
        }
        let train = self.train_seconds.max(1e-9);
        Ok(RunSummary {
            out: self.out.to_path_buf(),
            device: format!("{:?}", self.device),
            steps: self.step,
            steps_this_process: self.step - self.first_step,
            epochs: self.epoch,
            seconds,
            images_per_s: self.images_seen as f64 / train,
            train_seconds: self.train_seconds,
            data_wait_seconds: self.wait_seconds,
            data_wait_fraction: self.wait_seconds / train,
            final_loss: if self.step > self.first_step { self.last.loss } else { f64::NAN },
            final_terms: self.last.terms.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            embedding_std: self.last.collapse.map(|c| c.0),
            effective_rank: self.last.collapse.map(|c| c.1),
            collapse_warning,
            unreadable_samples: self.unreadable,
            skipped_steps: self.skipped,
            interrupted: self.interrupted.map(|s| signals::name(s).to_string()),
            checkpoint: self.last_checkpoint.clone(),
            eval,
            profile: self.profile.take().map(StepProfile::finish),
            world_size: self.dist.world(),
            dist_backend: self.dist.backend().map(|b| format!("{b:?}").to_lowercase()),
            grad_buckets_started_in_backward: self.early_buckets as f64 / (self.step - self.first_step).max(1) as f64,
            grad_allreduce_seconds: self.allreduce_seconds,
            init_from: self.init_from.clone(),
            eval_skipped: self.eval_skipped.clone().filter(|_| cfg.eval.at_end),
        })
    }
}

/// Histograms of every trainable parameter's values and gradient, and of the per-parameter gradient norms, each
/// computed on the device (a few numbers per tensor come back).
fn log_histograms(vs: &VarStore, bins: usize, sink: &mut dyn Sink, step: i64) {
    use crate::tensorboard::Histogram;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut norms = Vec::new();
    tch::no_grad(|| {
        for (name, t) in &vars {
            sink.histogram(&format!("weights/{name}"), step, &Histogram::of_tensor(t, bins));
            let g = t.grad();
            if g.defined() {
                sink.histogram(&format!("gradients/{name}"), step, &Histogram::of_tensor(&g, bins));
                norms.push(g.to_kind(tch::Kind::Float).norm());
            }
        }
        if !norms.is_empty() {
            let norms: Vec<f32> = Vec::try_from(Tensor::stack(&norms, 0).to_device(Device::Cpu)).unwrap_or_default();
            sink.histogram("grad_norm/per_parameter", step, &Histogram::of_values(&norms, bins));
        }
    });
}

/// The collapse monitor's verdict on a readout: `Some(message)` when the embeddings' spread or effective rank is
/// below the configured thresholds.
fn collapse_warning(cfg: &Config, r: &Readout) -> Option<String> {
    let (std, rank) = r.collapse?;
    let t = &cfg.train;
    let low_std = std < t.collapse_warn_std;
    let low_rank = rank < t.collapse_warn_rank;
    (low_std || low_rank).then(|| {
        format!(
            "embeddings may be collapsing: embedding_std {std:.3} (warn below {}), effective_rank {rank:.2} (warn below {})",
            t.collapse_warn_std, t.collapse_warn_rank
        )
    })
}
