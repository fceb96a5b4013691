//! ResNet-18/34/50/101/152 (He et al. 2016) as torchvision builds it
//! (`torchvision.models.resnet`, v1.5: the stride of a bottleneck is on its
//! 3x3 convolution), with SimCLR's width multiplier and a choice of stem.
//!
//! Variable paths are torchvision's state-dict keys (`conv1.weight`,
//! `layer2.0.downsample.1.running_var`, ...), so weights move to and from
//! PyTorch without a renaming table. The classifier `fc` is left out: the
//! encoder's output is h, the pooled features.
use tch::nn::{self, ConvConfig, Init};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
    Resnet101,
    Resnet152,
}

names!(Arch, "architecture", {
    Resnet18 => "resnet18",
    Resnet34 => "resnet34",
    Resnet50 => "resnet50",
    Resnet101 => "resnet101",
    Resnet152 => "resnet152",
});

impl Arch {
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
}

/// The first layers, before the four stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stem {
    /// 7x7 convolution, stride 2, then 3x3 max-pool, stride 2 (ImageNet).
    Imagenet,
    /// 3x3 convolution, stride 1, no max-pool: the paper's CIFAR-10 variant (appendix B.9).
    Cifar,
}

names!(Stem, "stem", { Imagenet => "imagenet", Cifar => "cifar" });

/// BatchNorm's epsilon, torchvision's (and tch's) default; folding needs it.
const BATCH_NORM_EPS: f64 = 1e-5;

/// A convolution (no bias) and the BatchNorm after it: the unit every layer
/// of a ResNet is built from.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    stride: i64,
    padding: i64,
    /// Whether this convolution runs in NCHW on the CPU whatever the
    /// model's memory format; see [`ConvBn::hits_onednn_6035`].
    nchw_on_cpu: bool,
}

impl ConvBn {
    /// torchvision's init: Kaiming-normal (fan-out) convolutions, BatchNorm at (1, 0).
    fn new(conv_path: nn::Path, bn_path: nn::Path, inputs: i64, outputs: i64, kernel: i64, stride: i64) -> Self {
        let padding = kernel / 2;
        let config = ConvConfig {
            stride,
            padding,
            bias: false,
            ws_init: Init::Kaiming {
                dist: nn::init::NormalOrUniform::Normal,
                fan: nn::init::FanInOut::FanOut,
                non_linearity: nn::init::NonLinearity::ReLU,
            },
            ..Default::default()
        };
        let conv = nn::conv2d(conv_path, inputs, outputs, kernel, config);
        let nchw_on_cpu = Self::hits_onednn_6035(inputs, kernel, stride);
        Self { conv, bn: batch_norm(bn_path, outputs), stride, padding, nchw_on_cpu }
    }

    /// oneDNN's issue #6035 (open in the oneDNN of libtorch 2.11): the
    /// weight-gradient kernel of a strided 1x1 convolution in channels-last
    /// memory with fewer input channels than its channel block (16 with
    /// AVX-512) writes past its workspace. PyTorch 2.11 itself dies of it
    /// ("free(): invalid next size"; probed on this project's machine: 2 to
    /// 15 input channels from 48 px up), and other CPUs get wrong weight
    /// gradients without a word. In a ResNet it is the first downsample at
    /// width 1/8 or less. Such convolutions run in NCHW on the CPU, which
    /// takes another kernel; they are a few, and small. Remove when
    /// libtorch ships a oneDNN with the fix.
    fn hits_onednn_6035(inputs: i64, kernel: i64, stride: i64) -> bool {
        kernel == 1 && stride > 1 && inputs < 16
    }

    /// The eval-mode unit as one convolution with a bias: BatchNorm with
    /// running statistics is the per-channel affine map y = a·x + b with
    /// a = γ/√(var + ε) and b = β - a·mean, so it scales the weights of each
    /// output channel and becomes the bias.
    fn fold(&self) -> FoldedConv {
        tch::no_grad(|| {
            let bn = &self.bn;
            let mut scale = (&bn.running_var + BATCH_NORM_EPS).rsqrt();
            if let Some(gamma) = &bn.ws {
                scale *= gamma;
            }
            let mut bias = -(&bn.running_mean * &scale);
            if let Some(beta) = &bn.bs {
                bias += beta;
            }
            // The product keeps the weight's memory format (channels-last
            // where the model uses it), so the folded convolution runs the
            // same kernels.
            let weight = &self.conv.ws * scale.view([-1, 1, 1, 1]);
            FoldedConv { weight, bias, stride: self.stride, padding: self.padding }
        })
    }
}

/// A [`ConvBn`] folded for inference (eval mode, no gradients).
#[derive(Debug)]
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

/// What a block needs of its units; train mode means batch statistics.
trait Unit {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor;
}

impl Unit for ConvBn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = if self.nchw_on_cpu && x.device() == tch::Device::Cpu {
            // Both operands NCHW: libtorch runs channels-last when either is.
            let (stride, padding) = ([self.stride; 2], [self.padding; 2]);
            let weight = crate::device::nchw(&self.conv.ws);
            crate::device::nchw(x).conv2d(&weight, None::<Tensor>, stride, padding, [1, 1], 1)
        } else {
            x.apply(&self.conv)
        };
        crate::dist::batch_norm(&y, &self.bn, train)
    }
}

impl Unit for FoldedConv {
    /// Eval mode only: the running statistics are in the weights, and
    /// [`FoldedResNet`] never asks for train mode.
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let (stride, padding) = ([self.stride; 2], [self.padding; 2]);
        x.conv2d(&self.weight, Some(&self.bias), stride, padding, [1, 1], 1)
    }
}

fn batch_norm(path: nn::Path, channels: i64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps: BATCH_NORM_EPS,
        ws_init: Init::Const(1.0),
        bs_init: Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(path, channels, config)
}

#[derive(Debug)]
struct Block<U> {
    units: Vec<U>,
    downsample: Option<U>,
}

impl Block<ConvBn> {
    /// A BasicBlock (two 3x3) or a Bottleneck (1x1, 3x3 with the stride, 1x1).
    fn new(path: &nn::Path, inputs: i64, planes: i64, outputs: i64, stride: i64, bottleneck: bool) -> Self {
        let shapes: Vec<(i64, i64, i64, i64)> = if bottleneck {
            vec![(inputs, planes, 1, 1), (planes, planes, 3, stride), (planes, outputs, 1, 1)]
        } else {
            vec![(inputs, planes, 3, stride), (planes, outputs, 3, 1)]
        };
        let units = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (cin, cout, kernel, s))| {
                let n = i + 1;
                ConvBn::new(path / format!("conv{n}"), path / format!("bn{n}"), cin, cout, kernel, s)
            })
            .collect();
        let downsample = (stride != 1 || inputs != outputs).then(|| {
            let ds = path / "downsample";
            ConvBn::new(&ds / 0, &ds / 1, inputs, outputs, 1, stride)
        });
        Self { units, downsample }
    }

    fn fold(&self) -> Block<FoldedConv> {
        Block {
            units: self.units.iter().map(ConvBn::fold).collect(),
            downsample: self.downsample.as_ref().map(ConvBn::fold),
        }
    }
}

impl<U: Unit> Block<U> {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        // ReLU and the residual sum in place, as torchvision does: on the CPU
        // the saved allocations and memory traffic are a few percent of a step.
        let mut y = x.shallow_clone();
        let last = self.units.len() - 1;
        for (i, unit) in self.units.iter().enumerate() {
            y = unit.forward_t(&y, train);
            if i != last {
                y = y.relu_();
            }
        }
        match &self.downsample {
            Some(unit) => y += unit.forward_t(x, train),
            None => y += x,
        }
        y.relu_()
    }
}

/// The layers of a ResNet, built from units `U`.
#[derive(Debug)]
struct Layers<U> {
    stem_unit: U,
    stem: Stem,
    stages: Vec<Vec<Block<U>>>,
    feature_dim: i64,
}

impl<U: Unit> Layers<U> {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = self.stem_unit.forward_t(x, train).relu_();
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

/// The encoder f(·): input `[B, 3, H, W]`, output h of shape `[B, feature_dim]`.
#[derive(Debug)]
pub struct ResNet {
    layers: Layers<ConvBn>,
}

impl ResNet {
    pub fn new(path: &nn::Path, arch: Arch, width_multiplier: f64, stem: Stem) -> Self {
        let width = |channels: i64| ((channels as f64 * width_multiplier).round() as i64).max(1);
        let (blocks, bottleneck) = arch.layout();
        let expansion = if bottleneck { 4 } else { 1 };
        let stem_width = width(64);
        let (kernel, stride) = match stem {
            Stem::Imagenet => (7, 2),
            Stem::Cifar => (3, 1),
        };
        let stem_unit = ConvBn::new(path / "conv1", path / "bn1", 3, stem_width, kernel, stride);
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
        Self { layers: Layers { stem_unit, stem, stages, feature_dim: inputs } }
    }

    /// Size of h: 512·width (ResNet-18/34) or 2048·width (50 and deeper).
    pub fn feature_dim(&self) -> i64 {
        self.layers.feature_dim
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.layers.forward_t(x, train)
    }

    /// A frozen copy for inference, each BatchNorm folded into the
    /// convolution before it; see [`FoldedResNet`].
    pub fn fold(&self) -> FoldedResNet {
        let layers = &self.layers;
        FoldedResNet {
            layers: Layers {
                stem_unit: layers.stem_unit.fold(),
                stem: layers.stem,
                stages: layers.stages.iter().map(|stage| stage.iter().map(Block::fold).collect()).collect(),
                feature_dim: layers.feature_dim,
            },
        }
    }
}

/// The encoder in eval mode with its BatchNorms folded into the
/// convolutions: the same h as `forward_t(x, false)` up to float rounding,
/// one pass over each activation fewer per layer. On the CPU oneDNN adds the
/// bias inside the convolution; PyTorch eager runs BatchNorm as its own pass,
/// 7% of a ResNet-18 forward (CIFAR stem, batch 64, 2 threads, profiled with
/// torch.profiler). It is a snapshot: later training does not change it.
#[derive(Debug)]
pub struct FoldedResNet {
    layers: Layers<FoldedConv>,
}

impl FoldedResNet {
    pub fn feature_dim(&self) -> i64 {
        self.layers.feature_dim
    }

    /// The dtype of its weights, which its input must have (outside autocast).
    pub fn kind(&self) -> tch::Kind {
        self.layers.stem_unit.weight.kind()
    }

    /// h of shape `[B, feature_dim]` for images `[B, 3, H, W]`; call it
    /// under `tch::no_grad` (the weights are detached).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.layers.forward_t(x, false)
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

    /// Random running statistics and affine parameters, so that folding has
    /// something to fold (a fresh BatchNorm is the identity in eval mode).
    fn perturb_batch_norms(store: &nn::VarStore) {
        tch::no_grad(|| {
            for (name, mut variable) in store.variables() {
                let noise = |low: f64, high: f64| variable.rand_like() * (high - low) + low;
                let value = if name.ends_with("running_var") {
                    noise(0.5, 2.0)
                } else if name.ends_with("running_mean") || name.contains("bn") && name.ends_with("bias") {
                    noise(-0.5, 0.5)
                } else if name.contains("bn") && name.ends_with("weight") {
                    noise(0.5, 1.5)
                } else {
                    continue;
                };
                variable.copy_(&value);
            }
        });
    }

    #[test]
    fn folded_encoder_gives_the_eval_features() {
        tch::manual_seed(3);
        for (arch, stem, size) in [(Arch::Resnet18, Stem::Cifar, 16), (Arch::Resnet50, Stem::Imagenet, 64)] {
            let store = nn::VarStore::new(Device::Cpu);
            let net = ResNet::new(&store.root(), arch, 0.25, stem);
            perturb_batch_norms(&store);
            crate::device::use_channels_last(&store);
            let x = Tensor::randn([3, 3, size, size], (Kind::Float, Device::Cpu));
            let (eval, folded) = tch::no_grad(|| (net.forward_t(&x, false), net.fold().forward(&x)));
            let scale = eval.abs().max().double_value(&[]);
            let error = (&eval - &folded).abs().max().double_value(&[]);
            assert!(scale > 0.1, "{arch:?}: features vanish ({scale})");
            // Float rounding only (fp32, the same sums in another order):
            // torch's fuse_conv_bn_eval gives 1e-6 of the scale on ResNet-18.
            assert!(error < 1e-4 * scale, "{arch:?}: max |Δh| {error} at scale {scale}");
            assert_eq!(folded.size(), vec![3, net.feature_dim()]);
        }
    }

    #[test]
    fn folding_keeps_the_memory_format_and_leaves_the_model_alone() {
        let store = nn::VarStore::new(Device::Cpu);
        let net = ResNet::new(&store.root(), Arch::Resnet18, 0.25, Stem::Cifar);
        perturb_batch_norms(&store);
        crate::device::use_channels_last(&store);
        let before = store.variables()["layer1.0.conv1.weight"].copy();
        let folded = net.fold();
        let original = &store.variables()["layer1.0.conv1.weight"];
        assert_eq!(folded.layers.stages[0][0].units[0].weight.stride(), original.stride());
        assert!(!folded.layers.stages[0][0].units[0].weight.requires_grad());
        assert!(original.equal(&before), "folding changed the trained weights");
    }

    /// Largest |a - b| over the largest |b|.
    fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
    }

    #[test]
    fn a_narrow_downsample_gets_the_nchw_gradients_in_a_channels_last_model() {
        // The convolution that crashed libtorch's CPU backward (oneDNN
        // #6035): 1x1, stride 2, 4 input channels, 64 px, channels-last.
        tch::manual_seed(6035);
        let store = nn::VarStore::new(Device::Cpu);
        let unit = ConvBn::new(store.root() / "conv", store.root() / "bn", 4, 8, 1, 2);
        assert!(unit.nchw_on_cpu);
        crate::device::use_channels_last(&store);
        let x = Tensor::randn([2, 4, 64, 64], (Kind::Float, Device::Cpu));
        let input = crate::device::channels_last(&x).set_requires_grad(true);
        let y = unit.forward_t(&input, true);
        (&y * &y).sum(Kind::Float).backward();
        // The same unit by hand, all NCHW.
        let weight = crate::device::nchw(&unit.conv.ws).detach().set_requires_grad(true);
        let reference_input = x.set_requires_grad(true);
        let y = reference_input.conv2d(&weight, None::<Tensor>, [2, 2], [0, 0], [1, 1], 1).batch_norm(
            None::<Tensor>,
            None::<Tensor>,
            None::<Tensor>,
            None::<Tensor>,
            true,
            0.1,
            BATCH_NORM_EPS,
            false,
        );
        (&y * &y).sum(Kind::Float).backward();
        // Float summation order only: 2e-7 measured for both.
        for (what, grad, expected) in
            [("weight", unit.conv.ws.grad(), weight.grad()), ("input", input.grad(), reference_input.grad())]
        {
            let error = relative_error(&grad, &expected);
            assert!(error < 1e-5, "gradient of the {what}: relative error {error:e}");
        }
    }

    #[test]
    fn narrow_resnets_train_channels_last_on_the_cpu() {
        // The commands that died of oneDNN #6035: ResNet-18 at width 1/16
        // on 64 px (CIFAR stem) and at width 1/8 on 224 px (ImageNet stem).
        tch::manual_seed(6035);
        for (width, stem, size) in [(0.0625, Stem::Cifar, 64), (0.125, Stem::Imagenet, 224)] {
            let (channels_last, mut nchw) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
            let net = ResNet::new(&channels_last.root(), Arch::Resnet18, width, stem);
            let reference = ResNet::new(&nchw.root(), Arch::Resnet18, width, stem);
            nchw.copy(&channels_last).unwrap();
            crate::device::use_channels_last(&channels_last);
            let x = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
            for (model, x) in [(&net, crate::device::channels_last(&x)), (&reference, x)] {
                let h = model.forward_t(&x, true);
                (&h * &h).sum(Kind::Float).backward();
            }
            // The convolutions' weight gradients, which the bug corrupts:
            // 3.7e-5 at most over repeated runs. (BatchNorm's parameter
            // gradients are sums with heavy cancellation, where the two
            // layouts' summation orders alone part by up to 2e-2.)
            let expected = nchw.variables();
            for (name, variable) in channels_last.variables().into_iter().filter(|(_, v)| v.dim() == 4) {
                let (grad, expected) = (variable.grad(), expected[&name].grad());
                let error = (&grad - &expected).norm().double_value(&[]) / expected.norm().double_value(&[]);
                assert!(error < 2e-4, "width {width} {stem:?} {name}: relative error {error:e} (2-norm)");
            }
        }
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = "resnet19".parse::<Arch>().unwrap_err().to_string();
        assert!(err.contains("resnet19") && err.contains("resnet50"), "{err}");
    }
}
