//! BYOL, Bootstrap Your Own Latent (Grill et al. 2020, https://arxiv.org/abs/2006.07733): an online network
//! (backbone, projector, predictor) predicts the projection of the other view made by a momentum teacher (the
//! target network: EMA of the online backbone and projector, no gradients); the loss is the symmetrized normalized
//! MSE `2 - 2 cos(p, z')`. No negatives: the predictor and the EMA keep it from collapsing.

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT, VarStore};
use tch::Tensor;

use super::siamese::{Momentum, WithTeacher};
use super::{Batch, Objective, Step};
use crate::backbone::{Backbone, BackboneConfig};
use crate::head::{Mlp, MlpSpec};
use crate::loss::byol_loss;
use crate::teacher::validate_momentum;
use crate::{invalid, ModelError, TrainProgress};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ByolConfig {
    pub proj_hidden: i64,
    pub proj_dim: i64,
    pub pred_hidden: i64,
    /// EMA momentum of the target network at the start of training (BYOL's tau_base) ...
    pub momentum: f64,
    /// ... and at the end, on a cosine schedule.
    pub momentum_end: f64,
}

impl Default for ByolConfig {
    fn default() -> Self {
        // solo-learn's CIFAR recipe (the paper's ImageNet one: 4096 / 256 / 4096, tau 0.996).
        ByolConfig { proj_hidden: 4096, proj_dim: 256, pred_hidden: 4096, momentum: 0.99, momentum_end: 1.0 }
    }
}

impl ByolConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
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

/// BYOL: `backbone.`, `projector.` (`Linear → BN → ReLU → Linear`), `predictor.` (same shape), and the target
/// network under `teacher.backbone.` / `teacher.projector.`.
pub struct Byol {
    net: WithTeacher<Mlp>,
    predictor: Mlp,
}

impl Byol {
    pub fn new(
        vs: &VarStore,
        backbone: &BackboneConfig,
        in_channels: i64,
        cfg: &ByolConfig,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let projector = |p: nn::Path, dim: i64| Mlp::new(p, MlpSpec::projector(dim, cfg.proj_hidden, cfg.proj_dim));
        let momentum = Momentum { start: cfg.momentum, end: cfg.momentum_end };
        let net = WithTeacher::build(vs, backbone, in_channels, "projector", projector, momentum)?;
        let predictor =
            Mlp::new(vs.root() / "predictor", MlpSpec::projector(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim));
        Ok(Byol { net, predictor })
    }
}

impl Objective for Byol {
    /// # Shapes
    /// `batch.views`: two `[N, C, H, W]` → loss scalar, features `[N, dim]`, embedding `[N, proj_dim]`.
    fn loss(&mut self, batch: &Batch, train: bool) -> Step {
        let views = &batch.views[..2];
        let online = self.net.student.forward(views, train);
        let p: Vec<Tensor> = online.outputs.iter().map(|z| self.predictor.forward_t(z, train)).collect();
        let target = self.net.teacher_forward(views, train);
        // fp32 outside autocast: cosines of bf16 vectors lose the small differences the loss is made of.
        let loss = crate::device::autocast(false, || {
            byol_loss(&p[0], &target.outputs[1]) + byol_loss(&p[1], &target.outputs[0])
        });
        let terms = vec![("normalized_mse", loss.detach())];
        Step { loss, features: online.features[0].detach(), embedding: online.outputs[0].detach(), terms }
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
