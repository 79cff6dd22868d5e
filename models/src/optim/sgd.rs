//! SGD with momentum and LARS (You et al. 2017, <https://arxiv.org/abs/1708.03888>, as used by SimCLR).

use tch::{Kind, Tensor};

use super::{Buffers, Optimizer, OptimizerKind};

impl Optimizer {
    pub(super) fn step_momentum(&mut self, lr: f64) {
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
}
