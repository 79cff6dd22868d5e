//! What the trainer accumulates between two log points, on the device, and reads back in one sync: the mean loss
//! and loss terms of the window, and the collapse monitor on the window's last embeddings.

use selfsup_models::Step;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::WindowState;
use selfsup_models::dist::{Dist, DistError};

/// The spread of embeddings: the per-dimension std of the l2-normalized rows, averaged over dimensions, times
/// sqrt(D) (about 1 for embeddings spread over the sphere, 0 for collapsed ones; lightly's
/// `std_of_l2_normalized` without its 1/sqrt(D) scale), and the effective rank of the batch (RankMe, Garrido
/// et al. 2023, https://arxiv.org/abs/2210.02885: exp of the entropy of the normalized singular values, from 1 for
/// a rank-1 batch to min(N, D)). Computed in fp32 on the embeddings' device; nothing is read back.
///
/// # Shapes
/// `embedding`: `[N, D]` with N >= 2 → `[2]` fp32 (std, effective rank).
pub fn collapse_metrics(embedding: &Tensor) -> Tensor {
    tch::no_grad(|| {
        // A non-finite embedding (a NaN step) gives NaN metrics, decided on the device: the eigensolver would fail
        // on it, so it sees zeros instead.
        let e = embedding.detach().to_kind(Kind::Float);
        let finite = e.isfinite().all();
        let e = e.where_self(&finite, &e.zeros_like());
        let d = e.size()[1] as f64;
        let z = &e / e.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
        let std = z.std_dim([0i64].as_slice(), true, false).mean(Kind::Float) * d.sqrt();
        // Singular values from the eigenvalues of the smaller Gram matrix (tch's svdvals always passes a driver,
        // which the CPU refuses).
        let (n, dims) = (e.size()[0], e.size()[1]);
        let gram = if n < dims { e.matmul(&e.tr()) } else { e.tr().matmul(&e) };
        let s = Tensor::linalg_eigvalsh(&gram, "L").clamp_min(0.0).sqrt();
        let p = &s / s.sum(Kind::Float).clamp_min(1e-12) + 1e-7;
        let rank = (-(&p * p.log()).sum(Kind::Float)).exp();
        let metrics = Tensor::stack(&[std, rank], 0);
        metrics.where_self(&finite, &metrics.full_like(f64::NAN))
    })
}

/// Values read back at a log point.
#[derive(Clone, Debug, Default)]
pub(super) struct Readout {
    pub loss: f64,
    pub terms: Vec<(&'static str, f64)>,
    /// The mean gradient norm before clipping (`train/grad_norm`).
    pub grad_norm: f64,
    /// `train/embedding_std`, `train/effective_rank` of the window's last step.
    pub collapse: Option<(f64, f64)>,
    /// The first step of the window whose loss or gradient norm was not finite, if any.
    pub first_nonfinite: Option<u64>,
}

/// Sums since the last log point, on the device.
pub(super) struct Window {
    device: Device,
    loss: Tensor,
    terms: Vec<(&'static str, Tensor)>,
    grad_norm: Tensor,
    embedding: Option<Tensor>,
    pub steps: u64,
    /// The first step with a non-finite loss or gradient norm (-1: none yet), 0-dim int64 on the device.
    first_bad: Tensor,
    /// Sums restored from a checkpoint for terms not yet seen in this process.
    pending: Vec<(String, f32)>,
}

/// The host-side counters of a log window: images trained on, seconds blocked on the loader, and seconds in the
/// loop in all (steps only: checkpoints and k-NN between epochs are not counted).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Clock {
    pub images: u64,
    pub wait: f64,
    pub time: f64,
}

impl Window {
    pub fn new(device: Device) -> Self {
        Window {
            device,
            loss: Tensor::zeros([], (Kind::Float, device)),
            terms: Vec::new(),
            grad_norm: Tensor::zeros([], (Kind::Float, device)),
            embedding: None,
            steps: 0,
            first_bad: Tensor::full([], -1, (Kind::Int64, device)),
            pending: Vec::new(),
        }
    }

    /// Adds one step's loss, terms and gradient norm (device additions only) and keeps its embedding for the
    /// monitor. `ok` (a 0-dim bool on the device: the loss and gradient norm were finite) marks step
    /// `global_step` as the window's first non-finite one if it is, without a sync.
    pub fn add(&mut self, step: &Step, grad_norm: &Tensor, ok: &Tensor, global_step: u64) {
        self.loss += step.loss.detach().to_kind(Kind::Float);
        self.grad_norm += grad_norm.detach().to_kind(Kind::Float);
        for (name, t) in &step.terms {
            let t = t.detach().to_kind(Kind::Float);
            match self.terms.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum += t,
                None => {
                    let restored = self.pending.iter().position(|(n, _)| n == name).map(|i| self.pending.remove(i));
                    let sum = match restored {
                        Some((_, v)) => Tensor::from(v).to_device(self.device) + t,
                        None => t,
                    };
                    self.terms.push((name, sum))
                }
            }
        }
        self.embedding = Some(step.embedding.shallow_clone());
        self.steps += 1;
        let first_bad_here = ok.logical_not().logical_and(&self.first_bad.lt(0));
        let here = Tensor::full([], global_step as i64, (Kind::Int64, self.device));
        self.first_bad = self.first_bad.where_self(&first_bad_here.logical_not(), &here);
    }

    /// The first non-finite step since the last log point, if any (one read from the device).
    /// Over a process group: the window's loss and terms become their mean over the ranks (each rank's loss is
    /// the mean over its slice of the batch), and the last embeddings every rank's rows (so the collapse monitor
    /// sees the global batch). Idempotent; a no-op in one process.
    pub fn reduce(&mut self, dist: &Dist) -> Result<(), DistError> {
        if dist.world() <= 1 {
            return Ok(());
        }
        let mut parts = vec![self.loss.reshape([1]), self.grad_norm.reshape([1])];
        parts.extend(self.terms.iter().map(|(_, t)| t.reshape([1])));
        let mut flat = Tensor::cat(&parts, 0).to_kind(Kind::Float);
        dist.all_reduce_sum(&mut flat)?;
        let flat = flat / dist.world() as f64;
        self.loss = flat.get(0);
        self.grad_norm = flat.get(1);
        for (i, (_, t)) in self.terms.iter_mut().enumerate() {
            *t = flat.get(i as i64 + 2);
        }
        if let Some(e) = &self.embedding {
            self.embedding = Some(dist.all_gather(e)?);
        }
        Ok(())
    }

    pub fn first_nonfinite(&self) -> Option<u64> {
        u64::try_from(self.first_bad.int64_value(&[])).ok()
    }

    /// The window's sums as a checkpoint keeps them (one read from the device).
    pub fn snapshot(&self, images: u64) -> WindowState {
        let f = |t: &Tensor| t.to_kind(Kind::Float).double_value(&[]) as f32;
        let mut terms: Vec<(String, f32)> = self.terms.iter().map(|(n, t)| (n.to_string(), f(t))).collect();
        terms.extend(self.pending.iter().cloned());
        WindowState {
            steps: self.steps,
            images,
            loss: f(&self.loss),
            terms,
            grad_norm: f(&self.grad_norm),
            ..Default::default()
        }
    }

    /// Continues the window saved by [`Window::snapshot`].
    pub fn restore(&mut self, saved: &WindowState) {
        *self = Window::new(self.device);
        self.loss = Tensor::from(saved.loss).to_device(self.device);
        self.grad_norm = Tensor::from(saved.grad_norm).to_device(self.device);
        self.steps = saved.steps;
        self.pending = saved.terms.clone();
    }

    /// Means over the window, and the collapse metrics of its last embedding, in one read from the device; then
    /// starts a new window.
    pub fn read(&mut self) -> Readout {
        let mut values =
            vec![self.first_bad.shallow_clone(), self.loss.shallow_clone(), self.grad_norm.shallow_clone()];
        values.extend(self.terms.iter().map(|(_, t)| t.shallow_clone()));
        let monitored = self.embedding.as_ref().filter(|e| e.dim() == 2 && e.size()[0] >= 2);
        if let Some(e) = monitored {
            values.push(collapse_metrics(e).to_device(self.device));
        }
        let flat = Tensor::cat(&values.iter().map(|t| t.reshape([-1]).to_kind(Kind::Double)).collect::<Vec<_>>(), 0);
        // The one deliberate sync point of the loop.
        let host: Vec<f64> = Vec::try_from(flat.to_kind(Kind::Double)).expect("a flat tensor of numbers");
        let n = self.steps.max(1) as f64;
        let readout = Readout {
            loss: host[1] / n,
            grad_norm: host[2] / n,
            terms: self.terms.iter().zip(&host[3..]).map(|((name, _), v)| (*name, v / n)).collect(),
            collapse: monitored.map(|_| (host[host.len() - 2], host[host.len() - 1])),
            first_nonfinite: (host[0] >= 0.0).then_some(host[0] as u64),
        };
        let device = self.device;
        *self = Window::new(device);
        readout
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

    #[test]
    fn collapse_metrics_tell_spread_from_collapse() {
        let mut rng = selfsup_augment::Rng::new(3);
        let spread = randn(&mut rng, &[512, 32]);
        let v: Vec<f64> = Vec::try_from(collapse_metrics(&spread).to_kind(Kind::Double)).unwrap();
        assert!((v[0] - 1.0).abs() < 0.05, "isotropic gaussian rows: std x sqrt(D) ~ 1, got {}", v[0]);
        assert!(v[1] > 25.0 && v[1] <= 32.0, "effective rank near D = 32, got {}", v[1]);
        // Every row the same direction (up to scale): collapsed.
        let dir = randn(&mut rng, &[1, 32]);
        let scale: Vec<f32> = (0..512).map(|_| rng.uniform()).collect();
        let collapsed = Tensor::from_slice(&scale).view([512, 1]) * dir + 1e-4;
        let v: Vec<f64> = Vec::try_from(collapse_metrics(&collapsed).to_kind(Kind::Double)).unwrap();
        assert!(v[0] < 0.01, "collapsed std {}", v[0]);
        assert!(v[1] < 1.1, "collapsed rank {}", v[1]);
        // Rank 4 of 32: dimensional collapse shows in the rank.
        let low = randn(&mut rng, &[512, 4]).matmul(&randn(&mut rng, &[4, 32]));
        let v: Vec<f64> = Vec::try_from(collapse_metrics(&low).to_kind(Kind::Double)).unwrap();
        assert!(v[1] > 2.5 && v[1] < 4.01, "rank-4 batch: effective rank {}", v[1]);
        // A NaN anywhere (a non-finite step): NaN metrics, no eigensolver failure.
        let _ = low.get(3).get(5).fill_(f64::NAN);
        let v: Vec<f64> = Vec::try_from(collapse_metrics(&low).to_kind(Kind::Double)).unwrap();
        assert!(v[0].is_nan() && v[1].is_nan(), "{v:?}");
    }

    #[test]
    fn window_means_terms_and_reads_once() {
        let mut w = Window::new(Device::Cpu);
        for (l, a) in [(1.0, 10.0), (3.0, 20.0)] {
            let step = Step {
                loss: Tensor::from(l as f32),
                features: Tensor::zeros([2, 2], tch::kind::FLOAT_CPU),
                embedding: Tensor::from_slice(&[1f32, 0., 0., 1.]).view([2, 2]),
                terms: vec![("a", Tensor::from(a as f32)), ("b", Tensor::from(1f32))],
            };
            w.add(&step, &Tensor::from(2f32 * l as f32), &Tensor::from(true), 0);
        }
        assert_eq!(w.steps, 2);
        let r = w.read();
        assert_eq!(r.loss, 2.0);
        assert_eq!(r.terms, vec![("a", 15.0), ("b", 1.0)]);
        assert_eq!(r.grad_norm, 4.0);
        let (std, rank) = r.collapse.unwrap();
        assert!((std - 1.0).abs() < 1e-5 && (rank - 2.0).abs() < 1e-4, "{std} {rank}");
        assert_eq!(w.steps, 0, "a new window starts");
    }
}
