//! SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709): two augmented views of each image, a shared
//! backbone and projection head, and the NT-Xent loss pulling the views together against the rest of the batch.

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::{Batch, Objective, Step};
use crate::backbone::Backbone;
use crate::head::{Mlp, MlpSpec};
use crate::loss::nt_xent;
use crate::{invalid, ModelError};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimClrConfig {
    pub temperature: f64,
    pub proj_hidden: i64,
    pub proj_dim: i64,
}

impl Default for SimClrConfig {
    fn default() -> Self {
        SimClrConfig { temperature: 0.2, proj_hidden: 2048, proj_dim: 128 }
    }
}

impl SimClrConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(invalid("objective.temperature", format!("must be > 0, got {}", self.temperature)));
        }
        if self.proj_hidden < 1 || self.proj_dim < 1 {
            return Err(invalid("objective.proj_hidden/proj_dim", "must be >= 1"));
        }
        Ok(())
    }
}

pub struct SimClr {
    backbone: Box<dyn Backbone>,
    projector: Mlp,
    temperature: f64,
}

impl SimClr {
    pub fn new(root: &nn::Path, backbone: Box<dyn Backbone>, cfg: &SimClrConfig) -> Self {
        let projector = Mlp::new(root / "projector", MlpSpec::simclr(backbone.dim(), cfg.proj_hidden, cfg.proj_dim));
        SimClr { backbone, projector, temperature: cfg.temperature }
    }
}

impl Objective for SimClr {
    /// # Shapes
    /// `batch.views`: two `[N, C, H, W]` → loss scalar, features `[N, dim]`.
    fn loss(&mut self, batch: &Batch, train: bool) -> Step {
        let n = batch.views[0].size()[0];
        // One forward over both views: batch-norm statistics then cover the 2N images, as in the reference.
        let x = Tensor::cat(&batch.views[..2], 0);
        let h = self.backbone.features(&x, train);
        let z = self.projector.forward_t(&h, train);
        // Negatives from the global batch: every rank's embeddings (gathered with their gradient), the same loss
        // as one process on the whole batch. Outside autocast: under it the similarity matmul would run in bf16
        // despite the fp32 inputs.
        let (z1, z2) = (batch.dist.gather(&z.narrow(0, 0, n)), batch.dist.gather(&z.narrow(0, n, n)));
        let loss = crate::device::autocast(false, || nt_xent(&z1, &z2, self.temperature));
        let terms = vec![("nt_xent", loss.detach())];
        Step { loss, features: h.narrow(0, 0, n).detach(), embedding: z.narrow(0, 0, n).detach(), terms }
    }

    fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    fn num_views(&self) -> usize {
        2
    }
}
