//! AdamW (Loshchilov & Hutter 2019, <https://arxiv.org/abs/1711.05101>) exactly as `torch.optim.AdamW`: the
//! per-tensor update and the multi-tensor path that updates whole flat fp32 chunks of parameters at once.

use tch::{Kind, Tensor};

use super::chunk::flat;
use super::{Buffers, Optimizer, Param, ParamSpec};

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
                let g = flat(&grads);
                let mut p = chunk.flat_params(&self.params);
                let [exp_avg, exp_avg_sq] = &mut chunk.state[..] else { unreachable!("AdamW chunks hold two moments") };
                h.apply(&mut p, &g, exp_avg, exp_avg_sq, chunk.spec);
                chunk.write_back(&mut self.params, &p);
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
