//! The trait every pixel op implements, and what it promises.
//!
//! An op is split in two so that the two implementations share one
//! semantics: [`Augmentation::sample`] draws a view's random parameters from
//! an explicit RNG, and both [`Augmentation::apply`] (the CPU path) and
//! [`Augmentation::apply_batch`] (the device path) apply given parameters.
//! The op's config struct implements the trait; `register!` in
//! `augment/mod.rs` lists each op once, which gives it its config name, its
//! variant of [`super::OpConfig`] and [`super::OpParams`], and its dispatch.
use rand::Rng;
use serde::Serialize;
use tch::Tensor;

use super::FloatImage;

pub trait Augmentation {
    /// What one draw decides for one view (`()` when the only decision is
    /// whether the op applies). Serialised into the parameter log.
    type Params: Copy + std::fmt::Debug + PartialEq + Serialize;

    /// Draws the parameters of a `side` x `side` view, or `None` when the op
    /// is not applied to it. The Bernoulli draw with the op's `probability`
    /// comes first (`applies`), so a probability of 0 draws nothing
    /// else.
    fn sample<R: Rng + ?Sized>(&self, side: usize, rng: &mut R) -> Option<Self::Params>;

    /// The CPU path: applies `params` to one view in place.
    fn apply(image: &mut FloatImage, params: &Self::Params);

    /// The device path: applies `params[i]` to image `i` of a `[n, 3, h, w]`
    /// float batch in [0, 1], on whatever device the batch is on.
    fn apply_batch(images: Tensor, params: &[Self::Params]) -> Tensor;

    /// Pushes one line per bad field, each starting with `field`. The
    /// probability is checked for every op; this checks the rest.
    fn check(&self, _field: &str, _image_size: u32, _problems: &mut Vec<String>) {}
}
