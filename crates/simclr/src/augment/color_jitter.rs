//! Colour distortion (appendix A): brightness, contrast, saturation and hue
//! jitter with strength s, as torchvision's `ColorJitter(0.8s, 0.8s, 0.8s,
//! 0.2s)` applied with p = 0.8, the four in a random order. Formulas follow
//! torchvision's functional ops so that results carry over.
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::grayscale::{luma, luma_batch};
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

/// The drawn factors of one colour distortion and the order of its four parts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JitterParams {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    /// 0 brightness, 1 contrast, 2 saturation, 3 hue, in the order applied.
    pub order: [u8; 4],
}

impl ColorJitterConfig {
    pub(crate) fn check(&self, field: &str, problems: &mut Vec<String>) {
        super::check_probability(field, self.probability, problems);
        if !(0.0..=1.25).contains(&self.strength) {
            problems.push(format!(
                "{field}: strength = {}: must be in [0, 1.25] (hue jitter 0.2s may not exceed 0.25)",
                self.strength
            ));
        }
    }

    /// torchvision's `ColorJitter.get_params`: each factor uniform in
    /// [max(0, 1 - spread), 1 + spread], the hue shift in [-0.2s, 0.2s].
    pub fn sample<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> Option<JitterParams> {
        if !super::applies(self.probability, rng) {
            return None;
        }
        let s = self.strength as f32;
        let mut factor = |spread: f32| rng.random_range((1.0 - spread).max(0.0)..=1.0 + spread);
        let brightness = factor(0.8 * s);
        let contrast = factor(0.8 * s);
        let saturation = factor(0.8 * s);
        let hue = rng.random_range(-0.2 * s..=0.2 * s);
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        Some(JitterParams { brightness, contrast, saturation, hue, order })
    }
}

pub fn apply(image: &mut FloatImage, params: &JitterParams) {
    for part in params.order {
        match part {
            0 => adjust_brightness(image, params.brightness),
            1 => adjust_contrast(image, params.contrast),
            2 => adjust_saturation(image, params.saturation),
            _ => adjust_hue(image, params.hue),
        }
    }
}

/// The tensor path: at each of the four positions, each part runs once on
/// the images that put it there.
pub fn apply_batch(images: Tensor, params: &[JitterParams]) -> Tensor {
    let mut images = images;
    for position in 0..4 {
        for part in 0..4u8 {
            let chosen: Vec<(usize, f32)> = params
                .iter()
                .enumerate()
                .filter(|(_, p)| p.order[position] == part)
                .map(|(i, p)| (i, [p.brightness, p.contrast, p.saturation, p.hue][part as usize]))
                .collect();
            images = super::on_subset(images, &chosen, |x, factors| {
                let factor = super::per_image(factors, &x);
                match part {
                    0 => blend_batch(&x, &x.zeros_like(), &factor),
                    1 => {
                        let mean = luma_batch(&x).mean_dim(&[1i64, 2, 3][..], true, x.kind());
                        blend_batch(&x, &mean, &factor)
                    }
                    2 => blend_batch(&x, &luma_batch(&x), &factor),
                    _ => adjust_hue_batch(&x, &factor),
                }
            });
        }
    }
    images
}

fn blend_batch(images: &Tensor, other: &Tensor, factor: &Tensor) -> Tensor {
    let blended: Tensor = images * factor + other * (1.0 - factor);
    blended.clamp(0.0, 1.0)
}

/// torchvision's `_rgb2hsv`, hue shift and `_hsv2rgb` on a batch.
fn adjust_hue_batch(images: &Tensor, shift: &Tensor) -> Tensor {
    let channels = images.unbind(1);
    let (r, g, b) = (&channels[0], &channels[1], &channels[2]);
    let max = images.amax([1], false);
    let min = images.amin([1], false);
    let flat = max.eq_tensor(&min);
    let chroma = &max - &min;
    let ones = max.ones_like();
    let saturation = &chroma / max.where_self(&flat.logical_not(), &ones);
    let divisor = chroma.where_self(&flat.logical_not(), &ones);
    let (rc, gc, bc) = ((&max - r) / &divisor, (&max - g) / &divisor, (&max - b) / &divisor);
    let is_r = max.eq_tensor(r);
    let is_g = max.eq_tensor(g).logical_and(&is_r.logical_not());
    let is_b = is_r.logical_or(&is_g).logical_not();
    let hue = is_r.to_kind(images.kind()) * (&bc - &gc)
        + is_g.to_kind(images.kind()) * (&rc - &bc + 2.0)
        + is_b.to_kind(images.kind()) * (&gc - &rc + 4.0);
    let hue = (hue / 6.0 + 1.0).fmod(1.0);
    let hue = (hue + shift.view([-1, 1, 1])).remainder(1.0);

    let sector = (&hue * 6.0).floor();
    let f = &hue * 6.0 - &sector;
    let sector = sector.to_kind(tch::Kind::Int64).remainder(6).unsqueeze(1);
    let v = &max;
    let p = (v * (-&saturation + 1.0)).clamp(0.0, 1.0);
    let q = (v * (-(&saturation * &f) + 1.0)).clamp(0.0, 1.0);
    let t = (v * (-(&saturation * (-&f + 1.0)) + 1.0)).clamp(0.0, 1.0);
    let pick = |order: [&Tensor; 6]| Tensor::stack(&order, 1).gather(1, &sector, false);
    Tensor::cat(&[pick([v, &q, &p, &p, &t, v]), pick([&t, v, v, &q, &p, &p]), pick([&p, &p, &t, v, v, &q])], 1)
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
    // Summed in f64: an f32 running sum over a 224x224 image drifts by 1e-4.
    let pixels = (image.width * image.height).max(1) as f64;
    let mean = (image.data.chunks_exact(3).map(|rgb| f64::from(luma(rgb))).sum::<f64>() / pixels) as f32;
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
        let gray = 0.2989 * 0.2 + 0.587 * 0.6 + 0.114;
        assert!(image.data.iter().all(|v| (v - gray).abs() < 1e-6));
        adjust_brightness(&mut image, 10.0);
        assert_eq!(image.data, vec![1.0; 3]);
    }

    #[test]
    fn contrast_blends_with_mean_luma() {
        // Gray pixels 0 and 0.5: mean luma 0.25 (less 1e-4 of it: the weights sum to 0.9999).
        let mut image = FloatImage { width: 2, height: 1, data: vec![0.0, 0.0, 0.0, 0.5, 0.5, 0.5] };
        adjust_contrast(&mut image, 0.5);
        let expected = [0.125, 0.125, 0.125, 0.375, 0.375, 0.375];
        assert!(image.data.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-4), "{:?}", image.data);
    }
}
