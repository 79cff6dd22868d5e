//! SGD with momentum and LARS (You et al. 2017, <https://arxiv.org/abs/1708.03888>, as used by SimCLR): the
//! per-tensor update and the multi-tensor path over flat fp32 chunks (per-parameter trust ratios from segment
//! norms), the same arithmetic either way.

use tch::{Kind, Tensor};

use super::chunk::flat;
use super::{Buffers, Optimizer, OptimizerKind};

impl Optimizer {
    pub(super) fn step_momentum(&mut self, lr: f64) {
        let (wd, eta, mu, lars) =
            (self.cfg.weight_decay, self.cfg.eta, self.cfg.momentum, self.cfg.kind == OptimizerKind::Lars);
        // LARC's clip mode: the adapted rate never exceeds the scheduled one.
        let clip = self.cfg.lars_clip.then_some(lr);
        for chunk in &mut self.chunks {
            let grads: Vec<Tensor> = chunk.members.iter().map(|&i| self.params[i].tensor.grad()).collect();
            let multi_tensor = self.multi_tensor.unwrap_or(chunk.device.is_cuda());
            let decays = chunk.spec.weight_decay;
            let step_lr = -lr * chunk.spec.lr_scale;
            if multi_tensor && chunk.kind == Kind::Float && grads.iter().all(Tensor::defined) {
                let mut p = chunk.flat_params(&self.params);
                let mut g = flat(&grads);
                if decays && wd > 0.0 {
                    g = g + &p * wd;
                }
                if decays && lars {
                    let (pn, gn) = (chunk.segment_norms(&p), chunk.segment_norms(&g));
                    g = g * chunk.expand(&trust_ratio(&pn, &gn, eta, clip));
                }
                let momentum = &mut chunk.state[0];
                let _ = momentum.g_mul_scalar_(mu).g_add_(&g);
                let _ = p.g_add_(&(&*momentum * step_lr));
                chunk.write_back(&mut self.params, &p);
                continue;
            }
            for (&i, grad) in chunk.members.iter().zip(grads) {
                let param = &mut self.params[i];
                let Buffers::Momentum(momentum) = &mut param.buffers else {
                    unreachable!("SGD/LARS params hold momentum")
                };
                if !grad.defined() {
                    continue;
                }
                let mut g = grad.to_kind(Kind::Float);
                if decays && wd > 0.0 {
                    g = g + &param.tensor * wd;
                }
                if decays && lars {
                    let trust = trust_ratio(&param.tensor.norm(), &g.norm(), eta, clip);
                    g = g * trust;
                }
                let _ = momentum.g_mul_scalar_(mu).g_add_(&g);
                let _ = param.tensor.g_add_(&(&*momentum * step_lr));
            }
        }
    }
}

/// LARS's trust ratio `eta * |p| / |g|`, 1 where either norm is 0 (elementwise over norms of any shape). With
/// `clip = Some(lr)` (LARC's clip mode, solo-learn's `clip_lr`), `min(ratio / lr, 1)`: the layer's rate
/// `lr * ratio` is capped at `lr`, so layers with tiny gradients (a teacher-matching head early in DINO) are not
/// thrown around by ratios of 100 and more.
fn trust_ratio(pn: &Tensor, gn: &Tensor, eta: f64, clip: Option<f64>) -> Tensor {
    let mut ratio = (pn * eta) / gn;
    if let Some(lr) = clip {
        ratio = if lr > 0.0 { (ratio / lr).clamp_max(1.0) } else { Tensor::ones_like(&ratio) };
    }
    let ok = pn.gt(0.0).logical_and(&gn.gt(0.0));
    ratio.where_self(&ok, &Tensor::ones_like(&ratio))
}
