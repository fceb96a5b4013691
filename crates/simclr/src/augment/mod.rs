//! The stochastic data augmentation module (section 3 and appendix A).
//!
//! Each training image gives two views, each drawn independently from the
//! same family: random resized crop and resize, horizontal flip, colour
//! distortion (jitter with strength s, applied with p = 0.8) and random
//! grayscale (p = 0.2). The paper's main finding (Figure 5) is that crop
//! plus colour distortion is what makes the contrastive task hard enough.
//!
//! Ops work on a [`FloatImage`] (RGB, interleaved, values in [0, 1]) and take
//! an explicit RNG, so a view depends only on the seed, epoch, image index
//! and view number ([`view_rng`]).
pub mod color_jitter;
pub mod crop;
pub mod flip;
pub mod grayscale;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use color_jitter::ColorJitterConfig;
pub use crop::CropConfig;
pub use flip::FlipConfig;
pub use grayscale::GrayscaleConfig;

/// An RGB image with interleaved f32 channels in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` values, row-major, RGB interleaved.
    pub data: Vec<f32>,
}

impl FloatImage {
    pub fn from_rgb(image: &RgbImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            data: image.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    /// Writes the image as a normalised CHW slice: (x - mean) / std per channel.
    pub fn write_chw_normalized(&self, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
        let plane = self.width * self.height;
        assert_eq!(out.len(), plane * 3, "output slice must hold the whole image");
        for (pixel, rgb) in self.data.chunks_exact(3).enumerate() {
            for channel in 0..3 {
                out[channel * plane + pixel] = (rgb[channel] - mean[channel]) / std[channel];
            }
        }
    }
}

/// The `[augment]` section: one entry per op, each with the paper's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    pub crop: CropConfig,
    pub flip: FlipConfig,
    pub color_jitter: ColorJitterConfig,
    pub grayscale: GrayscaleConfig,
}

impl Default for AugmentConfig {
    /// The paper's ImageNet pipeline (appendix A), colour strength s = 1.0.
    fn default() -> Self {
        Self {
            crop: CropConfig::default(),
            flip: FlipConfig::default(),
            color_jitter: ColorJitterConfig::default(),
            grayscale: GrayscaleConfig::default(),
        }
    }
}

impl AugmentConfig {
    /// The paper's CIFAR-10 pipeline (appendix B.9): colour strength s = 0.5.
    pub fn cifar() -> Self {
        Self { color_jitter: ColorJitterConfig { strength: 0.5, ..Default::default() }, ..Default::default() }
    }

    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        self.crop.check(problems);
        self.flip.check(problems);
        self.color_jitter.check(problems);
        self.grayscale.check(problems);
    }
}

pub(crate) fn check_probability(field: &str, value: f64, problems: &mut Vec<String>) {
    if !(0.0..=1.0).contains(&value) {
        problems.push(format!("{field} = {value}: a probability must be in [0, 1]"));
    }
}

/// The RNG for one view: a pure function of its coordinates, so that data
/// order, resumption and worker count never change what a view looks like.
pub fn view_rng(seed: u64, epoch: u64, index: u64, view: u64) -> ChaCha8Rng {
    let mut state = seed;
    for part in [epoch, index, view] {
        state = splitmix64(state ^ splitmix64(part));
    }
    ChaCha8Rng::seed_from_u64(state)
}

/// SplitMix64's finaliser (Steele et al. 2014): a cheap, well-mixed hash.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The two-view training pipeline for a validated [`AugmentConfig`].
#[derive(Debug, Clone)]
pub struct Pipeline {
    config: AugmentConfig,
    size: u32,
}

impl Pipeline {
    pub fn new(config: AugmentConfig, size: u32) -> Self {
        Self { config, size }
    }

    /// One random view of `image`, `size` x `size` pixels.
    pub fn view(&self, image: &RgbImage, rng: &mut impl rand::Rng) -> FloatImage {
        let mut view = self.config.crop.apply(image, self.size, rng);
        self.config.flip.apply(&mut view, rng);
        self.config.color_jitter.apply(&mut view, rng);
        self.config.grayscale.apply(&mut view, rng);
        view
    }
}

/// The evaluation view: shorter side resized to `size`, then centre-cropped.
/// An image already `size` x `size` is used as it is.
pub fn center_view(image: &RgbImage, size: u32) -> FloatImage {
    crop::resize_shorter_center_crop(image, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_rng_depends_on_every_coordinate() {
        use rand::Rng;
        let draw = |s, e, i, v| view_rng(s, e, i, v).random::<u64>();
        let base = draw(1, 2, 3, 0);
        assert_eq!(base, draw(1, 2, 3, 0));
        for other in [draw(0, 2, 3, 0), draw(1, 1, 3, 0), draw(1, 2, 4, 0), draw(1, 2, 3, 1)] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn pipeline_output_has_the_requested_size_and_range() {
        let image = RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 128]));
        let pipeline = Pipeline::new(AugmentConfig::default(), 32);
        let mut rng = view_rng(0, 0, 0, 0);
        for _ in 0..20 {
            let view = pipeline.view(&image, &mut rng);
            assert_eq!((view.width, view.height, view.data.len()), (32, 32, 32 * 32 * 3));
            assert!(view.data.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn normalisation_writes_planes() {
        let image = FloatImage { width: 2, height: 1, data: vec![0.5, 0.0, 1.0, 0.5, 0.0, 1.0] };
        let mut out = vec![0.0; 6];
        image.write_chw_normalized([0.5, 0.0, 0.5], [0.5, 1.0, 0.25], &mut out);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 2.0, 2.0]);
    }
}
