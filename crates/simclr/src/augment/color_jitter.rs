//! Colour distortion (appendix A): brightness, contrast, saturation and hue
//! jitter with strength s, as torchvision's `ColorJitter(0.8s, 0.8s, 0.8s,
//! 0.2s)` applied with p = 0.8, the four in a random order. Formulas follow
//! torchvision's functional ops so that results carry over.
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::grayscale::luma;
use super::{Augmentation, FloatImage};

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

impl Augmentation for ColorJitterConfig {
    type Params = JitterParams;

    fn check(&self, field: &str, _image_size: u32, problems: &mut Vec<String>) {
        if !(0.0..=1.25).contains(&self.strength) {
            problems.push(format!(
                "{field}: strength = {}: must be in [0, 1.25] (hue jitter 0.2s may not exceed 0.25)",
                self.strength
            ));
        }
    }

    /// torchvision's `ColorJitter.get_params`: each factor uniform in
    /// [max(0, 1 - spread), 1 + spread], the hue shift in [-0.2s, 0.2s].
    fn sample<R: rand::Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<JitterParams> {
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

    fn apply(image: &mut FloatImage, params: &JitterParams) {
        for part in params.order {
            match part {
                0 => adjust_brightness(image, params.brightness),
                1 => adjust_contrast(image, params.contrast),
                2 => adjust_saturation(image, params.saturation),
                _ => adjust_hue(image, params.hue),
            }
        }
    }

    /// The device path. Each image runs its four parts in its own order, so
    /// the batch goes through the four positions in turn; at each, every image
    /// runs the part its order puts there.
    ///
    /// Written for few kernels, as on a GPU each costs a launch whatever the
    /// batch (this path had run every part on its own subset of images, about
    /// 470 kernels per batch of views; now about 130):
    /// - brightness, contrast and saturation are one blend,
    ///   clamp(f·x + (1 − f)·o, 0, 1), whose other image o is 0, the mean luma
    ///   or the luma. One pass per position runs all three, on the whole batch:
    ///   the images running hue there get f = 1 and o = 0, exactly x again;
    /// - hue runs on its own images, in the closed form of `adjust_hue_batch`;
    /// - the drawn values of all positions go to the device in one copy.
    fn apply_batch(images: Tensor, params: &[JitterParams]) -> Tensor {
        let count = params.len() as i64;
        // Per position, four rows of one value per image: f, 1 − f (in f32, as
        // the pixel path computes it) and the weights of the mean luma and of
        // the luma in the other image.
        let mut blend = Vec::with_capacity(16 * params.len());
        for position in 0..4 {
            let part = |p: &JitterParams| p.order[position];
            let factor = |p: &JitterParams| match part(p) {
                0 => p.brightness,
                1 => p.contrast,
                2 => p.saturation,
                _ => 1.0,
            };
            blend.extend(params.iter().map(factor));
            blend.extend(params.iter().map(|p| 1.0 - factor(p)));
            blend.extend(params.iter().map(|p| f32::from(part(p) == 1)));
            blend.extend(params.iter().map(|p| f32::from(part(p) == 2)));
        }
        let blend = crate::device::upload_slice(&blend, images.device()).view([4, 4, count, 1, 1, 1]);
        let luma_weights = super::grayscale::luma_weights(images.device());
        let mut images = images;
        for position in 0..4 {
            let row = |k: i64| blend.get(position as i64).get(k);
            let gray = super::grayscale::luma_with(&images, &luma_weights);
            let mean = gray.mean_dim(&[2i64, 3][..], true, gray.kind());
            let other = (&gray * row(3)).addcmul(&row(2), &mean);
            images = (&images * row(0)).addcmul(&other, &row(1)).clamp(0.0, 1.0);
            // A zero shift leaves the image alone, as the pixel path does.
            let shifts: Vec<(usize, f32)> = params
                .iter()
                .enumerate()
                .filter(|(_, p)| p.order[position] == 3 && p.hue != 0.0)
                .map(|(i, p)| (i, p.hue))
                .collect();
            images = super::on_subset(images, &shifts, |x, shifts| adjust_hue_batch(&x, &super::per_image(shifts, &x)));
        }
        images
    }
}

/// torchvision's `adjust_hue` (`_rgb2hsv`, the shift, `_hsv2rgb`) on a
/// `[n, 3, h, w]` batch, shifted by `shift` (`[n, 1, 1, 1]`, in turns), in
/// closed form: 24 kernels where a transcription of torchvision's branches
/// took about 75. Equal to the pixel path up to float rounding.
///
/// With V the largest channel and C = V − min the chroma:
/// - 6·hue is (g − b)/C, 2 + (b − r)/C or 4 + (r − g)/C for the first
///   channel, in r, g, b order, that equals V (torchvision's precedence);
///   0 for a gray pixel;
/// - back to RGB, channel c is V − C·clamp(2 − |k − 2|, 0, 1) with
///   k = (n_c + 6·hue) mod 6 and n = 5, 3, 1 for r, g, b (the sector
///   table of `_hsv2rgb` as one formula; V·S = C).
fn adjust_hue_batch(images: &Tensor, shift: &Tensor) -> Tensor {
    let constants = crate::device::upload_slice(&[0f32, 2.0, 4.0, 5.0, 3.0, 1.0], images.device());
    let (offsets, phases) =
        (constants.narrow(0, 0, 3).view([1, 3, 1, 1]), constants.narrow(0, 3, 3).view([1, 3, 1, 1]));
    // max_dim gives the first maximal channel on ties, as torchvision's
    // precedence r, then g, then b.
    let (max, channel) = images.max_dim(1, true);
    let chroma = &max - images.amin([1], true);
    // [g − b, b − r, r − g], plus 0, 2C, 4C: 6·hue·C for each channel as V.
    let numerators = (images.roll([-1], [1]) - images.roll([1], [1])).addcmul(&offsets, &chroma);
    // A gray pixel has numerator 0 and C = 0: hue 0, as torchvision sets it.
    let sextant = numerators.gather(1, &channel, false) / chroma.clamp_min(f64::from(f32::MIN_POSITIVE));
    // (hue + shift) mod 1, with hue = sextant / 6 in [-1/6, 5/6]: positive after + 1.
    let hue = (sextant / 6.0 + (shift + 1.0)).remainder(1.0);
    let k = (hue * 6.0 + phases).remainder(6.0);
    let ramp = ((k - 2.0).abs() - 2.0).clamp(-1.0, 0.0);
    max.addcmul(&chroma, &ramp)
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
        let (r, g, b) = hsv_to_rgb(fraction(h + shift), s, v);
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
    (fraction(hue / 6.0 + 1.0), saturation, max)
}

/// `x.rem_euclid(1.0)` for the small values hue takes (|x| < 2^23): x minus
/// its floor is exact, so the two are equal (only the sign of a zero result
/// may differ). `rem_euclid` calls libm's `fmodf`
/// and `floor` is a libm call too on baseline x86-64 (no SSE4.1 `roundps`);
/// with both, the hue rotation was a third of the CPU pipeline's time
/// (perf, `simclr bench augment` at 224 px).
fn fraction(x: f32) -> f32 {
    let truncated = x as i32 as f32;
    x - if truncated > x { truncated - 1.0 } else { truncated }
}

/// torchvision's `_hsv2rgb`.
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    // h is in [0, 1] (from `fraction`), so truncation is the floor.
    let sector = (h * 6.0) as i32 as f32;
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
    #[test]
    fn fraction_is_rem_euclid() {
        use rand::Rng;
        let mut rng = crate::augment::view_rng(5, 0, 0, 0);
        let edges = [0.0f32, -0.0, 1.0, -1.0, 0.5, -1e-9, 1e-9, 1.0 - f32::EPSILON, -1.0 + f32::EPSILON, 2.999_999_8];
        let drawn = (0..100_000).map(|_| rng.random_range(-2.0f32..3.0));
        for x in edges.into_iter().chain(drawn) {
            // Equal as numbers: at negative integers `rem_euclid` gives -0.0
            // and `fraction` 0.0, which the HSV conversion treats alike.
            assert_eq!(fraction(x), x.rem_euclid(1.0), "{x}");
        }
    }

    use super::*;

    fn pixel(rgb: [f32; 3]) -> FloatImage {
        FloatImage { width: 1, height: 1, data: rgb.to_vec() }
    }

    #[test]
    fn the_batch_path_matches_the_pixel_path() {
        // Random images with gray pixels and ties between channels (levels
        // of 1/8), every order of the parts, shifts of both signs and 0.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let config = ColorJitterConfig { strength: 1.0, probability: 1.0 };
        let (side, count) = (6usize, 48usize);
        let images: Vec<FloatImage> = (0..count)
            .map(|i| {
                let level = |rng: &mut rand::rngs::StdRng| f32::from(rng.random_range(0u8..=8)) / 8.0;
                let data = (0..side * side)
                    .flat_map(|p| {
                        let v = level(&mut rng);
                        if (p + i) % 5 == 0 {
                            [v; 3]
                        } else {
                            [v, level(&mut rng), level(&mut rng)]
                        }
                    })
                    .collect();
                FloatImage { width: side, height: side, data }
            })
            .collect();
        let params: Vec<JitterParams> = (0..count)
            .map(|i| {
                let mut p = config.sample(32, &mut rng).unwrap();
                if i % 7 == 0 {
                    p.hue = 0.0;
                }
                p
            })
            .collect();
        let batch = Tensor::cat(&images.iter().map(|image| image.to_tensor().unsqueeze(0)).collect::<Vec<_>>(), 0);
        let rendered = ColorJitterConfig::apply_batch(batch, &params);
        for (i, (image, p)) in images.iter().zip(&params).enumerate() {
            let mut expected = image.clone();
            ColorJitterConfig::apply(&mut expected, p);
            let got = FloatImage::from_tensor(&rendered.get(i as i64));
            let worst = expected.data.iter().zip(&got.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 2e-5, "image {i}: {worst}, {p:?}");
        }
    }

    #[test]
    fn hue_in_closed_form_rotates_primaries_and_keeps_grays() {
        let pixels = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.5, 0.5, 0.5, 0.2, 0.7, 0.7]).view([3, 3, 1, 1]);
        let shifted = adjust_hue_batch(&pixels, &Tensor::from_slice(&[1.0f32 / 3.0, 0.25, -0.5]).view([3, 1, 1, 1]));
        let expected = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.5, 0.5, 0.5, 0.7, 0.2, 0.2]).view([3, 3, 1, 1]);
        assert!(shifted.allclose(&expected, 1e-6, 1e-6, false), "{shifted}");
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
