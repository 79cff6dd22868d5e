//! Fine-tuning a pretrained backbone on labeled data (and the same recipe from scratch, the baseline it must
//! beat): full fine-tuning with layer-wise learning-rate decay, or a linear head on the frozen backbone; AdamW,
//! SGD or LARS with warmup + cosine, label smoothing, gradient clipping, bf16 autocast on CUDA. Low-label runs
//! keep a fixed, seeded subset of `labels_per_class` images per class. Reports top-1, per-class and worst-class
//! accuracy as text and `finetune.json`, and logs the curves (`finetune/*`) to TensorBoard.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use selfsup_augment::{RecipeConfig, Views};
use selfsup_models::{cross_entropy, Backbone, Optimizer};
use serde::Serialize;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::config::{Config, FinetuneConfig, FinetuneMode, ShuffleMode};
use crate::eval::{eval_recipe, extract, ClassReport, ExtractOptions};
use crate::loader::{Loader, LoaderConfig};
use crate::progress::{Line, Progress};
use crate::source::{self, Source, Subset};
use crate::tensorboard::{confusion_image, Sink};
use crate::trainer::{labels_to_device, optimizer_step, param_spec, report_bad, to_device};
use crate::{checkpoint, prepare_device, write_json_atomic, Error, Result};

pub struct FinetuneOptions {
    /// Where `finetune.json`, the event file and the fine-tuned weights go.
    pub out: PathBuf,
    /// The pretrained checkpoint (a folder), or a backbone weights file (`.safetensors` with torchvision / timm
    /// names, read by [`crate::pretrained::load_backbone_file`]); `None` = the same backbone from scratch.
    pub checkpoint: Option<PathBuf>,
    pub quiet: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CurvePoint {
    pub epoch: usize,
    pub train_loss: f64,
    pub test_top1: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FinetuneReport {
    /// The checkpoint the backbone came from; `None` from scratch.
    pub checkpoint: Option<PathBuf>,
    pub pretrained: bool,
    pub mode: FinetuneMode,
    pub backbone: String,
    pub train_data: PathBuf,
    pub test_data: PathBuf,
    pub train_samples: usize,
    pub labels_per_class: usize,
    pub test_samples: usize,
    pub epochs: usize,
    pub steps: u64,
    pub device: String,
    pub seconds: f64,
    /// Top-1 (fraction) on the test data after the last epoch; also in `test.top1`.
    pub top1: f64,
    pub test: ClassReport,
    pub curve: Vec<CurvePoint>,
    pub unreadable_samples: usize,
    pub seed: u64,
    /// The recipe as run (the whole config is in `config.toml` beside the report).
    pub recipe: FinetuneConfig,
}

impl std::fmt::Display for FinetuneReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.pretrained { "pretrained" } else { "from scratch" };
        let labels =
            if self.labels_per_class > 0 { format!("{} per class, ", self.labels_per_class) } else { String::new() };
        writeln!(
            f,
            "fine-tuned ({:?}, {what}) {} for {} epochs on {} labeled images ({labels}{}) in {:.1}s",
            self.mode,
            self.backbone,
            self.epochs,
            self.train_samples,
            self.train_data.display(),
            self.seconds
        )?;
        writeln!(f, "  test top-1: {:.2}% on {} images", 100.0 * self.top1, self.test_samples)?;
        writeln!(f, "  per class:")?;
        for c in &self.test.per_class {
            writeln!(f, "    {:<14} {:6.2}%  (n={})", c.class, 100.0 * c.accuracy, c.count)?;
        }
        write!(f, "  worst class: {} ({:.2}%)", self.test.worst_class, 100.0 * self.test.worst_accuracy)
    }
}

fn labeled(path: &Path, key: &str, cfg: &Config) -> Result<Arc<dyn Source>> {
    let s: Arc<dyn Source> = source::open_with(path, cfg.data.open_options())?.into();
    if s.labels().is_none() {
        let msg = format!("{key} = {}: fine-tuning needs labels and this source has none", path.display());
        return Err(Error::Other(msg));
    }
    Ok(s)
}

/// The labeled data of `cfg.finetune`, opened and checked against each other: (train, test, class names).
/// Training on other data than pretraining needs its own test data; both must have the same channels and, when
/// both name their classes (image folders, HDF5), the same classes in the same order (labels are indices).
pub fn open_data(cfg: &Config) -> Result<(Arc<dyn Source>, Arc<dyn Source>, Vec<String>)> {
    let f = &cfg.finetune;
    if f.train.is_some() && f.test.is_none() {
        return Err(Error::Other(
            "finetune.train (--data) is set but finetune.test (--test) is not: the pretraining data's test set \
             would score the wrong labels"
                .into(),
        ));
    }
    let train_key = if f.train.is_some() { "finetune.train" } else { "data.train" };
    let test_key = if f.test.is_some() { "finetune.test" } else { "data.test" };
    let train_path = f.train.as_ref().unwrap_or(&cfg.data.train);
    let test_path = f
        .test
        .as_ref()
        .or(cfg.data.test.as_ref())
        .ok_or_else(|| Error::Other("no test data: set finetune.test (--test) or data.test".into()))?;
    let train = labeled(train_path, train_key, cfg)?;
    let test = labeled(test_path, test_key, cfg)?;
    if train.channels() != test.channels() {
        let (a, b) = (train.channels(), test.channels());
        return Err(Error::Other(format!("{train_key} has {a} channel(s), {test_key} {b}: set data.channels")));
    }
    let (a, b) = (train.class_names(), test.class_names());
    if !a.is_empty() && !b.is_empty() && a != b {
        let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        return Err(Error::Other(format!(
            "{train_key} and {test_key} name different classes (class {i}: {:?} vs {:?}); labels are class \
             indices, so both need the same classes in the same order",
            a.get(i),
            b.get(i)
        )));
    }
    let names = if !f.class_names.is_empty() {
        f.class_names.clone()
    } else if cfg.data.test.as_ref() == Some(test_path) && !cfg.data.class_names.is_empty() {
        // The pretraining data's test set (named explicitly or not): its class names apply.
        cfg.data.class_names.clone()
    } else if !b.is_empty() {
        b
    } else {
        a
    };
    // Labels are class indices into the classes the head is built for and the report names.
    let named = if f.class_names.is_empty() { "data.class_names" } else { "finetune.class_names" };
    let classes = source::Classes::named(&names, named).or_else(|| source::Classes::of(train.as_ref(), train_key));
    source::check_fits(train.as_ref(), train_key, train_path, train.channels(), classes.as_ref())?;
    source::check_fits(test.as_ref(), test_key, test_path, train.channels(), classes.as_ref())?;
    Ok((train, test, names))
}

/// The backbone plus a linear classifier `head` (timm's name), in one VarStore.
struct Classifier {
    vs: VarStore,
    backbone: Box<dyn Backbone>,
    head: nn::Linear,
}

impl Classifier {
    fn logits(&self, x: &Tensor, train: bool, frozen: bool) -> Tensor {
        let h =
            if frozen { tch::no_grad(|| self.backbone.features(x, false)) } else { self.backbone.features(x, train) };
        h.apply(&self.head)
    }
}

fn build_classifier(cfg: &Config, channels: u8, classes: i64, device: Device) -> Result<Classifier> {
    tch::manual_seed(cfg.seed as i64);
    let vs = VarStore::new(device);
    let backbone = cfg.model.backbone.build(vs.root() / "backbone", i64::from(channels))?;
    // A near-zero head (MAE's fine-tuning: trunc-normal std 2e-5) so that the first steps do not push large,
    // random gradients into a pretrained backbone.
    let head_cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 2e-5 },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    let head = nn::linear(vs.root() / "head", backbone.dim(), classes, head_cfg);
    Ok(Classifier { vs, backbone, head })
}

/// Fine-tunes `cfg`'s backbone (from `opts.checkpoint`, or from scratch) with `cfg.finetune`.
pub fn finetune(cfg: &Config, opts: &FinetuneOptions, sink: &mut dyn Sink) -> Result<FinetuneReport> {
    let f = &cfg.finetune;
    let (device, autocast) = prepare_device(cfg.train.device, cfg.train.bf16)?;
    let (full_train, test_src, names) = open_data(cfg)?;
    // Timed from here: building, loading, training and testing (not opening the data).
    let t0 = Instant::now();
    let train_src: Arc<dyn Source> = if f.labels_per_class > 0 {
        Arc::new(Subset::per_class(full_train.clone(), f.labels_per_class, cfg.seed).expect("labels checked above"))
    } else {
        full_train.clone()
    };
    let classes = train_src.num_classes().max(test_src.num_classes()).unwrap_or(0) as i64;
    let channels = train_src.channels();

    let model = build_classifier(cfg, channels, classes, device)?;
    if let Some(file) = opts.checkpoint.as_ref().filter(|p| p.is_file()) {
        // A backbone weights file (torchvision / timm names), not a checkpoint folder: `finetune --init-from`.
        crate::say!("{}", crate::pretrained::load_backbone_file(&model.vs, file, &cfg.model.backbone)?);
    } else if let Some(ckpt) = &opts.checkpoint {
        let which = checkpoint::Which::from_teacher(f.teacher);
        let n = checkpoint::load_backbone(&model.vs, ckpt, which)?;
        let whose = if f.teacher { "teacher " } else { "" };
        crate::say!("loaded {n} {whose}backbone tensors from {}", ckpt.display());
    }
    // The data and the weights fit: now the output folder.
    let io = |e: std::io::Error| Error::Other(format!("{}: {e}", opts.out.display()));
    std::fs::create_dir_all(&opts.out).map_err(io)?;
    std::fs::write(opts.out.join("config.toml"), cfg.to_toml()).map_err(io)?;
    let frozen = f.mode == FinetuneMode::Linear;
    if frozen {
        for (name, t) in model.vs.variables() {
            if name.starts_with("backbone.") {
                let _ = t.shallow_clone().set_requires_grad(false);
            }
        }
    }

    // Augmentation: the pretraining view's size and normalization, a random resized crop and a flip.
    let view = cfg.view_recipes().swap_remove(0);
    let first = train_src.get(0).map_err(|e| Error::Other(e.to_string()))?.image;
    let mut recipe: RecipeConfig = eval_recipe(&view, first.width, first.height);
    recipe.crop_scale = f.crop_scale;
    recipe.crop_ratio = view.crop_ratio;
    recipe.flip_p = f.flip_p;
    let views = Arc::new(Views::new(vec![recipe.build(channels)?]));
    let batch_size = f.batch_size.min(train_src.len());
    if batch_size < 2 {
        let n = train_src.len();
        let msg = format!("{n} labeled training images (finetune.labels_per_class = {}): need 2", f.labels_per_class);
        return Err(Error::Other(msg));
    }
    let loader_cfg = LoaderConfig {
        batch_size,
        threads: cfg.train.threads,
        prefetch: cfg.train.prefetch,
        seed: cfg.seed ^ 0x5eed_f17e,
        shuffle: true,
        full_shuffle: cfg.data.shuffle == ShuffleMode::Full,
        // Every labeled image every epoch: with few labels a dropped remainder is a large share of them.
        drop_last: false,
        slice: (0, 1),
    };
    let loader = Loader::new(train_src.clone(), views, loader_cfg).map_err(|e| Error::Other(e.to_string()))?;
    let steps_per_epoch = loader.batches_per_epoch() as u64;
    let total_steps = steps_per_epoch * f.epochs as u64;

    let ocfg = f.optimizer_config();
    let mut opt = Optimizer::new_with(&model.vs, &ocfg, param_spec(model.backbone.as_ref(), ocfg.layer_decay))?;
    let peak_lr = ocfg.base_lr * batch_size as f64 / 256.0;

    let test_data = match (&f.test, &cfg.data.test) {
        (Some(p), _) => format!("finetune.test = {}", p.display()),
        (None, Some(p)) => format!("data.test = {}", p.display()),
        (None, None) => "the test data".into(),
    };
    let eval_opts = ExtractOptions {
        recipe: &view,
        batch_size: 512,
        threads: cfg.train.threads,
        device,
        limit: f.test_limit,
        autocast,
        dist: None,
        progress: None,
        stop_on_signal: false,
        data: &test_data,
    };
    let mut progress = Progress::new(total_steps, 0, opts.quiet);
    let mut curve = Vec::new();
    let mut step = 0u64;
    let mut unreadable = 0usize;
    let mut last_report = None;
    let mut last_lr = 0.0;
    for epoch in 0..f.epochs {
        let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
        let (mut n_steps, mut seen, mut bad) = (0u64, 0usize, Vec::new());
        let win_start = Instant::now();
        for batch in loader.epoch(epoch as u64) {
            seen += batch.len() + batch.bad.len();
            bad.extend(batch.bad.iter().cloned());
            if batch.len() < 2 {
                continue;
            }
            let labels = batch.labels.as_ref().ok_or_else(|| Error::Other("a batch without labels".into()))?;
            let y = labels_to_device(labels, device);
            let x = to_device(&batch, device).swap_remove(0);
            let lr = ocfg.lr_at(peak_lr, step as f64 / steps_per_epoch as f64, f.epochs as f64);
            let logits = selfsup_models::device::autocast(autocast, || model.logits(&x, true, frozen));
            let loss = cross_entropy(&logits, &y, f.label_smoothing);
            optimizer_step(&mut opt, &loss, ocfg.clip_grad, lr);
            step += 1;
            n_steps += 1;
            loss_acc += loss.detach();
            last_lr = lr;
        }
        report_bad(epoch, &bad, 0, seen, cfg.data.max_bad_fraction)?;
        unreadable += bad.len();
        let train_loss = if n_steps > 0 { loss_acc.double_value(&[]) / n_steps as f64 } else { f64::NAN };
        if !train_loss.is_finite() {
            let msg = format!("fine-tuning loss is {train_loss} in epoch {} (lower finetune.base_lr?)", epoch + 1);
            return Err(Error::Other(msg));
        }
        let ips = (seen - bad.len()) as f64 / win_start.elapsed().as_secs_f64().max(1e-9);
        // Once per epoch, however few steps it has.
        sink.scalar("finetune/train_loss", step as i64, train_loss);
        sink.scalar("finetune/lr", step as i64, last_lr);
        let line = Line { epoch, epochs: f.epochs, done: step, loss: train_loss, img_per_s: ips, ..Default::default() };
        progress.update(&line, epoch + 1 == f.epochs);
        let last = epoch + 1 == f.epochs;
        let test_top1 = if last || (f.eval_every > 0 && (epoch + 1) % f.eval_every == 0) {
            let report = evaluate(&model, test_src.clone(), &eval_opts, classes, &names, frozen)?;
            sink.scalar("finetune/test_top1", step as i64, report.0.top1);
            sink.image("finetune/confusion_matrix", step as i64, &confusion_image(&report.0.confusion, &names));
            let top1 = report.0.top1;
            last_report = Some(report);
            Some(top1)
        } else {
            None
        };
        curve.push(CurvePoint { epoch: epoch + 1, train_loss, test_top1 });
        sink.flush();
    }
    progress.finish();
    let (test, test_samples, test_bad) = last_report.expect("the last epoch always evaluates");
    save_weights(&model.vs, &opts.out)?;
    let report = FinetuneReport {
        checkpoint: opts.checkpoint.clone(),
        pretrained: opts.checkpoint.is_some(),
        mode: f.mode,
        backbone: crate::trainer::report::backbone_name(cfg),
        train_data: f.train.clone().unwrap_or_else(|| cfg.data.train.clone()),
        test_data: f.test.clone().or_else(|| cfg.data.test.clone()).unwrap_or_default(),
        train_samples: train_src.len(),
        labels_per_class: f.labels_per_class,
        test_samples,
        epochs: f.epochs,
        steps: step,
        device: format!("{device:?}"),
        seconds: t0.elapsed().as_secs_f64(),
        top1: test.top1,
        test,
        curve,
        unreadable_samples: unreadable + test_bad,
        seed: cfg.seed,
        recipe: f.clone(),
    };
    write_json_atomic(&opts.out.join("finetune.json"), &report)?;
    let summary = format!(
        "{}\n\nWorst class: **{}** at {:.2}%.\n\n{}",
        report.to_string().lines().next().unwrap_or_default(),
        report.test.worst_class,
        100.0 * report.test.worst_accuracy,
        crate::trainer::report::class_table(&[("fine-tuned", &report.test)])
    );
    sink.text("finetune/report", step as i64, &summary);
    sink.flush();
    Ok(report)
}

/// Test predictions of the classifier: (report, images evaluated, unreadable).
fn evaluate(
    model: &Classifier,
    test: Arc<dyn Source>,
    opts: &ExtractOptions,
    classes: i64,
    names: &[String],
    frozen: bool,
) -> Result<(ClassReport, usize, usize)> {
    let logits = |x: &Tensor| model.logits(x, false, frozen);
    let out = extract(test, opts, &[&logits])?.swap_remove(0);
    let pred = out.x.argmax(1, false);
    let n = out.y.size()[0] as usize;
    Ok((ClassReport::new(&pred, &out.y, names, classes as usize), n, out.unreadable))
}

fn save_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    let p = dir.join("finetuned.safetensors");
    // The extension picks the format in tch: keep `.safetensors` last.
    let tmp = dir.join(".finetuned.tmp.safetensors");
    let err = |e: &dyn std::fmt::Display| Error::Other(format!("{}: {e}", p.display()));
    vs.save(&tmp).map_err(|e| err(&e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| err(&e))?;
    std::fs::rename(&tmp, &p).map_err(|e| err(&e))
}

/// The pretrained fine-tune and the from-scratch baseline with the same recipe, side by side.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub pretrained: FinetuneReport,
    pub scratch: FinetuneReport,
}

impl Comparison {
    /// Points of top-1 the pretrained backbone gains over scratch.
    pub fn gain_points(&self) -> f64 {
        100.0 * (self.pretrained.top1 - self.scratch.top1)
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, s) = (&self.pretrained, &self.scratch);
        writeln!(
            f,
            "fine-tuning on {} ({} labeled images, {} epochs, {:?}):",
            p.train_data.display(),
            p.train_samples,
            p.epochs,
            p.mode
        )?;
        writeln!(f, "  {:<13} {:>8} {:>9}  worst class", "", "top-1", "seconds")?;
        for (name, r) in [("pretrained", p), ("from scratch", s)] {
            let (top1, worst) = (100.0 * r.top1, 100.0 * r.test.worst_accuracy);
            writeln!(f, "  {name:<13} {top1:>7.2}% {:>9.1}  {} ({worst:.2}%)", r.seconds, r.test.worst_class)?;
        }
        let g = self.gain_points();
        if g > 0.0 {
            write!(f, "  pretrained beats scratch by {g:.2} points")
        } else {
            write!(f, "  pretrained does NOT beat scratch ({g:+.2} points)")
        }
    }
}

/// Fine-tunes the backbone of checkpoint `ckpt` and the same backbone from scratch with `cfg.finetune`, into
/// `out/pretrained` and `out/scratch`, and writes `out/comparison.json`.
pub fn compare(cfg: &Config, ckpt: &Path, out: &Path, quiet: bool, sinks: [&mut dyn Sink; 2]) -> Result<Comparison> {
    let [sp, ss] = sinks;
    let run = |checkpoint: Option<PathBuf>, dir: &str, sink: &mut dyn Sink| {
        finetune(cfg, &FinetuneOptions { out: out.join(dir), checkpoint, quiet }, sink)
    };
    let pretrained = run(Some(ckpt.to_path_buf()), "pretrained", sp)?;
    let scratch = run(None, "scratch", ss)?;
    let c = Comparison { pretrained, scratch };
    write_json_atomic(&out.join("comparison.json"), &c)?;
    Ok(c)
}
