//! The momentum teacher: an exponential moving average of a student's weights that receives no gradients (BYOL's
//! target network, Grill et al. 2020, https://arxiv.org/abs/2006.07733; MoCo v3's momentum encoder, Chen et al.
//! 2021, https://arxiv.org/abs/2104.02057; DINO's teacher, Caron et al. 2021, https://arxiv.org/abs/2104.14294).
//!
//! An objective builds its student modules (backbone under `backbone.`, heads beside it) and then the same modules
//! again under `teacher.` from the same config; [`MomentumTeacher::new`] pairs each trainable student variable
//! `X` with `teacher.X`, copies the student into the teacher and freezes the teacher (`requires_grad = false`, so
//! the optimizer never sees it). The teacher lives in the same `VarStore`, so checkpoints carry it and resume
//! restores it; its batch-norm statistics are its own, from its own forward passes, as in BYOL and DINO.
//!
//! After every optimizer step, `t = m * t + (1 - m) * s` with `m` following the cosine schedule from `momentum`
//! to `momentum_end` over training (BYOL eq. 3 / DINO). On CUDA the teacher's parameters are views into one flat
//! buffer and the update is one `cat` of the student plus one `lerp_` over the buffer (two kernels whatever the
//! model size); on the CPU, where launches are cheap and the concatenation is not, it is one `lerp_` per tensor.
//! Both do the same element-wise arithmetic.

use std::f64::consts::PI;

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::objective::TrainProgress;
use crate::{invalid, ModelError};

/// The path prefix of every teacher variable: `teacher.backbone.layer1.0.conv1.weight`.
pub const TEACHER_PREFIX: &str = "teacher";

/// The EMA momentum at `fraction` (0..=1) of training: `end - (end - start) * (cos(pi * fraction) + 1) / 2`,
/// so `start` at the first step and `end` at the last (BYOL's `tau`, DINO's `momentum_schedule`).
pub fn cosine_momentum(start: f64, end: f64, fraction: f64) -> f64 {
    end - (end - start) * ((PI * fraction.clamp(0.0, 1.0)).cos() + 1.0) / 2.0
}

/// An EMA copy of some of a student's variables (see the module docs).
pub struct MomentumTeacher {
    /// Student parameters and their teacher twins, in the same (name) order.
    student: Vec<Tensor>,
    teacher: Vec<Tensor>,
    /// On CUDA: the teacher's parameters, flat; `teacher[i]` are views into it.
    flat: Option<Tensor>,
    momentum: f64,
    momentum_end: f64,
    /// The momentum of the last update (for logging).
    last: f64,
}

impl std::fmt::Debug for MomentumTeacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MomentumTeacher")
            .field("tensors", &self.teacher.len())
            .field("flat", &self.flat.is_some())
            .field("momentum", &(self.momentum, self.momentum_end))
            .finish()
    }
}

impl MomentumTeacher {
    /// Pairs every trainable variable of `vs` under one of `prefixes` (e.g. `["backbone", "projector"]`) with its
    /// twin under `teacher.`, which must exist with the same shape (the objective built it from the same config).
    /// Copies every student variable under `prefixes` into its twin (parameters and buffers, so that the teacher
    /// starts as the student), then freezes the teacher's parameters. Errors name the variable that has no twin.
    pub fn new(vs: &VarStore, prefixes: &[&str], momentum: f64, momentum_end: f64) -> Result<Self, ModelError> {
        validate_momentum(momentum, momentum_end)?;
        let vars = vs.variables();
        let mut names: Vec<&String> = vars
            .keys()
            .filter(|n| prefixes.iter().any(|p| n.strip_prefix(p).is_some_and(|rest| rest.starts_with('.'))))
            .collect();
        names.sort();
        let (mut student, mut teacher) = (Vec::new(), Vec::new());
        for name in names {
            let s = &vars[name];
            let twin = format!("{TEACHER_PREFIX}.{name}");
            let t = vars.get(&twin).ok_or_else(|| invalid("teacher", format!("{name} has no twin {twin}")))?;
            if t.size() != s.size() || t.kind() != s.kind() {
                let msg = format!("{twin} is {:?} {:?}, {name} is {:?} {:?}", t.size(), t.kind(), s.size(), s.kind());
                return Err(invalid("teacher", msg));
            }
            let mut t = t.shallow_clone();
            tch::no_grad(|| t.copy_(s));
            if s.requires_grad() {
                let _ = t.set_requires_grad(false);
                student.push(s.shallow_clone());
                teacher.push(t);
            }
        }
        if student.is_empty() {
            return Err(invalid("teacher", format!("no trainable variables under {prefixes:?}")));
        }
        let flat = student[0].device().is_cuda().then(|| flatten_into_views(&mut teacher));
        Ok(MomentumTeacher { student, teacher, flat, momentum, momentum_end, last: momentum })
    }

    /// Keeps the teacher in one flat buffer whatever the device (the CUDA layout), so tests on the CPU can check
    /// that both layouts compute the same update.
    pub fn with_flat_buffer(mut self) -> Self {
        if self.flat.is_none() {
            self.flat = Some(flatten_into_views(&mut self.teacher));
        }
        self
    }

    /// The momentum at `progress` (cosine from `momentum` to `momentum_end`).
    pub fn momentum_at(&self, progress: &TrainProgress) -> f64 {
        cosine_momentum(self.momentum, self.momentum_end, progress.fraction())
    }

    /// The EMA update after the optimizer step of `progress`: `t = m * t + (1 - m) * s`.
    pub fn update(&mut self, progress: &TrainProgress) {
        self.update_with(self.momentum_at(progress));
    }

    /// The EMA update with momentum `m` (1 leaves the teacher exactly as it is). No gradient, no host sync.
    pub fn update_with(&mut self, m: f64) {
        self.last = m;
        // lerp: t + (1 - m) (s - t); with weight 0 it is t exactly.
        let w = 1.0 - m;
        tch::no_grad(|| match &mut self.flat {
            Some(flat) => {
                let s = Tensor::cat(&self.student.iter().map(|t| t.detach().reshape([-1])).collect::<Vec<_>>(), 0);
                let _ = flat.lerp_(&s, w);
            }
            None => {
                for (t, s) in self.teacher.iter_mut().zip(&self.student) {
                    let _ = t.lerp_(s, w);
                }
            }
        });
    }

    /// The momentum used by the last update.
    pub fn last_momentum(&self) -> f64 {
        self.last
    }

    /// Number of parameter tensors the teacher tracks.
    pub fn len(&self) -> usize {
        self.teacher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teacher.is_empty()
    }
}

/// Checks a momentum schedule's ends, naming `objective.momentum` / `objective.momentum_end`.
pub fn validate_momentum(momentum: f64, momentum_end: f64) -> Result<(), ModelError> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(invalid("objective.momentum", format!("must be in [0, 1], got {momentum}")));
    }
    if !(momentum..=1.0).contains(&momentum_end) {
        return Err(invalid("objective.momentum_end", format!("must be in [momentum, 1], got {momentum_end}")));
    }
    Ok(())
}

/// Moves the values of `ts` (same device, fp32) into one flat buffer and makes each tensor a view into it, so that
/// element-wise updates of the buffer update them all. Returns the buffer.
fn flatten_into_views(ts: &mut [Tensor]) -> Tensor {
    let flat = tch::no_grad(|| {
        Tensor::cat(&ts.iter().map(|t| t.detach().reshape([-1]).to_kind(Kind::Float)).collect::<Vec<_>>(), 0)
    });
    let mut offset = 0;
    for t in ts.iter_mut() {
        let n = t.numel() as i64;
        let view = flat.narrow(0, offset, n).view(t.size().as_slice());
        t.set_data(&view);
        offset += n;
    }
    flat
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn cosine_momentum_runs_from_start_to_end() {
        assert_eq!(cosine_momentum(0.99, 1.0, 0.0), 0.99);
        assert_eq!(cosine_momentum(0.99, 1.0, 1.0), 1.0);
        assert!((cosine_momentum(0.99, 1.0, 0.5) - 0.995).abs() < 1e-12);
        assert!(cosine_momentum(0.996, 1.0, 0.25) < cosine_momentum(0.996, 1.0, 0.75));
        assert!(validate_momentum(0.99, 0.9).unwrap_err().to_string().contains("objective.momentum_end"));
        assert!(validate_momentum(1.5, 1.0).unwrap_err().to_string().contains("objective.momentum"));
    }

    #[test]
    fn flat_views_alias_the_buffer() {
        let mut ts = vec![Tensor::ones([2, 3], tch::kind::FLOAT_CPU), Tensor::zeros([4], tch::kind::FLOAT_CPU)];
        let mut flat = flatten_into_views(&mut ts);
        let _ = flat.fill_(7.0);
        assert_eq!(ts[0].sum(Kind::Float).double_value(&[]), 42.0);
        assert_eq!(ts[1].sum(Kind::Float).double_value(&[]), 28.0);
        assert_eq!(ts[0].size(), vec![2, 3]);
        let _ = Device::Cpu;
    }
}
