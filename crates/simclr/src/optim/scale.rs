//! Dynamic loss scaling for fp16 autocast, as PyTorch's
//! `torch.amp.GradScaler` does it with its defaults: the loss is multiplied
//! by a scale (2^16 at first) before the backward pass, so that gradients
//! too small for fp16 survive it, and the gradient divided by it before the
//! update. A step whose gradient overflowed (a non-finite value) is skipped
//! and the scale halved; after 2000 finite steps in a row it doubles. The
//! scale is a power of two, so scaling and unscaling are exact. Every
//! number stays on the device (libtorch's `_amp_update_scale_`), so no step
//! waits for the host.
use tch::{Device, Kind, Tensor};

/// The scale of the first step (GradScaler's `init_scale`).
pub const INITIAL_SCALE: f64 = 65536.0;
/// Finite steps in a row after which the scale doubles (`growth_interval`).
pub const GROWTH_INTERVAL: i64 = 2000;

#[derive(Debug)]
pub struct LossScale {
    /// fp32, 0-d, on the device.
    scale: Tensor,
    /// Finite steps since the scale last changed: int32, 0-d, on the device.
    growth: Tensor,
}

impl LossScale {
    pub fn new(device: Device) -> Self {
        Self {
            scale: Tensor::full([], INITIAL_SCALE, (Kind::Float, device)),
            growth: Tensor::zeros([], (Kind::Int, device)),
        }
    }

    /// `loss` times the scale, to back-propagate.
    pub fn scaled(&self, loss: &Tensor) -> Tensor {
        loss * &self.scale
    }

    /// Divides a gradient of a scaled loss by the scale, in place.
    pub fn unscale(&self, gradient: &mut Tensor) {
        let _ = tch::no_grad(|| gradient.g_div_(&self.scale));
    }

    /// After a step whose loss is `loss` and whose (unscaled) gradient was
    /// all finite where `finite` (0-d bool) says so: halves the scale on an
    /// overflow, doubles it after [`GROWTH_INTERVAL`] finite steps. Returns
    /// whether the step is sound for the divergence count: the loss finite,
    /// and the gradient too unless the scale was at least 1 (an overflow
    /// then is the scale's to fix, as GradScaler's skipped steps are; below
    /// 1 the gradient overflows unscaled, which is divergence).
    pub fn update(&mut self, loss: &Tensor, finite: &Tensor) -> Tensor {
        let sound = loss.isfinite().logical_and(&finite.logical_or(&self.scale.ge(1.0)));
        let found_inf = finite.logical_not().to_kind(Kind::Float);
        tch::no_grad(|| {
            let _ = self.scale.internal_amp_update_scale_(&self.growth, &found_inf, 2.0, 0.5, GROWTH_INTERVAL);
        });
        sound
    }

    /// The scale now (reads the device).
    pub fn value(&self) -> f64 {
        self.scale.double_value(&[])
    }

    /// The state a checkpoint keeps, by name.
    pub fn tensors(&self) -> [(&'static str, &Tensor); 2] {
        [("loss_scale", &self.scale), ("loss_scale_growth", &self.growth)]
    }

    /// The same, to write into (a checkpoint's values, a broadcast).
    pub fn tensors_mut(&mut self) -> [(&'static str, &mut Tensor); 2] {
        [("loss_scale", &mut self.scale), ("loss_scale_growth", &mut self.growth)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_an_overflow_and_doubles_after_the_growth_interval() {
        let mut scale = LossScale::new(Device::Cpu);
        let loss = Tensor::from(2.0f32);
        let (yes, no) = (Tensor::from(true), Tensor::from(false));
        assert!(bool::try_from(scale.update(&loss, &no)).unwrap(), "an overflow at 2^16 is the scale's");
        assert_eq!(scale.value(), INITIAL_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            let _ = scale.update(&loss, &yes);
        }
        assert_eq!(scale.value(), INITIAL_SCALE / 2.0, "one step short of the interval");
        let _ = scale.update(&loss, &yes);
        assert_eq!(scale.value(), INITIAL_SCALE);
        // An overflow resets the count: the next doubling is a whole interval away.
        let _ = scale.update(&loss, &no);
        for _ in 0..GROWTH_INTERVAL - 1 {
            let _ = scale.update(&loss, &yes);
        }
        assert_eq!(scale.value(), INITIAL_SCALE / 2.0);
        // Below 1, an overflow is divergence; a non-finite loss always is.
        for _ in 0..16 {
            let _ = scale.update(&loss, &no);
        }
        assert_eq!(scale.value(), 0.5);
        assert!(!bool::try_from(scale.update(&loss, &no)).unwrap());
        assert!(!bool::try_from(LossScale::new(Device::Cpu).update(&Tensor::from(f32::NAN), &no)).unwrap());
    }

    #[test]
    fn scaling_and_unscaling_are_exact() {
        let scale = LossScale::new(Device::Cpu);
        let gradient = Tensor::randn([1000], (Kind::Float, Device::Cpu)) * 1e-6;
        let mut scaled = scale.scaled(&gradient);
        scale.unscale(&mut scaled);
        assert!(scaled.equal(&gradient));
    }
}
