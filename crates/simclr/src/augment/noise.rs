//! Gaussian noise (one of the ablation ops of section 3, in Figures 4 and
//! 5): every channel of every pixel gets `mean + sigma * n` with `n`
//! standard normal, clipped to [0, 1], as torchvision's `GaussianNoise`
//! (v2, on float images, `clip=True`). The paper gives no noise level;
//! torchvision's defaults (mean 0, sigma 0.1) are ours.
//!
//! A view's noise is a pure function of a key drawn from the view's RNG
//! and the element's position, so the CPU path and the device path add the
//! same noise: the element at row y, column x, channel c of a w-wide view
//! is number e = (y w + x) 3 + c, its two uniforms are a keyed hash of 2e
//! and 2e + 1, and Box-Muller makes them a normal, in f64 on both paths.
//! The hash is 32-bit (lowbias32, by Chris Wellons, keyed by two rounds),
//! which the device path computes in int64 tensor ops with no overflow; no
//! crate offers a counter-based generator with a tensor twin.
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseConfig {
    /// 0.5 by default (not in the paper's main pipeline).
    pub probability: f64,
    /// The noise's mean, on pixels in [0, 1]; torchvision's 0.
    pub mean: f64,
    /// The noise's standard deviation, on pixels in [0, 1]; torchvision's 0.1.
    pub sigma: f64,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self { probability: 0.5, mean: 0.0, sigma: 0.1 }
    }
}

/// One view's noise: its key and level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NoiseParams {
    pub key: u64,
    pub mean: f32,
    pub sigma: f32,
}

/// lowbias32's multipliers.
const MULTIPLIERS: [u32; 2] = [0x7feb_352d, 0x846c_a68b];

fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(MULTIPLIERS[0]);
    x ^= x >> 15;
    x = x.wrapping_mul(MULTIPLIERS[1]);
    x ^ (x >> 16)
}

/// The two 32-bit halves of a key.
fn halves(key: u64) -> [u32; 2] {
    [key as u32, (key >> 32) as u32]
}

/// The keyed hash of counter `j`.
fn draw(key: [u32; 2], j: u32) -> u32 {
    mix(mix(j ^ key[0]) ^ key[1])
}

/// A hash's top 24 bits as a uniform in (0, 1), never 0.
fn uniform(hash: u32) -> f64 {
    (f64::from(hash >> 8) + 0.5) / f64::from(1u32 << 24)
}

/// Box-Muller: a standard normal from two uniforms in (0, 1).
fn normal(u1: f64, u2: f64) -> f64 {
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Augmentation for NoiseConfig {
    type Params = NoiseParams;

    fn check(&self, field: &str, _image_size: u32, problems: &mut Vec<String>) {
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            problems.push(format!("{field}: sigma = {}: must be finite and >= 0", self.sigma));
        }
        if !self.mean.is_finite() {
            problems.push(format!("{field}: mean = {}: must be finite", self.mean));
        }
    }

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<NoiseParams> {
        super::applies(self.probability, rng).then(|| NoiseParams {
            key: rng.random(),
            mean: self.mean as f32,
            sigma: self.sigma as f32,
        })
    }

    fn apply(image: &mut FloatImage, params: &NoiseParams) {
        let key = halves(params.key);
        let (mean, sigma) = (f64::from(params.mean), f64::from(params.sigma));
        for (e, value) in image.data.iter_mut().enumerate() {
            let e = e as u32;
            let n = normal(uniform(draw(key, 2 * e)), uniform(draw(key, 2 * e + 1)));
            *value = (*value + (mean + sigma * n) as f32).clamp(0.0, 1.0);
        }
    }

    fn apply_batch(images: Tensor, params: &[NoiseParams]) -> Tensor {
        let (_, channels, height, width) = images.size4().expect("a [n, 3, h, w] batch");
        let key = |half: usize| {
            let values: Vec<i64> = params.iter().map(|p| i64::from(halves(p.key)[half])).collect();
            super::per_image(&values, &images)
        };
        let (key0, key1) = (key(0), key(1));
        // f32 levels meet the f64 normals below and are promoted to f64, exactly.
        let mean = super::per_image(&params.iter().map(|p| p.mean).collect::<Vec<_>>(), &images);
        let sigma = super::per_image(&params.iter().map(|p| p.sigma).collect::<Vec<_>>(), &images);
        // e for every element of a view, in the CPU path's interleaved order.
        let element = Tensor::arange(height * width * channels, (Kind::Int64, images.device()))
            .view([height, width, channels])
            .permute([2, 0, 1])
            .unsqueeze(0);
        let uniform = |j: Tensor| {
            let hash = mix_tensor(&mix_tensor(&j.bitwise_xor_tensor(&key0)).bitwise_xor_tensor(&key1));
            (hash.bitwise_right_shift_tensor_scalar(8).to_kind(Kind::Double) + 0.5) / f64::from(1u32 << 24)
        };
        let (u1, u2) = (uniform(&element * 2), uniform(&element * 2 + 1));
        let normal = (u1.log() * -2.0).sqrt() * (u2 * std::f64::consts::TAU).cos();
        let noise = (normal * sigma + mean).to_kind(images.kind());
        (images + noise).clamp(0.0, 1.0)
    }
}

/// [`mix`] on int64 tensors holding u32 values.
fn mix_tensor(x: &Tensor) -> Tensor {
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = multiply_u32(&x, MULTIPLIERS[0]);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    let x = multiply_u32(&x, MULTIPLIERS[1]);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// `x * m` modulo 2^32 for int64 tensors holding u32 values, in halves of
/// `m` so that no product passes 2^48 (int64 overflow is not defined).
fn multiply_u32(x: &Tensor, m: u32) -> Tensor {
    let (low, high) = (i64::from(m & 0xffff), i64::from(m >> 16));
    let upper = (x * high).bitwise_and(0xffff).bitwise_left_shift_tensor_scalar(16);
    (x * low + upper).bitwise_and(0xffff_ffff_i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tensor_hash_is_the_scalar_one() {
        let values: Vec<u32> = vec![0, 1, 2, 0xffff, 0x1_0000, 0x7fff_ffff, 0x8000_0000, 0xdead_beef, u32::MAX];
        let tensor = Tensor::from_slice(&values.iter().map(|v| i64::from(*v)).collect::<Vec<_>>());
        let mixed = Vec::<i64>::try_from(&mix_tensor(&tensor)).unwrap();
        let expected: Vec<i64> = values.iter().map(|v| i64::from(mix(*v))).collect();
        assert_eq!(mixed, expected);
    }

    #[test]
    fn the_noise_is_standard_normal_and_clipped() {
        let mut image = FloatImage { width: 64, height: 64, data: vec![0.5; 64 * 64 * 3] };
        NoiseConfig::apply(&mut image, &NoiseParams { key: 9, mean: 0.0, sigma: 0.1 });
        let n = image.data.len() as f64;
        let residuals: Vec<f64> = image.data.iter().map(|v| f64::from(*v) - 0.5).collect();
        let mean = residuals.iter().sum::<f64>() / n;
        let std = (residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        // 12,288 draws: the mean's standard error is 0.0009, the std's 0.0006.
        assert!(mean.abs() < 0.004 && (std - 0.1).abs() < 0.003, "mean {mean}, std {std}");
        let mut dark = FloatImage { width: 8, height: 8, data: vec![0.0; 192] };
        NoiseConfig::apply(&mut dark, &NoiseParams { key: 9, mean: 0.0, sigma: 0.1 });
        assert!(dark.data.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(dark.data.iter().filter(|v| **v == 0.0).count() > 60, "about half the pixels clip at 0");
    }
}
