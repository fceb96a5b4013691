//! The `simclr` command: parses arguments, calls one library function, and
//! reports the result or the error chain once.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use simclr::config::{DataFormat, DeviceChoice, Preset, RunConfig};
use simclr::model::{Arch, Stem};
use simclr::tch::Device;

#[derive(Parser)]
#[command(
    name = "simclr",
    version,
    args_override_self = true,
    about = "Contrastive self-supervised learning of visual representations (SimCLR)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain an encoder with SimCLR on a folder of images (or the built-in synthetic data).
    Train(TrainArgs),
    /// Write the representation h of every image in a folder to a .npy file.
    Embed(EmbedArgs),
    /// Evaluate an encoder on labelled images: kNN or linear classification on frozen features.
    Eval(EvalArgs),
    /// Draw a run's figures (training curves, embedding by class in PCA and t-SNE, confusion matrix) into its folder.
    Report {
        /// The run folder (holding metrics.jsonl and checkpoint.safetensors).
        run: PathBuf,
    },
    /// Find the images of a folder most similar to query images, by cosine similarity of h.
    Neighbors(NeighborsArgs),
    /// Measure training-step and encoder-forward throughput on this device
    /// (or, with `bench augment`, the augmentation pipeline's).
    Bench(BenchArgs),
    /// Write a PNG of images and pairs of their augmented views, for a run configuration.
    AugmentPreview(PreviewArgs),
    /// Ablation experiments from the paper.
    Ablate {
        #[command(subcommand)]
        kind: AblateKind,
    },
}

#[derive(Subcommand)]
enum EvalProtocol {
    /// Weighted kNN on cosine similarity (k=200, T=0.1 by default).
    Knn {
        #[arg(long, default_value_t = 200)]
        k: usize,
        #[arg(long, default_value_t = 0.1)]
        temperature: f64,
    },
    /// A linear classifier on frozen features (SGD, Nesterov, cosine schedule).
    Linear {
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        #[arg(long, default_value_t = 0.1)]
        learning_rate: f64,
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f64,
    },
    /// Fine-tune the whole encoder and a linear layer on a class-balanced fraction of the labels.
    Finetune {
        /// Fraction of each class's labelled images: 0.01, 0.1, 1.0 in the paper.
        #[arg(long, default_value_t = 0.1)]
        fraction: f64,
        /// Default: the paper's 60 for fractions up to 1%, 30 above.
        #[arg(long)]
        epochs: Option<usize>,
        /// Base rate, scaled by batch/256.
        #[arg(long, default_value_t = 0.05)]
        learning_rate: f64,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// List the labelled images used here, one per line.
        #[arg(long)]
        subset_file: Option<PathBuf>,
        /// How the new linear layer starts: `random` (the paper) or
        /// `linear-probe` (fitted first on the frozen features of the subset).
        #[arg(long, default_value = "random")]
        head_init: simclr::eval::finetune::HeadInit,
    },
}

#[derive(Args)]
struct EvalArgs {
    #[command(subcommand)]
    protocol: EvalProtocol,
    #[command(flatten)]
    common: EvalCommon,
}

#[derive(Args)]
struct EvalCommon {
    /// torchvision-named safetensors.
    #[arg(long, global = true, conflicts_with_all = ["checkpoint", "random_init"])]
    weights: Option<PathBuf>,
    /// A run's checkpoint; architecture, image size and normalisation come from its config.
    #[arg(long, global = true, conflicts_with = "random_init")]
    checkpoint: Option<PathBuf>,
    /// Evaluate an untrained encoder (the baseline), drawn with --seed.
    #[arg(long, global = true)]
    random_init: bool,
    #[arg(long, global = true, default_value = "resnet50")]
    arch: String,
    #[arg(long, global = true, default_value_t = 1.0)]
    width: f64,
    #[arg(long, global = true, default_value = "imagenet")]
    stem: String,
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// Labelled training images (ImageFolder or CIFAR batches).
    #[arg(long, global = true)]
    train: Option<PathBuf>,
    /// Labelled test images.
    #[arg(long, global = true)]
    test: Option<PathBuf>,
    /// Use at most this many images of each split.
    #[arg(long, global = true)]
    limit: Option<usize>,
    #[arg(long, global = true)]
    image_size: Option<u32>,
    #[arg(long, global = true, default_value_t = 0)]
    seed: u64,
    /// Also write the result as JSON here.
    #[arg(long, global = true)]
    output: Option<PathBuf>,
}

/// Where a run configuration starts: a preset, a file over it, overrides over both.
#[derive(Args)]
struct ConfigArgs {
    /// A TOML run configuration (see configs/); its fields override the preset's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Starting point: demo, cifar10 or imagenet. Without --config, --preset
    /// and --data, the demo preset is used.
    #[arg(long)]
    preset: Option<String>,
    /// Any field as section.field=value, e.g. --set loss.temperature=0.5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    base: ConfigArgs,
    /// Training images: an ImageFolder, a flat folder or CIFAR binary batches.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder for checkpoints, metrics and the exported encoder.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// auto, cpu or cuda.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Continue the run in --output from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct PreviewArgs {
    #[command(flatten)]
    base: ConfigArgs,
    /// Images to preview: an ImageFolder, a flat folder or CIFAR binary batches.
    #[arg(long)]
    data: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    output: PathBuf,
    /// How many images (drawn with --seed), one row each.
    #[arg(long, default_value_t = 8)]
    images: usize,
    /// Pairs of views per image.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Enlargement of each view; by default views are shown about 96 px wide.
    #[arg(long)]
    scale: Option<u32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or tensor: which implementation renders the views.
    #[arg(long, default_value = "cpu")]
    renderer: String,
    /// Also write every view's drawn parameters here, one JSON object per line.
    #[arg(long)]
    params: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AblateKind {
    /// The paper's Figure 5: train once per pair of ops applied to one view, score by kNN, draw the heatmap.
    Augment(AblateAugmentArgs),
}

#[derive(Args)]
struct AblateAugmentArgs {
    /// The base run (its --output is the folder of the whole ablation).
    #[command(flatten)]
    run: RunArgs,
    /// Comma-separated ops (names as in [[augment.ops]]).
    #[arg(long, default_value = "random-resized-crop,cutout,color-jitter,sobel,gaussian-blur,rotation")]
    ops: String,
}

#[derive(Args)]
struct EncoderArgs {
    /// resnet18, resnet34, resnet50, resnet101 or resnet152.
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// Width multiplier of the encoder.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// imagenet or cifar.
    #[arg(long, default_value = "imagenet")]
    stem: String,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    spec: EncoderSpecArgs,
    /// Folder of images (searched recursively).
    #[arg(long)]
    input: PathBuf,
    /// Where the [images, features] float32 matrix goes; paths go beside it (.paths.txt).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct NeighborsArgs {
    #[command(flatten)]
    spec: EncoderSpecArgs,
    /// Folder of images to search (recursively).
    #[arg(long)]
    index: PathBuf,
    /// A query image, or a folder of them.
    #[arg(long)]
    query: PathBuf,
    /// Neighbours per query.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// exact, hnsw, or auto (exact up to 50,000 images).
    #[arg(long, default_value = "auto")]
    index_kind: String,
    /// Write a PNG gallery here: one row per query, its neighbours beside it.
    #[arg(long)]
    gallery: Option<PathBuf>,
    #[arg(long, default_value_t = 96)]
    thumbnail: u32,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    encoder: EncoderArgs,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Width of the projection head's hidden layer (default: the size of h).
    #[arg(long)]
    hidden_dim: Option<usize>,
    /// Use fp32 throughout, even on CUDA.
    #[arg(long)]
    no_mixed_precision: bool,
    /// The training step's update: lars, sgd or adamw.
    #[arg(long, default_value = "lars")]
    optimizer: String,
    /// Also time the training step captured as a CUDA graph and replayed,
    /// through this library (tools/cuda_graph.cpp, which `tools/device-bench.sh
    /// prepare` builds): the step without launch overhead. CUDA only.
    #[arg(long, value_name = "LIBRARY")]
    cuda_graph: Option<PathBuf>,
    /// Also run this PyTorch reference script (tools/bench_pytorch.py) with
    /// the same model and settings, and print both with their ratio.
    #[arg(long, value_name = "SCRIPT")]
    compare: Option<PathBuf>,
    /// The Python that runs --compare's script.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the PyTorch reference with `args`' settings and prints both reports with their ratios.
fn compare_with_pytorch(
    args: &BenchArgs,
    ours: &simclr::bench::BenchReport,
    script: &std::path::Path,
    device: Device,
) -> Result<()> {
    let mut command = std::process::Command::new(&args.python);
    command.arg(script).args([
        "--arch",
        &args.encoder.arch,
        "--width",
        &args.encoder.width.to_string(),
        "--stem",
        &args.encoder.stem,
        "--batch-size",
        &args.batch_size.to_string(),
        "--image-size",
        &args.image_size.to_string(),
        "--steps",
        &args.steps.to_string(),
        "--warmup",
        &args.warmup.to_string(),
        "--device",
        if device.is_cuda() { "cuda" } else { "cpu" },
        "--threads",
        &simclr::tch::get_num_threads().to_string(),
        "--optimizer",
        ours.optimizer,
    ]);
    if let Some(hidden) = args.hidden_dim {
        command.args(["--hidden-dim", &hidden.to_string()]);
    }
    // The reference runs in simclr's memory format, channels-last, on every
    // device (--bf16 implies it).
    if device.is_cuda() && !args.no_mixed_precision {
        command.arg("--bf16");
    } else {
        command.arg("--channels-last");
    }
    let output = command.output().with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !output.status.success() {
        anyhow::bail!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&output.stderr));
    }
    let reference: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{} printed no JSON report", script.display()))?;
    let number = |key: &str| reference[key].as_f64().with_context(|| format!("the reference report lacks {key}"));
    let (train, forward) = (number("train_images_per_second")?, number("forward_images_per_second")?);
    let name = reference["implementation"].as_str().unwrap_or("pytorch");
    if args.json {
        let both = serde_json::json!({
            "simclr": ours, "reference": reference,
            "train_ratio": ours.train_images_per_second / train,
            "forward_ratio": ours.forward_images_per_second / forward,
        });
        println!("{both}");
        return Ok(());
    }
    println!(
        "{} on {}, batch {} at {}px, {}, {} timed steps:",
        ours.arch, ours.device, ours.batch_size, ours.image_size, ours.optimizer, ours.steps
    );
    for (what, mine, theirs) in [
        ("training images/s", ours.train_images_per_second, train),
        ("encoder forward images/s", ours.forward_images_per_second, forward),
    ] {
        println!("  {what:26} simclr {mine:10.1}   {name} {theirs:10.1}   ratio {:.2}x", mine / theirs);
    }
    if let Some(graph) = ours.graph_ms_per_step {
        let step = number("train_ms_per_step")?;
        println!(
            "  {:26} simclr {graph:4.1} ms   {name} eager {step:4.1} ms   ratio {:.2}x",
            "step as a CUDA graph",
            step / graph
        );
    }
    if device.is_cuda() {
        // Which side of the step bounds it: see BenchReport::train_issue_ms.
        let issue = number("train_issue_ms")?;
        let step = number("train_ms_per_step")?;
        println!(
            "  {:26} simclr {:4.1} of {:4.1} ms   {name} {issue:4.1} of {step:4.1} ms",
            "host time to issue a step", ours.train_issue_ms, ours.train_ms_per_step
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Views per second of an augmentation pipeline on decoded images (decoding not timed).
    Augment(BenchAugmentArgs),
}

#[derive(Args)]
struct BenchAugmentArgs {
    /// Images to augment (an ImageFolder, a flat folder or CIFAR batches).
    #[arg(long)]
    data: PathBuf,
    /// simclr-imagenet or simclr-cifar.
    #[arg(long, default_value = "simclr-imagenet")]
    pipeline: String,
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Use at most this many images.
    #[arg(long, default_value_t = 256)]
    limit: usize,
    /// CPU threads (rayon workers, and libtorch's for the tensor path).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long)]
    json: bool,
}

fn bench_augment(args: BenchAugmentArgs) -> Result<()> {
    use simclr::augment::{AugmentConfig, AugmentPreset, Pipeline};
    let preset: AugmentPreset = args.pipeline.parse()?;
    let config = AugmentConfig { preset, ..Default::default() };
    if args.threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    let images =
        simclr::data::Dataset::open(&args.data, &DataFormat::Auto)?.subset(Some(args.limit), 0).decode_all()?;
    simclr::tch::set_num_threads(args.threads as i32);
    let options = simclr::bench::AugmentBenchOptions {
        pipeline: Pipeline::new(&config, args.image_size),
        threads: args.threads,
        rounds: args.rounds,
        mean: simclr::config::IMAGENET_MEAN,
        std: simclr::config::IMAGENET_STD,
    };
    let report = simclr::bench::bench_augment(&images, &options)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} at {}x{} on {} images, {} thread(s): CPU path {:.1} views/s{}",
            args.pipeline,
            report.image_size,
            report.image_size,
            report.images,
            report.threads,
            report.cpu_views_per_second,
            report.tensor_views_per_second.map(|v| format!(", tensor path (CPU) {v:.1} views/s")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Three comma-separated numbers, as `0.485,0.456,0.406`.
fn parse_triple(text: &str) -> std::result::Result<[f32; 3], String> {
    let values: Vec<f32> = text
        .split(',')
        .map(|v| v.trim().parse::<f32>().map_err(|e| format!("'{v}': {e}")))
        .collect::<std::result::Result<_, _>>()?;
    <[f32; 3]>::try_from(values).map_err(|v| format!("expected three comma-separated numbers, got {}", v.len()))
}

fn parse_device(name: &str) -> Result<DeviceChoice> {
    match name {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda),
        other => anyhow::bail!("unknown device '{other}': expected auto, cpu or cuda"),
    }
}

fn encoder_device(args: &EncoderArgs) -> Result<(Arch, Stem, Device)> {
    let arch: Arch = args.arch.parse()?;
    let stem: Stem = args.stem.parse()?;
    if !(simclr::config::is_positive_finite(args.width) && args.width <= 16.0) {
        anyhow::bail!("--width {}: must be in (0, 16]", args.width);
    }
    let device = simclr::device::select(parse_device(&args.device)?)?;
    Ok((arch, stem, device))
}

/// The preset (the demo one when nothing else is named) with the file laid over it.
fn base_config(args: &ConfigArgs, has_data: bool) -> Result<RunConfig> {
    let preset = match (&args.preset, &args.config, has_data) {
        (Some(name), _, _) => Some(name.parse::<Preset>()?),
        (None, None, false) => {
            tracing::info!("no --data, --config or --preset: using the demo preset on the synthetic dataset");
            Some(Preset::Demo)
        }
        _ => None,
    };
    let config = preset.map(RunConfig::preset).unwrap_or_default();
    Ok(match &args.config {
        Some(path) => config.with_file(path)?,
        None => config,
    })
}

/// The run configuration: the checkpoint's (when resuming), else the preset
/// with the file laid over it; then flags, then --set overrides; validated once.
fn resolve_config(args: &RunArgs, resume: bool) -> Result<simclr::config::ValidConfig> {
    let mut config = if resume {
        let dir = args.output.clone().context("--resume needs --output, the run folder to continue")?;
        let path = dir.join(simclr::train::checkpoint::FILE_NAME);
        simclr::train::checkpoint::Checkpoint::read_latest(&path)?.config
    } else {
        base_config(&args.base, args.data.is_some())?
    };
    let mut flags = args.base.overrides.clone();
    let quoted = |p: &PathBuf| format!("{:?}", p.display().to_string());
    if let Some(data) = &args.data {
        flags.insert(0, format!("data.path={}", quoted(data)));
    }
    if let Some(output) = &args.output {
        flags.insert(0, format!("train.output_dir={}", quoted(output)));
    }
    for (key, value) in [
        ("train.epochs", args.epochs.map(|v| v.to_string())),
        ("train.batch_size", args.batch_size.map(|v| v.to_string())),
        ("train.seed", args.seed.map(|v| v.to_string())),
    ] {
        if let Some(value) = value {
            flags.insert(0, format!("{key}={value}"));
        }
    }
    if let Some(device) = &args.device {
        parse_device(device)?;
        flags.insert(0, format!("train.device=\"{device}\""));
    }
    config = config.with_overrides(&flags)?;
    Ok(config.validate()?)
}

/// A run stopped by a signal; it exits with 130 after saying how to resume.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Step numbers from a test hook's variable, comma-separated (tests only).
fn test_hook(name: &str) -> Result<Vec<usize>> {
    let Ok(value) = std::env::var(name) else { return Ok(Vec::new()) };
    value.split(',').map(|v| v.trim().parse().with_context(|| format!("{name}={value}"))).collect()
}

fn train(args: TrainArgs) -> Result<()> {
    let config = resolve_config(&args.run, args.resume)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    // SIGINT and SIGTERM ask the run to finish its step and checkpoint.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing the signal handler")?;
    }
    let options = simclr::train::TrainOptions {
        resume: args.resume,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        stop: Some(stop),
        stop_after_steps: test_hook("SIMCLR_TEST_STOP_AFTER_STEPS")?.into_iter().next(),
        poison_steps: test_hook("SIMCLR_TEST_POISON_STEPS")?,
    };
    let output_dir = config.train.output_dir.clone();
    let report = simclr::train::train(config, options)?;
    if let Some(position) = report.interrupted_at {
        eprintln!(
            "interrupted after step {} (epoch {}, batch {}); checkpoint written to {}\ncontinue with: simclr train --resume --output {}",
            position.step,
            position.epoch + 1,
            position.batch,
            report.checkpoint_path.display(),
            output_dir.display()
        );
        return Err(Interrupted.into());
    }
    if let Some(last) = report.epochs.last() {
        println!("trained {} epochs on {:?}: final loss {:.4}", last.epoch, report.device, last.loss);
    }
    match (report.initial_knn_top1, report.final_knn_top1()) {
        (Some(before), Some(after)) => {
            println!("kNN top-1: {:.2}% at random init -> {:.2}% after training", 100.0 * before, 100.0 * after)
        }
        (None, Some(after)) => println!("kNN top-1: {:.2}%", 100.0 * after),
        _ => {}
    }
    if !report.skipped_images.is_empty() {
        println!("skipped {} unreadable images:", report.skipped_images.len());
        for skipped in &report.skipped_images {
            println!("  {skipped}");
        }
    }
    if report.skipped_steps > 0 {
        println!("skipped {} steps with a non-finite loss or gradient", report.skipped_steps);
    }
    if let Some(encoder) = &report.encoder_path {
        println!("encoder: {}", encoder.display());
    }
    println!("checkpoint: {}", report.checkpoint_path.display());
    Ok(())
}

/// The encoder and image preparation that `embed` and `neighbors` share.
#[derive(Args)]
struct EncoderSpecArgs {
    /// torchvision-named safetensors (e.g. a run's encoder.safetensors).
    #[arg(long)]
    weights: PathBuf,
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Images are resized (shorter side) and centre-cropped to this size.
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Normalisation mean per channel, as R,G,B (ImageNet's by default).
    #[arg(long, value_parser = parse_triple)]
    mean: Option<[f32; 3]>,
    /// Normalisation standard deviation per channel, as R,G,B.
    #[arg(long, value_parser = parse_triple)]
    std: Option<[f32; 3]>,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
}

impl EncoderSpecArgs {
    fn spec(self) -> Result<simclr::embed::EncoderSpec> {
        let (arch, stem, device) = encoder_device(&self.encoder)?;
        let mut spec = simclr::embed::EncoderSpec::new(self.weights);
        (spec.arch, spec.stem, spec.device, spec.width_multiplier) = (arch, stem, device, self.encoder.width);
        (spec.image_size, spec.batch_size) = (self.image_size, self.batch_size);
        if let Some(mean) = self.mean {
            spec.mean = mean;
        }
        if let Some(std) = self.std {
            if !std.iter().all(|s| simclr::config::is_positive_finite(f64::from(*s))) {
                anyhow::bail!("--std {std:?}: every entry must be > 0");
            }
            spec.std = std;
        }
        Ok(spec)
    }
}

fn embed(args: EmbedArgs) -> Result<()> {
    let options = simclr::embed::EmbedOptions { encoder: args.spec.spec()?, input: args.input, output: args.output };
    let report = simclr::embed::embed(&options)?;
    println!(
        "embedded {} images ({} features each) into {}; paths in {}; {:.1} s, {:.1} images/s",
        report.images,
        report.feature_dim,
        report.features_path.display(),
        report.paths_path.display(),
        report.embed_seconds,
        report.images as f64 / report.embed_seconds.max(1e-9),
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use simclr::eval::{EncoderSource, EvalOptions, FinetuneConfig, KnnConfig, LinearConfig, Protocol};
    let common = args.common;
    let (train, test) = match (common.train, common.test) {
        (Some(train), Some(test)) => (train, test),
        _ => anyhow::bail!("eval needs --train and --test, two labelled image folders"),
    };
    let device = simclr::device::select(parse_device(&common.device)?)?;
    let mut options = match (&common.weights, &common.checkpoint, common.random_init) {
        (Some(weights), None, false) => EvalOptions::new(EncoderSource::Weights(weights.clone()), train, test),
        (None, Some(checkpoint), false) => {
            let run = simclr::train::checkpoint::Checkpoint::read(checkpoint)?.config;
            let mut options = EvalOptions::new(EncoderSource::Weights(checkpoint.clone()), train, test);
            (options.arch, options.width_multiplier, options.stem) =
                (run.model.arch, run.model.width_multiplier, run.model.stem);
            (options.image_size, options.mean, options.std) = (run.data.image_size, run.data.mean, run.data.std);
            options
        }
        (None, None, true) => EvalOptions::new(EncoderSource::RandomInit(common.seed), train, test),
        _ => anyhow::bail!("give one of --weights, --checkpoint or --random-init"),
    };
    if common.checkpoint.is_none() {
        let (arch, stem, _) = encoder_device(&EncoderArgs {
            arch: common.arch,
            width: common.width,
            stem: common.stem,
            device: common.device,
        })?;
        (options.arch, options.stem, options.width_multiplier) = (arch, stem, common.width);
    }
    if let Some(size) = common.image_size {
        options.image_size = size;
    }
    options.limit = common.limit;
    options.device = device;
    options.seed = common.seed;
    let protocol = match args.protocol {
        EvalProtocol::Knn { k, temperature } => {
            if k == 0 || !simclr::config::is_positive_finite(temperature) {
                anyhow::bail!("knn needs --k >= 1 and --temperature > 0, got {k} and {temperature}");
            }
            Protocol::Knn(KnnConfig { k, temperature })
        }
        EvalProtocol::Linear { epochs, learning_rate, weight_decay } => Protocol::Linear(LinearConfig {
            epochs,
            learning_rate,
            weight_decay,
            seed: common.seed,
            ..Default::default()
        }),
        EvalProtocol::Finetune { fraction, epochs, learning_rate, batch_size, subset_file, head_init } => {
            Protocol::Finetune(FinetuneConfig {
                fraction,
                epochs: epochs.unwrap_or_else(|| FinetuneConfig::paper_epochs(fraction)),
                learning_rate,
                batch_size,
                subset_file,
                head_init,
                seed: common.seed,
                ..Default::default()
            })
        }
    };
    let report = simclr::eval::evaluate(&options, &protocol)?;
    println!(
        "{} | {} | {} labelled of {} train / {} test images, {} classes | top-1 {:.2}% | top-5 {:.2}%",
        report.protocol,
        report.encoder,
        report.labelled_images,
        report.train_images,
        report.test_images,
        report.classes,
        100.0 * report.top1,
        100.0 * report.top5
    );
    if let Some(path) = common.output {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn report(run: &std::path::Path) -> Result<()> {
    for path in simclr::report::write_report(run)? {
        println!("{}", path.display());
    }
    Ok(())
}

fn neighbors(args: NeighborsArgs) -> Result<()> {
    if args.thumbnail < 8 {
        anyhow::bail!("--thumbnail {}: must be at least 8 pixels", args.thumbnail);
    }
    let options = simclr::retrieval::NeighborsOptions {
        encoder: args.spec.spec()?,
        index: args.index,
        queries: args.query,
        k: args.k,
        kind: args.index_kind.parse()?,
        gallery: args.gallery,
        thumbnail: args.thumbnail,
    };
    let report = simclr::retrieval::neighbors(&options)?;
    println!("query\trank\tsimilarity\tpath");
    for (query, hits) in report.queries.iter().zip(&report.hits) {
        for (rank, hit) in hits.iter().enumerate() {
            println!("{}\t{}\t{:.4}\t{}", query.display(), rank + 1, hit.similarity, report.items[hit.index].display());
        }
    }
    if let Some(gallery) = &options.gallery {
        eprintln!("gallery: {}", gallery.display());
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if let Some(BenchWhat::Augment(augment)) = args.what {
        return bench_augment(augment);
    }
    let (arch, stem, device) = encoder_device(&args.encoder)?;
    let mut model =
        simclr::model::ModelConfig { arch, stem, width_multiplier: args.encoder.width, ..Default::default() };
    model.head.hidden_dim = args.hidden_dim;
    let options = simclr::bench::BenchOptions {
        model,
        batch_size: args.batch_size,
        image_size: args.image_size,
        steps: args.steps,
        warmup_steps: args.warmup,
        device,
        mixed_precision: !args.no_mixed_precision,
        optimizer: args.optimizer.parse()?,
        cuda_graph: args.cuda_graph.clone(),
    };
    let report = simclr::bench::bench(&options)?;
    if let Some(script) = &args.compare {
        return compare_with_pytorch(&args, &report, script, device);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} ({}x, {:?} stem) on {}, batch {} at {}x{}, {} timed steps:",
            report.arch,
            args.encoder.width,
            stem,
            report.device,
            report.batch_size,
            report.image_size,
            report.image_size,
            report.steps
        );
        println!(
            "  training ({}): {:.1} images/s ({:.1} ms/step, {:.1} ms of it to issue)",
            report.optimizer, report.train_images_per_second, report.train_ms_per_step, report.train_issue_ms
        );
        if let Some(graph) = report.graph_ms_per_step {
            println!("  training step as a CUDA graph: {graph:.1} ms/step");
        }
        println!("  encoder forward: {:.1} images/s", report.forward_images_per_second);
    }
    Ok(())
}

fn augment_preview(args: PreviewArgs) -> Result<()> {
    use simclr::augment::preview::{preview, Renderer};
    let config = base_config(&args.base, true)?.with_overrides(&args.base.overrides)?.validate()?;
    let renderer = match args.renderer.as_str() {
        "cpu" => Renderer::Cpu,
        "tensor" => Renderer::Tensor,
        other => anyhow::bail!("unknown --renderer '{other}': expected cpu or tensor"),
    };
    if args.images == 0 || args.pairs == 0 {
        anyhow::bail!("--images and --pairs must be at least 1");
    }
    let images = simclr::data::Dataset::open(&args.data, &DataFormat::Auto)?
        .subset(Some(args.images), args.seed)
        .decode_all()?;
    let size = config.data.image_size;
    let pipeline = simclr::augment::Pipeline::new(&config.augment, size);
    let scale = args.scale.unwrap_or((96 / size).max(1));
    let (sheet, log) = preview(&images, &pipeline, args.seed, args.pairs, scale, renderer);
    simclr::io::write_png(&args.output, &sheet)?;
    for (view, ops) in pipeline_ops(&pipeline).iter().enumerate() {
        eprintln!("view {}: {}", view + 1, ops);
    }
    println!("preview: {}", args.output.display());
    if let Some(path) = &args.params {
        let lines: String =
            log.iter().map(|entry| serde_json::to_string(entry).map(|line| line + "\n")).collect::<Result<_, _>>()?;
        simclr::io::write_atomic(path, lines.as_bytes())?;
        println!("parameters: {}", path.display());
    }
    Ok(())
}

/// Each view's op names, as "a -> b -> c".
fn pipeline_ops(pipeline: &simclr::augment::Pipeline) -> [String; 2] {
    let names = |view| {
        let ops: Vec<&str> = pipeline.ops(view).iter().map(|op| op.name()).collect();
        if ops.is_empty() {
            "resize only".to_owned()
        } else {
            ops.join(" -> ")
        }
    };
    [names(0), names(1)]
}

fn ablate(kind: AblateKind) -> Result<()> {
    let AblateKind::Augment(args) = kind;
    let base = resolve_config(&args.run, false)?;
    let ops = args
        .ops
        .split(',')
        .map(|name| {
            simclr::augment::OpConfig::from_name(name.trim()).with_context(|| {
                let known: Vec<&str> = simclr::augment::OpConfig::all().iter().map(|op| op.name()).collect();
                format!("unknown op '{}' in --ops: expected one of {}", name.trim(), known.join(", "))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let output_dir = base.train.output_dir.clone();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = simclr::ablation::augment_pairs(&base, &ops, &output_dir, progress)?;
    print!("{:>22}", "1st \\ 2nd");
    for name in &result.names {
        print!(" {name:>20}");
    }
    println!();
    for (name, row) in result.names.iter().zip(&result.top1) {
        print!("{name:>22}");
        for score in row {
            print!(" {:>19.2}%", 100.0 * score);
        }
        println!();
    }
    println!("table: {}\nheatmap: {}", result.csv_path.display(), result.png_path.display());
    Ok(())
}

/// Tunes glibc's malloc, which serves libtorch's CPU tensors, to keep freed
/// memory for reuse. By default it unmaps blocks over its (dynamic, at most
/// 32 MiB) mmap threshold and trims the heap top beyond twice that, so
/// every training step faults in and zeroes again the activations and
/// gradients the step before freed. Measured on ResNet-18 at batch 64 on
/// 2 cores (`/usr/bin/time simclr bench ... --device cpu`): 2.0-2.6M page
/// faults and 4-5 s of system time per run; with these settings 0.7-0.9M
/// and 1.5-2 s, peak memory 8-14% higher. A process-wide choice, so the binary makes
/// it, not the library; a user's own `GLIBC_TUNABLES` or `MALLOC_*_`
/// settings win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|name| std::env::var_os(name).is_some());
        if !user_set {
            // SAFETY: mallopt only sets allocator parameters; it is called
            // before any other thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // An allocation failure inside a training step surfaces as a panic in
    // tch; the library turns it into an error naming the batch size, so
    // the panic message itself is not printed.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        if !message.is_some_and(simclr::device::is_out_of_memory) {
            default_hook(info);
        }
    }));
    if let Ok(pause) = std::env::var("SIMCLR_TEST_WRITE_PAUSE_MS") {
        simclr::io::set_write_pause_for_tests(pause.parse().unwrap_or(0));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Embed(args) => embed(args),
        Command::Eval(args) => eval(args),
        Command::Neighbors(args) => neighbors(args),
        Command::Report { run } => report(&run),
        Command::Bench(args) => bench(args),
        Command::AugmentPreview(args) => augment_preview(args),
        Command::Ablate { kind } => ablate(kind),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<Interrupted>() => ExitCode::from(130),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
