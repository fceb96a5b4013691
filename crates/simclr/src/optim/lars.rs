//! LARS as in the paper's code (`tf2/lars_optimizer.py`, classic momentum):
//!
//! g ← ∇w + λw                          (decayed parameters only)
//! r ← η‖w‖/‖g‖ if both norms > 0, else 1 (adapted parameters only)
//! v ← μv + lr·r·g
//! w ← w − v
//!
//! Note the momentum accumulates the already-scaled step, unlike PyTorch's SGD.
//! Norms are per parameter tensor, taken over the flat buffers by segment.
use tch::{Kind, Tensor};

use super::{Amounts, Hyper, Layout};

pub(super) fn update(
    weights: &mut Tensor,
    grad: &Tensor,
    velocity: &mut Tensor,
    layout: &Layout,
    lr: &Tensor,
    hyper: Hyper,
    amounts: &Amounts,
) {
    let grad = amounts.gradient(super::decayed_gradient(weights, grad, layout, hyper.weight_decay));
    // Kept on the device (no .item()): the ratios are a `[P]` tensor.
    let w_norm = layout.norms(weights).to_kind(Kind::Float);
    let g_norm = layout.norms(&grad).to_kind(Kind::Float);
    let usable = w_norm.gt(0.0).logical_and(&g_norm.gt(0.0)).logical_and(&layout.adapted);
    let trust = (hyper.trust_coefficient * &w_norm / &g_norm).where_self(&usable, &w_norm.ones_like()) * lr;
    let _ = velocity.g_mul_(&amounts.rate(hyper.momentum)).addcmul_(&grad, &layout.spread(&trust));
    // w − v, as w + v·(−1): exact, and w itself where the update is shut.
    let _ = weights.addcmul_(velocity, &amounts.step(-1.0));
}
