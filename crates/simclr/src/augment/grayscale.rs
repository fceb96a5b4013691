//! Random conversion to grayscale (appendix A: p = 0.2), with the ITU-R
//! 601 luma weights torchvision uses, replicated to three channels.
use serde::{Deserialize, Serialize};

use super::FloatImage;

/// torchvision's `rgb_to_grayscale` weights.
pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

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

impl GrayscaleConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        super::check_probability("augment.grayscale.probability", self.probability, problems);
    }

    pub fn apply(&self, image: &mut FloatImage, rng: &mut impl rand::Rng) {
        if rng.random::<f64>() < self.probability {
            to_grayscale(image);
        }
    }
}

pub fn luma(rgb: &[f32]) -> f32 {
    LUMA[0] * rgb[0] + LUMA[1] * rgb[1] + LUMA[2] * rgb[2]
}

pub fn to_grayscale(image: &mut FloatImage) {
    for rgb in image.data.chunks_exact_mut(3) {
        let gray = luma(rgb);
        rgb.fill(gray);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_luma_weights() {
        let mut image = FloatImage { width: 1, height: 1, data: vec![1.0, 0.0, 0.0] };
        to_grayscale(&mut image);
        assert_eq!(image.data, vec![0.299; 3]);
    }
}
