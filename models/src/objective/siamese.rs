//! The pieces every joint-embedding objective shares: a [`Network`] (backbone + head) forwarded over the views of
//! a batch one size group at a time, and a student with an EMA teacher built from the same config
//! ([`WithTeacher`], the mechanism of BYOL, MoCo v3 and DINO).

use tch::nn::{self, ModuleT, VarStore};
use tch::Tensor;

use super::forward_groups;
use crate::backbone::{Backbone, BackboneConfig};
use crate::teacher::{MomentumTeacher, TEACHER_PREFIX};
use crate::{ModelError, TrainProgress};

/// A backbone and the head on its features.
pub struct Network<H> {
    pub backbone: Box<dyn Backbone>,
    pub head: H,
}

/// What a [`Network`] gives for each view.
pub struct ViewOutputs {
    /// Backbone features per view: `[N, dim]`.
    pub features: Vec<Tensor>,
    /// Head outputs per view: `[N, out]`.
    pub outputs: Vec<Tensor>,
}

impl<H: ModuleT> Network<H> {
    /// The backbone of `backbone` under `root / "backbone"` and `head(root / head_name, backbone dim)`.
    pub fn build(
        root: &nn::Path,
        backbone: &BackboneConfig,
        in_channels: i64,
        head_name: &str,
        head: impl FnOnce(nn::Path, i64) -> H,
    ) -> Result<Self, ModelError> {
        let backbone = backbone.build(root / "backbone", in_channels)?;
        let head = head(root / head_name, backbone.dim());
        Ok(Network { backbone, head })
    }

    /// Backbone and head over `views`, one forward per size group (batch norm sees the whole group).
    ///
    /// # Shapes
    /// `views[v]`: `[N, C, H_v, W_v]` → per view `[N, dim]` features and `[N, out]` outputs.
    pub fn forward(&self, views: &[Tensor], train: bool) -> ViewOutputs {
        let mut features = Vec::with_capacity(views.len());
        let outputs = forward_groups(views, |x| {
            let h = self.backbone.features(x, train);
            let out = self.head.forward_t(&h, train);
            features.push(h);
            out
        });
        // `features` holds one tensor per group; split it like the outputs.
        let features = split_like(&features, views);
        ViewOutputs { features, outputs }
    }
}

/// Per-group tensors (as `forward_groups` calls its closure) split back into one per view.
fn split_like(groups: &[Tensor], views: &[Tensor]) -> Vec<Tensor> {
    let mut out = Vec::with_capacity(views.len());
    for (g, (_, count)) in groups.iter().zip(super::size_groups(views)) {
        let n = g.size()[0] / count as i64;
        out.extend((0..count as i64).map(|i| g.narrow(0, i * n, n)));
    }
    out
}

/// A student network and its momentum teacher: the same backbone and head built twice from one config, the
/// teacher under `teacher.` (`teacher.backbone.*`, `teacher.<head>.*`), updated by EMA after every step.
pub struct WithTeacher<H> {
    pub student: Network<H>,
    pub teacher: Network<H>,
    pub ema: MomentumTeacher,
}

/// The momentum schedule of a teacher: `momentum` at the start, cosine to `momentum_end`.
#[derive(Clone, Copy, Debug)]
pub struct Momentum {
    pub start: f64,
    pub end: f64,
}

impl<H: ModuleT> WithTeacher<H> {
    /// Builds the student under the root of `vs`, the teacher under `teacher.` with `head` called for each, then
    /// copies the student into the teacher and freezes it.
    pub fn build(
        vs: &VarStore,
        backbone: &BackboneConfig,
        in_channels: i64,
        head_name: &str,
        head: impl Fn(nn::Path, i64) -> H,
        momentum: Momentum,
    ) -> Result<Self, ModelError> {
        let root = vs.root();
        let student = Network::build(&root, backbone, in_channels, head_name, &head)?;
        let teacher = Network::build(&(&root / TEACHER_PREFIX), backbone, in_channels, head_name, &head)?;
        let ema = MomentumTeacher::new(vs, &["backbone", head_name], momentum.start, momentum.end)?;
        Ok(WithTeacher { student, teacher, ema })
    }

    /// The teacher over `views`, without gradients (its batch norms still use and update batch statistics in
    /// training mode, as BYOL's target network and DINO's teacher do).
    pub fn teacher_forward(&self, views: &[Tensor], train: bool) -> ViewOutputs {
        tch::no_grad(|| {
            let out = self.teacher.forward(views, train);
            ViewOutputs {
                features: out.features.iter().map(Tensor::detach).collect(),
                outputs: out.outputs.iter().map(Tensor::detach).collect(),
            }
        })
    }

    pub fn after_step(&mut self, progress: &TrainProgress) {
        self.ema.update(progress);
    }
}
