//! Optimizers written on tensors so that their state can be checkpointed by name: SGD with momentum, LARS
//! (You et al. 2017, https://arxiv.org/abs/1708.03888, as used by SimCLR) and AdamW (Loshchilov & Hutter 2019,
//! https://arxiv.org/abs/1711.05101, exactly as `torch.optim.AdamW`, for vision transformers); per-parameter lr
//! scales and weight-decay switches (by default no decay and no LARS adaptation on biases and norm parameters),
//! layer-wise lr decay (BEiT, https://arxiv.org/abs/2106.08254), global gradient-norm clipping, and the
//! linear-warmup + cosine learning-rate schedule.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::{invalid, ModelError};

use crate::dist::{Dist, DistError};
use chunk::{make_chunks, Chunk, CHUNK_NUMEL};

mod adamw;
mod chunk;
mod sgd;
#[cfg(test)]
mod tests;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Lars,
    Adamw,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Learning rate for a batch of 256; the trainer scales it linearly with the batch size.
    pub base_lr: f64,
    /// SGD and LARS only.
    pub momentum: f64,
    pub weight_decay: f64,
    /// LARS trust coefficient.
    pub eta: f64,
    /// LARS: cap each layer's adapted rate at the scheduled one (LARC's clip mode, solo-learn's `clip_lr`).
    pub lars_clip: bool,
    pub warmup_epochs: f64,
    /// Final learning rate as a fraction of the peak.
    pub final_lr_fraction: f64,
    /// AdamW: decay rate of the first-moment average.
    pub beta1: f64,
    /// AdamW: decay rate of the second-moment average.
    pub beta2: f64,
    /// AdamW: added to the bias-corrected sqrt of the second moment.
    pub eps: f64,
    /// Layer-wise lr decay in (0, 1], 1 = off; the trainer turns it into per-parameter scales with
    /// [`layer_decay_scale`].
    pub layer_decay: f64,
    /// Maximum global L2 norm of the gradients ([`Optimizer::clip_grad_norm`]); 0 = no clipping.
    pub clip_grad: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Lars,
            base_lr: 0.3,
            momentum: 0.9,
            weight_decay: 1e-6,
            eta: 0.02,
            lars_clip: false,
            warmup_epochs: 2.0,
            final_lr_fraction: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            layer_decay: 1.0,
            clip_grad: 0.0,
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
            ("optimizer.beta1", (0.0..1.0).contains(&self.beta1)),
            ("optimizer.beta2", (0.0..1.0).contains(&self.beta2)),
            ("optimizer.eps", self.eps.is_finite() && self.eps >= 0.0),
            ("optimizer.layer_decay", self.layer_decay > 0.0 && self.layer_decay <= 1.0),
            ("optimizer.clip_grad", self.clip_grad.is_finite() && self.clip_grad >= 0.0),
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

/// Layer-wise lr decay (BEiT, MAE fine-tuning): the lr scale of a parameter in layer `layer_id` of a network with
/// ids `0..=num_layers` (0 = embeddings, the head = `num_layers` gets 1): `decay^(num_layers - layer_id)`.
pub fn layer_decay_scale(layer_id: usize, num_layers: usize, decay: f64) -> f64 {
    debug_assert!(layer_id <= num_layers, "layer id {layer_id} > {num_layers}");
    decay.powi(num_layers.saturating_sub(layer_id) as i32)
}

/// How one parameter is optimized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamSpec {
    /// Multiplies the learning rate given to [`Optimizer::step`] (layer-wise decay).
    pub lr_scale: f64,
    /// Weight decay applies, and for LARS the trust-ratio adaptation too.
    pub weight_decay: bool,
}

impl ParamSpec {
    /// The default: lr scale 1, weight decay on matrices and kernels but not on biases and norm parameters
    /// (tensors of rank <= 1).
    pub fn by_rank(tensor: &Tensor) -> Self {
        ParamSpec { lr_scale: 1.0, weight_decay: tensor.dim() > 1 }
    }
}

/// Optimizer state of one parameter. AdamW moments are views into their chunk's flat buffers.
enum Buffers {
    Momentum(Tensor),
    Adam { exp_avg: Tensor, exp_avg_sq: Tensor },
}

struct Param {
    name: String,
    tensor: Tensor,
    spec: ParamSpec,
    buffers: Buffers,
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<Param>,
    /// The parameters grouped for the multi-tensor update; their state tensors are views into the chunks'.
    chunks: Vec<Chunk>,
    /// AdamW steps taken (for the bias corrections); saved as `adamw.step`.
    step: i64,
    /// Update whole fp32 chunks at once: `None` = on CUDA only (as torch's foreach default), where it saves ~9 of
    /// every 10 kernel launches; on the CPU the extra copies cost more than the dispatches saved. Set in tests.
    multi_tensor: Option<bool>,
}

impl Optimizer {
    /// As [`Optimizer::new_with`], with [`ParamSpec::by_rank`]: weight decay on tensors of rank > 1, lr scale 1.
    pub fn new(vs: &nn::VarStore, cfg: &OptimizerConfig) -> Result<Self, ModelError> {
        Self::new_with(vs, cfg, |_, t| ParamSpec::by_rank(t))
    }

    /// Every trainable variable of `vs`, sorted by name so the order (and the checkpoint) is stable, each optimized
    /// as `spec(name, tensor)` says.
    pub fn new_with(
        vs: &nn::VarStore,
        cfg: &OptimizerConfig,
        spec: impl Fn(&str, &Tensor) -> ParamSpec,
    ) -> Result<Self, ModelError> {
        Self::build(vs, cfg, spec, CHUNK_NUMEL)
    }

    fn build(
        vs: &nn::VarStore,
        cfg: &OptimizerConfig,
        spec: impl Fn(&str, &Tensor) -> ParamSpec,
        chunk_numel: i64,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut params = Vec::with_capacity(named.len());
        for (name, tensor) in named {
            let spec = spec(&name, &tensor);
            if !(spec.lr_scale.is_finite() && spec.lr_scale >= 0.0) {
                return Err(invalid(&format!("optimizer.lr_scale.{name}"), format!("{} out of range", spec.lr_scale)));
            }
            // Views into the chunk buffers, made below.
            params.push(Param { name, tensor, spec, buffers: Buffers::Momentum(Tensor::new()) });
        }
        let chunks = make_chunks(&mut params, cfg.kind, chunk_numel);
        Ok(Optimizer { cfg: cfg.clone(), params, chunks, step: 0, multi_tensor: None })
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// The defined gradients and the global L2 norm over them (0-dim fp32 on the device; 0 without gradients).
    fn grads_and_norm(&self) -> (Vec<Tensor>, Tensor) {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|p| p.tensor.grad()).filter(|g| g.defined()).collect();
            let Some(first) = grads.first() else {
                let device = self.params.first().map_or(Device::Cpu, |p| p.tensor.device());
                return (grads, Tensor::zeros([], (Kind::Float, device)));
            };
            let device = first.device();
            let norms: Vec<Tensor> = if self.multi_tensor.unwrap_or(device.is_cuda()) {
                // One flat copy and one reduction per chunk instead of a kernel per parameter.
                self.chunks
                    .iter()
                    .filter_map(|c| {
                        let gs: Vec<Tensor> = c
                            .members
                            .iter()
                            .map(|&i| self.params[i].tensor.grad())
                            .filter(Tensor::defined)
                            .map(|g| g.to_kind(Kind::Float))
                            .collect();
                        (!gs.is_empty()).then(|| chunk::flat(&gs).norm().to_device(device))
                    })
                    .collect()
            } else {
                grads.iter().map(|g| g.to_kind(Kind::Float).norm().to_device(device)).collect()
            };
            let total = Tensor::stack(&norms, 0).norm();
            (grads, total)
        })
    }

    /// Data parallelism: every gradient replaced by its mean over the ranks of `dist` (a no-op in one process),
    /// summed in flat buckets of at most `bucket_numel` elements (one all-reduce per bucket, as DDP's 25 MB
    /// buckets; never one per parameter; a larger gradient is a bucket alone). Every rank must have gradients for
    /// the same parameters (the same model and objective: they do).
    pub fn average_gradients(&mut self, dist: &Dist, bucket_numel: i64) -> Result<(), DistError> {
        if !dist.in_group() {
            return Ok(());
        }
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect();
            let mut start = 0;
            while start < grads.len() {
                // Consecutive gradients of one kind and device, up to the bucket size (a larger one alone).
                let (kind, device) = (grads[start].kind(), grads[start].device());
                let mut end = start;
                let mut numel = 0;
                while end < grads.len()
                    && grads[end].kind() == kind
                    && grads[end].device() == device
                    && (end == start || numel + grads[end].numel() as i64 <= bucket_numel)
                {
                    numel += grads[end].numel() as i64;
                    end += 1;
                }
                let bucket = &grads[start..end];
                let mut flat = chunk::flat(bucket);
                dist.all_reduce_sum(&mut flat)?;
                let _ = flat.g_div_scalar_(dist.world() as f64);
                let mut offset = 0;
                for g in bucket {
                    let n = g.numel() as i64;
                    let mut g = g.shallow_clone();
                    g.copy_(&flat.narrow(0, offset, n).view(g.size().as_slice()));
                    offset += n;
                }
                start = end;
            }
            Ok(())
        })
    }

    /// The global L2 norm of all gradients, a 0-dim fp32 tensor on the device (nothing is read back): NaN or
    /// infinite when any gradient is.
    pub fn grad_norm(&self) -> Tensor {
        self.grads_and_norm().1
    }

    /// Scales all gradients in place so that their global L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, clamped to 1, always applied so
    /// there is no branch on a device value). Returns the norm before clipping, a 0-dim fp32 tensor on the device.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let (grads, total) = self.grads_and_norm();
        tch::no_grad(|| {
            let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
            for mut g in grads {
                let c = coef.to_device(g.device()).to_kind(g.kind());
                let _ = g.g_mul_(&c);
            }
        });
        total
    }

    /// One update with learning rate `lr` (each parameter uses `lr * lr_scale`). Stays on the device: no value is
    /// read back. Parameters without a gradient are skipped (AdamW's step count, one for all parameters, still
    /// advances; torch counts per parameter, which differs only for parameters that once had no gradient).
    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| match self.cfg.kind {
            OptimizerKind::Sgd | OptimizerKind::Lars => self.step_momentum(lr),
            OptimizerKind::Adamw => self.step_adamw(lr),
        });
    }

    /// The state buffers by name (`momentum.<param>`; AdamW: `exp_avg.<param>`, `exp_avg_sq.<param>` and the step
    /// count `adamw.step`, a 0-dim int64 CPU tensor), for checkpoints. The buffers are not copied.
    /// The parameters it updates, in its order (the same on every rank built from the same config).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.tensor.shallow_clone()).collect()
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.params.iter().flat_map(|p| p.buffers()).map(|(k, t)| (k, t.shallow_clone())).collect();
        if self.cfg.kind == OptimizerKind::Adamw {
            out.push((STEP_KEY.to_string(), Tensor::scalar_tensor(self.step, (Kind::Int64, Device::Cpu))));
        }
        out
    }

    /// Restores the state saved by [`Optimizer::state`]: every buffer must be present with the right shape, or
    /// nothing is changed and the error names the first key missing or wrong.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), ModelError> {
        let find = |key: &str| {
            state
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, t)| t)
                .ok_or_else(|| invalid("checkpoint.optimizer", format!("missing {key}")))
        };
        let mut copies = Vec::new();
        for p in &self.params {
            for (key, buffer) in p.buffers() {
                let t = find(&key)?;
                if t.size() != buffer.size() {
                    return Err(invalid(
                        "checkpoint.optimizer",
                        format!("{key}: shape {:?} != {:?}", t.size(), buffer.size()),
                    ));
                }
                copies.push((buffer.shallow_clone(), t));
            }
        }
        let step = if self.cfg.kind == OptimizerKind::Adamw {
            let t = find(STEP_KEY)?;
            let step = if t.numel() == 1 { t.reshape([1]).int64_value(&[0]) } else { -1 };
            if step < 0 {
                return Err(invalid("checkpoint.optimizer", format!("{STEP_KEY}: not a step count")));
            }
            step
        } else {
            0
        };
        tch::no_grad(|| {
            for (mut buffer, t) in copies {
                buffer.copy_(t);
            }
        });
        self.step = step;
        Ok(())
    }
}

const STEP_KEY: &str = "adamw.step";

impl Param {
    fn buffers(&self) -> Vec<(String, &Tensor)> {
        match &self.buffers {
            Buffers::Momentum(m) => vec![(format!("momentum.{}", self.name), m)],
            Buffers::Adam { exp_avg, exp_avg_sq } => {
                vec![(format!("exp_avg.{}", self.name), exp_avg), (format!("exp_avg_sq.{}", self.name), exp_avg_sq)]
            }
        }
    }
}
