//! Evaluation by transfer on frozen features: weighted k-NN (Wu et al. 2018, https://arxiv.org/abs/1805.01978:
//! cosine similarity, top-k neighbours vote with weight exp(sim / T)) and a linear probe (multinomial logistic
//! regression on standardized features). The same probe code fitted on raw pixels gives the baseline to beat.

use std::sync::Arc;

use selfsup_augment::{RecipeConfig, Views};
use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use selfsup_models::dist::Dist;

use crate::loader::{Loader, LoaderConfig};
use crate::source::Source;
use crate::{Error, Result};

/// Features (or raw pixels) of a labeled set, on the CPU.
pub struct Features {
    /// `[N, D]` f32.
    pub x: Tensor,
    /// `[N]` i64.
    pub y: Tensor,
    /// Samples that could not be read (over all ranks), left out of `x` and `y`.
    pub unreadable: usize,
}

/// The deterministic recipe for evaluation: the whole image resized to the training view size, normalized the
/// same way, with no random op.
pub fn eval_recipe(train: &RecipeConfig, width: u32, height: u32) -> RecipeConfig {
    let r = width as f32 / height as f32;
    let mut c = train.clone();
    c.crop_scale = (1.0, 1.0);
    c.crop_ratio = (r, r);
    c.flip_p = 0.0;
    c.jitter.p = 0.0;
    c.grayscale_p = 0.0;
    c.blur.p = 0.0;
    c.solarize_p = 0.0;
    c.equalize_p = 0.0;
    c
}

pub struct ExtractOptions<'a> {
    pub recipe: &'a RecipeConfig,
    pub batch_size: usize,
    pub threads: usize,
    pub device: Device,
    /// Use only the first N samples (0 = all).
    pub limit: usize,
    /// Run the networks under autocast (bf16, set up by [`prepare_device`](crate::prepare_device)); as training.
    pub autocast: bool,
    /// A process group to shard the pass over: each rank reads and runs its slice of every batch and every rank
    /// gets the whole set, in the order one process would give. `None`: this process does it all.
    pub dist: Option<&'a Dist>,
    /// A progress bar with this label on stderr (`None`: silent).
    pub progress: Option<&'a str>,
    /// Give up with [`Error::Stopped`] at the next batch once SIGINT / SIGTERM asked to stop (one process only:
    /// in a group every rank must take part in every gather).
    pub stop_on_signal: bool,
    /// The data, as errors name it: its config key and file (`data.test = /data/test.h5`).
    pub data: &'a str,
}

/// Runs each of `fs` (a frozen network, identity for raw pixels, ...) over the labeled `source` in one pass, so the
/// data is read and decoded once whatever the number of feature sets; returns one `[N, D_i]` set per function, on CPU.
/// In a process group ([`ExtractOptions::dist`]) every rank must call it; each does `1/world` of the work.
pub fn extract(
    source: Arc<dyn Source>,
    opts: &ExtractOptions,
    fs: &[&dyn Fn(&Tensor) -> Tensor],
) -> Result<Vec<Features>> {
    let first = source.get(0)?.image;
    let channels = source.channels();
    let pipe = eval_recipe(opts.recipe, first.width, first.height).build(channels)?;
    let shape = pipe.out_shape();
    let views = Arc::new(Views::new(vec![pipe]));
    let source: Arc<dyn Source> = if opts.limit > 0 && opts.limit < source.len() {
        Arc::new(crate::source::Prefix::new(source, opts.limit))
    } else {
        source
    };
    let cfg = LoaderConfig {
        batch_size: opts.batch_size,
        threads: opts.threads,
        prefetch: 2,
        seed: 0,
        shuffle: false,
        full_shuffle: false,
        drop_last: false,
        slice: opts.dist.map_or((0, 1), |d| (d.rank(), d.world())),
    };
    // Sharded: every batch's rows gathered from the ranks, in rank order, which is the batch's order (each rank
    // holds a contiguous slice of it). Every rank takes part in every gather, also with no readable row.
    let sharded = opts.dist.filter(|d| d.world() > 1);
    let gather = |t: Tensor| -> Result<Tensor> {
        match sharded {
            Some(d) => d.all_gather(&t).map_err(|e| Error::Other(format!("gathering evaluation features: {e}"))),
            None => Ok(t),
        }
    };
    let mut task =
        crate::progress::Task::new(opts.progress.unwrap_or(""), "images", source.len() as u64, opts.progress.is_some());
    let loader = Loader::new(source, views, cfg).map_err(|e| Error::Other(e.to_string()))?;
    let mut xs: Vec<DeviceBuffer> = fs.iter().map(|_| DeviceBuffer::default()).collect();
    let (mut ys, mut unreadable) = (DeviceBuffer::default(), 0usize);
    let stop = opts.stop_on_signal && sharded.is_none();
    for batch in loader.epoch(0) {
        if let Some(sig) = crate::signals::stop_requested().filter(|_| stop) {
            return Err(Error::Stopped(sig));
        }
        // This rank's share, counted as the whole batch (every rank reads its slice of every batch).
        task.inc(((batch.len() + batch.bad.len()) * sharded.map_or(1, |d| d.world())) as u64);
        unreadable += batch.bad.len();
        if batch.is_empty() && sharded.is_none() {
            continue;
        }
        let labels: &[i64] = match &batch.labels {
            Some(l) => l,
            None if batch.is_empty() => &[],
            None => return Err(Error::Other("the evaluation data has no labels".into())),
        };
        // A rank with no readable row runs one blank image to learn the feature sizes, and sends no row.
        let rows = batch.len().max(1) as i64;
        let dims = [rows, shape[0] as i64, shape[1] as i64, shape[2] as i64];
        let x = if batch.is_empty() {
            Tensor::zeros(dims, (Kind::Float, opts.device))
        } else {
            selfsup_models::device::host_to_device(&batch.views[0], &dims, opts.device)
        };
        for (f, out) in fs.iter().zip(xs.iter_mut()) {
            // The data was checked against the network when opened; a sample that still does not fit is an error
            // naming it, never a panic after the whole pass.
            let run = || tch::no_grad(|| selfsup_models::device::autocast(opts.autocast, || f(&x)));
            let feats = selfsup_models::device::catch_torch(run).map_err(|e| {
                Error::Other(format!(
                    "{}: the network cannot take its images (the batch from sample {}): {e}",
                    opts.data,
                    batch.indices.first().copied().unwrap_or(0)
                ))
            })?;
            out.push(gather(feats.to_kind(Kind::Float).narrow(0, 0, batch.len() as i64))?);
        }
        ys.push(gather(Tensor::from_slice(labels).to_device(opts.device))?);
    }
    if let Some(d) = sharded {
        let mut n = [unreadable as i64];
        d.all_reduce_host(&mut n).map_err(|e| Error::Other(format!("counting unreadable evaluation samples: {e}")))?;
        unreadable = n[0] as usize;
    }
    task.finish();
    let y = ys.finish();
    if y.numel() == 0 {
        return Err(Error::Other("no readable evaluation samples".into()));
    }
    Ok(xs.into_iter().map(|x| Features { x: x.finish(), y: y.shallow_clone(), unreadable }).collect())
}

/// Features collected batch by batch: kept on the device up to [`DeviceBuffer::BUDGET`] bytes, then moved to the
/// host in one copy, so evaluation neither synchronizes on every batch nor holds a whole data set's features (or
/// raw pixels) in GPU memory next to the model.
#[derive(Default)]
struct DeviceBuffer {
    pending: Vec<Tensor>,
    pending_bytes: usize,
    host: Vec<Tensor>,
}

impl DeviceBuffer {
    const BUDGET: usize = 256 << 20;

    fn push(&mut self, t: Tensor) {
        self.pending_bytes += t.numel() * t.kind().elt_size_in_bytes();
        self.pending.push(t);
        if self.pending_bytes >= Self::BUDGET {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.host.push(Tensor::cat(&std::mem::take(&mut self.pending), 0).to_device(Device::Cpu));
            self.pending_bytes = 0;
        }
    }

    /// Everything pushed, in order, as one CPU tensor (none pushed: an empty one).
    fn finish(mut self) -> Tensor {
        self.flush();
        if self.host.is_empty() {
            return Tensor::zeros([0], (Kind::Float, Device::Cpu));
        }
        if self.host.len() == 1 {
            return self.host.pop().expect("one tensor");
        }
        Tensor::cat(&self.host, 0)
    }
}

/// Weighted k-NN predictions for `test` from the bank `train`.
///
/// # Shapes
/// `train.x`: `[N, D]`, `test.x`: `[M, D]` → `[M]` predicted classes.
pub fn knn_predict(
    train: &Features,
    test: &Features,
    k: usize,
    temperature: f64,
    classes: i64,
    device: Device,
) -> Tensor {
    tch::no_grad(|| {
        let unit = |x: &Tensor| {
            let x = x.to_device(device);
            &x / x.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12)
        };
        let bank = unit(&train.x);
        let bank_y = train.y.to_device(device);
        let k = (k as i64).min(bank.size()[0]);
        let queries = unit(&test.x);
        let preds: Vec<Tensor> = queries
            .split(1024, 0)
            .iter()
            .map(|q| {
                let sim = q.matmul(&bank.tr());
                let (vals, idx) = sim.topk(k, 1, true, true);
                let neighbour_y = bank_y.index_select(0, &idx.flatten(0, -1)).view_as(&idx);
                // exp(sim / T) relative to each query's nearest neighbour: the same vote, without the overflow
                // to inf (then NaN) that a small T gives (T = 1e-3 overflows f32 at sim > 0.09).
                let w = ((&vals - vals.narrow(1, 0, 1)) / temperature).exp();
                let votes =
                    Tensor::zeros([q.size()[0], classes], (Kind::Float, device)).scatter_add(1, &neighbour_y, &w);
                votes.argmax(1, false)
            })
            .collect();
        Tensor::cat(&preds, 0).to_device(Device::Cpu)
    })
}

pub struct ProbeOptions {
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub weight_decay: f64,
    pub seed: i64,
    pub device: Device,
    /// A progress bar over the epochs on stderr.
    pub progress: bool,
    /// Give up with [`Error::Stopped`] at the next epoch once SIGINT / SIGTERM asked to stop.
    pub stop_on_signal: bool,
}

/// Fits a linear classifier on standardized `train` features with SGD (momentum 0.9, cosine learning rate)
/// and returns its predictions on `test`.
pub fn linear_probe_predict(train: &Features, test: &Features, classes: i64, o: &ProbeOptions) -> Result<Tensor> {
    tch::manual_seed(o.seed);
    let x = train.x.to_device(o.device);
    let mean = x.mean_dim([0i64].as_slice(), true, Kind::Float);
    let std = x.std_dim([0i64].as_slice(), false, true).clamp_min(1e-6);
    let x = (&x - &mean) / &std;
    let y = train.y.to_device(o.device);
    let xt = (test.x.to_device(o.device) - &mean) / &std;
    let vs = nn::VarStore::new(o.device);
    let lin = selfsup_models::linear(vs.root(), x.size()[1], classes);
    let mut opt = nn::Sgd { momentum: 0.9, dampening: 0.0, wd: o.weight_decay, nesterov: true }
        .build(&vs, o.lr)
        .expect("building SGD for the probe");
    let n = x.size()[0];
    let bs = o.batch_size as i64;
    let mut task = crate::progress::Task::new("linear probe", "epochs", o.epochs as u64, o.progress);
    for epoch in 0..o.epochs {
        if let Some(sig) = crate::signals::stop_requested().filter(|_| o.stop_on_signal) {
            return Err(Error::Stopped(sig));
        }
        let lr = 0.5 * o.lr * (1.0 + (std::f64::consts::PI * epoch as f64 / o.epochs as f64).cos());
        opt.set_lr(lr);
        let perm = Tensor::randperm(n, (Kind::Int64, o.device));
        for start in (0..n).step_by(bs as usize) {
            let idx = perm.narrow(0, start, bs.min(n - start));
            let loss = lin.forward(&x.index_select(0, &idx)).cross_entropy_for_logits(&y.index_select(0, &idx));
            opt.backward_step(&loss);
        }
        task.inc(1);
    }
    task.finish();
    Ok(tch::no_grad(|| lin.forward(&xt).argmax(1, false).to_device(Device::Cpu)))
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClassAccuracy {
    pub class: String,
    pub accuracy: f64,
    pub count: usize,
}

/// Top-1, per-class accuracy and the worst class of one evaluation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClassReport {
    pub top1: f64,
    pub per_class: Vec<ClassAccuracy>,
    pub worst_class: String,
    pub worst_accuracy: f64,
    /// `confusion[t][p]`: test images of class t predicted as class p.
    pub confusion: Vec<Vec<usize>>,
}

impl ClassReport {
    pub fn new(pred: &Tensor, truth: &Tensor, class_names: &[String], classes: usize) -> ClassReport {
        let p: Vec<i64> = Vec::try_from(pred).expect("predictions are i64");
        let t: Vec<i64> = Vec::try_from(truth).expect("labels are i64");
        let mut hit = vec![0usize; classes];
        let mut count = vec![0usize; classes];
        let mut confusion = vec![vec![0usize; classes]; classes];
        for (&p, &t) in p.iter().zip(&t) {
            count[t as usize] += 1;
            hit[t as usize] += usize::from(p == t);
            if let Some(c) = confusion[t as usize].get_mut(p as usize) {
                *c += 1;
            }
        }
        let name = |c: usize| class_names.get(c).cloned().unwrap_or_else(|| c.to_string());
        let per_class: Vec<ClassAccuracy> = (0..classes)
            .map(|c| ClassAccuracy {
                class: name(c),
                accuracy: if count[c] > 0 { hit[c] as f64 / count[c] as f64 } else { f64::NAN },
                count: count[c],
            })
            .collect();
        let worst = per_class
            .iter()
            .filter(|c| c.count > 0)
            .min_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
            .cloned()
            .unwrap_or(ClassAccuracy { class: "-".into(), accuracy: f64::NAN, count: 0 });
        ClassReport {
            top1: hit.iter().sum::<usize>() as f64 / t.len().max(1) as f64,
            per_class,
            worst_class: worst.class,
            worst_accuracy: worst.accuracy,
            confusion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard-normal values of `shape` from our own generator (Box-Muller on [`selfsup_augment::Rng`]), not from
    /// torch's global RNG, which the unit tests on other threads draw from too (docs/testing.md).
    fn randn(rng: &mut selfsup_augment::Rng, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2) = (1.0 - f64::from(rng.uniform()), f64::from(rng.uniform()));
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        Tensor::from_slice(&v).view(shape)
    }

    fn features(x: &[f32], d: i64, y: &[i64]) -> Features {
        Features { x: Tensor::from_slice(x).view([-1, d]), y: Tensor::from_slice(y), unreadable: 0 }
    }

    #[test]
    fn knn_votes_by_weighted_neighbours() {
        // Bank: two points near +x (class 0), one near +y (class 1). A query at +x must get class 0 with k=3;
        // a query at +y gets class 1 with k=1 and with k=3 the temperature-weighted vote still picks 1
        // (its own neighbour has weight e^{10} against 2 e^{~1}).
        let bank = features(&[1.0, 0.0, 0.9, 0.1, 0.0, 1.0], 2, &[0, 0, 1]);
        let q = features(&[1.0, 0.05, 0.02, 1.0], 2, &[0, 1]);
        let p1: Vec<i64> = Vec::try_from(&knn_predict(&bank, &q, 1, 0.1, 2, Device::Cpu)).unwrap();
        let p3: Vec<i64> = Vec::try_from(&knn_predict(&bank, &q, 3, 0.1, 2, Device::Cpu)).unwrap();
        assert_eq!(p1, vec![0, 1]);
        assert_eq!(p3, vec![0, 1]);
        // With a huge temperature the vote is a plain majority: two class-0 neighbours win.
        let p3_flat: Vec<i64> = Vec::try_from(&knn_predict(&bank, &q, 3, 1e6, 2, Device::Cpu)).unwrap();
        assert_eq!(p3_flat, vec![0, 0]);
        // A tiny temperature is the 1-NN vote, not an overflow to NaN (exp(1 / 1e-4) is inf in f32).
        for t in [1e-4, 1e-30] {
            let p: Vec<i64> = Vec::try_from(&knn_predict(&bank, &q, 3, t, 2, Device::Cpu)).unwrap();
            assert_eq!(p, vec![0, 1], "T = {t}");
        }
    }

    #[test]
    fn linear_probe_separates_separable_classes() {
        let n = 400;
        let y = Tensor::arange(n, tch::kind::INT64_CPU).remainder(3);
        let centers = Tensor::from_slice(&[3f32, 0., 0., 3., -3., -3.]).view([3, 2]);
        let x = centers.index_select(0, &y) + randn(&mut selfsup_augment::Rng::new(1), &[n, 2]) * 0.5;
        // The probe itself seeds torch's global RNG (o.seed) and draws its init and batch order from it; no other
        // unit test of this crate draws from it, so nothing interleaves (give them all a lock if one ever does).
        let f = Features { x, y, unreadable: 0 };
        let o = ProbeOptions {
            epochs: 10,
            lr: 0.1,
            batch_size: 64,
            weight_decay: 0.0,
            seed: 0,
            device: Device::Cpu,
            progress: false,
            stop_on_signal: false,
        };
        let pred = linear_probe_predict(&f, &f, 3, &o).unwrap();
        let r = ClassReport::new(&pred, &f.y, &[], 3);
        assert!(r.top1 > 0.97, "{r:?}");
    }

    #[test]
    fn report_finds_the_worst_class() {
        let pred = Tensor::from_slice(&[0i64, 0, 1, 0, 2, 2]);
        let truth = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]);
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        let r = ClassReport::new(&pred, &truth, &names, 3);
        assert!((r.top1 - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!((r.worst_class.as_str(), r.worst_accuracy), ("b", 0.5));
        assert_eq!(r.per_class[0], ClassAccuracy { class: "a".into(), accuracy: 1.0, count: 2 });
        // Rows: true class; columns: predicted. The one "b" predicted as "a" is confusion[1][0].
        assert_eq!(r.confusion, vec![vec![2, 0, 0], vec![1, 1, 0], vec![0, 0, 2]]);
    }
}
