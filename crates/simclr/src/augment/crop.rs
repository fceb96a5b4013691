//! Random resized crop (appendix A): a crop of random area (scale of the
//! original in [0.08, 1]) and aspect ratio (in [3/4, 4/3], drawn
//! log-uniformly) resized to the training size, as torchvision's
//! `RandomResizedCrop`.
//!
//! The CPU path resizes 8-bit pixels with a bilinear or Catmull-Rom
//! (bicubic, PIL's a = -0.5) convolution that antialiases when shrinking,
//! as PIL and torchvision v2 do. The device path
//! samples the crop with `grid_sample` (no antialiasing): identical for
//! crops that enlarge, which is nearly every crop at CIFAR's 32 px, up to
//! 8-bit rounding (bicubic differs more: `grid_sample`'s cubic is Keys'
//! a = -0.75, PIL's a = -0.5).
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::FloatImage;

/// How a crop is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    #[default]
    Bilinear,
    Bicubic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CropConfig {
    /// Smallest and largest fraction of the image area kept: 0.08 and 1.
    pub min_scale: f64,
    pub max_scale: f64,
    /// Aspect-ratio range (width / height): 3/4 and 4/3.
    pub min_ratio: f64,
    pub max_ratio: f64,
    pub interpolation: Interpolation,
}

impl Default for CropConfig {
    fn default() -> Self {
        Self {
            min_scale: 0.08,
            max_scale: 1.0,
            min_ratio: 3.0 / 4.0,
            max_ratio: 4.0 / 3.0,
            interpolation: Interpolation::Bilinear,
        }
    }
}

/// A box in pixels: top row, left column, height and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

impl CropConfig {
    pub(crate) fn check(&self, field: &str, problems: &mut Vec<String>) {
        if !(self.min_scale > 0.0 && self.min_scale <= self.max_scale && self.max_scale <= 1.0) {
            problems.push(format!(
                "{field}: min_scale = {}, max_scale = {}: need 0 < min_scale <= max_scale <= 1",
                self.min_scale, self.max_scale
            ));
        }
        if !(self.min_ratio > 0.0 && self.min_ratio <= self.max_ratio && self.max_ratio.is_finite()) {
            problems.push(format!(
                "{field}: min_ratio = {}, max_ratio = {}: need 0 < min_ratio <= max_ratio",
                self.min_ratio, self.max_ratio
            ));
        }
    }

    /// torchvision's `RandomResizedCrop.get_params`: ten tries at a box
    /// that fits, then a centre crop with the ratio clamped into range.
    pub fn sample_box<R: rand::Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
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
}

/// Cuts `crop` out of `image` and resizes it to `width` x `height`.
pub fn crop_resize(
    image: &RgbImage,
    crop: CropBox,
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> FloatImage {
    FloatImage::from_rgb(&crop_resize_rgb(image, crop, width, height, interpolation))
}

thread_local! {
    /// One resizer per worker thread: it keeps its scratch buffers.
    static RESIZER: std::cell::RefCell<fast_image_resize::Resizer> =
        std::cell::RefCell::new(fast_image_resize::Resizer::new());
}

/// [`crop_resize`] in 8 bits, the form the hybrid path sends to the device.
///
/// `fast_image_resize` convolves with PIL's filter supports (antialiased
/// when shrinking) in SIMD; the `image` crate's resize took 2.5x as long
/// for 224 px crops (perf, `simclr bench augment`).
pub fn crop_resize_rgb(
    image: &RgbImage,
    crop: CropBox,
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> RgbImage {
    use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions};
    let is_whole = crop.left == 0 && crop.top == 0 && crop.width == image.width() && crop.height == image.height();
    if is_whole && crop.width == width && crop.height == height {
        return image.clone();
    }
    let filter = match interpolation {
        Interpolation::Bilinear => FilterType::Bilinear,
        Interpolation::Bicubic => FilterType::CatmullRom,
    };
    // Copied out first: a crop option would let the filter read pixels
    // beyond the box edges, which PIL's crop-then-resize never sees.
    let cropped = cut(image, crop);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let mut resized = RgbImage::new(width, height);
    RESIZER
        .with(|resizer| resizer.borrow_mut().resize(&cropped, &mut resized, &options))
        .expect("both images are 8-bit RGB");
    resized
}

/// The pixels of `crop`, copied row by row (`crop_imm(..).to_image()` copies
/// pixel by pixel through `get_pixel`: 9% of the CPU pipeline's time).
fn cut(image: &RgbImage, crop: CropBox) -> RgbImage {
    let (stride, row) = (3 * image.width() as usize, 3 * crop.width as usize);
    let mut pixels = Vec::with_capacity(row * crop.height as usize);
    for y in crop.top as usize..(crop.top + crop.height) as usize {
        let start = y * stride + 3 * crop.left as usize;
        pixels.extend_from_slice(&image.as_raw()[start..start + row]);
    }
    RgbImage::from_raw(crop.width, crop.height, pixels).expect("a box inside the image")
}

/// [`crop_resize_rgb`] of `crop`, a box drawn on an image of size `from`,
/// out of the same image decoded smaller (1/k of each side, rounded up, as
/// a DCT-domain reduced decode makes it). The box is scaled exactly, its
/// fractional edges honoured by the filter: rounding them to pixels of the
/// smaller image would shift the view by up to half of one, k/2 pixels of
/// the original (measured: a mean difference to the full decode 4.4x as
/// large at 1/4, in `data::decode`'s test).
pub fn crop_resize_reduced(
    image: &RgbImage,
    crop: CropBox,
    from: (u32, u32),
    size: u32,
    interpolation: Interpolation,
) -> RgbImage {
    use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions};
    let (width, height) = image.dimensions();
    if (width, height) == from {
        return crop_resize_rgb(image, crop, size, size, interpolation);
    }
    let edges = |start: u32, len: u32, from: u32, to: u32| {
        let scale = 1.0 / (f64::from(from) / f64::from(to)).round();
        let first = (f64::from(start) * scale).min(f64::from(to) - 1.0);
        let end = (f64::from(start + len) * scale).clamp(first + 1.0 / 8.0, f64::from(to));
        (first, end)
    };
    let (left, right) = edges(crop.left, crop.width, from.0, width);
    let (top, bottom) = edges(crop.top, crop.height, from.1, height);
    // The whole pixels that hold the box, copied out as in `crop_resize_rgb`.
    let (x, y) = (left.floor() as u32, top.floor() as u32);
    let (x_end, y_end) = ((right.ceil() as u32).min(width), (bottom.ceil() as u32).min(height));
    let region = cut(image, CropBox { top: y, left: x, height: y_end - y, width: x_end - x });
    let filter = match interpolation {
        Interpolation::Bilinear => FilterType::Bilinear,
        Interpolation::Bicubic => FilterType::CatmullRom,
    };
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)).crop(
        left - f64::from(x),
        top - f64::from(y),
        right - left,
        bottom - top,
    );
    let mut resized = RgbImage::new(size, size);
    RESIZER
        .with(|resizer| resizer.borrow_mut().resize(&region, &mut resized, &options))
        .expect("both images are 8-bit RGB");
    resized
}

/// The centred square whose side is the shorter side.
pub fn center_square(width: u32, height: u32) -> CropBox {
    let side = width.min(height);
    CropBox { top: (height - side) / 2, left: (width - side) / 2, height: side, width: side }
}

/// Resizes the shorter side to `size` and cuts the centre `size` x `size`:
/// the same as resizing the centred square whose side is the shorter one.
pub fn resize_shorter_center_crop(image: &RgbImage, size: u32) -> FloatImage {
    let (width, height) = image.dimensions();
    crop_resize(image, center_square(width, height), size, size, Interpolation::Bilinear)
}

/// The device path: crops `boxes[i]` out of image `i` of the `[n, 3, h, w]`
/// float batch and resizes it to `size` x `size` with `grid_sample`
/// (pixel centres at half-integers, as `align_corners = false`; edges
/// clamped to the box, as PIL's and the CPU filters do).
pub fn crop_resize_batch(images: &Tensor, boxes: &[(CropBox, Interpolation)], size: i64) -> Tensor {
    let (count, _, height, width) = images.size4().expect("a [n, 3, h, w] batch");
    let whole = CropBox { top: 0, left: 0, height: height as u32, width: width as u32 };
    if size == height && size == width && boxes.iter().all(|(b, _)| *b == whole) {
        return images.shallow_clone();
    }
    let (w, h) = (width as f32, height as f32);
    // Output pixel u (normalised) maps to crop.left + (u + 1) / 2 * crop.width
    // in pixels, i.e. (crop.width / w) * u + (2 * crop.left + crop.width) / w - 1.
    let theta: Vec<f32> = boxes
        .iter()
        .flat_map(|(b, _)| {
            let (bw, bh) = (b.width as f32, b.height as f32);
            [bw / w, 0.0, (2.0 * b.left as f32 + bw) / w - 1.0, 0.0, bh / h, (2.0 * b.top as f32 + bh) / h - 1.0]
        })
        .collect();
    let theta = crate::device::upload_slice(&theta, images.device()).view([count, 2, 3]);
    let grid = Tensor::affine_grid_generator(&theta, [count, 3, size, size], false);
    // Filters read only pixels inside the crop (PIL crops, then resizes):
    // clamp the sampling points to the box's outermost pixel centres.
    let limits = |first: &dyn Fn(&CropBox) -> (u32, u32), extent: f32| {
        let (low, high): (Vec<f32>, Vec<f32>) = boxes
            .iter()
            .map(|(b, _)| {
                let (start, len) = first(b);
                ((2 * start + 1) as f32 / extent - 1.0, (2 * (start + len) - 1) as f32 / extent - 1.0)
            })
            .unzip();
        let column = |v: Vec<f32>| crate::device::upload_slice(&v, images.device()).view([count, 1, 1]);
        (column(low), column(high))
    };
    let (x_low, x_high) = limits(&|b| (b.left, b.width), w);
    let (y_low, y_high) = limits(&|b| (b.top, b.height), h);
    let x = grid.select(3, 0).clamp_tensor(Some(&x_low), Some(&x_high));
    let y = grid.select(3, 1).clamp_tensor(Some(&y_low), Some(&y_high));
    let grid = Tensor::stack(&[x, y], 3);
    let sample = |images: &Tensor, grid: &Tensor, mode| images.grid_sampler(grid, mode, 1, false);
    let bicubic: Vec<i64> =
        boxes.iter().enumerate().filter(|(_, (_, i))| *i == Interpolation::Bicubic).map(|(k, _)| k as i64).collect();
    let out = sample(images, &grid, 0);
    if bicubic.is_empty() {
        return out;
    }
    let index = crate::device::upload_slice(&bicubic, images.device());
    let cubic = sample(&images.index_select(0, &index), &grid.index_select(0, &index), 2).clamp(0.0, 1.0);
    out.index_copy(0, &index, &cubic.to_kind(Kind::Float))
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
