//! AdamW as `torch.optim.AdamW` (β = (0.9, 0.999), ε = 1e-8): decoupled
//! weight decay w ← w(1 − lr·λ), then the bias-corrected Adam step.
use tch::Tensor;

use super::{Amounts, Hyper, Layout};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

/// What an update multiplies by at step t, computed once per update on the
/// device from the rate and the step count there (see `Optimizer::steps`),
/// in f64 as the host would.
pub(super) struct Factors {
    /// lr·λ, or `None` without weight decay.
    decay: Option<Tensor>,
    /// lr / (1 − β₁ᵗ).
    step: Tensor,
    /// 1 − β₂ᵗ.
    correction2: Tensor,
}

impl Factors {
    pub(super) fn new(lr: &Tensor, steps: &Tensor, hyper: Hyper) -> Self {
        let correction = |beta: f64| -Tensor::pow_scalar(beta, &steps.to_kind(tch::Kind::Double)) + 1.0;
        let decay = (hyper.weight_decay != 0.0).then(|| lr * hyper.weight_decay);
        Self { decay, step: lr / correction(BETA1), correction2: correction(BETA2) }
    }
}

pub(super) fn update(
    w: &mut Tensor,
    grad: &Tensor,
    [first, second]: [&mut Tensor; 2],
    layout: &Layout,
    factors: &Factors,
    amounts: &Amounts,
) {
    if let Some(decay) = &factors.decay {
        let _ = w.g_sub_(&(&*w * &layout.decayed * amounts.scaled(decay)));
    }
    let grad = amounts.gradient(grad.shallow_clone());
    let _ = first.g_mul_(&amounts.rate(BETA1)).g_add_(&(&grad * amounts.step(1.0 - BETA1)));
    let _ = second.g_mul_(&amounts.rate(BETA2)).g_add_(&(&grad * &grad * amounts.step(1.0 - BETA2)));
    let denominator = (&*second / &factors.correction2).sqrt() + EPSILON;
    let _ = w.g_sub_(&(&*first / denominator * amounts.scaled(&factors.step)));
}
