//! Optimizers written on tensors so that their state can be checkpointed by name: SGD with momentum and
//! LARS (You et al. 2017, https://arxiv.org/abs/1708.03888, as used by SimCLR), with no weight decay and no
//! LARS adaptation on biases and norm parameters; and the linear-warmup + cosine learning-rate schedule.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::{invalid, ModelError};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Lars,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Learning rate for a batch of 256; the trainer scales it linearly with the batch size.
    pub base_lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// LARS trust coefficient.
    pub eta: f64,
    pub warmup_epochs: f64,
    /// Final learning rate as a fraction of the peak.
    pub final_lr_fraction: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Lars,
            base_lr: 0.3,
            momentum: 0.9,
            weight_decay: 1e-6,
            eta: 0.02,
            warmup_epochs: 2.0,
            final_lr_fraction: 0.0,
        }
    }
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let checks = [
            ("optimizer.base_lr", self.base_lr > 0.0),
            ("optimizer.momentum", (0.0..1.0).contains(&self.momentum)),
            ("optimizer.weight_decay", self.weight_decay >= 0.0),
            ("optimizer.eta", self.eta > 0.0),
            ("optimizer.warmup_epochs", self.warmup_epochs >= 0.0),
            ("optimizer.final_lr_fraction", (0.0..=1.0).contains(&self.final_lr_fraction)),
        ];
        for (field, ok) in checks {
            if !ok {
                return Err(invalid(field, "out of range"));
            }
        }
        Ok(())
    }

    /// Learning rate at `epoch` (fractional) of `total_epochs`: linear warmup from 0, then cosine down to
    /// `final_lr_fraction * peak`.
    pub fn lr_at(&self, peak: f64, epoch: f64, total_epochs: f64) -> f64 {
        if epoch < self.warmup_epochs {
            return peak * epoch / self.warmup_epochs;
        }
        let span = (total_epochs - self.warmup_epochs).max(1e-9);
        let t = ((epoch - self.warmup_epochs) / span).clamp(0.0, 1.0);
        let floor = peak * self.final_lr_fraction;
        floor + (peak - floor) * 0.5 * (1.0 + (PI * t).cos())
    }
}

struct Param {
    name: String,
    tensor: Tensor,
    /// Weight decay and LARS adaptation apply (not to biases and norm parameters, i.e. tensors of rank <= 1).
    adapt: bool,
    momentum: Tensor,
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<Param>,
}

impl Optimizer {
    /// Takes every trainable variable of `vs`, sorted by name so the order (and the checkpoint) is stable.
    pub fn new(vs: &nn::VarStore, cfg: &OptimizerConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, tensor)| {
                let momentum = tensor.zeros_like().set_requires_grad(false);
                Param { adapt: tensor.dim() > 1, name, tensor, momentum }
            })
            .collect();
        Ok(Optimizer { cfg: cfg.clone(), params })
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// One update with learning rate `lr`. Stays on the device: no value is read back.
    pub fn step(&mut self, lr: f64) {
        let cfg = &self.cfg;
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let mut g = grad.to_kind(Kind::Float);
                if p.adapt {
                    if cfg.weight_decay > 0.0 {
                        g = g + &p.tensor * cfg.weight_decay;
                    }
                    if cfg.kind == OptimizerKind::Lars {
                        let pn = p.tensor.norm();
                        let gn = g.norm();
                        let ratio = (&pn * cfg.eta) / &gn;
                        let ok = pn.gt(0.0).logical_and(&gn.gt(0.0));
                        let trust = ratio.where_self(&ok, &Tensor::ones_like(&ratio));
                        g = g * trust;
                    }
                }
                let _ = p.momentum.g_mul_scalar_(cfg.momentum).g_add_(&g);
                let _ = p.tensor.g_add_(&(&p.momentum * -lr));
            }
        });
    }

    /// Momentum buffers by parameter name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (format!("momentum.{}", p.name), p.momentum.shallow_clone())).collect()
    }

    /// Restores momentum buffers saved by [`Optimizer::state`]; every buffer must be present with the right shape.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), ModelError> {
        for p in &mut self.params {
            let key = format!("momentum.{}", p.name);
            let (_, t) = state
                .iter()
                .find(|(n, _)| *n == key)
                .ok_or_else(|| invalid("checkpoint.optimizer", format!("missing {key}")))?;
            if t.size() != p.momentum.size() {
                return Err(invalid(
                    "checkpoint.optimizer",
                    format!("{key}: shape {:?} != {:?}", t.size(), p.momentum.size()),
                ));
            }
            tch::no_grad(|| p.momentum.copy_(t));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = OptimizerConfig { warmup_epochs: 2.0, final_lr_fraction: 0.0, ..Default::default() };
        assert_eq!(cfg.lr_at(1.0, 0.0, 10.0), 0.0);
        assert!((cfg.lr_at(1.0, 1.0, 10.0) - 0.5).abs() < 1e-12);
        assert!((cfg.lr_at(1.0, 2.0, 10.0) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(1.0, 6.0, 10.0) - 0.5).abs() < 1e-12);
        assert!(cfg.lr_at(1.0, 10.0, 10.0).abs() < 1e-12);
    }

    #[test]
    fn sgd_matches_hand_computation_and_skips_decay_on_biases() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]));
        let b = vs.root().var_copy("b", &Tensor::from_slice(&[1f32, 1.]));
        let cfg = OptimizerConfig { kind: OptimizerKind::Sgd, momentum: 0.9, weight_decay: 0.1, ..Default::default() };
        let mut opt = Optimizer::new(&vs, &cfg).unwrap();
        for _ in 0..2 {
            opt.zero_grad();
            (w.sum(Kind::Float) + b.sum(Kind::Float)).backward();
            opt.step(0.5);
        }
        // Bias: grad 1, no decay. buf1 = 1, p = 1 - .5 = .5; buf2 = .9 + 1 = 1.9, p = .5 - .95 = -.45.
        let bv: Vec<f32> = Vec::try_from(&b).unwrap();
        assert!((bv[0] + 0.45).abs() < 1e-6, "{bv:?}");
        // Weight w0 = 1: g1 = 1 + .1 = 1.1, p = .45; g2 = 1 + .045 = 1.045, buf = .99 + 1.045 = 2.035, p = .45 - 1.0175.
        let wv: Vec<f32> = Vec::try_from(&w.flatten(0, -1)).unwrap();
        assert!((wv[0] - (0.45 - 1.0175)).abs() < 1e-6, "{wv:?}");
    }

    #[test]
    fn lars_scales_update_by_trust_ratio() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[3f32, 4.]).view([1, 2]));
        let cfg = OptimizerConfig {
            kind: OptimizerKind::Lars,
            momentum: 0.0,
            weight_decay: 0.0,
            eta: 0.1,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, &cfg).unwrap();
        opt.zero_grad();
        (&w * 100.0).sum(Kind::Float).backward(); // g = [100, 100], |g| = 141.42, |w| = 5
        opt.step(1.0);
        // update = eta * |w| / |g| * g = 0.1 * 5 / 141.42 * 100 = 0.35355 per coordinate.
        let wv: Vec<f32> = Vec::try_from(&w.flatten(0, -1)).unwrap();
        assert!((wv[0] - (3.0 - 0.353_553)).abs() < 1e-5, "{wv:?}");
    }
}
