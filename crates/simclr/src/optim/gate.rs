//! The update gate: a non-finite loss or gradient shuts the step on the
//! device, without a read-back.
use tch::Tensor;

/// The numbers an update multiplies by, as 0-d tensors on the device, and
/// the verdict that may shut it.
///
/// On a GPU, [`Optimizer::step_if_finite`](super::Optimizer::step_if_finite) cannot read its verdict without
/// waiting for the device, so the update runs either way and the verdict
/// decides its numbers: where it is shut, every step amount is 0, every
/// decay rate 1 and the gradient 0, so weights and state stay exactly as
/// they were. This replaces backups of the weights and state and the passes
/// that restored them (about a dozen passes over 45 MB per ResNet-18 step).
/// Open, or without a verdict, the values are the plain numbers, and the
/// arithmetic is the same as with scalars.
pub(super) struct Amounts {
    /// The verdict, a 0-d bool; `None`: always open.
    pub(super) open: Option<Tensor>,
    pub(super) device: tch::Device,
}

impl Amounts {
    /// `x`, or 0 where shut: a learning rate, a step's factor.
    pub(super) fn step(&self, x: f64) -> Tensor {
        self.value(x, 0.0)
    }

    /// `amount` (a 0-d tensor on the device), or 0 where shut.
    pub(super) fn scaled(&self, amount: &Tensor) -> Tensor {
        match &self.open {
            Some(open) => amount.where_scalarother(open, 0.0),
            None => amount.shallow_clone(),
        }
    }

    /// `rate`, or 1 where shut: how much of a state buffer is kept.
    pub(super) fn rate(&self, rate: f64) -> Tensor {
        self.value(rate, 1.0)
    }

    /// `open_value` as a 0-d tensor, or `shut_value` where the verdict is false.
    pub(super) fn value(&self, open_value: f64, shut_value: f64) -> Tensor {
        match &self.open {
            Some(open) => Tensor::where_scalar(open, open_value, shut_value),
            None => Tensor::full([], open_value, (tch::Kind::Float, self.device)),
        }
    }

    /// The gradient, or 0 where shut: its NaN or infinities must not reach
    /// the state (NaN · 0 is NaN).
    pub(super) fn gradient(&self, grad: Tensor) -> Tensor {
        match &self.open {
            Some(open) => grad.where_scalarother(open, 0.0),
            None => grad,
        }
    }
}
