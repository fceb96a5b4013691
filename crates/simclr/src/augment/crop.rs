//! Random resized crop (appendix A): a crop of random area (scale of the
//! original in [0.08, 1]) and aspect ratio (in [3/4, 4/3], drawn
//! log-uniformly) resized to the training size, as torchvision's
//! `RandomResizedCrop`. Resizing uses the `image` crate's triangle filter,
//! which is bilinear with antialiasing when shrinking (PIL's and
//! torchvision v2's default).
use image::imageops::{self, FilterType};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::FloatImage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CropConfig {
    /// Smallest and largest fraction of the image area kept: 0.08 and 1.
    pub min_scale: f64,
    pub max_scale: f64,
    /// Aspect-ratio range (width / height): 3/4 and 4/3.
    pub min_ratio: f64,
    pub max_ratio: f64,
}

impl Default for CropConfig {
    fn default() -> Self {
        Self { min_scale: 0.08, max_scale: 1.0, min_ratio: 3.0 / 4.0, max_ratio: 4.0 / 3.0 }
    }
}

/// A crop box in pixels: top row, left column, height and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

impl CropConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if !(self.min_scale > 0.0 && self.min_scale <= self.max_scale && self.max_scale <= 1.0) {
            problems.push(format!(
                "augment.crop.min_scale = {}, max_scale = {}: need 0 < min_scale <= max_scale <= 1",
                self.min_scale, self.max_scale
            ));
        }
        if !(self.min_ratio > 0.0 && self.min_ratio <= self.max_ratio) {
            problems.push(format!(
                "augment.crop.min_ratio = {}, max_ratio = {}: need 0 < min_ratio <= max_ratio",
                self.min_ratio, self.max_ratio
            ));
        }
    }

    /// torchvision's `RandomResizedCrop.get_params`: ten tries at a box
    /// that fits, then a centre crop with the ratio clamped into range.
    pub fn sample_box(&self, width: u32, height: u32, rng: &mut impl rand::Rng) -> CropBox {
        let area = f64::from(width) * f64::from(height);
        let (log_min, log_max) = (self.min_ratio.ln(), self.max_ratio.ln());
        for _ in 0..10 {
            let target = area * rng.random_range(self.min_scale..=self.max_scale);
            let ratio = rng.random_range(log_min..=log_max).exp();
            let w = (target * ratio).sqrt().round() as u32;
            let h = (target / ratio).sqrt().round() as u32;
            if w > 0 && h > 0 && w <= width && h <= height {
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox { top, left, height: h, width: w };
            }
        }
        let in_ratio = f64::from(width) / f64::from(height);
        let (w, h) = if in_ratio < self.min_ratio {
            (width, (f64::from(width) / self.min_ratio).round() as u32)
        } else if in_ratio > self.max_ratio {
            ((f64::from(height) * self.max_ratio).round() as u32, height)
        } else {
            (width, height)
        };
        let (w, h) = (w.clamp(1, width), h.clamp(1, height));
        CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
    }

    pub fn apply(&self, image: &RgbImage, size: u32, rng: &mut impl rand::Rng) -> FloatImage {
        let crop = self.sample_box(image.width(), image.height(), rng);
        crop_resize(image, crop, size, size)
    }
}

/// Cuts `crop` out of `image` and resizes it to `width` x `height`.
pub fn crop_resize(image: &RgbImage, crop: CropBox, width: u32, height: u32) -> FloatImage {
    let is_whole = crop.left == 0 && crop.top == 0 && crop.width == image.width() && crop.height == image.height();
    if is_whole && crop.width == width && crop.height == height {
        return FloatImage::from_rgb(image);
    }
    let view = imageops::crop_imm(image, crop.left, crop.top, crop.width, crop.height);
    FloatImage::from_rgb(&imageops::resize(&*view, width, height, FilterType::Triangle))
}

/// Resizes the shorter side to `size` and cuts the centre `size` x `size`:
/// the same as resizing the centred square whose side is the shorter one.
pub fn resize_shorter_center_crop(image: &RgbImage, size: u32) -> FloatImage {
    let (width, height) = image.dimensions();
    let side = width.min(height);
    let crop = CropBox { top: (height - side) / 2, left: (width - side) / 2, height: side, width: side };
    crop_resize(image, crop, size, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_respect_scale_and_ratio() {
        let config = CropConfig::default();
        let mut rng = super::super::view_rng(1, 0, 0, 0);
        for _ in 0..500 {
            let crop = config.sample_box(200, 100, &mut rng);
            assert!(crop.left + crop.width <= 200 && crop.top + crop.height <= 100);
            let scale = f64::from(crop.width * crop.height) / 20000.0;
            assert!((0.07..=1.0).contains(&scale), "{crop:?}");
            let ratio = f64::from(crop.width) / f64::from(crop.height);
            assert!((0.7..=1.4).contains(&ratio), "{crop:?}");
        }
    }

    #[test]
    fn same_size_image_is_used_as_it_is() {
        let image = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 7]));
        assert_eq!(resize_shorter_center_crop(&image, 8), FloatImage::from_rgb(&image));
    }

    #[test]
    fn center_crop_takes_the_middle_of_the_longer_side() {
        // Left half black, right half white, 40x20: the centre 20x20 square
        // straddles both, so its left column is dark and its right bright.
        let image = RgbImage::from_fn(40, 20, |x, _| if x < 20 { image::Rgb([0; 3]) } else { image::Rgb([255; 3]) });
        let view = resize_shorter_center_crop(&image, 10);
        assert_eq!((view.width, view.height), (10, 10));
        assert!(view.data[0] < 0.1 && view.data[9 * 3] > 0.9);
    }
}
