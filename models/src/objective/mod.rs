//! Self-supervised objectives. A new objective is one file here, one variant of [`ObjectiveConfig`] and a preset.

mod barlow;
mod byol;
mod dino;
mod mae;
mod masking;
mod mocov3;
mod siamese;
mod simclr;
mod simmim;
mod vicreg;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use crate::dist::Dist;

pub use barlow::{Barlow, BarlowConfig};
pub use byol::{Byol, ByolConfig};
pub use dino::{Dino, DinoConfig, DinoHead};
pub use mae::{Mae, MaeConfig};
pub use masking::{
    keep_count, masked_l1, masked_mse, masking_from_noise, normalize_patches, patch_stats, patchify, random_masking,
    unpatchify, MaskedForward, MaskedImageModel, Masking,
};
pub use mocov3::{MocoV3, MocoV3Config};
pub use siamese::{Momentum, Network, ViewOutputs, WithTeacher};
pub use simclr::{SimClr, SimClrConfig};
pub use simmim::{SimMim, SimMimConfig};
pub use vicreg::{Vicreg, VicregConfig};

use crate::backbone::{Backbone, BackboneConfig};
use crate::ModelError;

/// Where training stands, for the schedules that live in objectives (EMA momentum, DINO's teacher temperature,
/// last-layer freezing). Derived from the trainer's step counter, so a resumed run is positioned exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainProgress {
    /// Optimizer steps taken before the current one (0 during the first step).
    pub step: u64,
    pub steps_per_epoch: u64,
    /// Steps of the whole schedule (`train.epochs` x steps per epoch; `train.max_steps` cuts a run short without
    /// changing its schedules).
    pub total_steps: u64,
}

impl TrainProgress {
    /// `step / total_steps` in [0, 1] (0 when there is no schedule, e.g. in unit tests).
    pub fn fraction(&self) -> f64 {
        if self.total_steps == 0 {
            return 0.0;
        }
        (self.step as f64 / self.total_steps as f64).min(1.0)
    }

    /// Epochs completed, fractional.
    pub fn epoch(&self) -> f64 {
        self.step as f64 / self.steps_per_epoch.max(1) as f64
    }
}

/// One batch as the objective sees it: every view on the training device.
pub struct Batch {
    /// `views[v]`: `[N, C, H_v, W_v]` float, row i of every view from the same sample. Views may differ in size
    /// (multi-crop): consecutive views of one size form a group that objectives forward at once
    /// ([`size_groups`]).
    pub views: Vec<Tensor>,
    pub progress: TrainProgress,
    /// The process group: these rows are this rank's slice of the global batch. Objectives whose loss needs the
    /// whole batch gather through it ([`Dist::gather`]); per-sample randomness is drawn for the global batch and
    /// sliced ([`Dist::rand_rows`]), so it does not depend on the number of ranks. A no-op in one process.
    pub dist: Arc<Dist>,
}

impl Batch {
    /// A batch at the start of training (progress 0) in one process: tests and one-off forwards.
    pub fn new(views: Vec<Tensor>) -> Self {
        Batch { views, progress: TrainProgress::default(), dist: Dist::alone() }
    }
}

/// What one step produces. Everything stays on the device; the trainer reads values back only every `log_every`
/// steps.
pub struct Step {
    /// The scalar that is backpropagated.
    pub loss: Tensor,
    /// Backbone features of the first view, detached, for the online probe: `[N, dim]`.
    pub features: Tensor,
    /// The embeddings of the first view that the loss compares (projector / predictor outputs; backbone
    /// features for objectives without a projector), detached, for the collapse monitor: `[N, D]`.
    pub embedding: Tensor,
    /// The loss's terms, unweighted, each a scalar, logged as `train/loss/<name>`: every objective names its terms
    /// (a single-term loss too: `nt_xent`, `pixel_mse`, ...), so that runs of different objectives are not compared
    /// on one `train/loss` of incompatible scales.
    pub terms: Vec<(&'static str, Tensor)>,
}

pub trait Objective {
    fn loss(&mut self, batch: &Batch, train: bool) -> Step;
    /// Called after each optimizer step with the progress of the step just taken (momentum teachers update here).
    fn after_step(&mut self, _progress: &TrainProgress) {}
    /// Host-side values of the objective's schedules at the last step (e.g. `teacher_momentum`,
    /// `teacher_temperature`), logged as `train/<name>`; reading them costs no sync.
    fn schedule_values(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// The student backbone: what `eval`, `finetune` and `export` use by default.
    fn backbone(&self) -> &dyn Backbone;
    /// The EMA teacher's backbone, for objectives that have one (`--teacher`).
    fn teacher_backbone(&self) -> Option<&dyn Backbone> {
        None
    }
    /// How many views per sample the objective consumes.
    fn num_views(&self) -> usize;
    /// For masked-image objectives: (masked input, reconstruction with the visible patches pasted back), both
    /// [N,C,H,W] in the same (normalized) space as `x`, computed without gradients; None for others.
    fn reconstruct(&mut self, _x: &Tensor) -> Option<(Tensor, Tensor)> {
        None
    }
}

/// The objective, as a tagged enum in the config (`[objective] kind = "simclr"`, `"byol"`, `"mocov3"`, `"dino"`,
/// `"barlow"`, `"vicreg"`, `"mae"` or `"simmim"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ObjectiveConfig {
    Simclr(SimClrConfig),
    Byol(ByolConfig),
    #[serde(rename = "mocov3")]
    MocoV3(MocoV3Config),
    Dino(DinoConfig),
    Barlow(BarlowConfig),
    Vicreg(VicregConfig),
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
            ObjectiveConfig::Byol(c) => c.validate(),
            ObjectiveConfig::MocoV3(c) => c.validate(),
            ObjectiveConfig::Dino(c) => c.validate(),
            ObjectiveConfig::Barlow(c) => c.validate(),
            ObjectiveConfig::Vicreg(c) => c.validate(),
            ObjectiveConfig::Mae(c) => c.validate(),
            ObjectiveConfig::Simmim(c) => c.validate(),
        }
    }

    /// Builds the objective in `vs`: the student backbone of `backbone` for `in_channels`-channel images under
    /// `backbone.`, the heads beside it and, for objectives with a momentum teacher, the teacher's copy of both
    /// under `teacher.` ([`crate::teacher`]).
    pub fn build(
        &self,
        vs: &nn::VarStore,
        backbone: &BackboneConfig,
        in_channels: i64,
    ) -> Result<Box<dyn Objective>, ModelError> {
        self.validate()?;
        let root = vs.root();
        let student = || backbone.build(&root / "backbone", in_channels);
        Ok(match self {
            ObjectiveConfig::Simclr(c) => Box::new(SimClr::new(&root, student()?, c)),
            ObjectiveConfig::Byol(c) => Box::new(Byol::new(vs, backbone, in_channels, c)?),
            ObjectiveConfig::MocoV3(c) => Box::new(MocoV3::new(vs, backbone, in_channels, c)?),
            ObjectiveConfig::Dino(c) => Box::new(Dino::new(vs, backbone, in_channels, c)?),
            ObjectiveConfig::Barlow(c) => Box::new(Barlow::new(vs, backbone, in_channels, c)?),
            ObjectiveConfig::Vicreg(c) => Box::new(Vicreg::new(vs, backbone, in_channels, c)?),
            ObjectiveConfig::Mae(c) => Box::new(Mae::new(&root, student()?, c)?),
            ObjectiveConfig::Simmim(c) => Box::new(SimMim::new(&root, student()?, c)?),
        })
    }

    /// Whether the objective reconstructs images (MAE, SimMIM): the trainer then logs reconstruction grids.
    pub fn reconstructs(&self) -> bool {
        matches!(self, ObjectiveConfig::Mae(_) | ObjectiveConfig::Simmim(_))
    }

    pub fn num_views(&self) -> usize {
        match self {
            ObjectiveConfig::Dino(c) => c.num_views(),
            ObjectiveConfig::Simclr(_)
            | ObjectiveConfig::Byol(_)
            | ObjectiveConfig::MocoV3(_)
            | ObjectiveConfig::Barlow(_)
            | ObjectiveConfig::Vicreg(_) => 2,
            ObjectiveConfig::Mae(_) | ObjectiveConfig::Simmim(_) => 1,
        }
    }

    /// Whether the objective keeps a momentum teacher (`export --teacher`, `eval --teacher`).
    pub fn has_teacher(&self) -> bool {
        matches!(self, ObjectiveConfig::Byol(_) | ObjectiveConfig::MocoV3(_) | ObjectiveConfig::Dino(_))
    }
}

/// The views of a batch grouped by size: `(first, count)` runs of consecutive views with the same `[C, H, W]`
/// (multi-crop: 2 global + k local crops give two groups). Objectives concatenate each group along the batch and
/// forward it once, so batch norm sees the whole group and the GPU a few large launches, as DINO's
/// `MultiCropWrapper`.
pub fn size_groups(views: &[Tensor]) -> Vec<(usize, usize)> {
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for (i, v) in views.iter().enumerate() {
        match groups.last_mut() {
            Some((first, count)) if views[*first].size()[1..] == v.size()[1..] => *count += 1,
            _ => groups.push((i, 1)),
        }
    }
    groups
}

/// `f` applied to each size group of `views` at once, its `[G*N, ...]` output split back per view: one output
/// per view, in view order.
///
/// # Shapes
/// `views[v]`: `[N, C, H_v, W_v]`; `f`: `[G*N, C, H, W]` → `[G*N, ...]` → `[N, ...]` per view.
pub fn forward_groups(views: &[Tensor], mut f: impl FnMut(&Tensor) -> Tensor) -> Vec<Tensor> {
    let mut out = Vec::with_capacity(views.len());
    for (first, count) in size_groups(views) {
        let group = &views[first..first + count];
        if count == 1 {
            out.push(f(&group[0]));
            continue;
        }
        let n = group[0].size()[0];
        let y = f(&Tensor::cat(group, 0));
        out.extend((0..count as i64).map(|i| y.narrow(0, i * n, n)));
    }
    out
}
