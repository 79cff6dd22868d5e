//! VICReg, Variance-Invariance-Covariance Regularization (Bardes, Ponce, LeCun 2022,
//! https://arxiv.org/abs/2105.04906): the two views' embeddings agree (invariance: MSE), every dimension keeps a
//! standard deviation of at least 1 over the batch (variance: hinge), and dimensions decorrelate (covariance:
//! squared off-diagonal covariances). No teacher, no negatives, no normalization tricks.

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use super::siamese::Network;
use super::{Batch, Objective, Step};
use crate::backbone::{Backbone, BackboneConfig};
use crate::head::{Mlp, MlpSpec};
use crate::loss::vicreg;
use crate::{invalid, ModelError};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VicregConfig {
    pub proj_layers: usize,
    pub proj_hidden: i64,
    pub proj_dim: i64,
    /// Weights of the invariance, variance and covariance terms (the paper: 25, 25, 1).
    pub sim_coeff: f64,
    pub std_coeff: f64,
    pub cov_coeff: f64,
}

impl Default for VicregConfig {
    fn default() -> Self {
        // solo-learn's CIFAR recipe.
        VicregConfig {
            proj_layers: 3,
            proj_hidden: 2048,
            proj_dim: 2048,
            sim_coeff: 25.0,
            std_coeff: 25.0,
            cov_coeff: 1.0,
        }
    }
}

impl VicregConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.proj_layers < 1 || self.proj_hidden < 1 || self.proj_dim < 1 {
            return Err(invalid("objective.proj_layers/proj_hidden/proj_dim", "must be >= 1"));
        }
        for (field, v) in [("sim_coeff", self.sim_coeff), ("std_coeff", self.std_coeff), ("cov_coeff", self.cov_coeff)]
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(&format!("objective.{field}"), format!("must be >= 0, got {v}")));
            }
        }
        Ok(())
    }
}

/// VICReg: `backbone.` and `projector.` (the expander, 3 layers by default).
pub struct Vicreg {
    net: Network<Mlp>,
    coeffs: (f64, f64, f64),
}

impl Vicreg {
    pub fn new(
        vs: &VarStore,
        backbone: &BackboneConfig,
        in_channels: i64,
        cfg: &VicregConfig,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let spec = |dim| MlpSpec { layers: cfg.proj_layers, ..MlpSpec::projector(dim, cfg.proj_hidden, cfg.proj_dim) };
        let net = Network::build(&vs.root(), backbone, in_channels, "projector", |p, dim| Mlp::new(p, spec(dim)))?;
        Ok(Vicreg { net, coeffs: (cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff) })
    }
}

impl Objective for Vicreg {
    /// # Shapes
    /// `batch.views`: two `[N, C, H, W]` → loss scalar, features `[N, dim]`, embedding `[N, proj_dim]`.
    fn loss(&mut self, batch: &Batch, train: bool) -> Step {
        let out = self.net.forward(&batch.views[..2], train);
        let (sim, std, cov) = self.coeffs;
        // Over the global batch (every rank's embeddings, gathered with their gradient): variances and covariances
        // are one process's. fp32 outside autocast.
        let (z1, z2) = (batch.dist.gather(&out.outputs[0]), batch.dist.gather(&out.outputs[1]));
        let l = crate::device::autocast(false, || vicreg(&z1, &z2, sim, std, cov));
        Step { loss: l.total, features: out.features[0].detach(), embedding: out.outputs[0].detach(), terms: l.terms }
    }

    fn backbone(&self) -> &dyn Backbone {
        self.net.backbone.as_ref()
    }

    fn num_views(&self) -> usize {
        2
    }
}
