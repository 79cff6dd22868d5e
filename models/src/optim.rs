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

/// Largest number of elements AdamW updates in one flat chunk; bounds the temporaries of a step to a few such
/// buffers (64 MiB each in fp32).
const CHUNK_NUMEL: i64 = 1 << 24;

/// AdamW parameters with the same spec, device and dtype whose moments live in two flat fp32 buffers. tch 0.24
/// exposes neither `_foreach_*` nor `_fused_adamw_`, so on CUDA an fp32 chunk is updated as one tensor: the grads
/// and params are concatenated, ~10 kernels update the whole chunk, and one copy per parameter writes the result
/// back (instead of ~10 kernels per parameter).
struct Chunk {
    spec: ParamSpec,
    device: Device,
    kind: Kind,
    members: Vec<usize>,
    numel: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Per-step AdamW constants, host-side: nothing is read back from the device.
struct AdamStep {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bias_correction1: f64,
    bias_correction2_sqrt: f64,
}

impl AdamStep {
    /// One AdamW update in place, in the order and arithmetic of `torch.optim.AdamW` (single-tensor path).
    fn apply(&self, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, spec: ParamSpec) {
        let lr = self.lr * spec.lr_scale;
        if spec.weight_decay && self.weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
        }
        let _ = m.lerp_(g, 1.0 - self.beta1);
        let _ = v.g_mul_scalar_(self.beta2);
        // tch's addcmul_/addcdiv_ take no `value`: fold it into the first factor, as torch's kernels do.
        let _ = v.addcmul_(&(g * (1.0 - self.beta2)), g);
        let mut denom = v.sqrt();
        let _ = denom.g_div_scalar_(self.bias_correction2_sqrt).g_add_scalar_(self.eps);
        let step_size = lr / self.bias_correction1;
        let _ = p.addcdiv_(&(&*m * -step_size), &denom);
    }
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<Param>,
    /// AdamW only: the parameters grouped for the multi-tensor update.
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
            let buffers = match cfg.kind {
                OptimizerKind::Sgd | OptimizerKind::Lars => {
                    Buffers::Momentum(tensor.zeros_like().set_requires_grad(false))
                }
                // Views into the chunk buffers, made below.
                OptimizerKind::Adamw => Buffers::Adam { exp_avg: Tensor::new(), exp_avg_sq: Tensor::new() },
            };
            params.push(Param { name, tensor, spec, buffers });
        }
        let chunks = if cfg.kind == OptimizerKind::Adamw { adam_chunks(&mut params, chunk_numel) } else { Vec::new() };
        Ok(Optimizer { cfg: cfg.clone(), params, chunks, step: 0, multi_tensor: None })
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// Scales all gradients in place so that their global L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, clamped to 1, always applied so
    /// there is no branch on a device value). Returns the norm before clipping, a 0-dim fp32 tensor on the device.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|p| p.tensor.grad()).filter(|g| g.defined()).collect();
            let Some(first) = grads.first() else {
                let device = self.params.first().map_or(Device::Cpu, |p| p.tensor.device());
                return Tensor::zeros([], (Kind::Float, device));
            };
            let device = first.device();
            let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm().to_device(device)).collect();
            let total = Tensor::stack(&norms, 0).norm();
            let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
            for mut g in grads {
                let c = coef.to_device(g.device()).to_kind(g.kind());
                let _ = g.g_mul_(&c);
            }
            total
        })
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

    fn step_momentum(&mut self, lr: f64) {
        let cfg = &self.cfg;
        for p in &mut self.params {
            let grad = p.tensor.grad();
            let Buffers::Momentum(momentum) = &mut p.buffers else { unreachable!("SGD/LARS params hold momentum") };
            if !grad.defined() {
                continue;
            }
            let mut g = grad.to_kind(Kind::Float);
            if p.spec.weight_decay {
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
            let _ = momentum.g_mul_scalar_(cfg.momentum).g_add_(&g);
            let _ = p.tensor.g_add_(&(&*momentum * (-lr * p.spec.lr_scale)));
        }
    }

    fn step_adamw(&mut self, lr: f64) {
        self.step += 1;
        let cfg = &self.cfg;
        let t = self.step as f64;
        let h = AdamStep {
            lr,
            weight_decay: cfg.weight_decay,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            bias_correction1: 1.0 - cfg.beta1.powf(t),
            bias_correction2_sqrt: (1.0 - cfg.beta2.powf(t)).sqrt(),
        };
        for chunk in &mut self.chunks {
            let grads: Vec<Tensor> = chunk.members.iter().map(|&i| self.params[i].tensor.grad()).collect();
            let multi_tensor = self.multi_tensor.unwrap_or(chunk.device.is_cuda());
            if multi_tensor && chunk.kind == Kind::Float && grads.iter().all(Tensor::defined) {
                let flat = |ts: Vec<Tensor>| Tensor::cat(&ts.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
                let g = flat(grads);
                let mut p = flat(chunk.members.iter().map(|&i| self.params[i].tensor.shallow_clone()).collect());
                h.apply(&mut p, &g, &mut chunk.exp_avg, &mut chunk.exp_avg_sq, chunk.spec);
                let mut offset = 0;
                for &i in &chunk.members {
                    let param = &mut self.params[i].tensor;
                    let n = param.numel() as i64;
                    param.copy_(&p.narrow(0, offset, n).view(param.size().as_slice()));
                    offset += n;
                }
                continue;
            }
            for (&i, grad) in chunk.members.iter().zip(grads) {
                let Param { tensor, spec, buffers: Buffers::Adam { exp_avg, exp_avg_sq }, .. } = &mut self.params[i]
                else {
                    unreachable!("AdamW params hold moments")
                };
                if grad.defined() {
                    h.apply(tensor, &grad.to_kind(Kind::Float), exp_avg, exp_avg_sq, *spec);
                }
            }
        }
    }

    /// The state buffers by name (`momentum.<param>`; AdamW: `exp_avg.<param>`, `exp_avg_sq.<param>` and the step
    /// count `adamw.step`, a 0-dim int64 CPU tensor), for checkpoints. The buffers are not copied.
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

/// Groups AdamW parameters into chunks (same spec, device and dtype; at most `max_numel` elements unless one
/// parameter is larger) and gives each parameter its moments as views into the chunk's zeroed flat buffers.
fn adam_chunks(params: &mut [Param], max_numel: i64) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let (device, kind, numel) = (p.tensor.device(), p.tensor.kind(), p.tensor.numel() as i64);
        let open = chunks.iter_mut().rev().find(|c| c.spec == p.spec && c.device == device && c.kind == kind);
        match open {
            Some(c) if c.numel + numel <= max_numel => {
                c.members.push(i);
                c.numel += numel;
            }
            _ => chunks.push(Chunk {
                spec: p.spec,
                device,
                kind,
                members: vec![i],
                numel,
                exp_avg: Tensor::new(),
                exp_avg_sq: Tensor::new(),
            }),
        }
    }
    for c in &mut chunks {
        c.exp_avg = Tensor::zeros([c.numel], (Kind::Float, c.device));
        c.exp_avg_sq = Tensor::zeros([c.numel], (Kind::Float, c.device));
        let mut offset = 0;
        for &i in &c.members {
            let p = &mut params[i];
            let (n, shape) = (p.tensor.numel() as i64, p.tensor.size());
            let view = |flat: &Tensor| flat.narrow(0, offset, n).view(shape.as_slice());
            p.buffers = Buffers::Adam { exp_avg: view(&c.exp_avg), exp_avg_sq: view(&c.exp_avg_sq) };
            offset += n;
        }
    }
    chunks
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

    fn adamw(weight_decay: f64) -> OptimizerConfig {
        OptimizerConfig { kind: OptimizerKind::Adamw, beta2: 0.95, weight_decay, ..Default::default() }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::try_from(&t.flatten(0, -1).to_kind(Kind::Double)).unwrap()
    }

    /// Gradient `c + p` for every parameter but `skip` (`c` fixed per step `k`), so the update depends on the state
    /// so far.
    fn backward(vs: &nn::VarStore, k: i64, skip: &str) {
        let mut vars = vs.variables().into_iter().collect::<Vec<_>>();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut loss = Tensor::zeros([], tch::kind::FLOAT_CPU);
        for (i, (name, v)) in vars.iter().enumerate() {
            if name == skip {
                continue;
            }
            let c = Tensor::arange(v.numel() as i64, tch::kind::FLOAT_CPU).view(v.size().as_slice());
            let c = ((c + (i as i64 + 3 * k)) * 0.37).sin();
            loss = loss + (c * v).sum(Kind::Float) + (v * v).sum(Kind::Float) * 0.5;
        }
        loss.backward();
    }

    #[test]
    fn layer_decay_scales_by_hand() {
        assert_eq!(layer_decay_scale(12, 12, 0.75), 1.0);
        assert_eq!(layer_decay_scale(11, 12, 0.75), 0.75);
        assert!((layer_decay_scale(0, 12, 0.75) - 0.031_676_352_024_078).abs() < 1e-15);
        assert_eq!(layer_decay_scale(2, 4, 0.5), 0.25);
        assert_eq!(layer_decay_scale(0, 4, 1.0), 1.0);
    }

    #[test]
    fn adamw_lr_scale_halves_the_first_step() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let a = vs.root().zeros("a", &[3, 2]);
        let b = vs.root().zeros("b", &[3, 2]);
        // Decay is on in the config but off for both parameters.
        let spec =
            |name: &str, _: &Tensor| ParamSpec { lr_scale: if name == "b" { 0.5 } else { 1.0 }, weight_decay: false };
        let mut opt = Optimizer::new_with(&vs, &adamw(0.1), spec).unwrap();
        let c = Tensor::from_slice(&[0.3f32, -2.0, 0.01, 5.0, -0.7, 1.0]).view([3, 2]);
        ((&c * &a).sum(Kind::Float) + (&c * &b).sum(Kind::Float)).backward();
        opt.step(1e-2);
        let (av, bv) = (values(&a), values(&b));
        for (x, y) in av.iter().zip(&bv) {
            assert!(x.abs() > 9e-3, "{av:?}");
            assert_eq!(*y, 0.5 * x, "{av:?} {bv:?}");
        }
    }

    #[test]
    fn lars_spec_scales_lr_and_switches_off_adaptation() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[3f32, 4.]).view([1, 2]));
        let cfg = OptimizerConfig { kind: OptimizerKind::Lars, momentum: 0.0, weight_decay: 0.5, ..Default::default() };
        let spec = |_: &str, _: &Tensor| ParamSpec { lr_scale: 0.5, weight_decay: false };
        let mut opt = Optimizer::new_with(&vs, &cfg, spec).unwrap();
        (&w * 100.0).sum(Kind::Float).backward();
        opt.step(0.01);
        // Plain SGD at lr 0.005: no decay, no trust ratio.
        assert_eq!(values(&w), vec![3.0 - 0.5f32 as f64, 4.0 - 0.5f32 as f64]);
    }

    #[test]
    fn multi_tensor_adamw_matches_per_tensor_adamw() {
        // Mixed specs, chunks of at most 40 elements (so some chunks hold several parameters and one parameter is
        // larger than a chunk), and one parameter without a gradient on the first step (its chunk takes the
        // per-tensor path then).
        let make = || {
            tch::manual_seed(3);
            let vs = nn::VarStore::new(tch::Device::Cpu);
            for (i, shape) in [vec![4, 5], vec![5], vec![4, 4], vec![64], vec![2, 2, 3], vec![3]].iter().enumerate() {
                let _ = vs.root().randn(&format!("p{i}"), shape, 0.0, 1.0);
            }
            vs
        };
        let spec = |name: &str, t: &Tensor| ParamSpec {
            lr_scale: if name < "p3" { 0.5 } else { 1.0 },
            weight_decay: t.dim() > 1,
        };
        let run = |multi_tensor: bool| {
            let vs = make();
            let mut opt = Optimizer::build(&vs, &adamw(0.05), spec, 40).unwrap();
            let sizes: Vec<usize> = opt.chunks.iter().map(|c| c.members.len()).collect();
            assert_eq!(sizes, [2, 1, 1, 1, 1], "chunks");
            opt.multi_tensor = Some(multi_tensor);
            for k in 0..3 {
                opt.zero_grad();
                backward(&vs, k, if k == 0 { "p2" } else { "" });
                opt.step(1e-2);
            }
            let mut vars: Vec<_> = vs.variables().into_iter().map(|(n, t)| (n, values(&t))).collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            let state: Vec<_> = opt.state().iter().map(|(n, t)| (n.clone(), values(t))).collect();
            (vars, state)
        };
        let (multi, per_tensor) = (run(true), run(false));
        assert_eq!((multi.0.len(), multi.1.len()), (6, 13));
        for ((name, a), (_, b)) in multi.0.iter().chain(&multi.1).zip(per_tensor.0.iter().chain(&per_tensor.1)) {
            for (x, y) in a.iter().zip(b) {
                // Same kernels on the same values: bitwise equal here; allow an ulp for other CPUs.
                assert!((x - y).abs() <= 1e-6, "{name}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn adamw_state_round_trip_resumes_exactly() {
        let make = |from: Option<&nn::VarStore>| {
            let mut vs = nn::VarStore::new(tch::Device::Cpu);
            let _ = vs.root().var_copy("w", &Tensor::from_slice(&[0.5f32, -1., 2., 0.25]).view([2, 2]));
            let _ = vs.root().var_copy("b", &Tensor::from_slice(&[0.1f32, -0.2]));
            if let Some(src) = from {
                vs.copy(src).unwrap();
            }
            vs
        };
        let vs_a = make(None);
        let mut a = Optimizer::new(&vs_a, &adamw(0.05)).unwrap();
        for k in 0..2 {
            a.zero_grad();
            backward(&vs_a, k, "");
            a.step(1e-2);
        }
        // Through a file, as checkpoints go: 0-dim int64 step and the moment views must survive safetensors.
        let path = std::env::temp_dir().join(format!("selfsup-optim-state-{}.safetensors", std::process::id()));
        Tensor::write_safetensors(&a.state(), &path).unwrap();
        let saved = Tensor::read_safetensors(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(saved.len(), 5);

        let vs_b = make(Some(&vs_a));
        let mut b = Optimizer::new(&vs_b, &adamw(0.05)).unwrap();
        b.load_state(&saved).unwrap();
        assert_eq!(b.step, 2);
        for (vs, opt) in [(&vs_a, &mut a), (&vs_b, &mut b)] {
            opt.zero_grad();
            backward(vs, 2, "");
            opt.step(1e-2);
        }
        for name in ["w", "b"] {
            assert_eq!(values(&vs_a.variables()[name]), values(&vs_b.variables()[name]), "{name}");
        }

        for missing in ["exp_avg_sq.w", "adamw.step"] {
            let partial: Vec<_> =
                saved.iter().filter(|(n, _)| n != missing).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
            let err = b.load_state(&partial).unwrap_err().to_string();
            assert!(err.contains(missing), "{err}");
        }
        // An SGD checkpoint is no AdamW state.
        let sgd = Optimizer::new(&vs_b, &OptimizerConfig { kind: OptimizerKind::Sgd, ..Default::default() }).unwrap();
        assert!(b.load_state(&sgd.state()).unwrap_err().to_string().contains("exp_avg.b"));
    }

    #[test]
    fn config_parses_old_presets_and_names_bad_fields() {
        let old: OptimizerConfig = toml::from_str("kind = \"lars\"\nbase_lr = 0.3\nmomentum = 0.9\n").unwrap();
        assert_eq!((old.beta1, old.beta2, old.eps, old.layer_decay, old.clip_grad), (0.9, 0.999, 1e-8, 1.0, 0.0));
        let new: OptimizerConfig = toml::from_str("kind = \"adamw\"\nbeta2 = 0.95\nlayer_decay = 0.75\n").unwrap();
        assert_eq!((new.kind, new.beta2, new.layer_decay), (OptimizerKind::Adamw, 0.95, 0.75));
        new.validate().unwrap();
        let bad = [
            ("optimizer.beta1", OptimizerConfig { beta1: 1.0, ..Default::default() }),
            ("optimizer.beta2", OptimizerConfig { beta2: -0.1, ..Default::default() }),
            ("optimizer.eps", OptimizerConfig { eps: f64::NAN, ..Default::default() }),
            ("optimizer.layer_decay", OptimizerConfig { layer_decay: 0.0, ..Default::default() }),
            ("optimizer.layer_decay", OptimizerConfig { layer_decay: 1.5, ..Default::default() }),
            ("optimizer.clip_grad", OptimizerConfig { clip_grad: -1.0, ..Default::default() }),
        ];
        for (field, cfg) in bad {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    /// AdamW step on the CPU, multi-tensor vs per-tensor, for ViT-Ti/16's parameter list and for the same list 48x
    /// narrower (dispatch-bound, as small kernels are on a GPU):
    /// `cargo test --release -p selfsup-models --lib adamw_step_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn adamw_step_timing() {
        for width in [192, 4] {
            let (vs, n) = vit_params(width);
            let sum =
                vs.variables().values().fold(Tensor::zeros([], tch::kind::FLOAT_CPU), |a, v| a + v.sum(Kind::Float));
            sum.backward();
            // Interleaved rounds, best round of each: the machine may be shared.
            let mut best = [f64::INFINITY; 2];
            let mut opts: Vec<Optimizer> = [false, true]
                .into_iter()
                .map(|multi_tensor| {
                    let mut opt = Optimizer::new(&vs, &adamw(0.05)).unwrap();
                    opt.multi_tensor = Some(multi_tensor);
                    opt.step(1e-4);
                    opt
                })
                .collect();
            for _ in 0..6 {
                for (opt, best) in opts.iter_mut().zip(&mut best) {
                    let t0 = std::time::Instant::now();
                    for _ in 0..10 {
                        opt.step(1e-4);
                    }
                    *best = best.min(t0.elapsed().as_secs_f64() * 1e2);
                }
            }
            println!(
                "{} tensors, {n} parameters, {} threads: per-tensor {:.2} ms/step, multi-tensor {:.2} ms/step",
                vs.variables().len(),
                tch::get_num_threads(),
                best[0],
                best[1]
            );
        }
    }

    /// The parameter list of a ViT/16 with 12 blocks of width `d` (ViT-Ti: 192, 5.5M parameters): 150 tensors.
    fn vit_params(d: i64) -> (nn::VarStore, i64) {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let h = 4 * d;
        let mut shapes = vec![
            ("cls_token".to_string(), vec![1, 1, d]),
            ("pos_embed".to_string(), vec![1, 197, d]),
            ("patch_embed.proj.weight".to_string(), vec![d, 3, 16, 16]),
            ("patch_embed.proj.bias".to_string(), vec![d]),
        ];
        for i in 0..12 {
            for (n, s) in [
                ("norm1.weight", vec![d]),
                ("norm1.bias", vec![d]),
                ("attn.qkv.weight", vec![3 * d, d]),
                ("attn.qkv.bias", vec![3 * d]),
                ("attn.proj.weight", vec![d, d]),
                ("attn.proj.bias", vec![d]),
                ("norm2.weight", vec![d]),
                ("norm2.bias", vec![d]),
                ("mlp.fc1.weight", vec![h, d]),
                ("mlp.fc1.bias", vec![h]),
                ("mlp.fc2.weight", vec![d, h]),
                ("mlp.fc2.bias", vec![d]),
            ] {
                shapes.push((format!("blocks.{i}.{n}"), s));
            }
        }
        shapes.push(("norm.weight".to_string(), vec![d]));
        shapes.push(("norm.bias".to_string(), vec![d]));
        let mut n = 0;
        for (name, shape) in shapes {
            n += shape.iter().product::<i64>();
            let _ = vs.root().randn(&name.replace('.', "_"), &shape, 0.0, 0.02);
        }
        (vs, n)
    }
}
