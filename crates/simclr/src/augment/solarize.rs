//! Solarisation (SimCLR v2, arXiv 2006.10029, following BYOL): pixels at or
//! above the threshold are inverted, as torchvision's `solarize`. BYOL and
//! SimCLR v2 apply it with p = 0.2 to one view only (see
//! `augment.second_view`).
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SolarizeConfig {
    /// BYOL's 0.2 (on the second view).
    pub probability: f64,
    /// Pixels >= threshold become 1 - x; 0.5 as in BYOL.
    pub threshold: f64,
}

impl Default for SolarizeConfig {
    fn default() -> Self {
        Self { probability: 0.2, threshold: 0.5 }
    }
}

/// The threshold of one solarised view.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SolarizeParams {
    pub threshold: f32,
}

impl Augmentation for SolarizeConfig {
    type Params = SolarizeParams;

    fn check(&self, field: &str, _image_size: u32, problems: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.threshold) {
            problems.push(format!("{field}: threshold = {}: must be in [0, 1]", self.threshold));
        }
    }

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<SolarizeParams> {
        super::applies(self.probability, rng).then_some(SolarizeParams { threshold: self.threshold as f32 })
    }

    fn apply(image: &mut FloatImage, params: &SolarizeParams) {
        let threshold = params.threshold;
        image.data.iter_mut().filter(|v| **v >= threshold).for_each(|v| *v = 1.0 - *v);
    }

    /// Each image at its own threshold (AutoAugment's sub-policies differ).
    fn apply_batch(images: Tensor, params: &[SolarizeParams]) -> Tensor {
        let thresholds: Vec<f32> = params.iter().map(|p| p.threshold).collect();
        let thresholds = super::per_image(&thresholds, &images).to_kind(images.kind());
        let inverted: Tensor = 1.0 - &images;
        inverted.where_self(&images.ge_tensor(&thresholds), &images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverts_from_the_threshold_up() {
        let mut image = FloatImage { width: 1, height: 1, data: vec![0.25, 0.5, 0.75] };
        SolarizeConfig::apply(&mut image, &SolarizeParams { threshold: 0.5 });
        assert_eq!(image.data, vec![0.25, 0.5, 0.25]);
    }
}
