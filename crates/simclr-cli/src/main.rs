//! The `simclr` command: parses arguments, calls one library function, and
//! reports the result or the error chain once. Parsing of values (`FromStr`
//! in the library), config layering and every check live in the library.
mod observer;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use simclr::augment::preview::{PreviewOptions, Renderer};
use simclr::augment::{AugmentPreset, OpConfig};
use simclr::config::{Preset, RunLayers};
use simclr::data::config::DataFormat;
use simclr::data::Dataset;
use simclr::device::DeviceChoice;
use simclr::eval::finetune::HeadInit;
use simclr::eval::{EncoderSource, EvalOptions, FinetuneConfig, KnnConfig, LinearConfig, Protocol};
use simclr::model::{Arch, EncoderSpec, SpecOverrides, Stem};
use simclr::normalization::{parse_triple, IMAGENET_MEAN, IMAGENET_STD};
use simclr::optim::OptimizerKind;
use simclr::retrieval::IndexKind;
use simclr::train::checkpoint;

#[derive(Parser)]
#[command(name = "simclr", version, args_override_self = true)]
#[command(about = "Contrastive self-supervised learning of visual representations (SimCLR)")]
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
    /// Evaluate an encoder on labelled images: kNN, linear, or fine-tuning on a fraction of the labels.
    Eval {
        #[command(subcommand)]
        protocol: EvalProtocol,
    },
    /// Draw a run's figures (training curves, embedding by class in PCA and t-SNE, confusion matrix) into its folder.
    Report {
        /// The run folder (holding metrics.jsonl and checkpoint.safetensors).
        run: PathBuf,
    },
    /// Find the images of a folder most similar to query images, by cosine similarity of h.
    Neighbors(NeighborsArgs),
    /// Measure training-step and encoder-forward throughput (or, with `bench augment`, the augmentation's).
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
enum AblateKind {
    /// The paper's Figure 5: train once per pair of ops applied to one view, score by kNN, draw the heatmap.
    Augment(AblateArgs),
}

/// Where a run configuration starts: a preset, a file over it, flags and overrides over both.
#[derive(Args)]
struct ConfigArgs {
    /// A TOML run configuration (see configs/); its fields override the preset's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Starting point: demo, cifar10 or imagenet. Without --config, --preset and --data, the demo preset.
    #[arg(long)]
    preset: Option<Preset>,
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
    device: Option<DeviceChoice>,
}

impl ConfigArgs {
    fn layers(&self, data: Option<PathBuf>) -> RunLayers {
        let (preset, file, overrides) = (self.preset, self.config.clone(), self.overrides.clone());
        RunLayers { preset, file, data, overrides, ..Default::default() }
    }
}

impl RunArgs {
    fn layers(&self) -> RunLayers {
        let (output, epochs, batch_size, seed, device) =
            (self.output.clone(), self.epochs, self.batch_size, self.seed, self.device);
        RunLayers { output, epochs, batch_size, seed, device, ..self.base.layers(self.data.clone()) }
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Continue the run in --output from its checkpoint.
    #[arg(long, requires = "output")]
    resume: bool,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    print_config: bool,
}

/// The encoder file and how to use it; a run's encoder.safetensors records
/// all of it, and these flags override what it records.
#[derive(Args)]
struct EncoderArgs {
    /// torchvision-named safetensors (e.g. a run's encoder.safetensors).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// resnet18, resnet34, resnet50, resnet101 or resnet152 (default: the file's, else resnet50).
    #[arg(long)]
    arch: Option<Arch>,
    /// Width multiplier (default: the file's, else 1).
    #[arg(long)]
    width: Option<f64>,
    /// imagenet or cifar (default: the file's, else imagenet).
    #[arg(long)]
    stem: Option<Stem>,
    /// Images are resized (shorter side) and centre-cropped to this size (default: the file's, else 224).
    #[arg(long)]
    image_size: Option<u32>,
    /// Normalisation mean per channel, as R,G,B (default: the file's, else ImageNet's).
    #[arg(long, value_parser = parse_triple)]
    mean: Option<[f32; 3]>,
    /// Normalisation standard deviation per channel, as R,G,B.
    #[arg(long, value_parser = parse_triple)]
    std: Option<[f32; 3]>,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

impl EncoderArgs {
    fn overrides(&self) -> SpecOverrides {
        SpecOverrides {
            arch: self.arch,
            width_multiplier: self.width,
            stem: self.stem,
            image_size: self.image_size,
            mean: self.mean,
            std: self.std,
        }
    }

    fn options(&self, batch_size: usize) -> Result<simclr::embed::EncoderOptions> {
        let weights = self.weights.clone().context("give the encoder with --weights")?;
        let device = simclr::device::select(self.device)?;
        Ok(simclr::embed::EncoderOptions::new(weights, &self.overrides(), batch_size, device)?)
    }
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Folder of images (searched recursively).
    #[arg(long)]
    input: PathBuf,
    /// Where the [images, features] float32 matrix goes; paths go beside it (.paths.txt).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    /// A run's checkpoint, instead of --weights.
    #[arg(long, conflicts_with_all = ["weights", "random_init"])]
    checkpoint: Option<PathBuf>,
    /// Evaluate an untrained encoder (the baseline), drawn with --seed.
    #[arg(long, conflicts_with = "weights")]
    random_init: bool,
    /// Labelled training images (ImageFolder or CIFAR batches).
    #[arg(long)]
    train: PathBuf,
    /// Labelled test images.
    #[arg(long)]
    test: PathBuf,
    /// Use at most this many images of each split.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EvalProtocol {
    /// Weighted kNN on cosine similarity (k=200, T=0.1 by default).
    Knn {
        #[arg(long, default_value_t = 200)]
        k: usize,
        #[arg(long, default_value_t = 0.1)]
        temperature: f64,
        #[command(flatten)]
        common: EvalArgs,
    },
    /// A linear classifier on frozen features (SGD, Nesterov, cosine schedule).
    Linear {
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        #[arg(long, default_value_t = 0.1)]
        learning_rate: f64,
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f64,
        #[command(flatten)]
        common: EvalArgs,
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
        /// `random` (the paper) or `linear-probe` (fitted first on the frozen features of the subset).
        #[arg(long, default_value = "random")]
        head_init: HeadInit,
        #[command(flatten)]
        common: EvalArgs,
    },
}

#[derive(Args)]
struct NeighborsArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
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
    index_kind: IndexKind,
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
    #[arg(long, default_value = "resnet50")]
    arch: Arch,
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    #[arg(long, default_value = "imagenet")]
    stem: Stem,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
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
    optimizer: OptimizerKind,
    /// Also time the step captured as a CUDA graph and replayed, through this
    /// library (crates/simclr/cuda_graph.cpp, built by `tools/device/device-bench.sh prepare`). CUDA only.
    #[arg(long, value_name = "LIBRARY")]
    cuda_graph: Option<PathBuf>,
    /// Also run this PyTorch reference (tools/reference/bench_pytorch.py) with the same settings.
    #[arg(long, value_name = "SCRIPT")]
    compare: Option<PathBuf>,
    /// The Python that runs --compare's script.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Views per second of an augmentation pipeline on decoded images (decoding not timed).
    Augment {
        /// Images to augment (an ImageFolder, a flat folder or CIFAR batches).
        #[arg(long)]
        data: PathBuf,
        /// simclr-imagenet or simclr-cifar.
        #[arg(long, default_value = "simclr-imagenet")]
        pipeline: AugmentPreset,
        #[arg(long, default_value_t = 224)]
        image_size: u32,
        /// Use at most this many images.
        #[arg(long, default_value_t = 256)]
        limit: usize,
        /// CPU threads (rayon workers, and libtorch's for the device path).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
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
    /// cpu or device: which path renders the views (the device path on CPU tensors).
    #[arg(long, default_value = "cpu")]
    renderer: Renderer,
    /// Also write every view's drawn parameters here, one JSON object per line.
    #[arg(long)]
    params: Option<PathBuf>,
}

#[derive(Args)]
struct AblateArgs {
    /// The base run (its --output is the folder of the whole ablation).
    #[command(flatten)]
    run: RunArgs,
    /// Comma-separated ops (names as in [[augment.ops]]).
    #[arg(long, default_value = "random-resized-crop,cutout,color-jitter,sobel,gaussian-blur,rotation")]
    ops: String,
}

fn train(args: TrainArgs) -> Result<()> {
    let layers = args.run.layers();
    let base = match (&args.run.output, args.resume) {
        (Some(run), true) => checkpoint::saved_config(run)?,
        _ => layers.base()?,
    };
    let config = layers.resolve(base)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let report = simclr::train::train(config, args.resume, &mut observer::console()?)?;
    if let Some(position) = report.interrupted_at {
        eprint!("{report}");
        return Err(simclr::Error::Interrupted(format!("step {}", position.step)).into());
    }
    print!("{report}");
    Ok(())
}

fn embed(args: EmbedArgs) -> Result<()> {
    let options = simclr::embed::EmbedOptions {
        encoder: args.encoder.options(args.batch_size)?,
        input: args.input,
        output: args.output,
    };
    println!("{}", simclr::embed::embed(&options)?);
    Ok(())
}

fn eval(protocol: EvalProtocol) -> Result<()> {
    let (EvalProtocol::Knn { common: args, .. }
    | EvalProtocol::Linear { common: args, .. }
    | EvalProtocol::Finetune { common: args, .. }) = &protocol;
    let overrides = args.encoder.overrides();
    let (source, spec) = match (&args.encoder.weights, &args.checkpoint, args.random_init) {
        (Some(weights), None, false) => {
            (EncoderSource::Weights(weights.clone()), simclr::io::torchvision::resolve_spec(weights, &overrides)?)
        }
        (None, Some(checkpoint), false) => {
            (EncoderSource::Weights(checkpoint.clone()), checkpoint::encoder_spec(checkpoint)?.with(&overrides)?)
        }
        (None, None, true) => (EncoderSource::RandomInit(args.seed), EncoderSpec::default().with(&overrides)?),
        _ => anyhow::bail!("give one of --weights, --checkpoint or --random-init"),
    };
    let mut options = EvalOptions::new(source, spec, args.train.clone(), args.test.clone());
    (options.limit, options.seed) = (args.limit, args.seed);
    options.device = simclr::device::select(args.encoder.device)?;
    let (output, seed) = (args.output.clone(), args.seed);
    let protocol = match protocol {
        EvalProtocol::Knn { k, temperature, .. } => Protocol::Knn(KnnConfig { k, temperature }),
        EvalProtocol::Linear { epochs, learning_rate, weight_decay, .. } => {
            Protocol::Linear(LinearConfig { epochs, learning_rate, weight_decay, seed, ..Default::default() })
        }
        EvalProtocol::Finetune { fraction, epochs, learning_rate, batch_size, subset_file, head_init, .. } => {
            let epochs = epochs.unwrap_or_else(|| FinetuneConfig::paper_epochs(fraction));
            let defaults = FinetuneConfig::default();
            let config = FinetuneConfig {
                fraction,
                epochs,
                learning_rate,
                batch_size,
                subset_file,
                head_init,
                seed,
                ..defaults
            };
            Protocol::Finetune(config)
        }
    };
    let report = simclr::eval::evaluate(&options, &protocol)?;
    println!("{report}");
    if let Some(path) = output {
        simclr::io::write_atomic(&path, (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
    }
    Ok(())
}

fn neighbors(args: NeighborsArgs) -> Result<()> {
    let options = simclr::retrieval::NeighborsOptions {
        encoder: args.encoder.options(args.batch_size)?,
        index: args.index,
        queries: args.query,
        k: args.k,
        kind: args.index_kind,
        gallery: args.gallery,
        thumbnail: args.thumbnail,
    };
    print!("{}", simclr::retrieval::neighbors(&options)?);
    if let Some(gallery) = &options.gallery {
        eprintln!("gallery: {}", gallery.display());
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if let Some(BenchWhat::Augment { data, pipeline, image_size, limit, threads, rounds, json }) = args.what {
        let images = Dataset::open(&data, &DataFormat::Auto)?.subset(Some(limit), 0).decode_all()?;
        simclr::tch::set_num_threads(threads as i32);
        let config = simclr::augment::AugmentConfig { preset: pipeline, ..Default::default() };
        let pipeline = simclr::augment::Pipeline::new(&config, image_size);
        let options =
            simclr::bench::AugmentBenchOptions { pipeline, threads, rounds, mean: IMAGENET_MEAN, std: IMAGENET_STD };
        let report = simclr::bench::bench_augment(&images, &options)?;
        match json {
            true => println!("{}", serde_json::to_string(&report)?),
            false => println!("{report}"),
        }
        return Ok(());
    }
    let mut model = simclr::model::ModelConfig { arch: args.arch, stem: args.stem, ..Default::default() };
    model.width_multiplier = args.width;
    model.head.hidden_dim = args.hidden_dim;
    let options = simclr::bench::BenchOptions {
        model,
        batch_size: args.batch_size,
        image_size: args.image_size,
        steps: args.steps,
        warmup_steps: args.warmup,
        device: simclr::device::select(args.device)?,
        mixed_precision: !args.no_mixed_precision,
        optimizer: args.optimizer,
        cuda_graph: args.cuda_graph,
    };
    let report = simclr::bench::bench(&options)?;
    match (&args.compare, args.json) {
        (Some(script), json) => {
            let comparison = simclr::bench::compare_with_pytorch(&options, report, script, &args.python)?;
            match json {
                true => println!("{}", comparison.to_json()),
                false => print!("{comparison}"),
            }
        }
        (None, true) => println!("{}", serde_json::to_string(&report)?),
        (None, false) => print!("{report}"),
    }
    Ok(())
}

fn augment_preview(args: PreviewArgs) -> Result<()> {
    let layers = args.base.layers(Some(args.data.clone()));
    let config = layers.resolve(layers.base()?)?;
    let images = Dataset::open(&args.data, &DataFormat::Auto)?.subset(Some(args.images), args.seed).decode_all()?;
    let pipeline = simclr::augment::Pipeline::new(&config.augment, config.data.image_size);
    let options = PreviewOptions { seed: args.seed, pairs: args.pairs, scale: args.scale, renderer: args.renderer };
    simclr::augment::preview::write_preview(&images, &pipeline, options, &args.output, args.params.as_deref())?;
    (0..2).for_each(|view| eprintln!("view {}: {}", view + 1, pipeline.describe(view)));
    println!("preview: {}", args.output.display());
    if let Some(path) = &args.params {
        println!("parameters: {}", path.display());
    }
    Ok(())
}

fn ablate(kind: AblateKind) -> Result<()> {
    let AblateKind::Augment(args) = kind;
    let layers = args.run.layers();
    let base = layers.resolve(layers.base()?)?;
    let ops = args.ops.split(',').map(|name| name.trim().parse()).collect::<Result<Vec<OpConfig>, _>>()?;
    let output_dir = base.train.output_dir.clone();
    let result = simclr::ablation::augment_pairs(&base, &ops, &output_dir, &mut observer::console()?)?;
    print!("{result}");
    println!("table: {}\nheatmap: {}", result.csv_path.display(), result.png_path.display());
    Ok(())
}

fn main() -> ExitCode {
    observer::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    observer::quiet_out_of_memory_panics();
    #[cfg(feature = "fault-injection")]
    simclr::train::faults::install();
    let result = match Cli::parse().command {
        Command::Train(args) => train(args),
        Command::Embed(args) => embed(args),
        Command::Eval { protocol } => eval(protocol),
        Command::Neighbors(args) => neighbors(args),
        Command::Report { run } => simclr::report::write_report(&run)
            .map(|paths| paths.iter().for_each(|path| println!("{}", path.display())))
            .map_err(Into::into),
        Command::Bench(args) => bench(args),
        Command::AugmentPreview(args) => augment_preview(args),
        Command::Ablate { kind } => ablate(kind),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if matches!(error.downcast_ref(), Some(simclr::Error::Interrupted(_))) => ExitCode::from(130),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
