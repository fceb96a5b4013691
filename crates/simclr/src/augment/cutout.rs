//! Cutout (DeVries and Taylor 2017; one of the ablation ops of section 3,
//! Figure 4(e)): a square of side `size_fraction` of the view, centred at a
//! uniformly drawn pixel and clipped at the borders, set to black.
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Augmentation, CropBox, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CutoutConfig {
    /// 0.5 by default (not in the paper's main pipeline).
    pub probability: f64,
    /// Side of the square as a fraction of the view side: DeVries and
    /// Taylor's 16 px on CIFAR's 32.
    pub size_fraction: f64,
}

impl Default for CutoutConfig {
    fn default() -> Self {
        Self { probability: 0.5, size_fraction: 0.5 }
    }
}

impl Augmentation for CutoutConfig {
    type Params = CropBox;

    fn check(&self, field: &str, _image_size: u32, problems: &mut Vec<String>) {
        if !(self.size_fraction > 0.0 && self.size_fraction <= 1.0) {
            problems.push(format!("{field}: size_fraction = {}: must be in (0, 1]", self.size_fraction));
        }
    }

    /// The box, clipped to the view.
    fn sample<R: Rng + ?Sized>(&self, side: usize, rng: &mut R) -> Option<CropBox> {
        if !super::applies(self.probability, rng) {
            return None;
        }
        let mask = ((side as f64 * self.size_fraction).round() as i64).max(1);
        let (cy, cx) = (rng.random_range(0..side) as i64, rng.random_range(0..side) as i64);
        let clip = |v: i64| v.clamp(0, side as i64) as u32;
        let (top, left) = (clip(cy - mask / 2), clip(cx - mask / 2));
        let (bottom, right) = (clip(cy - mask / 2 + mask), clip(cx - mask / 2 + mask));
        Some(CropBox { top, left, height: bottom - top, width: right - left })
    }

    fn apply(image: &mut FloatImage, cut: &CropBox) {
        for y in cut.top..cut.top + cut.height {
            let start = (y as usize * image.width + cut.left as usize) * 3;
            image.data[start..start + cut.width as usize * 3].fill(0.0);
        }
    }

    fn apply_batch(images: Tensor, boxes: &[CropBox]) -> Tensor {
        let (_, _, height, width) = images.size4().expect("a [n, 3, h, w] batch");
        let device = images.device();
        let column = |values: Vec<i64>| super::per_image(&values, &images);
        let top = column(boxes.iter().map(|b| i64::from(b.top)).collect());
        let bottom = column(boxes.iter().map(|b| i64::from(b.top + b.height)).collect());
        let left = column(boxes.iter().map(|b| i64::from(b.left)).collect());
        let right = column(boxes.iter().map(|b| i64::from(b.left + b.width)).collect());
        let rows = Tensor::arange(height, (tch::Kind::Int64, device)).view([1, 1, -1, 1]);
        let columns = Tensor::arange(width, (tch::Kind::Int64, device)).view([1, 1, 1, -1]);
        let inside = rows.ge_tensor(&top).logical_and(&rows.lt_tensor(&bottom));
        let inside = inside.logical_and(&columns.ge_tensor(&left)).logical_and(&columns.lt_tensor(&right));
        images.masked_fill(&inside, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_stay_inside_and_have_the_side_asked_for_away_from_borders() {
        let config = CutoutConfig { probability: 1.0, size_fraction: 0.5 };
        let mut rng = super::super::view_rng(2, 0, 0, 0);
        let mut full = 0;
        for _ in 0..200 {
            let cut = config.sample(32, &mut rng).unwrap();
            assert!(cut.top + cut.height <= 32 && cut.left + cut.width <= 32);
            full += usize::from(cut.height == 16 && cut.width == 16);
        }
        assert!(full > 30, "{full} of 200 boxes were whole");
    }
}
