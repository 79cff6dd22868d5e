//! The online linear probe of pretraining.

use selfsup_models::Optimizer;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{labels_to_device, optimizer_step};
use crate::Result;

/// A linear classifier trained on the detached backbone features of each training batch (solo-learn's online
/// linear evaluation): a live accuracy curve during pretraining. Its own variables and optimizer, so it is not
/// part of the checkpoint (a resumed run starts a fresh probe) and no gradient reaches the backbone.
pub(super) struct OnlineProbe {
    _vs: VarStore,
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
        Ok(OnlineProbe { _vs: vs, head, opt, lr, hits: Tensor::zeros([], (Kind::Int64, device)), seen: 0 })
    }

    /// One SGD step on `features` (`[N, D]`, detached) and `labels`; counts its accuracy before the step.
    pub(super) fn step(&mut self, features: &Tensor, labels: &[i64]) {
        let y = labels_to_device(labels, features.device());
        // Standardized per batch (a batch norm without parameters, as MAE's linear probe): the raw feature scale
        // drifts while the backbone trains, which a plain linear layer at a fixed lr follows slowly.
        let f = features.detach().to_kind(Kind::Float);
        let f = (&f - f.mean_dim([0i64].as_slice(), true, Kind::Float))
            / f.std_dim([0i64].as_slice(), false, true).clamp_min(1e-6);
        let logits = f.apply(&self.head);
        self.hits += logits.argmax(1, false).eq_tensor(&y).sum(Kind::Int64).detach();
        self.seen += labels.len() as u64;
        let loss = selfsup_models::cross_entropy(&logits, &y, 0.0);
        optimizer_step(&mut self.opt, &loss, 0.0, self.lr);
    }

    /// Accuracy since the last call (reads one number back from the device), `None` when nothing was seen.
    pub(super) fn take_accuracy(&mut self) -> Option<f64> {
        let seen = std::mem::take(&mut self.seen);
        let hits = self.hits.int64_value(&[]);
        let _ = self.hits.zero_();
        (seen > 0).then(|| hits as f64 / seen as f64)
    }
}
