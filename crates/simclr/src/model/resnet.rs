//! ResNet-18/34/50/101/152 (He et al. 2016) as torchvision builds it
//! (`torchvision.models.resnet`, v1.5: the stride of a bottleneck is on its
//! 3x3 convolution), with SimCLR's width multiplier and a choice of stem.
//!
//! Variable paths are torchvision's state-dict keys (`conv1.weight`,
//! `layer2.0.downsample.1.running_var`, ...), so weights move to and from
//! PyTorch without a renaming table. The classifier `fc` is left out: the
//! encoder's output is h, the pooled features.
use serde::{Deserialize, Serialize};
use tch::nn::{self, ConvConfig, Init};
use tch::Tensor;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
    Resnet101,
    Resnet152,
}

impl Arch {
    pub const ALL: [Arch; 5] = [Arch::Resnet18, Arch::Resnet34, Arch::Resnet50, Arch::Resnet101, Arch::Resnet152];

    /// Blocks per stage and whether they are bottlenecks.
    fn layout(self) -> ([usize; 4], bool) {
        match self {
            Arch::Resnet18 => ([2, 2, 2, 2], false),
            Arch::Resnet34 => ([3, 4, 6, 3], false),
            Arch::Resnet50 => ([3, 4, 6, 3], true),
            Arch::Resnet101 => ([3, 4, 23, 3], true),
            Arch::Resnet152 => ([3, 8, 36, 3], true),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::Resnet101 => "resnet101",
            Arch::Resnet152 => "resnet152",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self, Error> {
        Arch::ALL.into_iter().find(|a| a.name() == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown architecture '{name}': expected one of {}",
                Arch::ALL.map(Arch::name).join(", ")
            ))
        })
    }
}

/// The first layers, before the four stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// 7x7 convolution, stride 2, then 3x3 max-pool, stride 2 (ImageNet).
    Imagenet,
    /// 3x3 convolution, stride 1, no max-pool: the paper's CIFAR-10 variant (appendix B.9).
    Cifar,
}

impl std::str::FromStr for Stem {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self, Error> {
        match name {
            "imagenet" => Ok(Stem::Imagenet),
            "cifar" => Ok(Stem::Cifar),
            other => Err(Error::InvalidArgument(format!("unknown stem '{other}': expected imagenet or cifar"))),
        }
    }
}

/// torchvision's init: Kaiming-normal (fan-out) convolutions, BatchNorm at (1, 0).
fn conv(path: nn::Path, inputs: i64, outputs: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let config = ConvConfig {
        stride,
        padding: kernel / 2,
        bias: false,
        ws_init: Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(path, inputs, outputs, kernel, config)
}

pub(crate) fn batch_norm(path: nn::Path, channels: i64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig { ws_init: Init::Const(1.0), bs_init: Init::Const(0.0), ..Default::default() };
    nn::batch_norm2d(path, channels, config)
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Block {
    /// A BasicBlock (two 3x3) or a Bottleneck (1x1, 3x3 with the stride, 1x1).
    fn new(path: &nn::Path, inputs: i64, planes: i64, outputs: i64, stride: i64, bottleneck: bool) -> Self {
        let shapes: Vec<(i64, i64, i64, i64)> = if bottleneck {
            vec![(inputs, planes, 1, 1), (planes, planes, 3, stride), (planes, outputs, 1, 1)]
        } else {
            vec![(inputs, planes, 3, stride), (planes, outputs, 3, 1)]
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (cin, cout, kernel, s))| {
                let n = i + 1;
                (conv(path / format!("conv{n}"), cin, cout, kernel, s), batch_norm(path / format!("bn{n}"), cout))
            })
            .collect();
        let downsample = (stride != 1 || inputs != outputs).then(|| {
            let ds = path / "downsample";
            (conv(&ds / 0, inputs, outputs, 1, stride), batch_norm(&ds / 1, outputs))
        });
        Self { convs, downsample }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        // ReLU and the residual sum in place, as torchvision does: on the CPU
        // the saved allocations and memory traffic are a few percent of a step.
        let mut y = x.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = y.apply(conv).apply_t(bn, train);
            if i != last {
                y = y.relu_();
            }
        }
        match &self.downsample {
            Some((conv, bn)) => y += x.apply(conv).apply_t(bn, train),
            None => y += x,
        }
        y.relu_()
    }
}

/// The encoder f(·): input `[B, 3, H, W]`, output h of shape `[B, feature_dim]`.
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    stem: Stem,
    stages: Vec<Vec<Block>>,
    feature_dim: i64,
}

impl ResNet {
    pub fn new(path: &nn::Path, arch: Arch, width_multiplier: f64, stem: Stem) -> Self {
        let width = |channels: i64| ((channels as f64 * width_multiplier).round() as i64).max(1);
        let (blocks, bottleneck) = arch.layout();
        let expansion = if bottleneck { 4 } else { 1 };
        let stem_width = width(64);
        let conv1 = match stem {
            Stem::Imagenet => conv(path / "conv1", 3, stem_width, 7, 2),
            Stem::Cifar => conv(path / "conv1", 3, stem_width, 3, 1),
        };
        let bn1 = batch_norm(path / "bn1", stem_width);
        let mut inputs = stem_width;
        let mut stages = Vec::new();
        for (stage, &count) in blocks.iter().enumerate() {
            let planes = width(64 << stage);
            let outputs = planes * expansion;
            let stage_path = path / format!("layer{}", stage + 1);
            let stage_blocks = (0..count)
                .map(|i| {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let block = Block::new(&(&stage_path / i), inputs, planes, outputs, stride, bottleneck);
                    inputs = outputs;
                    block
                })
                .collect();
            stages.push(stage_blocks);
        }
        Self { conv1, bn1, stem, stages, feature_dim: inputs }
    }

    /// Size of h: 512·width (ResNet-18/34) or 2048·width (50 and deeper).
    pub fn feature_dim(&self) -> i64 {
        self.feature_dim
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.apply(&self.conv1).apply_t(&self.bn1, train).relu_();
        if self.stem == Stem::Imagenet {
            y = y.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for stage in &self.stages {
            for block in stage {
                y = block.forward_t(&y, train);
            }
        }
        y.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn names_and_shapes_match_torchvision() {
        let store = nn::VarStore::new(Device::Cpu);
        let net = ResNet::new(&store.root(), Arch::Resnet50, 1.0, Stem::Imagenet);
        let vars = store.variables();
        assert_eq!(net.feature_dim(), 2048);
        assert_eq!(vars["conv1.weight"].size(), vec![64, 3, 7, 7]);
        assert_eq!(vars["layer2.0.downsample.1.running_var"].size(), vec![512]);
        assert_eq!(vars["layer4.2.conv3.weight"].size(), vec![2048, 512, 1, 1]);
        // torchvision's resnet50 has 320: 53 convs, 53 BatchNorms x 5 (with
        // num_batches_tracked) and fc; without fc and the counters, 265.
        assert_eq!(vars.len(), 265);
    }

    #[test]
    fn width_and_stem_change_shapes() {
        let store = nn::VarStore::new(Device::Cpu);
        let net = ResNet::new(&store.root(), Arch::Resnet18, 0.5, Stem::Cifar);
        assert_eq!(net.feature_dim(), 256);
        assert_eq!(store.variables()["conv1.weight"].size(), vec![32, 3, 3, 3]);
        let h = net.forward_t(&Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu)), false);
        assert_eq!(h.size(), vec![2, 256]);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = "resnet19".parse::<Arch>().unwrap_err().to_string();
        assert!(err.contains("resnet19") && err.contains("resnet50"), "{err}");
    }
}
