//! The one training loop for every objective: it owns the loader, optimizer, schedule, checkpoints and logging.
//! GPU sync points are deliberate: the loss is accumulated on the device and read back every `log_every` steps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use selfsup_augment::Views;
use selfsup_models::{layer_decay_scale, Backbone, Batch, Objective, Optimizer, ParamSpec};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::config::{Config, ShuffleMode};
use crate::loader::{BadSample, HostBatch, Loader, LoaderConfig};
use crate::progress::Progress;
use crate::source::{self, Source};
use crate::tensorboard::Sink;
use crate::transfer::{self, EvalContext, EvalReport};
use crate::{prepare_device, Error, Result};

mod probe;
mod profile;
mod visuals;

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
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub out: PathBuf,
    pub device: String,
    pub steps: u64,
    pub epochs: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Time inside the training loop (steps only: no checkpoints, k-NN or final evaluation).
    pub train_seconds: f64,
    /// Time the training loop spent blocked waiting for the loader, and its fraction of `train_seconds`.
    pub data_wait_seconds: f64,
    pub data_wait_fraction: f64,
    pub final_loss: f64,
    pub unreadable_samples: usize,
    pub eval: Option<EvalReport>,
    /// Where a step's time goes (`train.profile_steps`).
    pub profile: Option<StepProfile>,
}

/// The model of a run: variables, objective (with its backbone) and the number of input channels.
pub struct Model {
    pub vs: VarStore,
    pub objective: Box<dyn Objective>,
}

/// Builds the variables of `cfg`'s model on `device` (seeded, so weights are reproducible).
pub fn build_model(cfg: &Config, channels: u8, device: Device) -> Result<Model> {
    tch::manual_seed(cfg.seed as i64);
    let vs = VarStore::new(device);
    let backbone = cfg.model.backbone.build(vs.root() / "backbone", i64::from(channels))?;
    let objective = cfg.objective.build(&vs.root(), backbone)?;
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

/// The seed of torch's global RNG in epoch `epoch`.
fn epoch_seed(seed: u64, epoch: usize) -> i64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (epoch as u64 + 1)) as i64 & i64::MAX
}

/// One optimizer update from `loss`: zero the gradients, backpropagate, clip their global norm to `clip` (0 = no
/// clipping), step with learning rate `lr`. The same for pretraining and fine-tuning.
pub fn optimizer_step(opt: &mut Optimizer, loss: &Tensor, clip: f64, lr: f64) {
    backward(opt, loss, clip);
    opt.step(lr);
}

/// The gradients of `loss` in place of the previous ones, their global norm clipped to `clip` (0 = no clipping).
fn backward(opt: &mut Optimizer, loss: &Tensor, clip: f64) {
    opt.zero_grad();
    loss.backward();
    if clip > 0.0 {
        let _ = opt.clip_grad_norm(clip);
    }
}

pub(crate) fn report_bad(epoch: usize, bad: &[BadSample], seen: usize, max_fraction: f64) -> Result<()> {
    if bad.is_empty() {
        return Ok(());
    }
    eprintln!("\nepoch {}: {} unreadable sample(s) skipped:", epoch + 1, bad.len());
    for b in bad.iter().take(20) {
        eprintln!("  {}: {}", b.location, b.error);
    }
    if bad.len() > 20 {
        eprintln!("  ... and {} more", bad.len() - 20);
    }
    let frac = bad.len() as f64 / seen.max(1) as f64;
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
pub fn pretrain(cfg: &Config, opts: &RunOptions, sink: &mut dyn Sink) -> Result<RunSummary> {
    let (device, autocast) = prepare_device(cfg.train.device, cfg.train.bf16)?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Error::Other(format!("{}: {e}", p.display()))
    };
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let resolved = opts.out.join("config.toml");
    std::fs::write(&resolved, cfg.to_toml()).map_err(io(&resolved))?;

    let mut source: Arc<dyn Source> = source::open_with(&cfg.data.train, cfg.data.open_options())?.into();
    if cfg.data.limit > 0 && cfg.data.limit < source.len() {
        source = Arc::new(source::Prefix::new(source, cfg.data.limit));
    }
    let channels = source.channels();
    let mut model = build_model(cfg, channels, device)?;
    let recipes = cfg.view_recipes().iter().map(|r| r.build(channels)).collect::<Result<Vec<_>, _>>()?;
    let views = Arc::new(Views::new(recipes));
    let t = &cfg.train;
    let loader_cfg = LoaderConfig {
        batch_size: t.batch_size,
        threads: t.threads,
        prefetch: t.prefetch,
        seed: cfg.seed,
        shuffle: true,
        full_shuffle: cfg.data.shuffle == ShuffleMode::Full,
        drop_last: true,
    };
    let loader = Loader::new(source.clone(), views.clone(), loader_cfg).map_err(|e| Error::Other(e.to_string()))?;
    let steps_per_epoch = loader.batches_per_epoch() as u64;
    if steps_per_epoch == 0 {
        return Err(Error::Other(format!("{} samples < train.batch_size {}", source.len(), t.batch_size)));
    }
    let mut opt = Optimizer::new_with(
        &model.vs,
        &cfg.optimizer,
        param_spec(model.objective.backbone(), cfg.optimizer.layer_decay),
    )?;
    let recon_batch = recon_batch(cfg, source.as_ref(), device, 8);
    let ckpt_dir = opts.out.join("checkpoints");
    let (mut start_epoch, mut step) = (0usize, 0u64);
    if opts.resume {
        let ckpt = checkpoint::resolve(&opts.out)?;
        checkpoint::load_weights(&mut model.vs, &ckpt)?;
        opt.load_state(&checkpoint::load_optimizer(&ckpt)?)?;
        let st = checkpoint::load_state(&ckpt)?;
        (start_epoch, step) = (st.epoch, st.step);
        eprintln!("resuming from {} (epoch {}, step {})", ckpt.display(), st.epoch, st.step);
    } else if let Some(img) = preview(source.as_ref(), &views, &loader.order(0), cfg.seed, t.preview_pairs) {
        sink.image("views/pairs", 0, &img);
    }

    let total_steps = steps_per_epoch * t.epochs as u64;
    let max_steps = if t.max_steps > 0 { (t.max_steps as u64).min(total_steps) } else { total_steps };
    let peak_lr = cfg.optimizer.base_lr * t.batch_size as f64 / 256.0;
    let mut progress = Progress::new(max_steps, opts.quiet);
    let run_start = Instant::now();
    let (mut total_wait, mut total_train, mut images_seen) = (0f64, 0f64, 0u64);
    let mut unreadable = 0usize;
    let mut final_loss = f64::NAN;
    let eval_ctx = EvalContext { cfg, device, threads: t.threads, autocast, projector_dir: Some(&opts.out) };
    let mut last_saved = None;
    let mut epoch = start_epoch;
    // The logging window runs across epoch boundaries and counts only time inside the training loop (not
    // checkpoints or k-NN between epochs), so images/s and the wait fraction cover every step exactly once.
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let (mut acc_steps, mut win_images, mut win_wait, mut win_time) = (0u64, 0u64, 0f64, 0f64);
    let mut probe = match source.num_classes() {
        Some(classes) if cfg.eval.online_probe && classes > 1 => {
            Some(OnlineProbe::new(model.objective.backbone().dim(), classes as i64, cfg.eval.online_probe_lr, device)?)
        }
        _ => None,
    };
    let mut cut_short = false;
    let mut profile: Option<StepProfile> = None;
    let first_step = step;
    while epoch < t.epochs && step < max_steps {
        // Torch's global RNG (masks of MAE/SimMIM, dropout) restarts from (seed, epoch) every epoch: a run resumed
        // at an epoch boundary continues exactly, and reconstruction grids between epochs change nothing.
        tch::manual_seed(epoch_seed(cfg.seed, epoch));
        let mut bad = Vec::new();
        let (mut seen, mut consumed) = (0usize, 0u64);
        let mut batches = loader.epoch(epoch as u64);
        while step < max_steps {
            let wait_start = Instant::now();
            let Some(batch) = batches.next() else { break };
            let waited = wait_start.elapsed().as_secs_f64();
            win_wait += waited;
            consumed += 1;
            seen += batch.len() + batch.bad.len();
            bad.extend(batch.bad.iter().cloned());
            if batch.len() < 2 {
                win_time += wait_start.elapsed().as_secs_f64();
                continue; // nothing to contrast in a batch emptied by unreadable samples
            }
            let progress_epochs = step as f64 / steps_per_epoch as f64;
            let lr = cfg.optimizer.lr_at(peak_lr, progress_epochs, t.epochs as f64);
            // Issued before the forward pass (also when profiling, so that its phases cover the model only, as
            // the PyTorch reference's do).
            let views = to_device(&batch, device);
            let forward =
                || selfsup_models::device::autocast(autocast, || model.objective.loss(&Batch { views }, true));
            // Counted from this run's first step, so a resumed run profiles too.
            let run_step = step - first_step;
            let profiling =
                t.profile_steps > 0 && (PROFILE_WARMUP..PROFILE_WARMUP + t.profile_steps as u64).contains(&run_step);
            let mut phases = Phases::new(profiling.then(|| profile.get_or_insert_with(StepProfile::new)), device);
            let out = phases.run(0, forward);
            phases.run(1, || backward(&mut opt, &out.loss, cfg.optimizer.clip_grad));
            phases.run(2, || opt.step(lr));
            if let (Some(p), Some(labels)) = (probe.as_mut(), batch.labels.as_ref()) {
                phases.run(3, || p.step(&out.features, labels));
            }
            step += 1;
            model.objective.after_step(step as f64 / total_steps as f64);
            loss_acc += out.loss.detach().to_kind(Kind::Float);
            acc_steps += 1;
            win_images += batch.len() as u64;
            images_seen += batch.len() as u64;
            if step % t.log_every as u64 == 0 || step >= max_steps {
                // The one deliberate sync point: read the mean loss of the window back from the device.
                let loss = loss_acc.double_value(&[]) / acc_steps as f64;
                win_time += wait_start.elapsed().as_secs_f64();
                total_train += win_time;
                total_wait += win_wait;
                let (ips, wait) = (win_images as f64 / win_time, win_wait / win_time);
                sink.scalar("train/loss", step as i64, loss);
                sink.scalar("train/lr", step as i64, lr);
                sink.scalar("train/images_per_s", step as i64, ips);
                sink.scalar("train/data_wait_fraction", step as i64, wait);
                if let Some(acc) = probe.as_mut().and_then(OnlineProbe::take_accuracy) {
                    sink.scalar("train/online_probe_top1", step as i64, acc);
                }
                progress.update(epoch, t.epochs, step, loss, ips, wait, step >= max_steps);
                if !loss.is_finite() {
                    return Err(Error::Other(format!("loss is {loss} at step {step}; lower optimizer.base_lr?")));
                }
                final_loss = loss;
                loss_acc = Tensor::zeros([], (Kind::Float, device));
                (acc_steps, win_images, win_wait, win_time) = (0, 0, 0.0, 0.0);
            } else {
                win_time += wait_start.elapsed().as_secs_f64();
            }
        }
        drop(batches);
        report_bad(epoch, &bad, seen, cfg.data.max_bad_fraction)?;
        unreadable += bad.len();
        if consumed < steps_per_epoch {
            cut_short = true;
            break; // stopped by train.max_steps in the middle of the epoch
        }
        epoch += 1;
        if t.checkpoint_every > 0 && epoch % t.checkpoint_every == 0 {
            let state = TrainerState { epoch, step, selfsup_version: env!("CARGO_PKG_VERSION").into() };
            checkpoint::save(&ckpt_dir, &format!("epoch-{epoch:04}"), &model.vs, &opt.state(), &state, cfg)?;
            last_saved = Some(step);
        }
        if t.recon_every > 0 && (epoch % t.recon_every == 0 || epoch == t.epochs) {
            log_reconstruction(model.objective.as_mut(), recon_batch.as_ref(), cfg, sink, step as i64);
        }
        if cfg.eval.knn_every > 0 && epoch % cfg.eval.knn_every == 0 && epoch < t.epochs && cfg.data.test.is_some() {
            let top1 = transfer::knn_only(model.objective.backbone(), &eval_ctx)?;
            sink.scalar("eval/knn_top1", step as i64, top1);
        }
        sink.flush();
    }
    progress.finish();
    if t.recon_every > 0 && cut_short {
        // Cut short by train.max_steps: still show what the model reconstructs.
        log_reconstruction(model.objective.as_mut(), recon_batch.as_ref(), cfg, sink, step as i64);
    }
    if last_saved != Some(step) {
        // The final checkpoint; a run cut short by train.max_steps is named by its step too.
        let state = TrainerState { epoch, step, selfsup_version: env!("CARGO_PKG_VERSION").into() };
        let name = if !cut_short { format!("epoch-{epoch:04}") } else { format!("epoch-{epoch:04}-step-{step}") };
        checkpoint::save(&ckpt_dir, &name, &model.vs, &opt.state(), &state, cfg)?;
    }
    let seconds = run_start.elapsed().as_secs_f64();
    let eval = if cfg.eval.at_end && cfg.data.test.is_some() {
        let report = transfer::evaluate(model.objective.backbone(), &eval_ctx, sink, step as i64)?;
        transfer::write_report(&report, &opts.out)?;
        Some(report)
    } else {
        None
    };
    sink.flush();
    Ok(RunSummary {
        out: opts.out.clone(),
        device: format!("{device:?}"),
        steps: step,
        epochs: epoch,
        seconds,
        images_per_s: images_seen as f64 / total_train.max(1e-9),
        train_seconds: total_train,
        data_wait_seconds: total_wait,
        data_wait_fraction: total_wait / total_train.max(1e-9),
        final_loss,
        unreadable_samples: unreadable,
        eval,
        profile: profile.map(StepProfile::finish),
    })
}
