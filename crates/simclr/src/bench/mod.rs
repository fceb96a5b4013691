//! `simclr bench`: throughput of a training step and of the encoder's
//! forward pass on random inputs, so data loading is left out and the
//! numbers compare directly with a PyTorch script on the same device.
use std::time::Instant;

pub mod input;

pub use input::{bench_input, InputBenchOptions, InputBenchReport};

use tch::{Device, Kind, Tensor};

use crate::augment::{AugmentConfig, AugmentPreset, Pipeline};
use crate::data::config::DataFormat;
use crate::data::Dataset;
use crate::device::{DeviceChoice, MemoryKind, PeakMemory, Precision};
use crate::loss::LossConfig;
use crate::model::SimClr;
use crate::model::{Arch, ModelConfig, Stem};
use crate::normalization::{IMAGENET_MEAN, IMAGENET_STD};
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::train::{GradientCache, Objective};
use crate::{Error, Result};

/// What `simclr bench` times, and against which reference.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    #[arg(long, default_value = "resnet50")]
    pub arch: Arch,
    #[arg(long = "width", default_value_t = 1.0)]
    pub width_multiplier: f64,
    #[arg(long, default_value = "imagenet")]
    pub stem: Stem,
    /// Width of the projection head's hidden layer (default: the size of h).
    #[arg(long)]
    pub hidden_dim: Option<usize>,
    /// auto (CUDA where there is a GPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Images per step (2x views go through the network).
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Compute each step's batch in chunks of this many images, with the
    /// whole batch's gradient (train.micro_batch_size).
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Side of the random input images, in pixels.
    #[arg(long, default_value_t = 32)]
    pub image_size: u32,
    /// Steps timed (the report gives their mean).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Steps run before timing (allocator, autotuning).
    #[arg(long = "warmup", default_value_t = 2)]
    pub warmup_steps: usize,
    /// bf16 autocast on CUDA and on a CPU with bf16 instructions (as
    /// `train.mixed_precision`); `--no-mixed-precision` keeps fp32 throughout.
    #[arg(long = "no-mixed-precision", action = clap::ArgAction::SetFalse)]
    pub mixed_precision: bool,
    /// The half type of mixed precision (as `train.mixed_precision_dtype`):
    /// auto, bf16, or fp16 (with loss scaling, as on a V100 or T4; the
    /// PyTorch reference then takes fp16 autocast and GradScaler).
    #[arg(long, default_value = "auto")]
    pub mixed_precision_dtype: crate::device::HalfType,
    /// The update of each training step: lars (the paper's), sgd or adamw.
    #[arg(long, default_value = "lars")]
    pub optimizer: OptimizerKind,
    /// Also time the step captured as a CUDA graph and replayed, through this
    /// library (crates/simclr/src/cuda_graph.cpp, built by `./x.sh build-cuda`). CUDA only.
    #[arg(long, value_name = "LIBRARY", conflicts_with = "micro_batch_size")]
    pub cuda_graph: Option<std::path::PathBuf>,
}

impl BenchOptions {
    /// The timed network: the chosen encoder with the default projection head.
    pub fn model(&self) -> ModelConfig {
        let mut model = ModelConfig { arch: self.arch, stem: self.stem, ..Default::default() };
        model.width_multiplier = self.width_multiplier;
        model.head.hidden_dim = self.hidden_dim;
        model
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub arch: String,
    pub batch_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    pub image_size: u32,
    pub steps: usize,
    pub optimizer: &'static str,
    /// The arithmetic of the training step and the forward pass
    /// ([`Precision::on`]), "bf16" or "fp16" (autocast) or "fp32" in JSON.
    pub precision: Precision,
    /// Training images per second (each image is two views through f, g,
    /// NT-Xent, backward and an optimiser step).
    pub train_images_per_second: f64,
    pub train_ms_per_step: f64,
    /// Median time the host takes to issue one training step, from an idle
    /// device until the step's last kernel is queued. On a GPU, a value
    /// close to `train_ms_per_step` means the step is bound by launching
    /// kernels (the host), a much smaller one that it is bound by running
    /// them (the device). On the CPU the step runs as it is issued, so the
    /// two agree.
    pub train_issue_ms: f64,
    /// The most memory the training steps held (warm-up and timed steps),
    /// in bytes, and what was measured ([`crate::device::PeakMemory`]).
    pub peak_memory_bytes: Option<u64>,
    pub peak_memory: Option<MemoryKind>,
    /// Encoder forward images per second (eval mode, BatchNorm folded, no gradients).
    pub forward_images_per_second: f64,
    /// The training step captured as a CUDA graph and replayed, where asked
    /// for: the same kernels with no launch overhead, so the floor under
    /// `train_ms_per_step`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_ms_per_step: Option<f64>,
}

/// Steps issued one at a time, each from an idle device, for
/// [`BenchReport::train_issue_ms`] (tools/reference/bench_pytorch.py takes as many).
const ISSUE_PROBES: usize = 5;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// A line for each of `counts` (flag, value if given) that is 0.
fn check_counts(counts: &[(&str, Option<usize>)], problems: &mut Vec<String>) {
    for (flag, value) in counts {
        if *value == Some(0) {
            problems.push(format!("{flag} 0: must be at least 1"));
        }
    }
}

/// `--image-size` as every model and pipeline here needs it.
fn check_image_size(image_size: u32, problems: &mut Vec<String>) {
    if image_size < crate::checks::MIN_IMAGE_SIDE {
        problems.push(format!("--image-size {image_size}: must be at least {}", crate::checks::MIN_IMAGE_SIDE));
    }
}

pub fn bench(options: &BenchOptions) -> Result<BenchReport> {
    let mut problems = Vec::new();
    if options.batch_size < 2 {
        problems.push(format!(
            "--batch-size {}: must be at least 2 (the other images are the negatives)",
            options.batch_size
        ));
    }
    let counts = [
        ("--steps", Some(options.steps)),
        ("--micro-batch-size", options.micro_batch_size),
        ("--hidden-dim", options.hidden_dim),
    ];
    check_counts(&counts, &mut problems);
    if let Err(problem) = crate::model::check_width(options.width_multiplier) {
        problems.push(format!("--width {problem}"));
    }
    check_image_size(options.image_size, &mut problems);
    if !problems.is_empty() {
        return Err(Error::Config(problems));
    }
    let device = crate::device::select(options.device)?;
    if options.cuda_graph.is_some() && !device.is_cuda() {
        return Err(Error::Device(format!("--cuda-graph needs a CUDA device, not {device:?}")));
    }
    let precision = Precision::on_with(device, options.mixed_precision, options.mixed_precision_dtype);
    let (store, model) = SimClr::in_store(&options.model(), device);
    let named = store.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let mut optimizer = Optimizer::new(&OptimConfig { optimizer: options.optimizer, ..OptimConfig::default() }, named);
    let fp16 = precision == Precision::Fp16;
    if fp16 {
        optimizer.scale_losses();
    }
    // tools/reference/bench_pytorch.py steps at the same rates.
    let learning_rate = if options.optimizer == OptimizerKind::Adamw { 1e-3 } else { 0.1 };
    let loss_config = LossConfig::default();
    let side = i64::from(options.image_size);
    let views = Tensor::randn([2 * options.batch_size as i64, 3, side, side], (Kind::Float, device));

    let objective = Objective::new(&loss_config, precision, None);
    let cache = options.micro_batch_size.map(|micro| GradientCache::new(&store, micro));
    // An allocation failure is an error naming the batch, as in training.
    let mut train_step = || -> Result<()> {
        let step = || -> Result<()> {
            let loss = crate::train::step::backward(&model, &views, &objective, cache.as_ref(), &mut optimizer)?;
            match fp16 {
                // As training steps: the loss scale needs the verdict.
                true => drop(optimizer.step_if_finite(learning_rate, &loss)),
                false => optimizer.step(learning_rate),
            }
            Ok(())
        };
        crate::train::step::out_of_memory_as_error(step, device, options.batch_size)
    };
    synchronize(device);
    let memory = PeakMemory::start(device);
    for _ in 0..options.warmup_steps {
        train_step()?;
    }
    synchronize(device);
    let started = Instant::now();
    for _ in 0..options.steps {
        train_step()?;
    }
    synchronize(device);
    let train_seconds = started.elapsed().as_secs_f64();
    let peak_memory = memory.read();
    let mut issue_seconds = Vec::with_capacity(ISSUE_PROBES);
    for _ in 0..ISSUE_PROBES {
        let started = Instant::now();
        train_step()?;
        issue_seconds.push(started.elapsed().as_secs_f64());
        synchronize(device);
    }

    let graph_seconds = match &options.cuda_graph {
        Some(library) => {
            // The same step from here on, replayed: every replay reads the
            // same views and updates the same weights, as the eager steps did.
            let graph = crate::cuda_graph::CudaGraph::capture(library, device, 3, &mut train_step)?;
            graph.replay()?;
            synchronize(device);
            let started = Instant::now();
            for _ in 0..options.steps {
                graph.replay()?;
            }
            synchronize(device);
            Some(started.elapsed().as_secs_f64())
        }
        None => None,
    };

    // The encoder as `simclr embed` and the evaluations run it.
    let images = views.narrow(0, 0, options.batch_size as i64);
    let encoder = model.encoder.fold();
    let forward = || tch::no_grad(|| precision.run(device, || encoder.forward(&images)));
    for _ in 0..options.warmup_steps {
        let _ = forward();
    }
    synchronize(device);
    let started = Instant::now();
    for _ in 0..options.steps {
        let _ = forward();
    }
    synchronize(device);
    let forward_seconds = started.elapsed().as_secs_f64();

    let images_done = (options.steps * options.batch_size) as f64;
    Ok(BenchReport {
        device: format!("{device:?}"),
        arch: options.arch.name().to_owned(),
        batch_size: options.batch_size,
        micro_batch_size: options.micro_batch_size,
        image_size: options.image_size,
        steps: options.steps,
        optimizer: options.optimizer.name(),
        precision,
        train_images_per_second: images_done / train_seconds,
        train_ms_per_step: 1000.0 * train_seconds / options.steps as f64,
        train_issue_ms: 1000.0 * median(&mut issue_seconds),
        peak_memory_bytes: peak_memory.map(|(bytes, _)| bytes),
        peak_memory: peak_memory.map(|(_, kind)| kind),
        forward_images_per_second: images_done / forward_seconds,
        graph_ms_per_step: graph_seconds.map(|seconds| 1000.0 * seconds / options.steps as f64),
    })
}

/// What `simclr bench augment` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct AugmentBenchOptions {
    /// Images to augment (an ImageFolder, a flat folder, CIFAR batches or tar shards).
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// simclr-imagenet or simclr-cifar.
    #[arg(long, default_value = "simclr-imagenet")]
    pub pipeline: AugmentPreset,
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Use at most this many images.
    #[arg(long, default_value_t = 256)]
    pub limit: usize,
    /// CPU threads (rayon workers, and libtorch's for the device path).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Passes over the images, after one untimed pass.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AugmentBenchReport {
    pub images: usize,
    pub image_size: u32,
    pub threads: usize,
    /// Views per second of the CPU path (sample, render, normalise into CHW),
    /// decoding excluded.
    pub cpu_views_per_second: f64,
    /// The same on the device path on CPU tensors, in batches of all
    /// images; absent when the images differ in size.
    pub tensor_views_per_second: Option<f64>,
}

impl std::fmt::Display for AugmentBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = self.image_size;
        write!(f, "{size}x{size} on {} images, {} thread(s): ", self.images, self.threads)?;
        write!(f, "CPU path {:.1} views/s", self.cpu_views_per_second)?;
        if let Some(views) = self.tensor_views_per_second {
            write!(f, ", device path (on the CPU) {views:.1} views/s")?;
        }
        Ok(())
    }
}

/// Times the augmentation pipeline alone on the decoded images of
/// `options.data`, as the data workers run it (one view per image per
/// round, written as CHW floats with ImageNet's normalisation, ready to batch).
pub fn bench_augment(options: &AugmentBenchOptions) -> Result<AugmentBenchReport> {
    use rayon::prelude::*;
    let mut problems = Vec::new();
    let counts =
        [("--limit", Some(options.limit)), ("--rounds", Some(options.rounds)), ("--threads", Some(options.threads))];
    check_counts(&counts, &mut problems);
    check_image_size(options.image_size, &mut problems);
    if !problems.is_empty() {
        return Err(Error::Config(problems));
    }
    let images = Dataset::open(&options.data, &DataFormat::Auto)?.subset(Some(options.limit), 0).decode_all()?;
    let images = &images[..];
    tch::set_num_threads(options.threads as i32);
    let config = AugmentConfig { preset: options.pipeline, ..Default::default() };
    let pipeline = &Pipeline::new(&config, options.image_size);
    let pool = crate::data::loader::worker_pool(options.threads)?;
    let side = pipeline.size() as usize;
    let mut out = vec![0f32; images.len() * 3 * side * side];
    let pass = |round: usize, out: &mut [f32]| {
        pool.install(|| {
            out.par_chunks_mut(3 * side * side).zip(images.par_iter()).enumerate().for_each(|(index, (out, image))| {
                let mut rng = crate::augment::view_rng(0, round as u64, index as u64, 0);
                pipeline.view(0, image, &mut rng).write_chw_normalized(IMAGENET_MEAN, IMAGENET_STD, out);
            })
        })
    };
    pass(usize::MAX, &mut out);
    let started = Instant::now();
    for round in 0..options.rounds {
        pass(round, &mut out);
    }
    let cpu_seconds = started.elapsed().as_secs_f64();

    let uniform = images.iter().all(|image| image.dimensions() == images[0].dimensions());
    let tensor_views_per_second = uniform.then(|| {
        let (width, height) = images[0].dimensions();
        let pixels: Vec<u8> = images.iter().flat_map(|image| image.as_raw().iter().copied()).collect();
        let batch = crate::augment::uint8_batch(&pixels, images.len(), width, height);
        let run = |round: usize| {
            let params: Vec<_> = (0..images.len())
                .map(|index| {
                    let mut rng = crate::augment::view_rng(0, round as u64, index as u64, 0);
                    pipeline.sample(0, width, height, &mut rng)
                })
                .collect();
            pipeline.render_batch(&batch, &params)
        };
        let _ = run(usize::MAX);
        let started = Instant::now();
        for round in 0..options.rounds {
            let _ = run(round);
        }
        (options.rounds * images.len()) as f64 / started.elapsed().as_secs_f64()
    });
    Ok(AugmentBenchReport {
        images: images.len(),
        image_size: pipeline.size(),
        threads: options.threads,
        cpu_views_per_second: (options.rounds * images.len()) as f64 / cpu_seconds,
        tensor_views_per_second,
    })
}

/// Our report beside the PyTorch reference's, run with the same settings.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub ours: BenchReport,
    /// The reference's JSON report, as it printed it.
    pub reference: serde_json::Value,
}

/// Runs the PyTorch reference script (`tools/reference/bench_pytorch.py`)
/// with `python`, on `options`' model and settings, in simclr's memory
/// format (channels-last; bf16 autocast where we use it).
pub fn compare_with_pytorch(
    options: &BenchOptions,
    ours: BenchReport,
    script: &std::path::Path,
    python: &str,
) -> Result<Comparison> {
    let model = options.model();
    let cuda = crate::device::select(options.device)?.is_cuda();
    let mut command = std::process::Command::new(python);
    command.arg(script).args([
        "--arch",
        model.arch.name(),
        "--width",
        &model.width_multiplier.to_string(),
        "--stem",
        model.stem.name(),
        "--batch-size",
        &options.batch_size.to_string(),
        "--image-size",
        &options.image_size.to_string(),
        "--steps",
        &options.steps.to_string(),
        "--warmup",
        &options.warmup_steps.to_string(),
        "--device",
        if cuda { "cuda" } else { "cpu" },
        "--threads",
        &tch::get_num_threads().to_string(),
        "--optimizer",
        ours.optimizer,
    ]);
    if let Some(hidden) = model.head.hidden_dim {
        command.args(["--hidden-dim", &hidden.to_string()]);
    }
    command.arg(match ours.precision {
        Precision::Bf16 => "--bf16",
        Precision::Fp16 => "--fp16",
        Precision::Fp32 => "--channels-last",
    });
    let failed = |message: String| Error::Reference(format!("{python} {}: {message}", script.display()));
    let output = command.output().map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        return Err(failed(format!("failed:\n{}", String::from_utf8_lossy(&output.stderr))));
    }
    let reference: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| failed(format!("printed no JSON report: {e}")))?;
    let comparison = Comparison { ours, reference };
    for key in ["train_images_per_second", "forward_images_per_second", "train_ms_per_step", "train_issue_ms"] {
        if comparison.number(key).is_none() {
            return Err(failed(format!("its report lacks {key}")));
        }
    }
    Ok(comparison)
}

impl Comparison {
    fn number(&self, key: &str) -> Option<f64> {
        self.reference[key].as_f64()
    }

    /// Both reports and the ratios, as one JSON object: training and
    /// forward images/s, and with `--cuda-graph` the reference's eager step
    /// time over our replayed one (`graph_ratio`; what `train.cuda_graph`
    /// trains with).
    pub fn to_json(&self) -> serde_json::Value {
        let ratio = |ours: f64, key| ours / self.number(key).unwrap_or(f64::NAN);
        let mut json = serde_json::json!({
            "simclr": self.ours, "reference": self.reference,
            "train_ratio": ratio(self.ours.train_images_per_second, "train_images_per_second"),
            "forward_ratio": ratio(self.ours.forward_images_per_second, "forward_images_per_second"),
        });
        if let Some(graph) = self.ours.graph_ms_per_step {
            json["graph_ratio"] = serde_json::json!(self.number("train_ms_per_step").unwrap_or(f64::NAN) / graph);
        }
        json
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ours, name) = (&self.ours, self.reference["implementation"].as_str().unwrap_or("pytorch"));
        let number = |key| self.number(key).unwrap_or(f64::NAN);
        writeln!(
            f,
            "{} on {} in {}, batch {} at {}px, {}, {} timed steps:",
            ours.arch,
            ours.device,
            ours.precision.name(),
            ours.batch_size,
            ours.image_size,
            ours.optimizer,
            ours.steps
        )?;
        for (what, mine, key) in [
            ("training images/s", ours.train_images_per_second, "train_images_per_second"),
            ("encoder forward images/s", ours.forward_images_per_second, "forward_images_per_second"),
        ] {
            let theirs = number(key);
            writeln!(f, "  {what:26} simclr {mine:10.1}   {name} {theirs:10.1}   ratio {:.2}x", mine / theirs)?;
        }
        let step = number("train_ms_per_step");
        if let Some(graph) = ours.graph_ms_per_step {
            let what = "step as a CUDA graph";
            writeln!(f, "  {what:26} simclr {graph:4.1} ms   {name} eager {step:4.1} ms   ratio {:.2}x", step / graph)?;
        }
        if ours.device.starts_with("Cuda") {
            // Which side of the step bounds it: see BenchReport::train_issue_ms.
            let (issue, what) = (number("train_issue_ms"), "host time to issue a step");
            writeln!(
                f,
                "  {what:26} simclr {:4.1} of {:4.1} ms   {name} {issue:4.1} of {step:4.1} ms",
                ours.train_issue_ms, ours.train_ms_per_step
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chunks = self.micro_batch_size.map(|micro| format!(" in chunks of {micro}")).unwrap_or_default();
        writeln!(
            f,
            "{} on {} in {}, batch {}{chunks} at {}x{}, {} timed steps:",
            self.arch,
            self.device,
            self.precision.name(),
            self.batch_size,
            self.image_size,
            self.image_size,
            self.steps
        )?;
        writeln!(
            f,
            "  training ({}): {:.1} images/s ({:.1} ms/step, {:.1} ms of it to issue)",
            self.optimizer, self.train_images_per_second, self.train_ms_per_step, self.train_issue_ms
        )?;
        if let Some(graph) = self.graph_ms_per_step {
            writeln!(f, "  training step as a CUDA graph: {graph:.1} ms/step")?;
        }
        if let (Some(bytes), Some(kind)) = (self.peak_memory_bytes, self.peak_memory) {
            writeln!(f, "  peak memory while training: {:.1} MiB ({})", bytes as f64 / (1 << 20) as f64, kind.name())?;
        }
        writeln!(f, "  encoder forward: {:.1} images/s", self.forward_images_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(graph_ms_per_step: Option<f64>) -> BenchReport {
        BenchReport {
            device: "Cuda(0)".to_owned(),
            arch: "resnet18".to_owned(),
            batch_size: 256,
            micro_batch_size: None,
            image_size: 32,
            steps: 200,
            optimizer: "sgd",
            precision: Precision::Bf16,
            train_images_per_second: 25_600.0,
            train_ms_per_step: 10.0,
            train_issue_ms: 9.0,
            peak_memory_bytes: None,
            peak_memory: None,
            forward_images_per_second: 100_000.0,
            graph_ms_per_step,
        }
    }

    #[test]
    fn a_comparison_gives_the_replayed_step_against_the_reference_eager_one() {
        let reference = serde_json::json!({
            "train_images_per_second": 19_692.3, "forward_images_per_second": 80_000.0,
            "train_ms_per_step": 13.0, "train_issue_ms": 12.0,
        });
        let graphed = Comparison { ours: report(Some(8.0)), reference: reference.clone() }.to_json();
        assert!((graphed["graph_ratio"].as_f64().unwrap() - 13.0 / 8.0).abs() < 1e-12);
        assert!((graphed["train_ratio"].as_f64().unwrap() - 25_600.0 / 19_692.3).abs() < 1e-12);
        // Without --cuda-graph there is no graph ratio, not a NaN.
        let eager = Comparison { ours: report(None), reference }.to_json();
        assert!(eager.get("graph_ratio").is_none());
    }
}
