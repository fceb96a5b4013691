//! Random horizontal flip (appendix A: applied with p = 0.5 after the crop).
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlipConfig {
    /// Chance of mirroring left-right; the paper's 0.5.
    pub probability: f64,
}

impl Default for FlipConfig {
    fn default() -> Self {
        Self { probability: 0.5 }
    }
}

impl Augmentation for FlipConfig {
    type Params = ();

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<()> {
        super::applies(self.probability, rng).then_some(())
    }

    fn apply(image: &mut FloatImage, _: &()) {
        let width = image.width;
        for row in image.data.chunks_exact_mut(width * 3) {
            for x in 0..width / 2 {
                for channel in 0..3 {
                    row.swap(x * 3 + channel, (width - 1 - x) * 3 + channel);
                }
            }
        }
    }

    fn apply_batch(images: Tensor, _: &[()]) -> Tensor {
        images.flip([3])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_each_row() {
        let mut image = FloatImage { width: 3, height: 1, data: vec![0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3] };
        FlipConfig::apply(&mut image, &());
        assert_eq!(image.data, vec![0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1]);
    }
}
