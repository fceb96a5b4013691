//! SGD with momentum, as `torch.optim.SGD` (dampening 0, no Nesterov):
//! b ← μb + (∇w + λw); w ← w − lr·b. Weight decay skips BatchNorm and biases.
use tch::Tensor;

use super::{Amounts, Hyper, Layout};

pub(super) fn update(
    weights: &mut Tensor,
    grad: &Tensor,
    buffer: &mut Tensor,
    layout: &Layout,
    lr: &Tensor,
    hyper: Hyper,
    amounts: &Amounts,
) {
    let grad = amounts.gradient(super::decayed_gradient(weights, grad, layout, hyper.weight_decay));
    let _ = buffer.g_mul_(&amounts.rate(hyper.momentum)).g_add_(&grad);
    let _ = weights.g_sub_(&(&*buffer * amounts.scaled(lr)));
}
