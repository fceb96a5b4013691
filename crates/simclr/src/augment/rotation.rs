//! Random rotation by a multiple of 90 degrees (one of the ablation ops of
//! section 3, Figure 4(f)): 90, 180 or 270 degrees counter-clockwise, each
//! equally likely, as torchvision's `rotate(img, 90 * k)` on square views.
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotationConfig {
    /// Chance of rotating at all; 0.5 by default (not in the paper's main pipeline).
    pub probability: f64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self { probability: 0.5 }
    }
}

/// Quarter turns counter-clockwise, 1 to 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RotationParams {
    pub quarter_turns: u8,
}

impl Augmentation for RotationConfig {
    type Params = RotationParams;

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<RotationParams> {
        super::applies(self.probability, rng).then(|| RotationParams { quarter_turns: rng.random_range(1..=3) })
    }

    /// Rotates a square image in place.
    fn apply(image: &mut FloatImage, params: &RotationParams) {
        let side = image.width;
        assert_eq!(side, image.height, "views are square");
        let source = image.data.clone();
        let last = side - 1;
        for y in 0..side {
            for x in 0..side {
                let (sy, sx) = match params.quarter_turns {
                    1 => (x, last - y),
                    2 => (last - y, last - x),
                    _ => (last - x, y),
                };
                image.data[(y * side + x) * 3..][..3].copy_from_slice(&source[(sy * side + sx) * 3..][..3]);
            }
        }
    }

    fn apply_batch(images: Tensor, params: &[RotationParams]) -> Tensor {
        let mut images = images;
        for turns in 1..=3u8 {
            let chosen: Vec<(usize, ())> =
                params.iter().enumerate().filter(|(_, p)| p.quarter_turns == turns).map(|(i, _)| (i, ())).collect();
            images = super::on_subset(images, &chosen, |x, _| x.rot90(i64::from(turns), [2, 3]));
        }
        images
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_turn_moves_the_top_right_corner_to_the_top_left() {
        // [[1, 2], [3, 4]] turned counter-clockwise is [[2, 4], [1, 3]].
        let gray =
            |values: [f32; 4]| FloatImage { width: 2, height: 2, data: values.iter().flat_map(|v| [*v; 3]).collect() };
        let mut image = gray([1.0, 2.0, 3.0, 4.0]);
        RotationConfig::apply(&mut image, &RotationParams { quarter_turns: 1 });
        assert_eq!(image, gray([2.0, 4.0, 1.0, 3.0]));
        RotationConfig::apply(&mut image, &RotationParams { quarter_turns: 3 });
        assert_eq!(image, gray([1.0, 2.0, 3.0, 4.0]));
    }
}
