//! AdamW (Loshchilov & Hutter 2019, <https://arxiv.org/abs/1711.05101>) exactly as `torch.optim.AdamW`: the
//! per-tensor update and the multi-tensor path that updates whole flat fp32 chunks of parameters at once.

use tch::{Device, Kind, Tensor};

use super::{Buffers, Optimizer, Param, ParamSpec};

/// Largest number of elements AdamW updates in one flat chunk; bounds the temporaries of a step to a few such
/// buffers (64 MiB each in fp32).
pub(super) const CHUNK_NUMEL: i64 = 1 << 24;

/// AdamW parameters with the same spec, device and dtype whose moments live in two flat fp32 buffers. tch 0.24
/// exposes neither `_foreach_*` nor `_fused_adamw_`, so on CUDA an fp32 chunk is updated as one tensor: the grads
/// and params are concatenated, ~10 kernels update the whole chunk, and one copy per parameter writes the result
/// back (instead of ~10 kernels per parameter).
pub(super) struct Chunk {
    spec: ParamSpec,
    device: Device,
    kind: Kind,
    pub(super) members: Vec<usize>,
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

impl Optimizer {
    pub(super) fn step_adamw(&mut self, lr: f64) {
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
}

/// Groups AdamW parameters into chunks (same spec, device and dtype; at most `max_numel` elements unless one
/// parameter is larger) and gives each parameter its moments as views into the chunk's zeroed flat buffers.
pub(super) fn adam_chunks(params: &mut [Param], max_numel: i64) -> Vec<Chunk> {
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
