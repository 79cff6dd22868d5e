//! The online linear probe of pretraining.

use selfsup_models::Optimizer;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::optimizer_step;
use crate::Result;

/// A linear classifier trained on the detached backbone features of each training batch (solo-learn's online
/// linear evaluation): a live accuracy curve during pretraining. Its own variables and optimizer (so no gradient
/// reaches the backbone), saved in checkpoints as `probe.safetensors`, so a resumed run continues the same probe.
pub(super) struct OnlineProbe {
    vs: VarStore,
    head: tch::nn::Linear,
    opt: Optimizer,
    lr: f64,
    /// Correct predictions and images since the last log, on the device.
    hits: Tensor,
    seen: u64,
}

impl OnlineProbe {
    pub(super) fn new(dim: i64, classes: i64, lr: f64, device: Device) -> Result<Self> {
        let vs = VarStore::new(device);
        let head = selfsup_models::linear(vs.root() / "online_probe", dim, classes);
        let cfg = selfsup_models::OptimizerConfig {
            kind: selfsup_models::OptimizerKind::Sgd,
            base_lr: lr,
            momentum: 0.9,
            weight_decay: 0.0,
            ..Default::default()
        };
        let opt = Optimizer::new(&vs, &cfg)?;
        Ok(OnlineProbe { vs, head, opt, lr, hits: Tensor::zeros([], (Kind::Int64, device)), seen: 0 })
    }

    /// One SGD step on `features` (`[N, D]`, detached) and `labels`; counts its accuracy before the step.
    /// One SGD step on `features` (`[N, D]`) and their labels `y` (`[N]` int64 on the same device).
    pub(super) fn step(&mut self, features: &Tensor, y: &Tensor) {
        // Standardized per batch (a batch norm without parameters, as MAE's linear probe): the raw feature scale
        // drifts while the backbone trains, which a plain linear layer at a fixed lr follows slowly.
        let f = features.detach().to_kind(Kind::Float);
        let f = (&f - f.mean_dim([0i64].as_slice(), true, Kind::Float))
            / f.std_dim([0i64].as_slice(), false, true).clamp_min(1e-6);
        let logits = f.apply(&self.head);
        self.hits += logits.argmax(1, false).eq_tensor(y).sum(Kind::Int64).detach();
        self.seen += y.size()[0] as u64;
        let loss = selfsup_models::cross_entropy(&logits, y, 0.0);
        optimizer_step(&mut self.opt, &loss, 0.0, self.lr);
    }

    /// Weights (`online_probe.*`) and optimizer state (`optimizer.*`), for checkpoints.
    pub(super) fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(self.opt.state().into_iter().map(|(k, t)| (format!("optimizer.{k}"), t)));
        out
    }

    /// Restores [`OnlineProbe::state`]; every tensor must be there with its shape.
    pub(super) fn load_state(&mut self, saved: &[(String, Tensor)]) -> Result<()> {
        let bad = |m: String| crate::Error::Other(format!("checkpoint probe.safetensors: {m}"));
        let mut opt = Vec::new();
        let mut copies = Vec::new();
        for (name, var) in self.vs.variables() {
            let src =
                saved.iter().find(|(n, _)| *n == name).map(|(_, t)| t).ok_or_else(|| bad(format!("no {name}")))?;
            if src.size() != var.size() {
                return Err(bad(format!("{name}: shape {:?} != {:?}", src.size(), var.size())));
            }
            copies.push((var, src));
        }
        for (name, t) in saved {
            if let Some(k) = name.strip_prefix("optimizer.") {
                opt.push((k.to_string(), t.shallow_clone()));
            }
        }
        self.opt.load_state(&opt)?;
        tch::no_grad(|| {
            for (mut var, src) in copies {
                var.copy_(src);
            }
        });
        Ok(())
    }

    /// Correct predictions and images since the last log point (one read from the device), for checkpoints.
    pub(super) fn counts(&self) -> (i64, u64) {
        (self.hits.int64_value(&[]), self.seen)
    }

    pub(super) fn restore_counts(&mut self, hits: i64, seen: u64) {
        let _ = self.hits.fill_(hits);
        self.seen = seen;
    }

    /// Accuracy since the last call (reads one number back from the device), `None` when nothing was seen.
    pub(super) fn take_accuracy(&mut self) -> Option<f64> {
        let seen = std::mem::take(&mut self.seen);
        let hits = self.hits.int64_value(&[]);
        let _ = self.hits.zero_();
        (seen > 0).then(|| hits as f64 / seen as f64)
    }
}
