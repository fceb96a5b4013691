//! Random conversion to grayscale (appendix A: p = 0.2), with the ITU-R
//! 601 luma weights torchvision uses, replicated to three channels.
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Augmentation, FloatImage};

/// torchvision's `rgb_to_grayscale` weights (ITU-R 601 with red written
/// 0.2989, as in torchvision's code; PIL's `convert("L")` uses 0.299).
pub const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrayscaleConfig {
    /// The paper's 0.2.
    pub probability: f64,
}

impl Default for GrayscaleConfig {
    fn default() -> Self {
        Self { probability: 0.2 }
    }
}

pub fn luma(rgb: &[f32]) -> f32 {
    LUMA[0] * rgb[0] + LUMA[1] * rgb[1] + LUMA[2] * rgb[2]
}

/// The luma of a `[n, 3, h, w]` batch, as `[n, 1, h, w]`.
pub fn luma_batch(images: &Tensor) -> Tensor {
    luma_with(images, &luma_weights(images.device()))
}

/// The luma weights as a `[1, 3, 1, 1]` tensor on `device`, for [`luma_with`].
pub fn luma_weights(device: tch::Device) -> Tensor {
    crate::device::upload_slice(&LUMA, device).view([1, 3, 1, 1])
}

/// [`luma_batch`] with the weights already on the device.
pub fn luma_with(images: &Tensor, weights: &Tensor) -> Tensor {
    (images * weights).sum_dim_intlist(&[1i64][..], true, images.kind())
}

impl Augmentation for GrayscaleConfig {
    type Params = ();

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<()> {
        super::applies(self.probability, rng).then_some(())
    }

    fn apply(image: &mut FloatImage, _: &()) {
        for rgb in image.data.chunks_exact_mut(3) {
            let gray = luma(rgb);
            rgb.fill(gray);
        }
    }

    fn apply_batch(images: Tensor, _: &[()]) -> Tensor {
        luma_batch(&images).expand([-1, 3, -1, -1], false).contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_luma_weights() {
        let mut image = FloatImage { width: 1, height: 1, data: vec![1.0, 0.0, 0.0] };
        GrayscaleConfig::apply(&mut image, &());
        assert_eq!(image.data, vec![0.2989; 3]);
    }
}
