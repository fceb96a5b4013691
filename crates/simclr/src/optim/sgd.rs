//! SGD with momentum, as `torch.optim.SGD` (dampening 0, no Nesterov):
//! b ← μb + (∇w + λw); w ← w − lr·b. Weight decay skips BatchNorm and biases.
use tch::Tensor;

use super::{Hyper, Layout};

pub fn update(weights: &mut Tensor, grad: &Tensor, buffer: &mut Tensor, layout: &Layout, lr: f64, hyper: Hyper) {
    let grad = super::decayed_gradient(weights, grad, layout, hyper.weight_decay);
    let _ = buffer.g_mul_scalar_(hyper.momentum).g_add_(&grad);
    let _ = weights.g_sub_(&(&*buffer * lr));
}
