//! Self-supervised objectives. A new objective is one file here, one variant of [`ObjectiveConfig`] and a preset.

mod mae;
mod masking;
mod simclr;
mod simmim;

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

pub use mae::{Mae, MaeConfig};
pub use masking::{
    keep_count, masked_l1, masked_mse, normalize_patches, patch_stats, patchify, random_masking, unpatchify,
    MaskedForward, MaskedImageModel, Masking,
};
pub use simclr::{SimClr, SimClrConfig};
pub use simmim::{SimMim, SimMimConfig};

use crate::backbone::Backbone;
use crate::ModelError;

/// One batch as the objective sees it: every view on the training device.
pub struct Batch {
    /// `views[v]`: `[N, C, H, W]` float, row i of every view from the same sample.
    pub views: Vec<Tensor>,
}

/// What one step produces. The loss stays on the device; the trainer reads it back only every `log_every` steps.
pub struct Step {
    pub loss: Tensor,
    /// Backbone features of the first view, detached, for the online probe: `[N, dim]`.
    pub features: Tensor,
}

pub trait Objective {
    fn loss(&mut self, batch: &Batch, train: bool) -> Step;
    /// Called after each optimizer step with training progress in [0, 1] (EMA targets, temperature schedules).
    fn after_step(&mut self, _progress: f64) {}
    fn backbone(&self) -> &dyn Backbone;
    /// How many views per sample the objective consumes.
    fn num_views(&self) -> usize;
    /// For masked-image objectives: (masked input, reconstruction with the visible patches pasted back), both
    /// [N,C,H,W] in the same (normalized) space as `x`, computed without gradients; None for others.
    fn reconstruct(&mut self, _x: &Tensor) -> Option<(Tensor, Tensor)> {
        None
    }
}

/// The objective, as a tagged enum in the config (`[objective] kind = "simclr"`, `"mae"` or `"simmim"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ObjectiveConfig {
    Simclr(SimClrConfig),
    Mae(MaeConfig),
    Simmim(SimMimConfig),
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig::Simclr(SimClrConfig::default())
    }
}

impl ObjectiveConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            ObjectiveConfig::Simclr(c) => c.validate(),
            ObjectiveConfig::Mae(c) => c.validate(),
            ObjectiveConfig::Simmim(c) => c.validate(),
        }
    }

    /// Builds the objective's heads under `root` around an already built backbone.
    pub fn build(&self, root: &nn::Path, backbone: Box<dyn Backbone>) -> Result<Box<dyn Objective>, ModelError> {
        self.validate()?;
        Ok(match self {
            ObjectiveConfig::Simclr(c) => Box::new(SimClr::new(root, backbone, c)),
            ObjectiveConfig::Mae(c) => Box::new(Mae::new(root, backbone, c)?),
            ObjectiveConfig::Simmim(c) => Box::new(SimMim::new(root, backbone, c)?),
        })
    }

    pub fn num_views(&self) -> usize {
        match self {
            ObjectiveConfig::Simclr(_) => 2,
            ObjectiveConfig::Mae(_) | ObjectiveConfig::Simmim(_) => 1,
        }
    }
}
