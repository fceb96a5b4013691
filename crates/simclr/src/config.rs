//! Run configuration: a TOML file whose defaults are the paper's values,
//! presets for common set-ups, and `section.field=value` overrides.
//!
//! [`RunConfig`] is what a user writes; [`RunConfig::validate`] checks every
//! field once and returns a [`ValidConfig`] (or an error listing every bad
//! field), which the rest of the library trusts.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::checks::{is_non_negative_finite, is_positive_finite};
use crate::data::config::DataConfig;
use crate::data::loader::ViewFormat;
use crate::device::DeviceChoice;
use crate::eval::KnnConfig;
use crate::loss::LossConfig;
use crate::model::{EncoderSpec, ModelConfig};
use crate::optim::OptimConfig;
use crate::{Error, Result};

/// The `[train]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Images per batch, N; each gives two views. The paper's default is 4096.
    pub batch_size: usize,
    /// Compute each batch in chunks of this many images (per process),
    /// with the gradient of the whole batch's loss (gradient caching: every
    /// anchor still meets all 2(N-1) negatives), so a batch trains in about
    /// a chunk's activation memory for a third more compute; the loss too
    /// is taken a chunk's anchors at a time, against all 2N keys. BatchNorm
    /// then normalises each chunk by its own statistics, as per-device
    /// BatchNorm does; its running statistics move once per chunk. Unset,
    /// or at least the batch: one pass, as without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    pub seed: u64,
    pub device: DeviceChoice,
    /// bf16 autocast (fp32 master weights) on CUDA and on a CPU with bf16
    /// instructions (AVX-512 BF16, as CPUs with AMX have); fp32 on other
    /// CPUs, which would emulate bf16.
    pub mixed_precision: bool,
    /// The half type of mixed precision: `"auto"` takes bf16 where the
    /// device computes it natively (GPUs of compute capability 8.0 and up,
    /// CPUs with AVX-512 BF16), fp16 with loss scaling on GPUs of
    /// capability 7.x (V100, T4), which have fp16 tensor cores but no bf16,
    /// and fp32 elsewhere; `"bf16"` never takes fp16; `"fp16"` takes it
    /// on any device (a CPU emulates it, slowly).
    pub mixed_precision_dtype: crate::device::HalfType,
    /// Where checkpoints, metrics and the exported encoder go.
    pub output_dir: PathBuf,
    /// Write a checkpoint every this many epochs (and always at the end).
    pub checkpoint_every: usize,
    /// Also write one every this many optimiser steps, in the middle of an
    /// epoch if need be (a resume continues from that step as from an
    /// epoch's end); 0 = at epochs' ends only.
    pub checkpoint_every_steps: usize,
    /// Also write one whenever this many minutes have passed since the
    /// last (or since the run started), at the end of the step then
    /// running, so that a kill loses no more than this of a run whose
    /// epochs are long (millions of images on one GPU: hours an epoch);
    /// 0 = never. In a multi-process run, any rank's clock can call it,
    /// and every rank then saves at the same step.
    pub checkpoint_every_minutes: f64,
    /// Also export the encoder every this many epochs, to
    /// `encoders/epoch-NNNN.safetensors` in the run folder, each a file as
    /// `encoder.safetensors` is (`eval`, `embed` and `neighbors` read it),
    /// to judge the representation along a run or keep one from before it
    /// went wrong; 0 = only `encoder.safetensors`, at the end. A resumed
    /// run removes those of epochs after its checkpoint, and writes them
    /// again.
    pub encoder_every: usize,
    /// Run the kNN monitor every this many epochs (and at the end); 0 = never.
    pub knn_every: usize,
    pub knn_k: usize,
    pub knn_temperature: f64,
    /// Log the loss and learning rate of every this many optimiser steps
    /// to the run's TensorBoard events (`train/loss_step`,
    /// `train/learning_rate_step`); 0 = per epoch only.
    pub log_every_steps: usize,
    /// Steps with a non-finite loss or gradient are skipped; this many in a
    /// row stop the run (its last checkpoint predates the fault).
    pub max_nonfinite_steps: usize,
    /// Train for at most about this many seconds instead of `epochs`: the
    /// run (and its cosine schedule) is sized to as many whole epochs as
    /// fit, at least one, provisionally at the pace of the first epoch
    /// (which pays one-off costs such as kernel autotuning), then at the
    /// pace of the second, then shortened whenever the mean pace of the
    /// epochs after the first says the plan would end past the budget (a
    /// machine that slows down). The first epoch should be warm-up
    /// (`optim.warmup_epochs >= 1`), which the sizing leaves unchanged. The
    /// planned epochs are saved, so a resume keeps them (a run resumed
    /// before the end of its second epoch keeps the provisional plan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_budget_seconds: Option<f64>,
    /// In a multi-process run, BatchNorm normalises over the global batch
    /// (the paper's Global BN); `false` normalises each process's slice
    /// alone, which lets a model cheat through the statistics (section 2.2).
    pub sync_batch_norm: bool,
    /// In a multi-process run, how long a process waits for the others (at
    /// the rendezvous, in a collective) before every one stops with an error.
    pub dist_timeout_seconds: f64,
    /// In a multi-process run, what carries the CUDA tensors: `nccl` (the
    /// `cuda` build), `gloo`, or `auto` (NCCL where it can serve: a cuda
    /// build on CUDA with a GPU per process, since NCCL refuses two
    /// processes on one GPU). CPU tensors always go through Gloo.
    pub dist_backend: crate::dist::Backend,
    /// In a multi-process run, the gradient is all-reduced in buckets of
    /// about this many MB (of fp32 gradient), each sent as soon as the
    /// backward pass has computed it, while the layers below are still
    /// being computed, as PyTorch's DDP does (its `bucket_cap_mb`, 25 by
    /// default); 0 sends the whole gradient once after the backward pass.
    /// Either way the gradient is the same (up to the order of float sums
    /// over 3 ranks or more).
    pub gradient_bucket_mb: f64,
    /// In a multi-process run, `"bf16"` rounds the gradient to bf16 for its
    /// all-reduce (half the bytes, as DDP's `bf16_compress_hook`): for
    /// networks slower than the step; each process's gradient then carries
    /// bf16's rounding (about 0.4% of each value), so the run no longer
    /// equals one process's. `"fp32"` (the default) sends it as computed.
    pub gradient_all_reduce: crate::dist::GradientPrecision,
    /// Train with labels instead: the paper's supervised baseline (Figure
    /// 7), the same encoder with a linear classifier on h (`model.head`
    /// linear, `projection_dim` = the number of classes; `--supervised`
    /// sets both) under cross-entropy on both augmented views of every
    /// image, with the same augmentation, optimiser and schedule. Needs
    /// labelled images (class folders, CIFAR batches) read in the epoch's
    /// order (not streamed shards).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub supervised: bool,
    /// On CUDA, replay every training step from a CUDA graph captured at
    /// the first (one launch per step instead of hundreds of kernels, so
    /// the host's time per step drops out); ignored on the CPU. Needs
    /// `libsimclr_graph.so` beside the `simclr` binary (`tools/device/device-bench.sh
    /// prepare` builds it) and batches of one shape; not with AdamW,
    /// `micro_batch_size`, `supervised` or several processes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cuda_graph: bool,
    /// On CUDA, convolutions take cuDNN's deterministic algorithms, chosen
    /// without autotuning (PyTorch's `cudnn.deterministic = True`,
    /// `cudnn.benchmark = False`), so that two runs from one seed on one
    /// card give the same weights bit for bit, at some cost in speed. The
    /// CPU is deterministic without it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deterministic: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 4096,
            micro_batch_size: None,
            seed: 0,
            device: DeviceChoice::Auto,
            mixed_precision: true,
            mixed_precision_dtype: crate::device::HalfType::Auto,
            output_dir: PathBuf::from("runs/simclr"),
            checkpoint_every: 10,
            checkpoint_every_steps: 0,
            checkpoint_every_minutes: 30.0,
            encoder_every: 0,
            knn_every: 10,
            knn_k: 200,
            knn_temperature: 0.1,
            log_every_steps: 10,
            max_nonfinite_steps: 5,
            time_budget_seconds: None,
            sync_batch_norm: true,
            dist_timeout_seconds: 1800.0,
            dist_backend: crate::dist::Backend::Auto,
            gradient_bucket_mb: 25.0,
            gradient_all_reduce: crate::dist::GradientPrecision::Fp32,
            supervised: false,
            cuda_graph: false,
            deterministic: false,
        }
    }
}

/// A whole run, as written in a TOML file. Defaults are the paper's
/// ImageNet setting (ResNet-50, batch 4096, LARS at 0.3·B/256, τ = 0.1).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub data: DataConfig,
    pub augment: AugmentConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
}

/// Named starting points; a config file or overrides change them further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// CPU-sized: a narrow ResNet-18 on the synthetic data, a few minutes on 2 cores.
    Demo,
    /// The paper's CIFAR-10 setting (appendix B.9): ResNet-50 CIFAR stem,
    /// 32x32, s = 0.5, τ = 0.5, batch 512.
    Cifar10,
    /// CIFAR-10 against the clock: ResNet-18 CIFAR stem trained for a time
    /// budget (300 s) with a short-run recipe and the tensor augmentation
    /// path (see docs/time-to-accuracy.md).
    Cifar10Fast,
    /// The paper's ImageNet setting: the defaults.
    Imagenet,
}

names!(Preset, "preset", { Demo => "demo", Cifar10 => "cifar10", Cifar10Fast => "cifar10-fast", Imagenet => "imagenet" });

impl RunConfig {
    /// The configuration a preset starts from.
    pub fn preset(preset: Preset) -> Self {
        let mut config = RunConfig::default();
        let cifar = |config: &mut RunConfig| {
            config.data.image_size = 32;
            config.data.mean = [0.4914, 0.4822, 0.4465];
            config.data.std = [0.2470, 0.2435, 0.2616];
            config.model.stem = crate::model::Stem::Cifar;
            config.augment = AugmentConfig::cifar();
        };
        match preset {
            Preset::Imagenet => {}
            Preset::Cifar10 => {
                cifar(&mut config);
                config.loss.temperature = 0.5;
                config.train.batch_size = 512;
                config.train.epochs = 500;
                config.optim.learning_rate = Some(1.0);
                config.optim.weight_decay = 1e-4;
            }
            Preset::Cifar10Fast => {
                cifar(&mut config);
                config.model.arch = crate::model::Arch::Resnet18;
                // Crops of at least a fifth of the image: 2.2 points more kNN
                // at 60 epochs on the CPU than 0.08, over two seeds.
                config.augment = AugmentConfig::cifar_cropping_at_least(0.2);
                config.augment.backend = crate::augment::Backend::Device;
                // 24 px views, scored at 32 px: as good per epoch in 0.56x the pixels.
                config.augment.view_size = Some(24);
                config.loss.temperature = 0.2;
                config.optim.optimizer = crate::optim::OptimizerKind::Sgd;
                config.optim.learning_rate = Some(0.5);
                config.optim.weight_decay = 5e-4;
                config.optim.warmup_epochs = 1.0;
                config.train.batch_size = 512;
                config.train.epochs = 200;
                config.train.time_budget_seconds = Some(300.0);
                config.train.output_dir = PathBuf::from("runs/cifar10-fast");
            }
            Preset::Demo => {
                config.data.image_size = 32;
                config.data.synthetic_images = 2000;
                config.model.arch = crate::model::Arch::Resnet18;
                config.model.stem = crate::model::Stem::Cifar;
                config.model.width_multiplier = 0.25;
                // One shape an image, which crops of at least half of it keep:
                // with SGD, kNN 89.5-95.75% after 15 epochs over 8 seeds, where
                // LARS and the paper's crops of 0.08 reached 43.5-71.75%
                // (docs/findings.md, "The demo's recipe").
                config.augment = AugmentConfig::cifar_cropping_at_least(0.5);
                config.loss.temperature = 0.2;
                config.optim.optimizer = crate::optim::OptimizerKind::Sgd;
                config.optim.learning_rate = Some(0.5);
                config.optim.warmup_epochs = 1.0;
                config.optim.weight_decay = 5e-4;
                config.train.batch_size = 128;
                config.train.epochs = 15;
                config.train.checkpoint_every = 5;
                config.train.knn_every = 5;
                config.train.knn_k = 20;
                config.train.output_dir = PathBuf::from("runs/demo");
            }
        }
        config
    }

    /// This config with the fields written in a TOML file laid over it;
    /// unknown fields are errors naming the file.
    pub fn with_file(&self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        self.with_toml(&text, path)
    }

    /// [`RunConfig::with_file`] on text already read; `path` is only named in errors.
    pub fn with_toml(&self, text: &str, path: &Path) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::Config(vec![format!("{}: {e}", path.display())]);
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(&e))?;
        let mut tree = self.tree();
        merge_into(&mut tree, toml::Value::Table(table));
        tree.try_into().map_err(|e: toml::de::Error| bad(&e))
    }

    /// Applies `section.field=value` overrides; the value is read as a TOML
    /// literal (`0.5`, `true`, `"x"`, `[1, 2]`) or, failing that, as a string.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        let mut tree = self.tree();
        let mut problems = Vec::new();
        let mut layers = Vec::with_capacity(overrides.len());
        for item in overrides {
            let Some((key, raw)) = item.split_once('=') else {
                problems.push(format!("override '{item}': expected section.field=value"));
                continue;
            };
            let mut value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut table| table.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
            for part in key.trim().rsplit('.') {
                value = toml::Value::Table(toml::Table::from_iter([(part.to_owned(), value)]));
            }
            layers.push((item, value.clone()));
            merge_into(&mut tree, value);
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
        let flat = |error: toml::de::Error| error.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        tree.try_into().map_err(|error: toml::de::Error| {
            // Which overrides are wrong: each laid alone over this config.
            let wrong: Vec<String> = layers
                .into_iter()
                .filter_map(|(item, layer)| {
                    let mut alone = self.tree();
                    merge_into(&mut alone, layer);
                    let error = alone.try_into::<RunConfig>().err()?;
                    Some(format!("--set {item}: {}", flat(error)))
                })
                .collect();
            Error::Config(if wrong.is_empty() { vec![format!("--set: {}", flat(error))] } else { wrong })
        })
    }

    /// The fields under `keys` (sections such as `model`, or fields such
    /// as `train.batch_size`) whose values in `self` differ from `before`'s,
    /// each as `key = value (before: value)`.
    pub fn changed_from(&self, before: &RunConfig, keys: &[&str]) -> Vec<String> {
        fn walk(key: &str, now: Option<&toml::Value>, then: Option<&toml::Value>, changed: &mut Vec<String>) {
            match (now, then) {
                (Some(toml::Value::Table(now)), Some(toml::Value::Table(then))) => {
                    let names: std::collections::BTreeSet<&String> = now.keys().chain(then.keys()).collect();
                    for name in names {
                        walk(&format!("{key}.{name}"), now.get(name), then.get(name), changed);
                    }
                }
                (now, then) if now != then => {
                    let show = |value: Option<&toml::Value>| value.map_or("unset".to_owned(), |v| v.to_string());
                    changed.push(format!("{key} = {} (before: {})", show(now), show(then)));
                }
                _ => {}
            }
        }
        let (now, then) = (self.tree(), before.tree());
        let field = |tree: &toml::Value, key: &str| -> Option<toml::Value> {
            key.split('.').try_fold(tree, |value, part| value.get(part)).cloned()
        };
        let mut changed = Vec::new();
        for key in keys {
            walk(key, field(&now, key).as_ref(), field(&then, key).as_ref(), &mut changed);
        }
        changed
    }

    fn tree(&self) -> toml::Value {
        toml::Value::try_from(self).expect("every config field is representable in TOML")
    }

    /// The encoder this run trains, as its `encoder.safetensors` records it.
    pub fn encoder_spec(&self) -> EncoderSpec {
        EncoderSpec {
            arch: self.model.arch,
            width_multiplier: self.model.width_multiplier,
            stem: self.model.stem,
            image_size: self.data.image_size,
            mean: self.data.mean,
            std: self.data.std,
            head: Some(self.model.head.clone()),
        }
    }

    /// The side of the training views: `augment.view_size`, else `data.image_size`.
    pub fn view_size(&self) -> u32 {
        self.augment.view_size.unwrap_or(self.data.image_size)
    }

    /// The training views' format: [`RunConfig::view_size`] px.
    pub fn view_format(&self) -> ViewFormat {
        ViewFormat { size: self.view_size(), mean: self.data.mean, std: self.data.std }
    }

    /// The format the kNN monitor, `eval` and the encoder's file read the
    /// images in: `data.image_size` px, whatever the training views' size.
    pub fn image_format(&self) -> ViewFormat {
        ViewFormat { size: self.data.image_size, mean: self.data.mean, std: self.data.std }
    }

    /// The config as TOML, as saved beside each run's checkpoints.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("every config field is representable in TOML")
    }

    /// Checks every field; the error lists each bad one with its value.
    pub fn validate(self) -> Result<ValidConfig> {
        let mut problems = Vec::new();
        self.data.check(&mut problems);
        let train = &self.train;
        if train.batch_size < 2 {
            problems.push(format!(
                "train.batch_size = {}: NT-Xent needs at least 2 images per batch, since the \
                 other images of the batch are the negatives",
                train.batch_size
            ));
        }
        if train.micro_batch_size == Some(0) {
            problems.push("train.micro_batch_size = 0: must be at least 1 image".to_owned());
        }
        if train.epochs == 0 {
            problems.push("train.epochs = 0: must be at least 1".to_owned());
        }
        if train.checkpoint_every == 0 {
            problems.push("train.checkpoint_every = 0: must be at least 1".to_owned());
        }
        if !is_non_negative_finite(train.checkpoint_every_minutes) {
            problems.push(format!("train.checkpoint_every_minutes = {}: must be >= 0", train.checkpoint_every_minutes));
        }
        if !crate::checks::is_positive_finite(train.dist_timeout_seconds) {
            problems.push(format!("train.dist_timeout_seconds = {}: must be > 0", train.dist_timeout_seconds));
        }
        if !is_non_negative_finite(train.gradient_bucket_mb) {
            problems.push(format!("train.gradient_bucket_mb = {}: must be >= 0", train.gradient_bucket_mb));
        }
        if train.max_nonfinite_steps == 0 {
            problems.push("train.max_nonfinite_steps = 0: must be at least 1".to_owned());
        }
        if let Some(budget) = train.time_budget_seconds {
            if !is_positive_finite(budget) {
                problems.push(format!("train.time_budget_seconds = {budget}: must be > 0"));
            }
        }
        if train.cuda_graph {
            let uncaptured = [
                train.micro_batch_size.map(|micro| {
                    format!("train.micro_batch_size = {micro}: gradient caching's passes are not captured")
                }),
                train.supervised.then(|| {
                    "train.supervised = true: its labels change every step, and a captured step reads none".to_owned()
                }),
            ];
            for why in uncaptured.into_iter().flatten() {
                problems.push(format!("train.cuda_graph = true with {why}; set train.cuda_graph = false"));
            }
        }
        KnnConfig { k: train.knn_k, temperature: train.knn_temperature }.check("train.knn_", &mut problems);
        self.augment.check(self.view_size(), &mut problems);
        self.model.check(&mut problems);
        self.loss.check(&mut problems);
        self.optim.check(&mut problems);
        if problems.is_empty() {
            Ok(ValidConfig(self))
        } else {
            Err(Error::Config(problems))
        }
    }
}

/// Where a run configuration starts: a preset, a file over it, and
/// `--set` overrides over everything.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigLayers {
    /// Starting point: demo, cifar10, cifar10-fast or imagenet. Without --config, --preset and --data, the demo preset.
    #[arg(long)]
    pub preset: Option<Preset>,
    /// A TOML run configuration (see configs/); its fields override the preset's.
    #[arg(long = "config")]
    pub file: Option<PathBuf>,
    /// Any field as section.field=value, e.g. --set loss.temperature=0.5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// What a command line says about a run, in the order the layers apply:
/// preset < file < flags < `--set` overrides.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunLayers {
    #[command(flatten)]
    pub config: ConfigLayers,
    /// Training images: an ImageFolder, a flat folder, CIFAR binary batches or tar shards.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run folder for checkpoints, metrics and the exported encoder.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Train this many epochs; clears a time budget set by the preset or
    /// file (`--set train.time_budget_seconds=S` sets one again).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step, all processes together (train.batch_size); each
    /// anchor's negatives are the other 2(N-1) views.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Compute each batch in chunks of this many images per process, with
    /// the whole batch's gradient (train.micro_batch_size).
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Seeds the initial weights, the image order and every view (train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto, cpu or cuda.
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Start the encoder from these weights, not a random init: an
    /// encoder.safetensors, torchvision-named safetensors, a run's
    /// checkpoint or its folder, of the run's network (model.init_encoder).
    #[arg(long, value_name = "WEIGHTS")]
    pub init_encoder: Option<PathBuf>,
}

impl RunLayers {
    /// The preset (the demo one when nothing else is named) with the file laid over it.
    pub fn base(&self) -> Result<RunConfig> {
        let preset = match (self.config.preset, &self.config.file, &self.data) {
            (Some(preset), _, _) => Some(preset),
            (None, None, None) => {
                tracing::info!("no --data, --config or --preset: using the demo preset on the synthetic dataset");
                Some(Preset::Demo)
            }
            _ => None,
        };
        let config = preset.map(RunConfig::preset).unwrap_or_default();
        match &self.config.file {
            Some(path) => config.with_file(path),
            None => Ok(config),
        }
    }

    /// The fields this command line sets by flag or `--set`, each with the
    /// words that set it: `("train.epochs", "--epochs 5")`.
    pub fn given(&self) -> Vec<(String, String)> {
        let flags = [
            ("data.path", "--data", self.data.as_ref().map(|path| path.display().to_string())),
            ("train.output_dir", "--output", self.output.as_ref().map(|path| path.display().to_string())),
            ("train.epochs", "--epochs", self.epochs.map(|epochs| epochs.to_string())),
            ("train.batch_size", "--batch-size", self.batch_size.map(|size| size.to_string())),
            ("train.micro_batch_size", "--micro-batch-size", self.micro_batch_size.map(|size| size.to_string())),
            ("train.seed", "--seed", self.seed.map(|seed| seed.to_string())),
            ("train.device", "--device", self.device.map(|device| format!("{device:?}").to_lowercase())),
            ("model.init_encoder", "--init-encoder", self.init_encoder.as_ref().map(|path| path.display().to_string())),
        ];
        let flags =
            flags.into_iter().filter_map(|(key, flag, value)| Some((key.to_owned(), format!("{flag} {}", value?))));
        let overrides = self.config.overrides.iter().map(|item| {
            let key = item.split_once('=').map_or(item.as_str(), |(key, _)| key);
            (key.trim().to_owned(), format!("--set {item}"))
        });
        flags.chain(overrides).collect()
    }

    /// `base` (the preset and file, or a checkpoint's config when resuming)
    /// with the flags, then the overrides, laid over it; validated once.
    pub fn resolve(&self, base: RunConfig) -> Result<ValidConfig> {
        let mut config = base;
        if let Some(data) = &self.data {
            config.data.path = Some(data.clone());
        }
        if let Some(output) = &self.output {
            config.train.output_dir = output.clone();
        }
        let train = &mut config.train;
        if let Some(epochs) = self.epochs {
            train.epochs = epochs;
            train.time_budget_seconds = None;
        }
        train.batch_size = self.batch_size.unwrap_or(train.batch_size);
        train.micro_batch_size = self.micro_batch_size.or(train.micro_batch_size);
        train.seed = self.seed.unwrap_or(train.seed);
        train.device = self.device.unwrap_or(train.device);
        if let Some(weights) = &self.init_encoder {
            config.model.init_encoder = Some(weights.clone());
        }
        config.with_overrides(&self.config.overrides)?.validate()
    }
}

/// Lays `over` onto `base`: tables merge key by key, anything else replaces.
fn merge_into(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(base), toml::Value::Table(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) if slot.is_table() && value.is_table() => merge_into(slot, value),
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// A configuration whose every field has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConfig(RunConfig);

impl ValidConfig {
    pub fn get(&self) -> &RunConfig {
        &self.0
    }

    /// The same run started from the encoder in `weights`.
    pub fn with_init_encoder(&self, weights: PathBuf) -> ValidConfig {
        let mut config = self.0.clone();
        config.model.init_encoder = Some(weights);
        ValidConfig(config)
    }

    /// The same run with `epochs` planned and no time budget left to plan.
    pub fn with_planned_epochs(&self, epochs: usize) -> ValidConfig {
        let mut config = self.0.clone();
        config.train.epochs = epochs.max(1);
        config.train.time_budget_seconds = None;
        ValidConfig(config)
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = RunConfig;
    fn deref(&self) -> &RunConfig {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::OpConfig;

    #[test]
    fn presets_are_valid() {
        for preset in [Preset::Demo, Preset::Cifar10, Preset::Cifar10Fast, Preset::Imagenet] {
            RunConfig::preset(preset).validate().unwrap();
        }
    }

    #[test]
    fn asymmetric_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/asymmetric.toml");
        let config = RunConfig::preset(Preset::Cifar10).with_file(&path).unwrap().validate().unwrap();
        let [first, second] = config.augment.view_ops();
        assert_ne!(first, second);
        assert_eq!(second.last().map(OpConfig::name), Some("solarize"));
    }

    #[test]
    fn example_configs_load_and_match_their_presets() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for (file, preset) in [
            ("demo.toml", Preset::Demo),
            ("cifar10.toml", Preset::Cifar10),
            ("cifar10-fast.toml", Preset::Cifar10Fast),
            ("imagenet.toml", Preset::Imagenet),
        ] {
            let config = RunConfig::default().with_file(&dir.join(file)).unwrap();
            config.clone().validate().unwrap();
            let mut expected = RunConfig::preset(preset);
            expected.train.output_dir = config.train.output_dir.clone();
            // A file may write the preset's ops out instead of naming it.
            assert_eq!(config.augment.view_ops(), expected.augment.view_ops(), "{file}: augmentation ops");
            assert_eq!(config.augment.view_size, expected.augment.view_size, "{file}: augment.view_size");
            expected.augment = config.augment.clone();
            assert_eq!(config, expected, "{file} differs from its preset");
        }
    }

    #[test]
    fn toml_round_trip_keeps_every_field() {
        let config = RunConfig::preset(Preset::Cifar10);
        let back: RunConfig = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn overrides_parse_literals_and_strings() {
        let config = RunConfig::default()
            .with_overrides(&[
                "train.batch_size=64".into(),
                "loss.temperature=0.5".into(),
                "data.path=/tmp/images".into(),
                "model.arch=\"resnet34\"".into(),
            ])
            .unwrap();
        assert_eq!(config.train.batch_size, 64);
        assert_eq!(config.loss.temperature, 0.5);
        assert_eq!(config.data.path, Some(PathBuf::from("/tmp/images")));
        assert_eq!(config.model.arch, crate::model::Arch::Resnet34);
    }

    #[test]
    fn the_epochs_flag_replaces_a_time_budget_and_set_brings_it_back() {
        let layers = |epochs: Option<usize>, overrides: &[&str]| RunLayers {
            config: ConfigLayers {
                preset: Some(Preset::Cifar10Fast),
                overrides: overrides.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            epochs,
            ..Default::default()
        };
        let resolve = |layers: RunLayers| layers.resolve(layers.base().unwrap()).unwrap().get().train.clone();
        let preset = resolve(layers(None, &[]));
        assert_eq!(preset.time_budget_seconds, Some(300.0));
        let fixed = resolve(layers(Some(3), &[]));
        assert_eq!((fixed.epochs, fixed.time_budget_seconds), (3, None));
        let budget = resolve(layers(Some(3), &["train.time_budget_seconds=60"]));
        assert_eq!((budget.epochs, budget.time_budget_seconds), (3, Some(60.0)));
    }

    #[test]
    fn a_file_overrides_only_what_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "[train]\nepochs = 7\n[model.head]\nprojection_dim = 64\n").unwrap();
        let config = RunConfig::preset(Preset::Cifar10).with_file(&path).unwrap();
        assert_eq!(config.train.epochs, 7);
        assert_eq!(config.model.head.projection_dim, 64);
        assert_eq!(config.loss.temperature, 0.5, "the preset's value survives");
        std::fs::write(&path, "[train]\nepoch = 7\n").unwrap();
        let message = RunConfig::default().with_file(&path).unwrap_err().to_string();
        assert!(message.contains("run.toml") && message.contains("epoch"), "{message}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = RunConfig::default().with_overrides(&["train.batch_sise=3".into()]).unwrap_err();
        assert!(err.to_string().contains("batch_sise"), "{err}");
        // Among several, each wrong one is named as given, and only those.
        let overrides = ["train.epochs=two", "loss.temperature=0.2", "model.width=2"].map(String::from);
        let Err(Error::Config(problems)) = RunConfig::default().with_overrides(&overrides) else {
            panic!("two of the overrides are wrong")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("--set train.epochs=two: invalid type"), "{problems:?}");
        assert!(problems[1].starts_with("--set model.width=2: unknown field `width`"), "{problems:?}");
    }

    #[test]
    fn changed_fields_are_listed_with_both_values() {
        let before = RunConfig::default();
        let mut now = before.clone();
        assert!(now.changed_from(&before, &["model", "train.batch_size"]).is_empty());
        now.model.width_multiplier = 0.5;
        now.model.head.projection_dim = 64;
        now.train.batch_size = 512;
        now.train.epochs = 900;
        let changed = now.changed_from(&before, &["model", "train.batch_size"]);
        assert_eq!(
            changed,
            [
                format!("model.head.projection_dim = 64 (before: {})", before.model.head.projection_dim),
                "model.width_multiplier = 0.5 (before: 1.0)".to_owned(),
                format!("train.batch_size = 512 (before: {})", before.train.batch_size),
            ]
        );
    }

    #[test]
    fn validation_lists_every_bad_field() {
        let mut config = RunConfig::default();
        config.train.batch_size = 1;
        config.loss.temperature = 0.0;
        config.data.stream_readers = 0;
        (config.data.limit, config.data.shuffle_buffer) = (Some(100), 64);
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("data.limit = 100 with data.shuffle_buffer = 64"), "{message}");
        assert!(message.contains("train.batch_size = 1"), "{message}");
        assert!(message.contains("loss.temperature = 0"), "{message}");
        assert!(message.contains("data.stream_readers = 0"), "{message}");
    }

    #[test]
    fn a_field_added_later_is_written_only_away_from_its_default() {
        // Configs written before `data.stream_readers` existed read back,
        // and are written again, unchanged: a study compares them as text.
        let config = RunConfig::preset(Preset::Cifar10);
        assert!(!config.to_toml().contains("stream_readers"));
        let mut other = config.clone();
        other.data.stream_readers = 2;
        let back: RunConfig = toml::from_str(&other.to_toml()).unwrap();
        assert_eq!(back.data.stream_readers, 2);
    }

    #[test]
    fn a_cuda_graph_refuses_what_a_capture_cannot_hold_and_takes_the_rest() {
        let mut config = RunConfig::preset(Preset::Cifar10Fast);
        config.train.cuda_graph = true;
        config.clone().validate().expect("SGD, one pass, no labels: capturable");
        config.optim.optimizer = crate::optim::OptimizerKind::Lars;
        config.clone().validate().expect("LARS reads its rate on the device too");
        config.optim.optimizer = crate::optim::OptimizerKind::Adamw;
        config.clone().validate().expect("AdamW counts its steps on the device");
        config.train.micro_batch_size = Some(64);
        config.train.supervised = true;
        let message = config.validate().unwrap_err().to_string();
        for setting in ["train.micro_batch_size = 64", "train.supervised = true"] {
            assert!(message.contains(&format!("train.cuda_graph = true with {setting}")), "{message}");
        }
    }
}
