//! SGD with momentum, as `torch.optim.SGD` (dampening 0, no Nesterov):
//! b ← μb + (∇w + λw); w ← w − lr·b. Weight decay skips BatchNorm and biases.
use tch::Tensor;

use super::{Hyper, Param};

pub fn update(param: &mut Param, grad: &Tensor, buffer: &mut Tensor, lr: f64, hyper: Hyper) {
    let w = &mut param.tensor;
    let grad = if param.decay_and_adapt && hyper.weight_decay != 0.0 {
        grad + hyper.weight_decay * &*w
    } else {
        grad.shallow_clone()
    };
    let _ = buffer.g_mul_scalar_(hyper.momentum).g_add_(&grad);
    let _ = w.g_sub_(&(&*buffer * lr));
}
