//! Evaluation of a backbone by transfer to the labeled data of a run: k-NN and linear probe on frozen features,
//! and the same probe on raw pixels as the baseline. Writes `eval.json` and logs `eval/*` scalars.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use selfsup_models::dist::Dist;
use selfsup_models::Backbone;
use serde::Serialize;
use tch::{Device, Tensor};

use crate::config::Config;
use crate::eval::{extract, knn_predict, linear_probe_predict, ClassReport, ExtractOptions, Features, ProbeOptions};
use crate::source::{self, Source};
use crate::tensorboard::Sink;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub train_samples: usize,
    pub test_samples: usize,
    pub feature_dim: i64,
    pub knn_k: usize,
    pub knn_temperature: f64,
    pub knn: ClassReport,
    pub linear: ClassReport,
    /// The same linear probe fitted on raw (normalized) pixels.
    pub raw_pixels_linear: Option<ClassReport>,
    pub unreadable_samples: usize,
    pub seconds: f64,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "evaluation on {} test images ({} labeled train images, {}-d features)",
            self.test_samples, self.train_samples, self.feature_dim
        )?;
        writeln!(f, "  k-NN (k={}, T={}) top-1: {:.2}%", self.knn_k, self.knn_temperature, 100.0 * self.knn.top1)?;
        writeln!(f, "  linear probe top-1:     {:.2}%", 100.0 * self.linear.top1)?;
        if let Some(raw) = &self.raw_pixels_linear {
            writeln!(f, "  linear probe on raw pixels (baseline): {:.2}%", 100.0 * raw.top1)?;
        }
        writeln!(f, "  linear probe per class:")?;
        for c in &self.linear.per_class {
            writeln!(f, "    {:<14} {:6.2}%  (n={})", c.class, 100.0 * c.accuracy, c.count)?;
        }
        write!(f, "  worst class: {} ({:.2}%)", self.linear.worst_class, 100.0 * self.linear.worst_accuracy)
    }
}

/// What one evaluation needs besides the backbone.
pub struct EvalContext<'a> {
    pub cfg: &'a Config,
    pub device: Device,
    pub threads: usize,
    /// bf16 autocast (CUDA with `train.bf16`).
    pub autocast: bool,
    /// The run folder (holding the event file): where the embedding projector's files go; `None` = not written.
    pub projector_dir: Option<&'a Path>,
    /// A process group: feature extraction is sharded over its ranks and gathered; the main rank alone fits the
    /// probes, reports and writes (the others get `None`). Every rank must call the same evaluations.
    pub dist: Option<&'a Dist>,
    /// Progress bars for feature extraction and the linear probe (on the main rank).
    pub progress: bool,
}

impl EvalContext<'_> {
    /// Whether a SIGINT / SIGTERM may cut the evaluation short ([`Error::Stopped`]): in one process only (in a
    /// group every rank must take part in every gather).
    fn stoppable(&self) -> bool {
        self.dist.is_none_or(|d| d.world() == 1)
    }

    fn is_main(&self) -> bool {
        self.dist.is_none_or(Dist::is_main)
    }
}

/// Opens data set `key` = `path`; an error names the key.
fn open_keyed(path: &Path, key: &str, options: source::OpenOptions) -> Result<Arc<dyn Source>> {
    Ok(source::open_with(path, options).map_err(|e| Error::Other(format!("{key}: {e}")))?.into())
}

fn labeled(path: &Path, key: &str, options: source::OpenOptions) -> Result<Arc<dyn Source>> {
    let s = open_keyed(path, key, options)?;
    if s.num_classes().is_none() {
        return Err(Error::Other(format!(
            "{key} = {}: evaluation needs labels and this source has none (a folder needs class sub-folders)",
            path.display()
        )));
    }
    Ok(s)
}

/// Whether a run's evaluation (the validation k-NN and the final k-NN and probe) can take place, decided at its
/// start: `Ok(None)` when it can, `Ok(Some(why))` when it is skipped (no `data.test`; or pretraining on an
/// unlabeled folder without `eval.train`), an error when a set given for it does not fit: unreadable, without
/// labels, with other channels than the network's `channels`, or with labels outside the classes (the names of
/// `data.class_names`, else the bank's labels). Opens the sets as evaluation will, so that a mistake fails before
/// hours of training rather than after; errors name the key.
pub fn plan(cfg: &Config, channels: u8) -> Result<Option<String>> {
    let Some(test_path) = &cfg.data.test else {
        return Ok(Some("data.test is not set".into()));
    };
    let o = cfg.data.open_options();
    let (bank_path, bank_key) = cfg.eval_bank();
    let bank = open_keyed(bank_path, bank_key, o)?;
    if bank.num_classes().is_none() {
        if cfg.eval.train.is_none() {
            return Ok(Some(format!(
                "data.train = {} has no labels (a folder without class sub-folders); set eval.train to a labeled \
                 set (a folder of class sub-folders) to evaluate on it",
                bank_path.display()
            )));
        }
        return Err(Error::Other(format!("eval.train = {}: has no labels", bank_path.display())));
    }
    let test = labeled(test_path, "data.test", o)?;
    let named = source::Classes::named(&cfg.data.class_names, "data.class_names");
    let classes = named.or_else(|| source::Classes::of(bank.as_ref(), bank_key));
    source::check_fits(bank.as_ref(), bank_key, bank_path, channels, classes.as_ref())?;
    source::check_fits(test.as_ref(), "data.test", test_path, channels, classes.as_ref())?;
    Ok(None)
}

fn class_names(cfg: &Config, src: &dyn Source) -> Vec<String> {
    if cfg.data.class_names.is_empty() {
        src.class_names()
    } else {
        cfg.data.class_names.clone()
    }
}

fn knn_report(train: &Features, test: &Features, classes: i64, names: &[String], ctx: &EvalContext) -> ClassReport {
    let e = &ctx.cfg.eval;
    let pred = knn_predict(train, test, e.knn_k, e.knn_temperature, classes, ctx.device);
    ClassReport::new(&pred, &test.y, names, classes as usize)
}

/// k-NN only (cheap enough to run during training) with a bank of the first `subset.0` labeled training images
/// and the first `subset.1` test images (0 = all); `None` on the ranks other than the main one.
pub fn knn_only(backbone: &dyn Backbone, ctx: &EvalContext, subset: (usize, usize)) -> Result<Option<f64>> {
    let sets = features(backbone, ctx, false, subset, false)?;
    Ok(ctx.is_main().then(|| knn_report(&sets.train, &sets.test, sets.classes, &[], ctx).top1))
}

/// Frozen features of the labeled train and test sets, and optionally their raw pixels.
struct EvalSets {
    train: Features,
    test: Features,
    classes: i64,
    names: Vec<String>,
    raw: Option<(Features, Features)>,
    test_src: Arc<dyn Source>,
}

/// `limits`: the first this many (train, test) images (0 = all); `show`: progress bars.
fn features(
    backbone: &dyn Backbone,
    ctx: &EvalContext,
    raw: bool,
    limits: (usize, usize),
    show: bool,
) -> Result<EvalSets> {
    let cfg = ctx.cfg;
    let test_path =
        cfg.data.test.as_ref().ok_or_else(|| Error::Other("data.test is not set: nothing to evaluate on".into()))?;
    let (bank_path, bank_key) = cfg.eval_bank();
    let train_src = labeled(bank_path, bank_key, cfg.data.open_options())?;
    let test_src = labeled(test_path, "data.test", cfg.data.open_options())?;
    let classes = train_src.num_classes().max(test_src.num_classes()).unwrap_or(0) as i64;
    let names = class_names(cfg, test_src.as_ref());
    // Evaluation sees whole images at the first (global) view's size and normalization.
    let recipe = cfg.view_recipes().swap_remove(0);
    let (bank_data, test_data) =
        (format!("{bank_key} = {}", bank_path.display()), format!("data.test = {}", test_path.display()));
    let opts = |limit, label, data| ExtractOptions {
        recipe: &recipe,
        batch_size: 512,
        threads: ctx.threads,
        device: ctx.device,
        limit,
        autocast: ctx.autocast,
        dist: ctx.dist,
        progress: show.then_some(label),
        stop_on_signal: ctx.stoppable(),
        data,
    };
    let net = |x: &Tensor| backbone.features(x, false);
    let pixels = |x: &Tensor| x.flatten(1, -1);
    let fs: Vec<&dyn Fn(&Tensor) -> Tensor> = if raw { vec![&net, &pixels] } else { vec![&net] };
    let mut tr = extract(train_src, &opts(limits.0, "features: labeled train", &bank_data), &fs)?.into_iter();
    let mut te = extract(test_src.clone(), &opts(limits.1, "features: test", &test_data), &fs)?.into_iter();
    let (train, test) = (tr.next().expect("one set per function"), te.next().expect("one set per function"));
    let raw = tr.next().zip(te.next());
    Ok(EvalSets { train, test, classes, names, raw, test_src })
}

/// Full evaluation: k-NN, linear probe, and (if configured) the raw-pixel probe baseline. `None` on the ranks
/// other than the main one (they only extract their share of the features).
pub fn evaluate(
    backbone: &dyn Backbone,
    ctx: &EvalContext,
    sink: &mut dyn Sink,
    step: i64,
) -> Result<Option<EvalReport>> {
    let t0 = Instant::now();
    let cfg = ctx.cfg;
    let e = &cfg.eval;
    let EvalSets { train, test, classes, names, raw, test_src } =
        features(backbone, ctx, e.raw_pixel_baseline, (e.train_limit, 0), ctx.progress && ctx.is_main())?;
    if !ctx.is_main() {
        return Ok(None);
    }
    if let (Some(dir), true) = (ctx.projector_dir, e.projector_samples > 0) {
        let k = (e.projector_samples as i64).min(test.x.size()[0]);
        let labels: Vec<i64> = Vec::try_from(test.y.narrow(0, 0, k)).unwrap_or_default();
        crate::projector::write(dir, &test.x.narrow(0, 0, k), &labels, &names, test_src.as_ref())?;
    }
    let probe = ProbeOptions {
        epochs: e.probe_epochs,
        lr: e.probe_lr,
        batch_size: e.probe_batch,
        weight_decay: e.probe_weight_decay,
        seed: cfg.seed as i64,
        device: ctx.device,
        progress: ctx.progress,
        stop_on_signal: ctx.stoppable(),
    };
    let knn = knn_report(&train, &test, classes, &names, ctx);
    let linear =
        ClassReport::new(&linear_probe_predict(&train, &test, classes, &probe)?, &test.y, &names, classes as usize);
    let raw_pixels_linear = match raw {
        Some((rtr, rte)) => Some(ClassReport::new(
            &linear_probe_predict(&rtr, &rte, classes, &probe)?,
            &rte.y,
            &names,
            classes as usize,
        )),
        None => None,
    };
    sink.scalar("eval/knn_top1", step, knn.top1);
    sink.scalar("eval/linear_top1", step, linear.top1);
    sink.scalar("eval/linear_worst_class_top1", step, linear.worst_accuracy);
    sink.image("eval/linear_confusion_matrix", step, &crate::tensorboard::confusion_image(&linear.confusion, &names));
    if let Some(r) = &raw_pixels_linear {
        sink.scalar("eval/raw_pixels_linear_top1", step, r.top1);
    }
    let report = EvalReport {
        train_samples: train.x.size()[0] as usize,
        test_samples: test.x.size()[0] as usize,
        feature_dim: train.x.size()[1],
        knn_k: e.knn_k,
        knn_temperature: e.knn_temperature,
        knn,
        linear,
        raw_pixels_linear,
        unreadable_samples: train.unreadable + test.unreadable,
        seconds: t0.elapsed().as_secs_f64(),
    };
    sink.text("eval/report", step, &crate::trainer::report::eval_markdown(&report));
    sink.flush();
    Ok(Some(report))
}

/// Writes `eval.json` into `dir` (temporary file, synced, then renamed).
pub fn write_report(report: &EvalReport, dir: &Path) -> Result<()> {
    crate::write_json_atomic(&dir.join("eval.json"), report)
}
