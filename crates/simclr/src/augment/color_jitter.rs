//! Colour distortion (appendix A): brightness, contrast, saturation and hue
//! jitter with strength s, as torchvision's `ColorJitter(0.8s, 0.8s, 0.8s,
//! 0.2s)` applied with p = 0.8, the four in a random order. Formulas follow
//! torchvision's functional ops so that results carry over.
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::grayscale::luma;
use super::FloatImage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColorJitterConfig {
    /// s: 1.0 for ImageNet, 0.5 for CIFAR-10 (appendix B.9).
    pub strength: f64,
    /// The paper's 0.8.
    pub probability: f64,
}

impl Default for ColorJitterConfig {
    fn default() -> Self {
        Self { strength: 1.0, probability: 0.8 }
    }
}

impl ColorJitterConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        super::check_probability("augment.color_jitter.probability", self.probability, problems);
        if !(0.0..=1.25).contains(&self.strength) {
            problems.push(format!(
                "augment.color_jitter.strength = {}: must be in [0, 1.25] (hue jitter 0.2s may not exceed 0.25)",
                self.strength
            ));
        }
    }

    pub fn apply(&self, image: &mut FloatImage, rng: &mut impl rand::Rng) {
        if rng.random::<f64>() >= self.probability {
            return;
        }
        let s = self.strength as f32;
        let mut factor = |spread: f32| rng.random_range((1.0 - spread).max(0.0)..=1.0 + spread);
        let brightness = factor(0.8 * s);
        let contrast = factor(0.8 * s);
        let saturation = factor(0.8 * s);
        let hue = rng.random_range(-0.2 * s..=0.2 * s);
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        for op in order {
            match op {
                0 => adjust_brightness(image, brightness),
                1 => adjust_contrast(image, contrast),
                2 => adjust_saturation(image, saturation),
                _ => adjust_hue(image, hue),
            }
        }
    }
}

fn blend(value: f32, other: f32, factor: f32) -> f32 {
    (factor * value + (1.0 - factor) * other).clamp(0.0, 1.0)
}

/// Multiplies every channel by `factor`.
pub fn adjust_brightness(image: &mut FloatImage, factor: f32) {
    image.data.iter_mut().for_each(|v| *v = blend(*v, 0.0, factor));
}

/// Blends with the mean luma of the whole image.
pub fn adjust_contrast(image: &mut FloatImage, factor: f32) {
    let pixels = (image.width * image.height).max(1) as f32;
    let mean = image.data.chunks_exact(3).map(luma).sum::<f32>() / pixels;
    image.data.iter_mut().for_each(|v| *v = blend(*v, mean, factor));
}

/// Blends each pixel with its own luma.
pub fn adjust_saturation(image: &mut FloatImage, factor: f32) {
    for rgb in image.data.chunks_exact_mut(3) {
        let gray = luma(rgb);
        rgb.iter_mut().for_each(|v| *v = blend(*v, gray, factor));
    }
}

/// Rotates the hue by `shift` turns (in [-0.5, 0.5]).
pub fn adjust_hue(image: &mut FloatImage, shift: f32) {
    if shift == 0.0 {
        return;
    }
    for rgb in image.data.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(rgb[0], rgb[1], rgb[2]);
        let (r, g, b) = hsv_to_rgb((h + shift).rem_euclid(1.0), s, v);
        rgb.copy_from_slice(&[r, g, b]);
    }
}

/// torchvision's `_rgb2hsv`, one pixel at a time.
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let chroma = max - min;
    if chroma == 0.0 {
        return (0.0, 0.0, max);
    }
    let saturation = chroma / max;
    let (rc, gc, bc) = ((max - r) / chroma, (max - g) / chroma, (max - b) / chroma);
    let hue = if max == r {
        bc - gc
    } else if max == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    ((hue / 6.0 + 1.0).rem_euclid(1.0), saturation, max)
}

/// torchvision's `_hsv2rgb`.
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let sector = (h * 6.0).floor();
    let f = h * 6.0 - sector;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (sector as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixel(rgb: [f32; 3]) -> FloatImage {
        FloatImage { width: 1, height: 1, data: rgb.to_vec() }
    }

    #[test]
    fn hsv_round_trip() {
        for rgb in [[0.2, 0.5, 0.9], [0.9, 0.1, 0.3], [0.4, 0.4, 0.1], [0.3, 0.3, 0.3]] {
            let (h, s, v) = rgb_to_hsv(rgb[0], rgb[1], rgb[2]);
            let (r, g, b) = hsv_to_rgb(h, s, v);
            for (x, y) in [r, g, b].iter().zip(rgb) {
                assert!((x - y).abs() < 1e-6, "{rgb:?} -> {:?}", (r, g, b));
            }
        }
    }

    #[test]
    fn hue_shift_by_a_third_rotates_primaries() {
        let mut image = pixel([1.0, 0.0, 0.0]);
        adjust_hue(&mut image, 1.0 / 3.0);
        let expected = [0.0, 1.0, 0.0];
        assert!(image.data.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-5), "{:?}", image.data);
    }

    #[test]
    fn saturation_zero_is_grayscale_and_brightness_clamps() {
        let mut image = pixel([0.2, 0.6, 1.0]);
        adjust_saturation(&mut image, 0.0);
        let gray = 0.299 * 0.2 + 0.587 * 0.6 + 0.114;
        assert!(image.data.iter().all(|v| (v - gray).abs() < 1e-6));
        adjust_brightness(&mut image, 10.0);
        assert_eq!(image.data, vec![1.0; 3]);
    }

    #[test]
    fn contrast_blends_with_mean_luma() {
        let mut image = FloatImage { width: 2, height: 1, data: vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0] };
        adjust_contrast(&mut image, 0.5);
        assert_eq!(image.data, vec![0.25, 0.25, 0.25, 0.75, 0.75, 0.75]);
    }
}
