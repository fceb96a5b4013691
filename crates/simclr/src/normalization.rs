//! Per-channel normalisation of views, (x - mean) / std: ImageNet's
//! constants (torchvision's default), the check of a std, and the parser of
//! a triple on the command line.
use crate::checks::is_positive_finite;

/// ImageNet's channel means and standard deviations, torchvision's default.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Three comma-separated numbers, as `0.485,0.456,0.406` (a mean or std on
/// the command line).
pub fn parse_triple(text: &str) -> Result<[f32; 3], String> {
    let values: Vec<f32> =
        text.split(',').map(|v| v.trim().parse().map_err(|e| format!("'{v}': {e}"))).collect::<Result<_, _>>()?;
    <[f32; 3]>::try_from(values).map_err(|v| format!("expected three comma-separated numbers, got {}", v.len()))
}

/// A normalisation's standard deviations: every one finite and above zero.
/// The error is the value with the rule, for the caller to prefix with its field.
pub fn check_std(std: &[f32; 3]) -> Result<(), String> {
    if std.iter().all(|s| is_positive_finite(f64::from(*s))) {
        Ok(())
    } else {
        Err(format!("{std:?}: every entry must be > 0"))
    }
}
