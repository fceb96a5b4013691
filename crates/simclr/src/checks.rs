//! Checks that several config sections share.

/// True for finite numbers above zero; false for NaN, which every `x > 0`
/// check written as `!(x > 0.0)` would otherwise have to remember.
pub fn is_positive_finite(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// True for finite numbers at or above zero; false for NaN, as above.
pub fn is_non_negative_finite(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

/// Images and views smaller than this on either side are rejected: a random
/// crop of 8% of a smaller image has no detail left to learn from.
pub const MIN_IMAGE_SIDE: u32 = 8;
