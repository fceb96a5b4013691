//! LARS as in the paper's code (`tf2/lars_optimizer.py`, classic momentum):
//!
//! g ← ∇w + λw                          (decayed parameters only)
//! r ← η‖w‖/‖g‖ if both norms > 0, else 1 (adapted parameters only)
//! v ← μv + lr·r·g
//! w ← w − v
//!
//! Note the momentum accumulates the already-scaled step, unlike PyTorch's SGD.
use tch::{Kind, Tensor};

use super::{Hyper, Param};

pub fn update(param: &mut Param, grad: &Tensor, velocity: &mut Tensor, lr: f64, hyper: Hyper) {
    let grad = super::decayed_gradient(param, grad, hyper.weight_decay);
    let w = &mut param.tensor;
    let step = if param.decay_and_adapt {
        // Kept on the device (no .item()): the ratio is a 0-d tensor.
        let w_norm = w.norm().to_kind(Kind::Float);
        let g_norm = grad.norm().to_kind(Kind::Float);
        let usable = w_norm.gt(0.0).logical_and(&g_norm.gt(0.0));
        let trust = (hyper.trust_coefficient * &w_norm / &g_norm).where_self(&usable, &w_norm.ones_like());
        grad * (trust * lr)
    } else {
        grad * lr
    };
    let _ = velocity.g_mul_scalar_(hyper.momentum).g_add_(&step);
    let _ = w.g_sub_(velocity);
}
