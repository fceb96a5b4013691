//! AdamW as `torch.optim.AdamW` (β = (0.9, 0.999), ε = 1e-8): decoupled
//! weight decay w ← w(1 − lr·λ), then the bias-corrected Adam step.
use tch::Tensor;

use super::{Amounts, Hyper, Layout};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

#[allow(clippy::too_many_arguments)]
pub(super) fn update(
    w: &mut Tensor,
    grad: &Tensor,
    [first, second]: [&mut Tensor; 2],
    layout: &Layout,
    lr: f64,
    hyper: Hyper,
    step: i64,
    amounts: &Amounts,
) {
    if hyper.weight_decay != 0.0 {
        let _ = w.g_sub_(&(&*w * &layout.decayed * amounts.step(lr * hyper.weight_decay)));
    }
    let grad = amounts.gradient(grad.shallow_clone());
    let _ = first.g_mul_(&amounts.rate(BETA1)).g_add_(&(&grad * amounts.step(1.0 - BETA1)));
    let _ = second.g_mul_(&amounts.rate(BETA2)).g_add_(&(&grad * &grad * amounts.step(1.0 - BETA2)));
    let correction1 = 1.0 - BETA1.powi(step as i32);
    let correction2 = 1.0 - BETA2.powi(step as i32);
    let denominator = (&*second / correction2).sqrt() + EPSILON;
    let _ = w.g_sub_(&(&*first / denominator * amounts.step(lr / correction1)));
}
