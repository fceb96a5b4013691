//! Random vertical flip: mirrors the view top to bottom, as torchvision's
//! `RandomVerticalFlip`. Not in the paper's pipelines (upright photographs
//! seldom appear upside down); it is one of the geometric ops section 3
//! groups with rotation, and is useful where orientation carries no meaning
//! (aerial, microscopy and other top-down images).
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerticalFlipConfig {
    /// Chance of mirroring top to bottom; torchvision's default 0.5.
    pub probability: f64,
}

impl Default for VerticalFlipConfig {
    fn default() -> Self {
        Self { probability: 0.5 }
    }
}

impl Augmentation for VerticalFlipConfig {
    type Params = ();

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<()> {
        super::applies(self.probability, rng).then_some(())
    }

    fn apply(image: &mut FloatImage, _: &()) {
        let stride = image.width * 3;
        let height = image.height;
        for y in 0..height / 2 {
            let (top, bottom) = image.data.split_at_mut((height - 1 - y) * stride);
            top[y * stride..(y + 1) * stride].swap_with_slice(&mut bottom[..stride]);
        }
    }

    fn apply_batch(images: Tensor, _: &[()]) -> Tensor {
        images.flip([2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_the_rows() {
        let rows = |values: &[f32]| values.iter().flat_map(|&v| [v; 6]).collect::<Vec<f32>>();
        let mut image = FloatImage { width: 2, height: 3, data: rows(&[0.1, 0.2, 0.3]) };
        VerticalFlipConfig::apply(&mut image, &());
        assert_eq!(image.data, rows(&[0.3, 0.2, 0.1]));
    }
}
