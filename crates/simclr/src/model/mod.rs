//! The base encoder f(·) and the projection head g(·) (section 2.1).
pub mod projection_head;
pub mod resnet;
pub mod simclr;
pub mod spec;

use serde::{Deserialize, Serialize};

pub use projection_head::{HeadConfig, HeadKind, Layer, ProjectionHead};
pub use resnet::{Arch, FoldedResNet, ResNet, Stem};
pub use simclr::SimClr;
pub use spec::{EncoderSpec, SpecOverrides};

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Multiplies every layer's channels, stem included, as in the paper's
    /// ResNet-50 (2x) and (4x). Fractions give narrow networks for CPU runs.
    pub width_multiplier: f64,
    pub stem: Stem,
    pub head: HeadConfig,
    /// Weights the encoder starts from instead of a random init, for
    /// pretraining that goes on from another encoder (torchvision's
    /// ImageNet ResNet on a domain's own images, say): an
    /// `encoder.safetensors` a run wrote, torchvision-named safetensors, or
    /// a run's checkpoint. Its network must be this one (`arch`,
    /// `width_multiplier`, `stem`); the projection head starts at random.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_encoder: Option<std::path::PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Resnet50,
            width_multiplier: 1.0,
            stem: Stem::Imagenet,
            head: HeadConfig::default(),
            init_encoder: None,
        }
    }
}

impl ModelConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if let Err(problem) = check_width(self.width_multiplier) {
            problems.push(format!("model.width_multiplier = {problem}"));
        }
        self.head.check(problems);
    }
}

/// A width multiplier in (0, 16] that leaves the 64-channel stem at least
/// one channel. The error is the value with the rule, for the caller to
/// prefix with its field or flag.
pub fn check_width(width_multiplier: f64) -> Result<(), String> {
    if crate::checks::is_positive_finite(width_multiplier) && width_multiplier <= 16.0 && 64.0 * width_multiplier >= 1.0
    {
        Ok(())
    } else {
        Err(format!("{width_multiplier}: must be in (0, 16] and leave the stem at least one channel"))
    }
}
