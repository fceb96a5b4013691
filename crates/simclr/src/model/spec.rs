//! What using an encoder needs beyond its weights: the network's shape and
//! how images are prepared for it. A run records it in its
//! `encoder.safetensors` metadata ([`crate::io::torchvision`]), so `embed`,
//! `eval` and `neighbors` take the file alone; flags still override it.
use serde::{Deserialize, Serialize};

use super::{Arch, HeadConfig, Stem};
use crate::normalization::{check_std, IMAGENET_MEAN, IMAGENET_STD};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderSpec {
    pub arch: Arch,
    pub width_multiplier: f64,
    pub stem: Stem,
    /// Images are resized (shorter side) and centre-cropped to this size.
    pub image_size: u32,
    /// Per-channel normalisation, as in training.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// The projection head g trained with the encoder (not in the file,
    /// which holds f alone): a record of the run, unused on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadConfig>,
}

/// torchvision's ResNet-50 on ImageNet-sized images: what an encoder file
/// without a recorded spec (torchvision's own, say) is taken to be.
impl Default for EncoderSpec {
    fn default() -> Self {
        Self {
            arch: Arch::Resnet50,
            width_multiplier: 1.0,
            stem: Stem::Imagenet,
            image_size: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            head: None,
        }
    }
}

/// The spec fields a user can give on the command line; `None` keeps the
/// recorded (or default) value.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SpecOverrides {
    /// resnet18, resnet34, resnet50, resnet101 or resnet152 (default: the file's, else resnet50).
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Width multiplier (default: the file's, else 1).
    #[arg(long = "width")]
    pub width_multiplier: Option<f64>,
    /// imagenet or cifar (default: the file's, else imagenet).
    #[arg(long)]
    pub stem: Option<Stem>,
    /// Images are resized (shorter side) and centre-cropped to this size (default: the file's, else 224).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Normalisation mean per channel, as R,G,B (default: the file's, else ImageNet's).
    #[arg(long, value_parser = crate::normalization::parse_triple)]
    pub mean: Option<[f32; 3]>,
    /// Normalisation standard deviation per channel, as R,G,B.
    #[arg(long, value_parser = crate::normalization::parse_triple)]
    pub std: Option<[f32; 3]>,
}

impl EncoderSpec {
    /// `self` with every given override laid over it, checked.
    pub fn with(mut self, overrides: &SpecOverrides) -> Result<Self> {
        let o = overrides;
        self.arch = o.arch.unwrap_or(self.arch);
        self.width_multiplier = o.width_multiplier.unwrap_or(self.width_multiplier);
        self.stem = o.stem.unwrap_or(self.stem);
        self.image_size = o.image_size.unwrap_or(self.image_size);
        self.mean = o.mean.unwrap_or(self.mean);
        self.std = o.std.unwrap_or(self.std);
        let mut problems = Vec::new();
        if let Err(problem) = super::check_width(self.width_multiplier) {
            problems.push(format!("--width {problem}"));
        }
        if self.image_size < crate::checks::MIN_IMAGE_SIDE {
            problems.push(format!(
                "--image-size {}: must be at least {}",
                self.image_size,
                crate::checks::MIN_IMAGE_SIDE
            ));
        }
        if let Err(problem) = check_std(&self.std) {
            problems.push(format!("--std {problem}"));
        }
        match problems.is_empty() {
            true => Ok(self),
            false => Err(Error::Config(problems)),
        }
    }

    /// The network in words, for messages: "resnet18 at 0.125x with the cifar stem".
    pub fn describe(&self) -> String {
        format!("{} at {}x with the {} stem", self.arch.name(), self.width_multiplier, self.stem.name())
    }
}
