//! Random crop with padding, the usual CIFAR augmentation (He et al. 2016;
//! torchvision's `RandomCrop(32, padding=4)`): the view is padded with
//! black by `padding` pixels on each side, then a view-sized window is cut
//! at a uniformly drawn offset. Images of another size are first resized
//! (shorter side) and centre-cropped to the view size.
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::FloatImage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PadCropConfig {
    /// Pixels of black added on each side; 4 for 32-pixel CIFAR views.
    pub padding: u32,
}

impl Default for PadCropConfig {
    fn default() -> Self {
        Self { padding: 4 }
    }
}

/// The window's shift from the centre, each in [-padding, padding].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PadOffset {
    pub down: i32,
    pub right: i32,
}

impl PadCropConfig {
    pub(crate) fn check(&self, field: &str, image_size: u32, problems: &mut Vec<String>) {
        if self.padding >= image_size {
            problems.push(format!(
                "{field}: padding = {}: must be smaller than the {image_size} px view (data.image_size)",
                self.padding
            ));
        }
    }

    pub fn sample<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> PadOffset {
        let padding = self.padding as i32;
        PadOffset { down: rng.random_range(-padding..=padding), right: rng.random_range(-padding..=padding) }
    }
}

/// Output pixel (y, x) is input pixel (y + down, x + right), black outside.
pub fn apply(image: &FloatImage, offset: PadOffset) -> FloatImage {
    let (width, height) = (image.width as i32, image.height as i32);
    let mut data = vec![0f32; image.data.len()];
    for y in 0..height {
        let source_y = y + offset.down;
        if !(0..height).contains(&source_y) {
            continue;
        }
        for x in 0..width {
            let source_x = x + offset.right;
            if (0..width).contains(&source_x) {
                let (to, from) = (((y * width + x) * 3) as usize, ((source_y * width + source_x) * 3) as usize);
                data[to..to + 3].copy_from_slice(&image.data[from..from + 3]);
            }
        }
    }
    FloatImage { width: image.width, height: image.height, data }
}

/// The device path: a whole-pixel translation through `grid_sample`
/// (nearest, zeros outside), which moves pixels exactly.
pub fn apply_batch(images: Tensor, offsets: &[PadOffset]) -> Tensor {
    let (count, channels, height, width) = images.size4().expect("a [n, 3, h, w] batch");
    let theta: Vec<f32> = offsets
        .iter()
        .flat_map(|o| [1.0, 0.0, 2.0 * o.right as f32 / width as f32, 0.0, 1.0, 2.0 * o.down as f32 / height as f32])
        .collect();
    let theta = crate::device::upload_slice(&theta, images.device()).view([count, 2, 3]);
    let grid = Tensor::affine_grid_generator(&theta, [count, channels, height, width], false);
    images.grid_sampler(&grid, 1, 0, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_and_fills_with_black() {
        let image = FloatImage { width: 3, height: 1, data: vec![0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3] };
        let out = apply(&image, PadOffset { down: 0, right: 1 });
        assert_eq!(out.data, vec![0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0]);
    }
}
