//! The two-view pipeline: each view's parameters drawn from its own RNG
//! ([`view_rng`]), then rendered on the CPU path or the device path.
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::{crop, pad_crop, AugmentConfig, CropBox, FloatImage, Interpolation, OpConfig, OpParams, PadOffset};

/// The RNG for one view: a pure function of its coordinates, so that data
/// order, resumption and worker count never change what a view looks like.
pub fn view_rng(seed: u64, epoch: u64, index: u64, view: u64) -> ChaCha8Rng {
    seeded_rng(seed, &[epoch, index, view])
}

/// An RNG that is a pure function of `seed` and the coordinates `parts`
/// (each folded in with [`splitmix64`]).
pub(crate) fn seeded_rng(seed: u64, parts: &[u64]) -> ChaCha8Rng {
    let state = parts.iter().fold(seed, |state, &part| splitmix64(state ^ splitmix64(part)));
    ChaCha8Rng::seed_from_u64(state)
}

/// SplitMix64's finaliser (Steele et al. 2014): a cheap, well-mixed hash.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// How the decoded image becomes a `size` x `size` view, with its drawn parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Sizing {
    /// Shorter side resized to the view size, centre cut: no randomness.
    CenterResize,
    RandomResizedCrop {
        crop: CropBox,
        interpolation: Interpolation,
    },
    RandomCrop {
        offset: PadOffset,
    },
}

/// Everything random about one view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViewParams {
    pub sizing: Sizing,
    pub ops: Vec<Option<OpParams>>,
}

/// The two-view pipeline for a validated [`AugmentConfig`] and view size.
#[derive(Debug, Clone)]
pub struct Pipeline {
    views: [Vec<OpConfig>; 2],
    size: u32,
}

impl Pipeline {
    pub fn new(config: &AugmentConfig, size: u32) -> Self {
        Self { views: config.view_ops(), size }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// The ops of `view` (0 or 1).
    pub fn ops(&self, view: usize) -> &[OpConfig] {
        &self.views[view]
    }

    /// The ops of `view` as "a -> b -> c", for listings.
    pub fn describe(&self, view: usize) -> String {
        let ops: Vec<&str> = self.views[view].iter().map(OpConfig::name).collect();
        if ops.is_empty() {
            "resize only".to_owned()
        } else {
            ops.join(" -> ")
        }
    }

    /// Whether both views draw from the same ops (the paper's symmetric
    /// augmentation), so that [`Pipeline::render_batch`] can take both
    /// views' parameters in one batch.
    pub fn is_symmetric(&self) -> bool {
        self.views[0] == self.views[1]
    }

    /// Draws the parameters of `view` of an image `width` x `height`.
    pub fn sample<R: Rng + ?Sized>(&self, view: usize, width: u32, height: u32, rng: &mut R) -> ViewParams {
        let ops = &self.views[view];
        let (sizing, pixel_ops) = match ops.first() {
            Some(OpConfig::RandomResizedCrop(c)) => (
                Sizing::RandomResizedCrop { crop: c.sample_box(width, height, rng), interpolation: c.interpolation },
                &ops[1..],
            ),
            Some(OpConfig::RandomCrop(c)) => (Sizing::RandomCrop { offset: c.sample(rng) }, &ops[1..]),
            _ => (Sizing::CenterResize, &ops[..]),
        };
        let side = self.size as usize;
        let ops = pixel_ops.iter().map(|op| op.sample_pixel(side, rng)).collect();
        ViewParams { sizing, ops }
    }

    /// The box of the image that `params` turn into the view, on an image
    /// `width` x `height`: the random crop, or the centred square.
    fn source_box(params: &ViewParams, width: u32, height: u32) -> (CropBox, Interpolation) {
        match params.sizing {
            Sizing::RandomResizedCrop { crop, interpolation } => (crop, interpolation),
            Sizing::CenterResize | Sizing::RandomCrop { .. } => {
                (crop::center_square(width, height), Interpolation::Bilinear)
            }
        }
    }

    /// By how much an image `width` x `height` may be decoded smaller (1, 2,
    /// 4 or 8) for the views of `params`: the largest factor that leaves
    /// every view's box at least the view's size on both sides, so the views
    /// are still shrunk, never enlarged, from the smaller image.
    pub fn reduction(&self, params: &[ViewParams], width: u32, height: u32) -> u32 {
        let shortest = params
            .iter()
            .map(|p| {
                let (b, _) = Self::source_box(p, width, height);
                b.width.min(b.height)
            })
            .min()
            .unwrap_or(0);
        [8, 4, 2].into_iter().find(|&factor| shortest >= factor * self.size).unwrap_or(1)
    }

    /// The geometric part of a view, in 8 bits: its box cut out of `image`
    /// and resized to `size` x `size` (for a random crop with padding, the
    /// centre view that the padding and offset then apply to). `image` may
    /// be a smaller decode of the `width` x `height` image that `params`
    /// were drawn for; the box is scaled to it.
    pub fn geometry(&self, image: &RgbImage, params: &ViewParams, width: u32, height: u32) -> RgbImage {
        let (source, interpolation) = Self::source_box(params, width, height);
        crop::crop_resize_reduced(image, source, (width, height), self.size, interpolation)
    }

    /// The rest of a view on the CPU, after [`Pipeline::geometry`]: the
    /// padded crop's offset, then the pixel ops.
    pub fn finish(&self, geometry: &RgbImage, params: &ViewParams) -> FloatImage {
        let mut view = FloatImage::from_rgb(geometry);
        if let Sizing::RandomCrop { offset } = params.sizing {
            view = pad_crop::apply(&view, offset);
        }
        for op in params.ops.iter().flatten() {
            op.apply(&mut view);
        }
        view
    }

    /// Applies `params` to `image` on the CPU.
    pub fn render(&self, image: &RgbImage, params: &ViewParams) -> FloatImage {
        let (width, height) = image.dimensions();
        self.finish(&self.geometry(image, params, width, height), params)
    }

    /// One random view of `image` (view 0 or 1), `size` x `size` pixels.
    pub fn view<R: Rng + ?Sized>(&self, view: usize, image: &RgbImage, rng: &mut R) -> FloatImage {
        let params = self.sample(view, image.width(), image.height(), rng);
        self.render(image, &params)
    }

    /// The device path: applies `params[i]` to image `i` of `images`, a
    /// `[n, 3, height, width]` uint8 batch of same-sized images on any
    /// device, and returns `[n, 3, size, size]` floats in [0, 1] on that device.
    ///
    /// Each op runs once per batch on the images that drew it (selected with
    /// indices known on the host, so no device synchronisation is needed).
    pub fn render_batch(&self, images: &Tensor, params: &[ViewParams]) -> Tensor {
        let device = images.device();
        let (count, _, height, width) = images.size4().expect("a [n, 3, height, width] batch");
        assert_eq!(count as usize, params.len(), "one parameter set per image");
        let images = images.to_kind(Kind::Float) / 255.0;
        let side = i64::from(self.size);
        let centre = crop::center_square(width as u32, height as u32);
        let boxes: Vec<(CropBox, Interpolation)> = params
            .iter()
            .map(|p| match p.sizing {
                Sizing::RandomResizedCrop { crop, interpolation } => (crop, interpolation),
                _ => (centre, Interpolation::Bilinear),
            })
            .collect();
        let views = crop::crop_resize_batch(&images, &boxes, side);
        let views = self.finish_batch(views, params);
        debug_assert_eq!(views.device(), device);
        views
    }

    /// The device part of the hybrid path: `views` is a `[n, size, size, 3]`
    /// uint8 batch of [`Pipeline::geometry`]'s outputs, on any device; the
    /// padded crops' offsets and the pixel ops of `params` run there, in
    /// batch, as on the device path. Returns `[n, 3, size, size]` floats in [0, 1].
    pub fn render_pixels(&self, views: &Tensor, params: &[ViewParams]) -> Tensor {
        assert_eq!(views.size()[0] as usize, params.len(), "one parameter set per view");
        let views = views.permute([0, 3, 1, 2]).to_kind(Kind::Float).contiguous() / 255.0;
        self.finish_batch(views, params)
    }

    /// The device path after the crop: padded crops' offsets, then the ops.
    fn finish_batch(&self, mut views: Tensor, params: &[ViewParams]) -> Tensor {
        let offsets: Vec<(usize, PadOffset)> = params
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p.sizing {
                Sizing::RandomCrop { offset } => Some((i, offset)),
                _ => None,
            })
            .collect();
        views = on_subset(views, &offsets, pad_crop::apply_batch);
        let positions = params.first().map_or(0, |p| p.ops.len());
        for position in 0..positions {
            let drawn: Vec<(usize, OpParams)> =
                params.iter().enumerate().filter_map(|(i, p)| p.ops[position].map(|op| (i, op))).collect();
            // Every image of a batch runs the same op list, so the drawn
            // parameters at one position are all of one kind.
            let Some((_, first)) = drawn.first() else { continue };
            views = first.apply_batch(views, &drawn);
        }
        views
    }
}

/// Runs `op` on the images at the given positions only and writes the
/// results back in place of those images.
pub(crate) fn on_subset<P: Copy>(
    images: Tensor,
    drawn: &[(usize, P)],
    op: impl FnOnce(Tensor, &[P]) -> Tensor,
) -> Tensor {
    if drawn.is_empty() {
        return images;
    }
    let params: Vec<P> = drawn.iter().map(|(_, p)| *p).collect();
    if drawn.len() as i64 == images.size()[0] && drawn.iter().enumerate().all(|(k, (i, _))| k == *i) {
        return op(images, &params);
    }
    let index: Vec<i64> = drawn.iter().map(|(i, _)| *i as i64).collect();
    let index = crate::device::upload_slice(&index, images.device());
    let changed = op(images.index_select(0, &index), &params);
    images.index_copy(0, &index, &changed)
}

/// A per-image scalar as a `[n, 1, 1, 1]` tensor on `like`'s device.
pub(crate) fn per_image<T: tch::kind::Element>(values: &[T], like: &Tensor) -> Tensor {
    crate::device::upload_slice(values, like.device()).view([values.len() as i64, 1, 1, 1])
}
