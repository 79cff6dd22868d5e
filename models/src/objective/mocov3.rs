//! MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
//! https://arxiv.org/abs/2104.02057): a query encoder (backbone, projector, predictor) and a momentum key encoder
//! (EMA of backbone and projector); the symmetric InfoNCE of each view's query against the other view's keys,
//! the other samples of the batch as negatives, scaled by 2T as the official code. For ResNets and ViTs alike.

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT, VarStore};
use tch::Tensor;

use super::siamese::{Momentum, WithTeacher};
use super::{Batch, Objective, Step};
use crate::backbone::{Backbone, BackboneConfig};
use crate::head::{Mlp, MlpSpec};
use crate::loss::infonce;
use crate::teacher::validate_momentum;
use crate::{invalid, ModelError, TrainProgress};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MocoV3Config {
    pub temperature: f64,
    /// Linear layers of the projector (the paper: 2 for ResNets, 3 for ViTs), each hidden one with BN + ReLU,
    /// the last followed by an affine-free BN.
    pub proj_layers: usize,
    pub proj_hidden: i64,
    pub proj_dim: i64,
    pub pred_hidden: i64,
    pub momentum: f64,
    pub momentum_end: f64,
}

impl Default for MocoV3Config {
    fn default() -> Self {
        // solo-learn's CIFAR recipe.
        MocoV3Config {
            temperature: 0.2,
            proj_layers: 2,
            proj_hidden: 4096,
            proj_dim: 256,
            pred_hidden: 4096,
            momentum: 0.99,
            momentum_end: 1.0,
        }
    }
}

impl MocoV3Config {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(invalid("objective.temperature", format!("must be > 0, got {}", self.temperature)));
        }
        if self.proj_layers < 1 {
            return Err(invalid("objective.proj_layers", "must be >= 1"));
        }
        for (field, v) in
            [("proj_hidden", self.proj_hidden), ("proj_dim", self.proj_dim), ("pred_hidden", self.pred_hidden)]
        {
            if v < 1 {
                return Err(invalid(&format!("objective.{field}"), format!("must be >= 1, got {v}")));
            }
        }
        validate_momentum(self.momentum, self.momentum_end)
    }
}

/// MoCo v3: `backbone.`, `projector.`, `predictor.` (2 layers, BN, no last BN), and the momentum encoder under
/// `teacher.backbone.` / `teacher.projector.`.
pub struct MocoV3 {
    net: WithTeacher<Mlp>,
    predictor: Mlp,
    temperature: f64,
}

impl MocoV3 {
    pub fn new(
        vs: &VarStore,
        backbone: &BackboneConfig,
        in_channels: i64,
        cfg: &MocoV3Config,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let spec = |input| MlpSpec {
            layers: cfg.proj_layers,
            last_bn: true,
            ..MlpSpec::projector(input, cfg.proj_hidden, cfg.proj_dim)
        };
        let projector = |p: nn::Path, dim: i64| Mlp::new(p, spec(dim));
        let momentum = Momentum { start: cfg.momentum, end: cfg.momentum_end };
        let net = WithTeacher::build(vs, backbone, in_channels, "projector", projector, momentum)?;
        let predictor =
            Mlp::new(vs.root() / "predictor", MlpSpec::projector(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim));
        Ok(MocoV3 { net, predictor, temperature: cfg.temperature })
    }
}

impl Objective for MocoV3 {
    /// # Shapes
    /// `batch.views`: two `[N, C, H, W]` → loss scalar, features `[N, dim]`, embedding `[N, proj_dim]`.
    fn loss(&mut self, batch: &Batch, train: bool) -> Step {
        let views = &batch.views[..2];
        let online = self.net.student.forward(views, train);
        let q: Vec<Tensor> = online.outputs.iter().map(|z| self.predictor.forward_t(z, train)).collect();
        let k = self.net.teacher_forward(views, train).outputs;
        let t = self.temperature;
        // Keys (and queries) from the global batch: every rank's, gathered (queries with their gradient), so the
        // loss is one process's on the whole batch. fp32 outside autocast: logits divided by a small temperature.
        let d = &batch.dist;
        let (q, k): (Vec<Tensor>, Vec<Tensor>) =
            (q.iter().map(|x| d.gather(x)).collect(), k.iter().map(|x| d.gather(x)).collect());
        let loss = crate::device::autocast(false, || infonce(&q[0], &k[1], t) + infonce(&q[1], &k[0], t));
        let embedding =
            q[0].narrow(0, d.rank() as i64 * online.features[0].size()[0], online.features[0].size()[0]).detach();
        let terms = vec![("infonce", loss.detach())];
        Step { loss, features: online.features[0].detach(), embedding, terms }
    }

    fn after_step(&mut self, progress: &TrainProgress) {
        self.net.after_step(progress);
    }

    fn schedule_values(&self) -> Vec<(&'static str, f64)> {
        vec![("teacher_momentum", self.net.ema.last_momentum())]
    }

    fn backbone(&self) -> &dyn Backbone {
        self.net.student.backbone.as_ref()
    }

    fn teacher_backbone(&self) -> Option<&dyn Backbone> {
        Some(self.net.teacher.backbone.as_ref())
    }

    fn num_views(&self) -> usize {
        2
    }
}
