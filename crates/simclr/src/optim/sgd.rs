//! SGD with momentum, as `torch.optim.SGD` (dampening 0, no Nesterov):
//! b ← μb + (∇w + λw); w ← w − lr·b. Weight decay skips BatchNorm and biases.
use tch::Tensor;

use super::{Hyper, Param};

pub fn update(param: &mut Param, grad: &Tensor, buffer: &mut Tensor, lr: f64, hyper: Hyper) {
    let grad = super::decayed_gradient(param, grad, hyper.weight_decay);
    let w = &mut param.tensor;
    let _ = buffer.g_mul_scalar_(hyper.momentum).g_add_(&grad);
    let _ = w.g_sub_(&(&*buffer * lr));
}
