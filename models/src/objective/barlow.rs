//! Barlow Twins (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230): the cross-correlation matrix of the two
//! views' batch-normalized embeddings is pushed to the identity, so the views agree (diagonal 1) while the
//! embedding dimensions decorrelate (off-diagonal 0, weighted by lambda). No teacher, no negatives.

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use super::siamese::Network;
use super::{Batch, Objective, Step};
use crate::backbone::{Backbone, BackboneConfig};
use crate::head::{Mlp, MlpSpec};
use crate::loss::barlow_twins;
use crate::{invalid, ModelError};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BarlowConfig {
    /// Linear layers of the projector (the paper: 3), the hidden ones with BN + ReLU.
    pub proj_layers: usize,
    pub proj_hidden: i64,
    pub proj_dim: i64,
    /// Weight of the off-diagonal (redundancy reduction) term.
    pub lambda: f64,
    /// Multiplies the whole loss (solo-learn's `scale_loss`; with LARS it sets the effective step size).
    pub scale_loss: f64,
}

impl Default for BarlowConfig {
    fn default() -> Self {
        // solo-learn's CIFAR recipe.
        BarlowConfig { proj_layers: 3, proj_hidden: 2048, proj_dim: 2048, lambda: 0.0051, scale_loss: 0.1 }
    }
}

impl BarlowConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.proj_layers < 1 || self.proj_hidden < 1 || self.proj_dim < 1 {
            return Err(invalid("objective.proj_layers/proj_hidden/proj_dim", "must be >= 1"));
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(invalid("objective.lambda", format!("must be >= 0, got {}", self.lambda)));
        }
        if !(self.scale_loss > 0.0 && self.scale_loss.is_finite()) {
            return Err(invalid("objective.scale_loss", format!("must be > 0, got {}", self.scale_loss)));
        }
        Ok(())
    }
}

/// Barlow Twins: `backbone.` and `projector.` (3 layers by default).
pub struct Barlow {
    net: Network<Mlp>,
    lambda: f64,
    scale: f64,
}

impl Barlow {
    pub fn new(
        vs: &VarStore,
        backbone: &BackboneConfig,
        in_channels: i64,
        cfg: &BarlowConfig,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let spec = |dim| MlpSpec { layers: cfg.proj_layers, ..MlpSpec::projector(dim, cfg.proj_hidden, cfg.proj_dim) };
        let net = Network::build(&vs.root(), backbone, in_channels, "projector", |p, dim| Mlp::new(p, spec(dim)))?;
        Ok(Barlow { net, lambda: cfg.lambda, scale: cfg.scale_loss })
    }
}

impl Objective for Barlow {
    /// # Shapes
    /// `batch.views`: two `[N, C, H, W]` → loss scalar, features `[N, dim]`, embedding `[N, proj_dim]`.
    fn loss(&mut self, batch: &Batch, train: bool) -> Step {
        let out = self.net.forward(&batch.views[..2], train);
        // Over the global batch (every rank's embeddings, gathered with their gradient): the batch statistics and
        // the correlation are one process's. fp32 outside autocast: a D x D correlation of standardized columns.
        let (z1, z2) = (batch.dist.gather(&out.outputs[0]), batch.dist.gather(&out.outputs[1]));
        let l = crate::device::autocast(false, || barlow_twins(&z1, &z2, self.lambda));
        Step {
            loss: l.total * self.scale,
            features: out.features[0].detach(),
            embedding: out.outputs[0].detach(),
            terms: l.terms,
        }
    }

    fn backbone(&self) -> &dyn Backbone {
        self.net.backbone.as_ref()
    }

    fn num_views(&self) -> usize {
        2
    }
}
