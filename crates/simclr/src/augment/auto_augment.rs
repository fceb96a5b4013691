//! AutoAugment (Cubuk et al., "AutoAugment: Learning Augmentation
//! Strategies from Data", CVPR 2019, arXiv 1805.09501), as torchvision's
//! `transforms.v2.AutoAugment`: each view runs one of the policy's 25
//! sub-policies, drawn uniformly; each of its two transforms applies with
//! its own probability at its own magnitude (one of 10 bins), a signed one
//! negated half the time. The paper's Table 1 sets it against colour
//! distortion: a policy learned with labels serves supervised training
//! better than SimCLR.
//!
//! Every transform follows torchvision's on float images in [0, 1], with the
//! policy's nearest interpolation and fill 0:
//! - shear, translation and rotation pick the source pixel that
//!   torchvision's affine grid and `grid_sample` pick (the shears turn
//!   about the top-left corner, as AutoAugment's TensorFlow original does);
//! - brightness, colour (saturation) and contrast blend as the colour
//!   jitter does, with factor 1 + magnitude;
//! - sharpness blends the interior with a 3x3 smoothing (1s around a 5,
//!   over 13), leaving the border;
//! - posterize keeps `bits` bits of each value, solarize inverts from a
//!   threshold, autocontrast stretches each channel to [0, 1], invert is
//!   1 - x;
//! - equalize works on 8-bit values (`x · 255.999` truncated, torchvision's
//!   conversion) with PIL's lookup table, and returns them as floats.
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::color_jitter::{self, ColorJitterConfig, JitterParams};
use super::solarize::{SolarizeConfig, SolarizeParams};
use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoAugmentConfig {
    /// Chance of running a sub-policy at all; 1, as torchvision's.
    pub probability: f64,
    /// Whose learned policy: ImageNet's (the paper's Table 1), CIFAR-10's or SVHN's.
    pub policy: Policy,
}

impl Default for AutoAugmentConfig {
    fn default() -> Self {
        Self { probability: 1.0, policy: Policy::Imagenet }
    }
}

/// The three policies AutoAugment learned, as torchvision lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Imagenet,
    Cifar10,
    Svhn,
}

names!(Policy, "AutoAugment policy", { Imagenet => "imagenet", Cifar10 => "cifar10", Svhn => "svhn" });

/// AutoAugment's transforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
    Invert,
}

names!(Transform, "AutoAugment transform", {
    ShearX => "shear-x",
    ShearY => "shear-y",
    TranslateX => "translate-x",
    TranslateY => "translate-y",
    Rotate => "rotate",
    Brightness => "brightness",
    Color => "color",
    Contrast => "contrast",
    Sharpness => "sharpness",
    Posterize => "posterize",
    Solarize => "solarize",
    AutoContrast => "auto-contrast",
    Equalize => "equalize",
    Invert => "invert",
});

/// One applied transform of a sub-policy. `magnitude` is the shear factor,
/// the shift in whole pixels, the angle in degrees (counter-clockwise), the
/// enhancement's factor less 1, the bits kept or the solarisation
/// threshold; 0 for autocontrast, equalize and invert.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Step {
    pub transform: Transform,
    pub magnitude: f32,
}

/// The drawn sub-policy and which of its two transforms apply.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AutoAugmentParams {
    pub sub_policy: u8,
    pub steps: [Option<Step>; 2],
}

impl Augmentation for AutoAugmentConfig {
    type Params = AutoAugmentParams;

    /// The sub-policy (uniform), then for each transform whether it applies
    /// and, where its magnitude is signed, its sign.
    fn sample<R: Rng + ?Sized>(&self, side: usize, rng: &mut R) -> Option<AutoAugmentParams> {
        if !super::applies(self.probability, rng) {
            return None;
        }
        let table = self.policy.sub_policies();
        let index = rng.random_range(0..table.len());
        let steps = table[index].map(|(transform, probability, bin)| {
            super::applies(probability, rng).then(|| {
                let (magnitude, signed) = transform.magnitude(bin, side);
                let magnitude = if signed && rng.random::<bool>() { -magnitude } else { magnitude };
                let magnitude = match transform {
                    Transform::TranslateX | Transform::TranslateY => magnitude.trunc(),
                    _ => magnitude,
                };
                Step { transform, magnitude }
            })
        });
        Some(AutoAugmentParams { sub_policy: index as u8, steps })
    }

    fn apply(image: &mut FloatImage, params: &AutoAugmentParams) {
        for step in params.steps.iter().flatten() {
            step.apply(image);
        }
    }

    /// The batch goes through the two positions of a sub-policy in turn; at
    /// each, every transform runs on the images that drew it there.
    fn apply_batch(images: Tensor, params: &[AutoAugmentParams]) -> Tensor {
        let mut images = images;
        for position in 0..2 {
            for transform in Transform::ALL {
                let drawn: Vec<(usize, f32)> = params
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        p.steps[position].filter(|s| s.transform == transform).map(|s| (i, s.magnitude))
                    })
                    .collect();
                images = super::on_subset(images, &drawn, |x, magnitudes| transform.apply_batch(x, magnitudes));
            }
        }
        images
    }
}

/// A transform of a sub-policy, its probability and its magnitude's bin of
/// 10 (unused by the transforms without a magnitude).
type Entry = (Transform, f64, u8);

impl Policy {
    /// torchvision's table of this policy (`AutoAugment._get_policies`).
    fn sub_policies(self) -> &'static [[Entry; 2]; 25] {
        match self {
            Policy::Imagenet => &IMAGENET,
            Policy::Cifar10 => &CIFAR10,
            Policy::Svhn => &SVHN,
        }
    }
}

use Transform::{
    AutoContrast, Brightness, Color, Contrast, Equalize, Invert, Posterize, Rotate, Sharpness, ShearX, ShearY,
    Solarize, TranslateX, TranslateY,
};

const IMAGENET: [[Entry; 2]; 25] = [
    [(Posterize, 0.4, 8), (Rotate, 0.6, 9)],
    [(Solarize, 0.6, 5), (AutoContrast, 0.6, 0)],
    [(Equalize, 0.8, 0), (Equalize, 0.6, 0)],
    [(Posterize, 0.6, 7), (Posterize, 0.6, 6)],
    [(Equalize, 0.4, 0), (Solarize, 0.2, 4)],
    [(Equalize, 0.4, 0), (Rotate, 0.8, 8)],
    [(Solarize, 0.6, 3), (Equalize, 0.6, 0)],
    [(Posterize, 0.8, 5), (Equalize, 1.0, 0)],
    [(Rotate, 0.2, 3), (Solarize, 0.6, 8)],
    [(Equalize, 0.6, 0), (Posterize, 0.4, 6)],
    [(Rotate, 0.8, 8), (Color, 0.4, 0)],
    [(Rotate, 0.4, 9), (Equalize, 0.6, 0)],
    [(Equalize, 0.0, 0), (Equalize, 0.8, 0)],
    [(Invert, 0.6, 0), (Equalize, 1.0, 0)],
    [(Color, 0.6, 4), (Contrast, 1.0, 8)],
    [(Rotate, 0.8, 8), (Color, 1.0, 2)],
    [(Color, 0.8, 8), (Solarize, 0.8, 7)],
    [(Sharpness, 0.4, 7), (Invert, 0.6, 0)],
    [(ShearX, 0.6, 5), (Equalize, 1.0, 0)],
    [(Color, 0.4, 0), (Equalize, 0.6, 0)],
    [(Equalize, 0.4, 0), (Solarize, 0.2, 4)],
    [(Solarize, 0.6, 5), (AutoContrast, 0.6, 0)],
    [(Invert, 0.6, 0), (Equalize, 1.0, 0)],
    [(Color, 0.6, 4), (Contrast, 1.0, 8)],
    [(Equalize, 0.8, 0), (Equalize, 0.6, 0)],
];

const CIFAR10: [[Entry; 2]; 25] = [
    [(Invert, 0.1, 0), (Contrast, 0.2, 6)],
    [(Rotate, 0.7, 2), (TranslateX, 0.3, 9)],
    [(Sharpness, 0.8, 1), (Sharpness, 0.9, 3)],
    [(ShearY, 0.5, 8), (TranslateY, 0.7, 9)],
    [(AutoContrast, 0.5, 0), (Equalize, 0.9, 0)],
    [(ShearY, 0.2, 7), (Posterize, 0.3, 7)],
    [(Color, 0.4, 3), (Brightness, 0.6, 7)],
    [(Sharpness, 0.3, 9), (Brightness, 0.7, 9)],
    [(Equalize, 0.6, 0), (Equalize, 0.5, 0)],
    [(Contrast, 0.6, 7), (Sharpness, 0.6, 5)],
    [(Color, 0.7, 7), (TranslateX, 0.5, 8)],
    [(Equalize, 0.3, 0), (AutoContrast, 0.4, 0)],
    [(TranslateY, 0.4, 3), (Sharpness, 0.2, 6)],
    [(Brightness, 0.9, 6), (Color, 0.2, 8)],
    [(Solarize, 0.5, 2), (Invert, 0.0, 0)],
    [(Equalize, 0.2, 0), (AutoContrast, 0.6, 0)],
    [(Equalize, 0.2, 0), (Equalize, 0.6, 0)],
    [(Color, 0.9, 9), (Equalize, 0.6, 0)],
    [(AutoContrast, 0.8, 0), (Solarize, 0.2, 8)],
    [(Brightness, 0.1, 3), (Color, 0.7, 0)],
    [(Solarize, 0.4, 5), (AutoContrast, 0.9, 0)],
    [(TranslateY, 0.9, 9), (TranslateY, 0.7, 9)],
    [(AutoContrast, 0.9, 0), (Solarize, 0.8, 3)],
    [(Equalize, 0.8, 0), (Invert, 0.1, 0)],
    [(TranslateY, 0.7, 9), (AutoContrast, 0.9, 0)],
];

const SVHN: [[Entry; 2]; 25] = [
    [(ShearX, 0.9, 4), (Invert, 0.2, 0)],
    [(ShearY, 0.9, 8), (Invert, 0.7, 0)],
    [(Equalize, 0.6, 0), (Solarize, 0.6, 6)],
    [(Invert, 0.9, 0), (Equalize, 0.6, 0)],
    [(Equalize, 0.6, 0), (Rotate, 0.9, 3)],
    [(ShearX, 0.9, 4), (AutoContrast, 0.8, 0)],
    [(ShearY, 0.9, 8), (Invert, 0.4, 0)],
    [(ShearY, 0.9, 5), (Solarize, 0.2, 6)],
    [(Invert, 0.9, 0), (AutoContrast, 0.8, 0)],
    [(Equalize, 0.6, 0), (Rotate, 0.9, 3)],
    [(ShearX, 0.9, 4), (Solarize, 0.3, 3)],
    [(ShearY, 0.8, 8), (Invert, 0.7, 0)],
    [(Equalize, 0.9, 0), (TranslateY, 0.6, 6)],
    [(Invert, 0.9, 0), (Equalize, 0.6, 0)],
    [(Contrast, 0.3, 3), (Rotate, 0.8, 4)],
    [(Invert, 0.8, 0), (TranslateY, 0.0, 2)],
    [(ShearY, 0.7, 6), (Solarize, 0.4, 8)],
    [(Invert, 0.6, 0), (Rotate, 0.8, 4)],
    [(ShearY, 0.3, 7), (TranslateX, 0.9, 3)],
    [(ShearX, 0.1, 6), (Invert, 0.6, 0)],
    [(Solarize, 0.7, 2), (TranslateY, 0.6, 7)],
    [(ShearY, 0.8, 4), (Invert, 0.8, 0)],
    [(ShearX, 0.7, 9), (TranslateY, 0.8, 3)],
    [(ShearY, 0.8, 5), (AutoContrast, 0.7, 0)],
    [(ShearX, 0.7, 2), (Invert, 0.1, 0)],
];

/// torchvision's float-to-uint8 factor: `x · (255 + 1 - 1e-3)`, truncated.
const TO_BYTE: f32 = 255.999;

impl Transform {
    /// The magnitude of `bin` (of 10) for a `side`-pixel view, unsigned, and
    /// whether its sign is drawn: torchvision's `_AUGMENTATION_SPACE`.
    fn magnitude(self, bin: u8, side: usize) -> (f32, bool) {
        let share = f32::from(bin) / 9.0;
        match self {
            ShearX | ShearY => (0.3 * share, true),
            TranslateX | TranslateY => (150.0 / 331.0 * side as f32 * share, true),
            Rotate => (30.0 * share, true),
            Brightness | Color | Contrast | Sharpness => (0.9 * share, true),
            Posterize => ((8.0 - f32::from(bin) / 2.25).round(), false),
            Solarize => (1.0 - share, false),
            AutoContrast | Equalize | Invert => (0.0, false),
        }
    }

    /// Shear, translation and rotation: those that move pixels.
    pub fn is_geometric(self) -> bool {
        matches!(self, ShearX | ShearY | TranslateX | TranslateY | Rotate)
    }

    /// The device path: this transform at `magnitudes[i]` on image `i` of a
    /// `[n, 3, h, w]` batch.
    fn apply_batch(self, images: Tensor, magnitudes: &[f32]) -> Tensor {
        let (_, _, height, width) = images.size4().expect("a [n, 3, h, w] batch");
        let column = |values: Vec<f32>| super::per_image(&values, &images).to_kind(images.kind());
        let enhance = |part: u8| {
            let params: Vec<JitterParams> = magnitudes.iter().map(|&m| jitter(part, 1.0 + m)).collect();
            ColorJitterConfig::apply_batch(images.shallow_clone(), &params)
        };
        match self {
            ShearX | ShearY | TranslateX | TranslateY | Rotate => {
                let thetas: Vec<[f32; 6]> = magnitudes
                    .iter()
                    .map(|&magnitude| {
                        Step { transform: self, magnitude }.inverse_matrix(width as usize, height as usize)
                    })
                    .collect();
                warp_batch(&images, &thetas)
            }
            Brightness => enhance(0),
            Contrast => enhance(1),
            Color => enhance(2),
            Sharpness => sharpen_batch(&images, &column(magnitudes.iter().map(|m| 1.0 + m).collect())),
            Posterize => {
                let levels = column(magnitudes.iter().map(|&bits| (1u32 << bits as u32) as f32).collect());
                (&images * &levels).floor().minimum(&(&levels - 1.0)).clamp_min(0.0) / levels
            }
            Solarize => {
                let params: Vec<SolarizeParams> =
                    magnitudes.iter().map(|&threshold| SolarizeParams { threshold }).collect();
                SolarizeConfig::apply_batch(images, &params)
            }
            AutoContrast => autocontrast_batch(&images),
            Equalize => equalize_batch(&images),
            Invert => 1.0 - images,
        }
    }
}

/// A colour-jitter draw that runs one part (brightness 0, contrast 1,
/// saturation 2) at `factor` and leaves the others at 1.
fn jitter(part: u8, factor: f32) -> JitterParams {
    let mut params = JitterParams { brightness: 1.0, contrast: 1.0, saturation: 1.0, hue: 0.0, order: [0, 1, 2, 3] };
    match part {
        0 => params.brightness = factor,
        1 => params.contrast = factor,
        _ => params.saturation = factor,
    }
    params
}

impl Step {
    /// The CPU path of this step.
    pub fn apply(&self, image: &mut FloatImage) {
        let factor = 1.0 + self.magnitude;
        match self.transform {
            transform if transform.is_geometric() => {
                *image = warp(image, &self.inverse_matrix(image.width, image.height));
            }
            Brightness => color_jitter::adjust_brightness(image, factor),
            Color => color_jitter::adjust_saturation(image, factor),
            Contrast => color_jitter::adjust_contrast(image, factor),
            Sharpness => sharpen(image, factor),
            Posterize => {
                let levels = (1u32 << self.magnitude as u32) as f32;
                let step = 1.0 / levels;
                image.data.iter_mut().for_each(|v| *v = (*v * levels).floor().clamp(0.0, levels - 1.0) * step);
            }
            Solarize => SolarizeConfig::apply(image, &SolarizeParams { threshold: self.magnitude }),
            AutoContrast => autocontrast(image),
            Equalize => equalize(image),
            Invert => image.data.iter_mut().for_each(|v| *v = 1.0 - *v),
            _ => unreachable!("every geometric transform is matched above"),
        }
    }

    /// The inverse affine map of a geometric step, from an output pixel to
    /// its source (both relative to the image's centre), as torchvision's
    /// `_get_inverse_affine_matrix` builds it for `affine` and `rotate`, in
    /// f64, then f32 as torchvision's grid takes it.
    fn inverse_matrix(&self, width: usize, height: usize) -> [f32; 6] {
        let magnitude = f64::from(self.magnitude);
        let corner = [-0.5 * width as f64, -0.5 * height as f64];
        let shear = magnitude.atan().to_degrees();
        // (centre, angle in degrees, translation, shear in degrees); `rotate`
        // turns counter-clockwise, which torchvision's affine matrix takes
        // as the negated angle modulo 360.
        let (center, angle, translate, shear) = match self.transform {
            ShearX => (corner, 0.0, [0.0; 2], [shear, 0.0]),
            ShearY => (corner, 0.0, [0.0; 2], [0.0, shear]),
            TranslateX => ([0.0; 2], 0.0, [magnitude, 0.0], [0.0; 2]),
            TranslateY => ([0.0; 2], 0.0, [0.0, magnitude], [0.0; 2]),
            Rotate => ([0.0; 2], -magnitude.rem_euclid(360.0), [0.0; 2], [0.0; 2]),
            transform => unreachable!("{transform:?} is not geometric"),
        };
        let rotation = angle.to_radians();
        let (shear_x, shear_y) = (shear[0].to_radians(), shear[1].to_radians());
        let a = (rotation - shear_y).cos() / shear_y.cos();
        let b = -(a * shear_x.tan() + rotation.sin());
        let c = (rotation - shear_y).sin() / shear_y.cos();
        let d = rotation.cos() - c * shear_x.tan();
        let (x, y) = (center[0] + translate[0], center[1] + translate[1]);
        let mut matrix = [d, -b, 0.0, -c, a, 0.0];
        matrix[2] += center[0] - matrix[0] * x - matrix[1] * y;
        matrix[5] += center[1] - matrix[3] * x - matrix[4] * y;
        matrix.map(|v| v as f32)
    }
}

/// The output pixel's offsets from the centre of a side of `size` pixels,
/// as torchvision's base grid (`linspace((1 - size) / 2, (size - 1) / 2)`).
fn centred(position: usize, size: usize) -> f32 {
    position as f32 - (size as f32 - 1.0) * 0.5
}

/// `image` resampled through `theta` (nearest, zero outside), in f32 in the
/// order of torchvision's `_affine_grid` and ATen's `grid_sample` (align
/// corners off), so that the same source pixels are picked but where a
/// coordinate falls within rounding of a half.
fn warp(image: &FloatImage, theta: &[f32; 6]) -> FloatImage {
    let (width, height) = (image.width, image.height);
    let (half_width, half_height) = (0.5 * width as f32, 0.5 * height as f32);
    let scaled = [
        theta[0] / half_width,
        theta[1] / half_width,
        theta[2] / half_width,
        theta[3] / half_height,
        theta[4] / half_height,
        theta[5] / half_height,
    ];
    let source = |normalised: f32, size: usize| {
        let position = (((normalised + 1.0) * size as f32 - 1.0) / 2.0).round_ties_even();
        (0.0..size as f32).contains(&position).then_some(position as usize)
    };
    let mut data = vec![0.0; image.data.len()];
    for y in 0..height {
        let row = centred(y, height);
        for x in 0..width {
            let column = centred(x, width);
            let from_x = source(column * scaled[0] + row * scaled[1] + scaled[2], width);
            let from_y = source(column * scaled[3] + row * scaled[4] + scaled[5], height);
            if let (Some(from_x), Some(from_y)) = (from_x, from_y) {
                let at = (from_y * width + from_x) * 3;
                data[(y * width + x) * 3..][..3].copy_from_slice(&image.data[at..at + 3]);
            }
        }
    }
    FloatImage { width, height, data }
}

/// [`warp`] on a `[n, 3, h, w]` batch, image `i` through `thetas[i]`: the
/// grid as torchvision's `_affine_grid` makes it, then `grid_sample`.
fn warp_batch(images: &Tensor, thetas: &[[f32; 6]]) -> Tensor {
    let (_, _, height, width) = images.size4().expect("a [n, 3, h, w] batch");
    let (device, count) = (images.device(), thetas.len() as i64);
    let flat: Vec<f32> = thetas.iter().flatten().copied().collect();
    let theta = crate::device::upload_slice(&flat, device).view([count, 2, 3]);
    let half = crate::device::upload_slice(&[0.5 * width as f32, 0.5 * height as f32], device);
    let scaled = theta.transpose(1, 2) / half;
    let xs: Vec<f32> = (0..width as usize).map(|x| centred(x, width as usize)).collect();
    let ys: Vec<f32> = (0..height as usize).map(|y| centred(y, height as usize)).collect();
    let xs = crate::device::upload_slice(&xs, device).view([1, width]).expand([height, width], false);
    let ys = crate::device::upload_slice(&ys, device).view([height, 1]).expand([height, width], false);
    let base = Tensor::stack(&[xs, ys, Tensor::ones([height, width], (Kind::Float, device))], -1)
        .view([1, height * width, 3])
        .expand([count, height * width, 3], false);
    let grid = base.bmm(&scaled).view([count, height, width, 2]);
    // Modes of `grid_sampler`: interpolation 1 is nearest, padding 0 zeros.
    images.to_kind(Kind::Float).grid_sampler(&grid, 1, 0, false).to_kind(images.kind())
}

/// torchvision's sharpness kernel: 1s around a 5, over 13.
const SMOOTH: [f32; 9] =
    [1.0 / 13.0, 1.0 / 13.0, 1.0 / 13.0, 1.0 / 13.0, 5.0 / 13.0, 1.0 / 13.0, 1.0 / 13.0, 1.0 / 13.0, 1.0 / 13.0];

/// torchvision's `adjust_sharpness`: the interior blended with its
/// smoothing, x + (1 - factor)(smooth - x), clamped; the border kept.
fn sharpen(image: &mut FloatImage, factor: f32) {
    let (width, height) = (image.width, image.height);
    if width <= 2 || height <= 2 {
        return;
    }
    let source = image.data.clone();
    for y in 1..height - 1 {
        for x in 1..width - 1 {
            for channel in 0..3 {
                let mut smooth = 0.0;
                for (k, weight) in SMOOTH.iter().enumerate() {
                    smooth += weight * source[((y + k / 3 - 1) * width + x + k % 3 - 1) * 3 + channel];
                }
                let value = source[(y * width + x) * 3 + channel];
                image.data[(y * width + x) * 3 + channel] = (value + (1.0 - factor) * (smooth - value)).clamp(0.0, 1.0);
            }
        }
    }
}

/// [`sharpen`] on a batch, with a `[n, 1, 1, 1]` factor per image.
fn sharpen_batch(images: &Tensor, factors: &Tensor) -> Tensor {
    let (_, channels, height, width) = images.size4().expect("a [n, 3, h, w] batch");
    if width <= 2 || height <= 2 {
        return images.shallow_clone();
    }
    let kernel = crate::device::upload_slice(&SMOOTH, images.device())
        .to_kind(images.kind())
        .view([1, 1, 3, 3])
        .expand([channels, 1, 3, 3], false);
    let smooth = images.conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], channels);
    let interior = images.narrow(2, 1, height - 2).narrow(3, 1, width - 2);
    let sharpened = (&smooth - &interior) * (1.0 - factors) + &interior;
    let output = images.copy();
    output.narrow(2, 1, height - 2).narrow(3, 1, width - 2).copy_(&sharpened);
    output.clamp(0.0, 1.0)
}

/// torchvision's `autocontrast`: each channel stretched from its least to
/// its greatest value onto [0, 1]; a flat channel is kept.
fn autocontrast(image: &mut FloatImage) {
    for channel in 0..3 {
        let values = image.data.iter().skip(channel).step_by(3);
        let low = values.clone().copied().fold(f32::INFINITY, f32::min);
        let high = values.copied().fold(f32::NEG_INFINITY, f32::max);
        let (low, scale) = if high == low { (0.0, 1.0) } else { (low, high - low) };
        image.data.iter_mut().skip(channel).step_by(3).for_each(|v| *v = ((*v - low) / scale).clamp(0.0, 1.0));
    }
}

/// [`autocontrast`] on a batch.
fn autocontrast_batch(images: &Tensor) -> Tensor {
    let low = images.amin([2, 3], true);
    let high = images.amax([2, 3], true);
    let flat = high.eq_tensor(&low);
    let scale = (&high - &low).masked_fill(&flat, 1.0);
    let low = low.masked_fill(&flat, 0.0);
    ((images - low) / scale).clamp(0.0, 1.0)
}

/// PIL's equalisation of one channel's 8-bit `histogram` (as torchvision's
/// `equalize`): the lookup table, or `None` where the channel has fewer
/// than 255 pixels off its greatest value, which leaves it as it is.
fn equalize_table(histogram: &[i64; 256], pixels: i64) -> Option<[u8; 256]> {
    let last = histogram.iter().rposition(|&count| count > 0).expect("a channel has pixels");
    let step = (pixels - histogram[last]) / 255;
    if step == 0 {
        return None;
    }
    let mut table = [0u8; 256];
    let mut cumulative = 0;
    for (value, count) in histogram.iter().enumerate().take(255) {
        cumulative += count;
        table[value + 1] = ((cumulative + step / 2) / step).min(255) as u8;
    }
    Some(table)
}

/// torchvision's `equalize` on float input: 8-bit values, each channel
/// through its own table, back to floats.
fn equalize(image: &mut FloatImage) {
    let bytes: Vec<u8> = image.data.iter().map(|v| (v * TO_BYTE) as u8).collect();
    let pixels = (image.width * image.height) as i64;
    for channel in 0..3 {
        let mut histogram = [0i64; 256];
        bytes.iter().skip(channel).step_by(3).for_each(|&v| histogram[usize::from(v)] += 1);
        let table = equalize_table(&histogram, pixels);
        for (out, &byte) in image.data.iter_mut().zip(&bytes).skip(channel).step_by(3) {
            let byte = table.map_or(byte, |table| table[usize::from(byte)]);
            *out = f32::from(byte) * (1.0 / 255.0);
        }
    }
}

/// [`equalize`] on a batch: every (image, channel)'s histogram in one
/// `bincount`, the tables as torchvision computes them, one `gather`.
fn equalize_batch(images: &Tensor) -> Tensor {
    let (count, channels, height, width) = images.size4().expect("a [n, 3, h, w] batch");
    let planes = count * channels;
    let pixels = height * width;
    let bytes = (images.to_kind(Kind::Float) * f64::from(TO_BYTE)).to_kind(Kind::Int64).view([planes, pixels]);
    let offsets = Tensor::arange(planes, (Kind::Int64, images.device())).view([planes, 1]) * 256;
    let histogram = (&bytes + offsets).view([-1]).bincount(None::<Tensor>, planes * 256).view([planes, 256]);
    let cumulative = histogram.cumsum(1, Kind::Int64);
    let last = cumulative.argmax(1, true);
    let step = (histogram.gather(1, &last, false).neg() + pixels).floor_divide_scalar(255);
    let table =
        (cumulative.narrow(1, 0, 255) + step.floor_divide_scalar(2)).floor_divide(&step.clamp_min(1)).clamp(0, 255);
    let table = Tensor::cat(&[table.zeros_like().narrow(1, 0, 1), table], 1);
    let equalized = table.gather(1, &bytes, false).where_self(&step.ne(0), &bytes);
    (equalized.to_kind(Kind::Float) * (1.0 / 255.0)).view([count, channels, height, width]).to_kind(images.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitudes_follow_torchvisions_bins() {
        assert_eq!(Posterize.magnitude(0, 32), (8.0, false));
        assert_eq!(Posterize.magnitude(3, 32), (7.0, false));
        assert_eq!(Posterize.magnitude(9, 32), (4.0, false));
        assert_eq!(Solarize.magnitude(9, 32).0, 0.0);
        assert!((Rotate.magnitude(9, 32).0 - 30.0).abs() < 1e-5);
        // 150/331 of the side at bin 9, truncated when drawn.
        assert!((TranslateX.magnitude(9, 331).0 - 150.0).abs() < 1e-3);
    }

    #[test]
    fn draws_follow_the_policy_table() {
        let config = AutoAugmentConfig::default();
        let mut rng = super::super::view_rng(4, 0, 0, 0);
        let mut seen = [0usize; 25];
        for _ in 0..2000 {
            let params = config.sample(32, &mut rng).expect("probability 1");
            seen[usize::from(params.sub_policy)] += 1;
            for (step, (transform, _, bin)) in params.steps.iter().zip(IMAGENET[usize::from(params.sub_policy)]) {
                if let Some(step) = step {
                    assert_eq!(step.transform, transform);
                    assert_eq!(step.magnitude.abs(), transform.magnitude(bin, 32).0);
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 40), "sub-policies drawn {seen:?}");
        // Sub-policy 12's first transform has probability 0.
        let mut rng = super::super::view_rng(4, 0, 1, 0);
        let never = (0..2000)
            .filter_map(|_| config.sample(32, &mut rng))
            .filter(|p| p.sub_policy == 12 && p.steps[0].is_some())
            .count();
        assert_eq!(never, 0);
    }

    #[test]
    fn both_paths_render_the_same_draws() {
        // 300 draws of each policy on one float view: the same values but
        // where a geometric transform's source coordinate falls within
        // rounding of a half (the two paths round f32 sums in other orders).
        let image = FloatImage {
            width: 32,
            height: 32,
            data: (0..32 * 32 * 3).map(|i| ((i * 37 % 256) as f32 / 255.0 + (i / 96) as f32 / 64.0) % 1.0).collect(),
        };
        for policy in [Policy::Imagenet, Policy::Cifar10, Policy::Svhn] {
            let config = AutoAugmentConfig { probability: 1.0, policy };
            let mut rng = super::super::view_rng(9, 0, 0, 0);
            let params: Vec<AutoAugmentParams> = (0..300).filter_map(|_| config.sample(32, &mut rng)).collect();
            let batch = image.to_tensor().unsqueeze(0).repeat([params.len() as i64, 1, 1, 1]);
            let rendered = AutoAugmentConfig::apply_batch(batch, &params);
            let (mut differing, mut total) = (0usize, 0usize);
            for (i, p) in params.iter().enumerate() {
                let mut cpu = image.clone();
                AutoAugmentConfig::apply(&mut cpu, p);
                let tensor = FloatImage::from_tensor(&rendered.get(i as i64));
                differing += cpu.data.iter().zip(&tensor.data).filter(|(a, b)| (*a - *b).abs() > 1e-5).count();
                total += cpu.data.len();
            }
            // None did on this machine (2026-12-05); a tie may round either way elsewhere.
            let share = differing as f64 / total as f64;
            assert!(share < 1e-3, "{policy:?}: {differing} of {total} values differ");
        }
    }

    #[test]
    fn equalize_leaves_a_channel_with_too_few_varied_pixels() {
        let mut histogram = [0i64; 256];
        histogram[10] = 100;
        histogram[200] = 100;
        assert_eq!(equalize_table(&histogram, 200), None);
        histogram[10] = 1000;
        let table = equalize_table(&histogram, 1100).expect("enough pixels below the top value");
        // step = 1000 / 255 = 3: value 10 maps to (0 + 1) / 3 = 0, 200 to (1000 + 1) / 3, clamped.
        assert_eq!((table[10], table[200]), (0, 255));
    }
}
