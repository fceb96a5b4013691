//! The stochastic data augmentation module (section 3 and appendix A).
//!
//! Each training image gives two views, each drawn from a family of random
//! ops: a sizing op (random resized crop, or the CIFAR crop with padding),
//! then any list of pixel ops (flip, colour jitter, grayscale, blur,
//! rotation, cutout, Sobel, Gaussian noise, solarisation, AutoAugment), each applied with its own
//! probability. The paper's main finding (Figure 5) is that crop plus colour
//! distortion is what makes the contrastive task hard enough.
//!
//! Every op is split in two: `sample` draws its random parameters from an
//! explicit RNG, `apply` applies given parameters. That split is what makes
//! the two implementations one semantics: the CPU path ([`Pipeline::render`],
//! Rust over interleaved f32 pixels) and the batched device path
//! ([`Pipeline::render_batch`], the whole batch at once on the training
//! device) apply the very same parameters, drawn from [`view_rng`], a pure
//! function of (seed, epoch, image, view). The parameters of any view can be
//! logged ([`ViewParams`] serialises to JSON).
mod augmentation;
pub mod crop;
mod images;
pub mod pad_crop;
mod pipeline;
pub mod preview;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use augmentation::Augmentation;
pub use auto_augment::{
    AutoAugmentParams, Policy as AutoAugmentPolicy, Step as AutoAugmentStep, Transform as AutoAugmentTransform,
};
pub use blur::BlurParams;
pub use color_jitter::JitterParams;
pub use crop::{CropBox, CropConfig, Interpolation};
pub use images::{center_view, uint8_batch, FloatImage};
pub use noise::NoiseParams;
pub use pad_crop::{PadCropConfig, PadOffset};
pub(crate) use pipeline::seeded_rng;
pub(crate) use pipeline::{on_subset, per_image, splitmix64};
pub use pipeline::{view_rng, Pipeline, Sizing, ViewParams};
pub use rotation::RotationParams;
pub use solarize::SolarizeParams;

// The pixel ops' modules, declared here rather than by `register!` below:
// rustfmt does not follow a `mod` that a macro declares, so the files would
// escape `cargo fmt` (they did, until 2026-12-06).
pub mod auto_augment;
pub mod blur;
pub mod color_jitter;
pub mod cutout;
pub mod flip;
pub mod grayscale;
pub mod noise;
pub mod rotation;
pub mod sobel;
pub mod solarize;
pub mod vertical_flip;

/// Every pixel op, one line each: its name in configs, its variant of
/// [`OpConfig`] and [`OpParams`], and its module and config type (which
/// implements [`Augmentation`]). Adding an op is its own file, its `mod`
/// line above and one line in the list below; the sizing ops (crops) are
/// written out, as they decide the view's size and are always first.
macro_rules! register {
    ($($name:literal => $variant:ident($module:ident::$config:ident),)*) => {
        $(pub use $module::$config;)*

        /// One op of a pipeline, as written in `[[augment.ops]]` with `op = "..."`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "op")]
        pub enum OpConfig {
            #[serde(rename = "random-resized-crop")]
            RandomResizedCrop(CropConfig),
            #[serde(rename = "random-crop")]
            RandomCrop(PadCropConfig),
            $(#[serde(rename = $name)] $variant($config),)*
        }

        /// The drawn parameters of one pixel op; `None` in [`ViewParams::ops`]
        /// means the op was not applied to this view.
        #[derive(Debug, Clone, Copy, PartialEq, Serialize)]
        #[serde(tag = "op")]
        pub enum OpParams {
            $(#[serde(rename = $name)] $variant(<$config as Augmentation>::Params),)*
        }

        impl OpConfig {
            /// The name written in configs.
            pub fn name(&self) -> &'static str {
                match self {
                    OpConfig::RandomResizedCrop(_) => "random-resized-crop",
                    OpConfig::RandomCrop(_) => "random-crop",
                    $(OpConfig::$variant(_) => $name,)*
                }
            }

            /// Every op with its defaults, for listings and the ablation.
            pub fn all() -> Vec<OpConfig> {
                vec![
                    OpConfig::RandomResizedCrop(Default::default()),
                    OpConfig::RandomCrop(Default::default()),
                    $(OpConfig::$variant(Default::default()),)*
                ]
            }

            /// The op with its probability set to `probability` (sizing ops have none).
            pub fn with_probability(mut self, probability: f64) -> Self {
                match &mut self {
                    OpConfig::RandomResizedCrop(_) | OpConfig::RandomCrop(_) => {}
                    $(OpConfig::$variant(c) => c.probability = probability,)*
                }
                self
            }

            fn check(&self, field: &str, image_size: u32, problems: &mut Vec<String>) {
                match self {
                    OpConfig::RandomResizedCrop(c) => c.check(field, problems),
                    OpConfig::RandomCrop(c) => c.check(field, image_size, problems),
                    $(OpConfig::$variant(c) => {
                        check_probability(field, c.probability, problems);
                        c.check(field, image_size, problems);
                    })*
                }
            }

            /// A pixel op's parameters for a `side` x `side` view.
            pub(crate) fn sample_pixel<R: Rng + ?Sized>(&self, side: usize, rng: &mut R) -> Option<OpParams> {
                match self {
                    OpConfig::RandomResizedCrop(_) | OpConfig::RandomCrop(_) => {
                        unreachable!("validation keeps sizing ops first")
                    }
                    $(OpConfig::$variant(c) => c.sample(side, rng).map(OpParams::$variant),)*
                }
            }
        }

        impl OpParams {
            /// The CPU path of this op.
            pub(crate) fn apply(&self, image: &mut FloatImage) {
                match self {
                    $(OpParams::$variant(params) => $config::apply(image, params),)*
                }
            }

            /// The device path of this op, on the images at the positions of
            /// `drawn`, whose parameters are all of this op.
            fn apply_batch(&self, images: Tensor, drawn: &[(usize, OpParams)]) -> Tensor {
                match self {
                    $(OpParams::$variant(_) => {
                        let typed: Vec<(usize, <$config as Augmentation>::Params)> = drawn
                            .iter()
                            .filter_map(|(i, p)| match p {
                                OpParams::$variant(params) => Some((*i, *params)),
                                _ => None,
                            })
                            .collect();
                        on_subset(images, &typed, $config::apply_batch)
                    })*
                }
            }
        }
    };
}

register! {
    "horizontal-flip" => HorizontalFlip(flip::FlipConfig),
    "color-jitter" => ColorJitter(color_jitter::ColorJitterConfig),
    "grayscale" => Grayscale(grayscale::GrayscaleConfig),
    "gaussian-blur" => GaussianBlur(blur::BlurConfig),
    "rotation" => Rotation(rotation::RotationConfig),
    "cutout" => Cutout(cutout::CutoutConfig),
    "sobel" => Sobel(sobel::SobelConfig),
    "gaussian-noise" => GaussianNoise(noise::NoiseConfig),
    "solarize" => Solarize(solarize::SolarizeConfig),
    "vertical-flip" => VerticalFlip(vertical_flip::VerticalFlipConfig),
    "auto-augment" => AutoAugment(auto_augment::AutoAugmentConfig),
}

/// Where views are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// On a CUDA device, the device path when the decoded images fit there
    /// (all of one size, at most [`DEVICE_DATA_LIMIT`] bytes), the hybrid
    /// path when they do not; the CPU path on the CPU.
    #[default]
    Auto,
    /// Rust on the CPU, on the data worker threads.
    Cpu,
    /// Tensor ops on the training device, whole batches at once.
    Device,
    /// Decoding, crop and resize on the data workers, the pixel ops (colour,
    /// grayscale, blur, ...) on the training device in batch.
    Hybrid,
}

/// The most decoded image bytes the automatic backend keeps on the device.
pub const DEVICE_DATA_LIMIT: usize = 4 << 30;

/// Named pipelines from the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AugmentPreset {
    /// Appendix A: crop, flip, colour distortion with s = 1.0, Gaussian blur.
    #[default]
    SimclrImagenet,
    /// Appendix B.9: crop, flip, colour distortion with s = 0.5, no blur.
    SimclrCifar,
}

names!(AugmentPreset, "augmentation preset", { SimclrImagenet => "simclr-imagenet", SimclrCifar => "simclr-cifar" });

impl AugmentPreset {
    pub fn ops(self) -> Vec<OpConfig> {
        let jitter = |strength| OpConfig::ColorJitter(ColorJitterConfig { strength, ..Default::default() });
        let mut ops =
            vec![OpConfig::RandomResizedCrop(CropConfig::default()), OpConfig::HorizontalFlip(FlipConfig::default())];
        match self {
            AugmentPreset::SimclrImagenet => ops.extend([
                jitter(1.0),
                OpConfig::Grayscale(GrayscaleConfig::default()),
                OpConfig::GaussianBlur(BlurConfig::default()),
            ]),
            AugmentPreset::SimclrCifar => ops.extend([jitter(0.5), OpConfig::Grayscale(GrayscaleConfig::default())]),
        }
        ops
    }
}

impl OpConfig {
    pub fn is_sizing(&self) -> bool {
        matches!(self, OpConfig::RandomResizedCrop(_) | OpConfig::RandomCrop(_))
    }
}

/// The op called `name`, with its defaults.
impl std::str::FromStr for OpConfig {
    type Err = crate::Error;
    fn from_str(name: &str) -> crate::Result<Self> {
        OpConfig::all().into_iter().find(|op| op.name() == name).ok_or_else(|| {
            let known: Vec<&str> = OpConfig::all().iter().map(OpConfig::name).collect();
            crate::Error::InvalidArgument(format!("unknown op '{name}': expected one of {}", known.join(", ")))
        })
    }
}

/// The `[augment]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    pub backend: Backend,
    /// The pipeline used when `ops` is not given.
    pub preset: AugmentPreset,
    /// The ops of each view, in order; a sizing op (random-resized-crop or
    /// random-crop) may only come first, and without one the image is
    /// resized (shorter side) and centre-cropped to the training size. An
    /// empty list means exactly that and nothing else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<Vec<OpConfig>>,
    /// Different ops for the second view (asymmetric views, as SimCLR v2's
    /// solarisation on one branch, or the Figure 5 ablation); absent means
    /// the same ops as the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_view: Option<Vec<OpConfig>>,
    /// Whether the device path makes each batch on a thread of its own
    /// while the training thread queues the step before; absent: on a GPU,
    /// not on a CPU, where the two threads' ops share the cores (on this
    /// project's 2-core machine the thread cost the `cifar10-fast` preset
    /// about a tenth of its images/s). The batches are the same either way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_thread: Option<bool>,
    /// The side of the training views in pixels; absent: `data.image_size`.
    /// Smaller views make each step cheaper (about as their pixels), and the
    /// kNN monitor, `eval`, `embed` and the encoder's file keep
    /// `data.image_size`: trained on 24 px crops of CIFAR-10, the encoder
    /// scored as well at 32 px as one trained on 32 px crops for as many
    /// epochs, in 0.58x the time (docs/time-to-accuracy.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view_size: Option<u32>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            preset: AugmentPreset::SimclrImagenet,
            ops: None,
            second_view: None,
            device_thread: None,
            view_size: None,
        }
    }
}

impl AugmentConfig {
    /// The paper's CIFAR-10 pipeline.
    pub fn cifar() -> Self {
        Self { preset: AugmentPreset::SimclrCifar, ..Default::default() }
    }

    /// The paper's CIFAR-10 pipeline with crops of at least `min_scale` of
    /// the image, where the paper keeps 0.08.
    pub fn cifar_cropping_at_least(min_scale: f64) -> Self {
        let mut ops = AugmentPreset::SimclrCifar.ops();
        ops[0] = OpConfig::RandomResizedCrop(CropConfig { min_scale, ..Default::default() });
        Self { ops: Some(ops), ..Self::cifar() }
    }

    /// Both views with the same `ops`.
    pub fn with_ops(ops: Vec<OpConfig>) -> Self {
        Self { ops: Some(ops), ..Default::default() }
    }

    /// The ops of view 0 and view 1 after the preset is resolved.
    pub fn view_ops(&self) -> [Vec<OpConfig>; 2] {
        let first = self.ops.clone().unwrap_or_else(|| self.preset.ops());
        let second = self.second_view.clone().unwrap_or_else(|| first.clone());
        [first, second]
    }

    /// Pushes one line per bad field; `image_size` is the views' side.
    pub(crate) fn check(&self, image_size: u32, problems: &mut Vec<String>) {
        // Only where set: an unset view_size is data.image_size, checked there.
        if let Some(size) = self.view_size.filter(|&size| size < crate::checks::MIN_IMAGE_SIDE) {
            problems.push(format!("augment.view_size = {size}: must be at least {}", crate::checks::MIN_IMAGE_SIDE));
        }
        let none = Vec::new();
        let lists =
            [("ops", self.ops.as_ref().unwrap_or(&none)), ("second_view", self.second_view.as_ref().unwrap_or(&none))];
        for (list, ops) in lists {
            for (position, op) in ops.iter().enumerate() {
                let field = format!("augment.{list}[{position}] ({})", op.name());
                if op.is_sizing() && position > 0 {
                    problems.push(format!("{field}: a sizing op may only be the first op of a view"));
                }
                op.check(&field, image_size, problems);
            }
        }
    }
}

pub(crate) fn check_probability(field: &str, value: f64, problems: &mut Vec<String>) {
    if !(0.0..=1.0).contains(&value) {
        problems.push(format!("{field}: probability = {value}: a probability must be in [0, 1]"));
    }
}

/// One Bernoulli draw: whether an op with `probability` is applied.
fn applies<R: Rng + ?Sized>(probability: f64, rng: &mut R) -> bool {
    rng.random::<f64>() < probability
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    #[test]
    fn view_rng_depends_on_every_coordinate() {
        let draw = |s, e, i, v| view_rng(s, e, i, v).random::<u64>();
        let base = draw(1, 2, 3, 0);
        assert_eq!(base, draw(1, 2, 3, 0));
        for other in [draw(0, 2, 3, 0), draw(1, 1, 3, 0), draw(1, 2, 4, 0), draw(1, 2, 3, 1)] {
            assert_ne!(base, other);
        }
    }

    fn every_op() -> AugmentConfig {
        let mut ops: Vec<OpConfig> = OpConfig::all().into_iter().filter(|op| !op.is_sizing()).collect();
        ops.insert(0, OpConfig::RandomResizedCrop(CropConfig::default()));
        AugmentConfig {
            second_view: Some(vec![OpConfig::RandomCrop(Default::default())]),
            ..AugmentConfig::with_ops(ops)
        }
    }

    #[test]
    fn pipeline_output_has_the_requested_size_and_range() {
        let image = RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 128]));
        let pipeline = Pipeline::new(&every_op(), 32);
        let mut rng = view_rng(0, 0, 0, 0);
        for view in [0, 1] {
            for _ in 0..20 {
                let out = pipeline.view(view, &image, &mut rng);
                assert_eq!((out.width, out.height, out.data.len()), (32, 32, 32 * 32 * 3));
                assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
            }
        }
    }

    #[test]
    fn parameters_serialise_for_logging() {
        let pipeline = Pipeline::new(&AugmentConfig::default(), 32);
        let params = pipeline.sample(0, 64, 48, &mut view_rng(3, 0, 0, 0));
        let json = serde_json::to_string(&params).unwrap();
        assert!(json.contains("random-resized-crop"), "{json}");
        assert_eq!(params.ops.len(), 4);
    }

    #[test]
    fn the_tensor_path_renders_what_the_cpu_path_renders() {
        // Same parameters, same image: the two paths agree pixel for pixel up
        // to float rounding and the CPU path's 8-bit resize (1/255), for
        // crops that enlarge (no antialiasing difference). Measured over
        // these 24 views: mean at most 0.0037; worst 0.0047, except 0.0176
        // in a view with Sobel, whose kernels amplify the resize's rounding.
        // AutoAugment is left out: its 8-bit transforms (equalize, posterize)
        // turn a 1/255 rounding into a step of their table; its own test
        // (auto_augment.rs) renders both paths from one float view.
        let image = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8]));
        let ops = vec![OpConfig::RandomResizedCrop(CropConfig { min_scale: 0.3, ..Default::default() })]
            .into_iter()
            .chain(
                OpConfig::all()
                    .into_iter()
                    .filter(|op| !op.is_sizing() && !matches!(op, OpConfig::AutoAugment(_)))
                    .map(|op| op.with_probability(0.5)),
            )
            .collect();
        let pipeline = Pipeline::new(&AugmentConfig::with_ops(ops), 32);
        let mut rng = view_rng(5, 0, 0, 0);
        let params: Vec<ViewParams> = (0..24).map(|_| pipeline.sample(0, 32, 32, &mut rng)).collect();
        let batch = uint8_batch(image.as_raw(), 1, 32, 32).repeat([24, 1, 1, 1]);
        let rendered = pipeline.render_batch(&batch, &params);
        for (i, p) in params.iter().enumerate() {
            let cpu = pipeline.render(&image, p);
            let tensor = FloatImage::from_tensor(&rendered.get(i as i64));
            let worst = cpu.data.iter().zip(&tensor.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let mean = cpu.data.iter().zip(&tensor.data).map(|(a, b)| (a - b).abs()).sum::<f32>() / 3072.0;
            assert!(mean < 0.005 && worst < 0.025, "view {i}: mean {mean}, worst {worst}, {p:?}");
        }
    }

    /// Mean, standard deviation and mean absolute change (against the
    /// unaugmented view) of the pixels of many views.
    fn statistics(views: &[FloatImage], plain: &FloatImage) -> [f64; 3] {
        let values: Vec<f64> = views.iter().flat_map(|v| v.data.iter().map(|x| f64::from(*x))).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let std = (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        let change = views
            .iter()
            .flat_map(|v| v.data.iter().zip(&plain.data).map(|(a, b)| f64::from((a - b).abs())))
            .sum::<f64>()
            / values.len() as f64;
        [mean, std, change]
    }

    #[test]
    fn both_paths_give_each_op_the_same_output_statistics() {
        // Each op alone (after its sizing), 400 views per path, drawn from
        // disjoint seeds so that the paths share no parameters: the three
        // statistics agree within 0.01 (their sampling spread is ~0.003).
        // AutoAugment is left out: its invert, equalize and solarize move
        // whole views, so the difference of two paths' means over 400 views
        // has a standard error of about 0.007, and it measured 0.0106; its
        // paths render the same draws alike (auto_augment.rs).
        let image =
            RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, (((x * y) % 32) * 8) as u8]));
        let plain = center_view(&image, 32);
        let batch = uint8_batch(image.as_raw(), 1, 32, 32);
        let views = 400;
        for op in OpConfig::all().into_iter().filter(|op| !matches!(op, OpConfig::AutoAugment(_))) {
            let name = op.name();
            let pipeline = Pipeline::new(&AugmentConfig::with_ops(vec![op]), 32);
            let cpu: Vec<FloatImage> =
                (0..views).map(|i| pipeline.view(0, &image, &mut view_rng(1, 0, i, 0))).collect();
            let params: Vec<ViewParams> =
                (0..views).map(|i| pipeline.sample(0, 32, 32, &mut view_rng(2, 0, i, 0))).collect();
            let rendered = pipeline.render_batch(&batch.repeat([views as i64, 1, 1, 1]), &params);
            let tensor: Vec<FloatImage> =
                (0..views as i64).map(|i| FloatImage::from_tensor(&rendered.get(i))).collect();
            let (a, b) = (statistics(&cpu, &plain), statistics(&tensor, &plain));
            for (statistic, (x, y)) in ["mean", "std", "change"].iter().zip(a.iter().zip(&b)) {
                assert!((x - y).abs() < 0.01, "{name}: {statistic} {x:.4} (cpu) vs {y:.4} (tensor)");
            }
        }
    }

    #[test]
    fn a_sizing_op_after_the_first_is_rejected() {
        let config = AugmentConfig::with_ops(vec![
            OpConfig::HorizontalFlip(Default::default()),
            OpConfig::RandomResizedCrop(Default::default()),
        ]);
        let mut problems = Vec::new();
        config.check(32, &mut problems);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("augment.ops[1] (random-resized-crop)"), "{problems:?}");
    }

    #[test]
    fn normalisation_writes_planes() {
        let image = FloatImage { width: 2, height: 1, data: vec![0.5, 0.0, 1.0, 0.5, 0.0, 1.0] };
        let mut out = vec![0.0; 6];
        image.write_chw_normalized([0.5, 0.0, 0.5], [0.5, 1.0, 0.25], &mut out);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 2.0, 2.0]);
    }
}
