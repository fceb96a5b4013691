//! The `simclr` command: parses arguments, calls one library function, and
//! reports the result or the error chain once. Parsing of values (`FromStr`
//! in the library), config layering and every check live in the library.
mod observer;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use simclr::ablation::{self, HeadChoice, Study};
use simclr::augment::preview::PreviewOptions;
use simclr::augment::{AutoAugmentPolicy, OpConfig};
use simclr::config::{ConfigLayers, RunLayers, ValidConfig};
use simclr::data::config::{BadImagePolicy, DataFormat};
use simclr::data::Dataset;
use simclr::device::{DeviceChoice, PrecisionChoice};
use simclr::dist::launch::{self, Outcome, World};
use simclr::dist::Backend;
use simclr::embed::EncoderSource;
use simclr::eval::{
    EvalOptions, EvalReport, FinetuneConfig, KnnConfig, LabelSubset, LinearConfig, Protocol, Transformation,
};
use simclr::loss::{Negatives, Objective, Similarity};
use simclr::model::{Arch, EncoderSpec, Layer, SpecOverrides};
use simclr::train::{checkpoint, Observer};

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
    /// Write the representation h of every image in a folder (or shards) to a .npy file.
    Embed(EmbedArgs),
    /// Write an encoder (or, from a run's checkpoint, a layer of its projection head) as a TorchScript module
    /// that torch.jit.load runs with no model code.
    Export(ExportArgs),
    /// Evaluate an encoder on labelled images: kNN, linear, or fine-tuning on a fraction of the labels.
    Eval {
        #[command(subcommand)]
        protocol: EvalProtocol,
    },
    /// Draw a run's figures (training curves, embedding by class in PCA and t-SNE, confusion matrix) into its folder.
    Report {
        /// The run folder (holding metrics.jsonl and checkpoint.safetensors).
        run: PathBuf,
        /// Where the monitor's splits are embedded: auto (CUDA where there is a GPU), cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Find the images of a folder most similar to query images, by cosine similarity of h.
    Neighbors(NeighborsArgs),
    /// Measure training-step and encoder-forward throughput (or, with `bench augment`, the augmentation's).
    Bench(BenchArgs),
    /// Write a PNG of images and pairs of their augmented views, for a run configuration.
    AugmentPreview(PreviewArgs),
    /// Write images (a folder, CIFAR batches) as WebDataset tar shards, for `--data` to read.
    Shard(simclr::data::shards::ShardOptions),
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
    /// The paper's Figure 6: for each pair of ops as `ablate augment`'s, how often colour histograms alone find a
    /// view's positive in its batch; no training.
    Histogram(AblateHistogramArgs),
    /// The paper's Tables 2 and 5: train once per loss, l2 normalisation and temperature, score by kNN.
    Loss(AblateLossArgs),
    /// The paper's Figure 9: train once per batch size and number of epochs, score by kNN.
    Batch(AblateBatchArgs),
    /// The paper's Figure 8 and section 4.2: train once per projection head, score h and z = g(h) by kNN.
    Head(AblateHeadArgs),
    /// The paper's Figure 7: train each architecture and width with SimCLR and supervised, score h by kNN.
    Model(AblateModelArgs),
    /// The paper's Table 1: train each colour-distortion strength (then the last with blur) with SimCLR and
    /// supervised, score h by kNN.
    Color(AblateColorArgs),
    /// The paper's Table 3: train with each transformation added, then an MLP on h and one on z = g(h) to predict it.
    Transform(AblateTransformArgs),
    /// The paper's section 2.2: BatchNorm over the global batch against over each device's images, by number of
    /// devices; score by kNN, with the training loss.
    Bn(AblateBnArgs),
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunLayers,
    /// Continue the run in --output from its checkpoint.
    #[arg(long, requires = "output")]
    resume: bool,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// Train the supervised baseline instead: the same encoder with a linear
    /// classifier under cross-entropy on the labels, same augmentation.
    #[arg(long, conflicts_with = "resume")]
    supervised: bool,
    /// Start this many processes on this machine, each training on its slice
    /// of every batch (docs/distributed.md). Under torchrun or srun, leave it out.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
}

/// The encoder file and how to use it; a run's encoder.safetensors records
/// all of it, and these flags override what it records.
#[derive(Args)]
struct EncoderArgs {
    /// torchvision-named safetensors (e.g. a run's encoder.safetensors), a run's checkpoint, or a run's
    /// folder (its checkpoint); eval also takes a folder of weights (a run's encoders/, written with
    /// train.encoder_every) and scores each, by epoch.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[command(flatten)]
    spec: SpecOverrides,
    /// auto (CUDA where there is a GPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Where features are read: h (the encoder's output), z (the projection
    /// head's), or head:K (after its K-th linear layer); a head layer needs
    /// a run's checkpoint. Fine-tuning trains the head's layers up to it
    /// with the encoder (SimCLR v2 fine-tunes from head:1 of a 3-layer head).
    #[arg(long, default_value = "h")]
    layer: Layer,
    /// stop (at the first image that cannot be read, naming it) or skip (leave it out, named in a
    /// warning and at the end)
    #[arg(long, default_value = "stop")]
    on_bad_image: BadImagePolicy,
    /// auto (fp32, but fine-tuning trains in the half type pretraining would), fp32, bf16 (autocast
    /// where the device computes bf16 natively: GPUs of compute capability 8.0 and up, a CPU with
    /// AVX-512 BF16; features 2-3.7x faster on such a CPU, within 2e-5 of fp32's in cosine), or fp16
    /// (autocast, fine-tuning with loss scaling: GPUs without bf16, as V100 and T4)
    #[arg(long, default_value = "auto")]
    precision: PrecisionChoice,
}

impl EncoderArgs {
    fn options(&self, batch_size: usize) -> Result<simclr::embed::EncoderOptions> {
        let weights = self.weights.clone().context("give the encoder with --weights")?;
        let device = simclr::device::select(self.device)?;
        let mut options = simclr::embed::EncoderOptions::new(weights, &self.spec, batch_size, device, self.layer)?;
        options.on_bad_image = self.on_bad_image;
        options.precision = self.precision.on(device, false);
        Ok(options)
    }
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Images: a folder (searched recursively), tar shards or CIFAR batches.
    #[arg(long)]
    input: PathBuf,
    /// Where the [images, features] float32 matrix goes; the images' paths (a shard member as
    /// shard.tar:key.jpg) go beside it (.paths.txt).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    processes: ProcessArgs,
}

#[derive(Args)]
struct ExportArgs {
    /// torchvision-named safetensors (e.g. a run's encoder.safetensors), a run's checkpoint or its folder.
    #[arg(long)]
    weights: PathBuf,
    #[command(flatten)]
    spec: SpecOverrides,
    /// The features the module returns: h, z or head:K (a head layer needs a run's checkpoint).
    #[arg(long, default_value = "h")]
    layer: Layer,
    /// Where the module goes (e.g. encoder.pt).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    /// A run's checkpoint (or its folder), instead of --weights.
    #[arg(long, conflicts_with_all = ["weights", "random_init"])]
    checkpoint: Option<PathBuf>,
    /// Evaluate an untrained encoder (the baseline), drawn with --seed.
    #[arg(long, conflicts_with = "weights")]
    random_init: bool,
    /// Labelled training images (ImageFolder, CIFAR batches or tar shards with classes).
    #[arg(long)]
    train: PathBuf,
    /// Labelled test images.
    #[arg(long)]
    test: PathBuf,
    /// Use at most this many images of each split.
    #[arg(long)]
    limit: Option<usize>,
    /// Seeds --limit's subset, the random-init encoder, the classifier and fine-tuning's views.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    processes: ProcessArgs,
}

/// How `eval`, `embed` and `neighbors` share their work among processes.
#[derive(Args)]
struct ProcessArgs {
    /// Start this many processes on this machine, each computing the features of its part of the
    /// images (embed, neighbors; eval's knn and linear), or fine-tuning on its part of every batch
    /// (eval finetune). Under torchrun or srun, leave it out.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// How long a process waits for the others before all stop with an error.
    #[arg(long, default_value_t = 1800.0)]
    dist_timeout_seconds: f64,
}

/// Where a command that can run on several processes runs.
enum Place {
    /// It ran in the processes this one started, which have ended.
    Launched,
    /// It runs here: alone, or as one rank of a group, on its device.
    Here(Option<simclr::dist::ProcessGroup>, simclr::tch::Device),
}

/// Starts the `processes` that --nproc-per-node asks for on this machine
/// (once `launchable` accepts their number), or joins the others of a
/// launcher's run (torchrun, srun; CUDA tensors through `backend`), with the
/// rank's own GPU where `device` is CUDA; else runs alone.
fn place(
    processes: Option<usize>,
    timeout: Duration,
    backend: Backend,
    device: simclr::tch::Device,
    launchable: &dyn Fn(usize) -> Result<()>,
) -> Result<Place> {
    let world = World::from_env()?;
    match (processes, world) {
        (Some(processes), None) => {
            launchable(processes)?;
            launch_local(processes, timeout)?;
            Ok(Place::Launched)
        }
        (processes, Some(world)) => {
            if let Some(processes) = processes {
                world.check_nproc_per_node(processes)?;
            }
            let device = simclr::device::of_rank(device, world.rank);
            let group = world.join(timeout, world.uses_nccl(backend, device.is_cuda())?)?;
            Ok(Place::Here(Some(group), device))
        }
        (None, None) => Ok(Place::Here(None, device)),
    }
}

impl ProcessArgs {
    /// [`place`] with these flags; `refused` says why the command cannot
    /// run on several processes.
    fn place(&self, device: simclr::tch::Device, refused: Option<&str>) -> Result<Place> {
        if !simclr::checks::is_positive_finite(self.dist_timeout_seconds) {
            anyhow::bail!("--dist-timeout-seconds {}: must be a finite number > 0", self.dist_timeout_seconds);
        }
        let timeout = Duration::from_secs_f64(self.dist_timeout_seconds);
        let launchable = |processes| match refused {
            Some(why) => anyhow::bail!("--nproc-per-node {processes}: {why}"),
            None => Ok(()),
        };
        place(self.nproc_per_node, timeout, Backend::Auto, device, &launchable)
    }
}

#[derive(Subcommand)]
enum EvalProtocol {
    /// Weighted kNN on cosine similarity (k=200, T=0.1 by default).
    Knn {
        #[command(flatten)]
        config: KnnConfig,
        #[command(flatten)]
        labels: LabelSubset,
        #[command(flatten)]
        common: EvalArgs,
    },
    /// A linear classifier on frozen features (SGD, Nesterov, cosine schedule).
    Linear {
        #[command(flatten)]
        config: LinearConfig,
        #[command(flatten)]
        labels: LabelSubset,
        #[command(flatten)]
        common: EvalArgs,
    },
    /// Fine-tune the whole encoder (with the projection head up to --layer) and a linear layer on a
    /// class-balanced fraction of the labels.
    Finetune {
        #[command(flatten)]
        config: FinetuneConfig,
        #[command(flatten)]
        common: EvalArgs,
    },
}

#[derive(Args)]
struct NeighborsArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[command(flatten)]
    options: simclr::retrieval::NeighborsOptions,
    #[command(flatten)]
    processes: ProcessArgs,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    options: simclr::bench::BenchOptions,
    /// Also run this PyTorch reference (tools/reference/bench_pytorch.py) with the same settings.
    #[arg(long, value_name = "SCRIPT", conflicts_with = "micro_batch_size")]
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
        #[command(flatten)]
        options: simclr::bench::AugmentBenchOptions,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Training images per second from files on disk to batches of views (decoding included), and per stage.
    Input {
        #[command(flatten)]
        options: simclr::bench::InputBenchOptions,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A report as its text, or as one line of JSON.
fn print(report: &(impl std::fmt::Display + serde::Serialize), json: bool) -> Result<()> {
    match json {
        true => println!("{}", serde_json::to_string(report)?),
        false => println!("{report}"),
    }
    Ok(())
}

#[derive(Args)]
struct PreviewArgs {
    #[command(flatten)]
    config: ConfigLayers,
    /// Images to preview: an ImageFolder, a flat folder, CIFAR binary batches or tar shards.
    #[arg(long)]
    data: PathBuf,
    /// The sheet to write: PNG, or the format its extension names (.jpg, .bmp, .tiff, .webp).
    #[arg(long)]
    output: PathBuf,
    /// How many images (drawn with --seed), one row each.
    #[arg(long, default_value_t = 8)]
    images: usize,
    #[command(flatten)]
    options: PreviewOptions,
    /// Also write every view's drawn parameters here, one JSON object per line.
    #[arg(long)]
    params: Option<PathBuf>,
}

/// What every study takes besides its base run and its grid.
#[derive(Args)]
struct StudyFlags {
    /// Comma-separated seeds: each cell trained once per seed (in its seed-S folders) and scored by
    /// the mean, with the standard deviation beside it [default: one run per cell, train.seed]
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
}

impl StudyFlags {
    /// The base run's config and the study of `run`'s output folder. The
    /// study sets the fields `varied` names in each of its runs, each from
    /// the flag beside it (and `train.seed` from --seeds): a flag or `--set`
    /// of `run` that sets one is overridden in every run, and said so (a
    /// base shared by several studies sets what one of them varies).
    fn study<'a>(
        &self,
        run: &RunLayers,
        varied: &[(&str, &str)],
        observer: &'a mut dyn Observer,
    ) -> Result<(ValidConfig, Study<'a>)> {
        let seeds = self.seeds.is_some().then_some(("train.seed", "--seeds"));
        for (key, given) in run.given() {
            let set = |(field, _): &&(&str, &str)| {
                key == *field || key.strip_prefix(field).is_some_and(|rest| rest.starts_with('.'))
            };
            if let Some((field, from)) = varied.iter().chain(&seeds).find(set) {
                tracing::warn!("{given} is not used: the study sets {field} in each run, from {from}");
            }
        }
        let base = run.resolve(run.base()?)?;
        let seeds = self.seeds.clone().unwrap_or_default();
        let output_dir = base.train.output_dir.clone();
        Ok((base, Study::new(output_dir, seeds, observer)?))
    }
}

#[derive(Args)]
struct AblateArgs {
    /// The base run (its --output is the folder of the whole ablation).
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated ops (names as in [[augment.ops]]).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "random-resized-crop,cutout,color-jitter,sobel,gaussian-noise,gaussian-blur,rotation"
    )]
    ops: Vec<OpConfig>,
}

#[derive(Args)]
struct AblateHistogramArgs {
    #[command(flatten)]
    pairs: AblateArgs,
    /// Comma-separated colour-distortion strengths s: the base's own augmentation with its colour jitter at each,
    /// below the table; the flag alone: none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0,0.125,0.25,0.5,1")]
    strengths: Vec<f64>,
}

#[derive(Args)]
struct AblateLossArgs {
    /// The base run (its --output is the folder of the whole study).
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated losses: nt-xent, nt-logistic, margin-triplet.
    #[arg(long, value_delimiter = ',', default_value = "nt-xent,nt-logistic,margin-triplet")]
    losses: Vec<Objective>,
    /// Comma-separated similarities: cosine (z l2-normalised) and dot (not).
    #[arg(long, value_delimiter = ',', default_value = "cosine,dot")]
    similarities: Vec<Similarity>,
    /// Comma-separated temperatures (the margin triplet loss uses loss.margin instead).
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.5,1")]
    temperatures: Vec<f64>,
    /// Comma-separated negatives: all, semi-hard (Table 2's semi-hard
    /// negative mining: rows for nt-logistic and margin-triplet only).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    negatives: Vec<Negatives>,
}

#[derive(Args)]
struct AblateBatchArgs {
    /// The base run (its --output is the folder of the whole study).
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated batch sizes (the learning rate scales with each as optim.lr_scaling says).
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048,4096")]
    batch_sizes: Vec<usize>,
    /// Comma-separated training lengths in epochs, each run with a schedule of its own.
    #[arg(long, value_delimiter = ',', default_value = "100,200,400")]
    lengths: Vec<usize>,
}

#[derive(Args)]
struct AblateHeadArgs {
    /// The base run (its --output is the folder of the whole study).
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated projection heads: none, linear, mlp-K (K linear layers, K >= 2).
    #[arg(long, value_delimiter = ',', default_value = "none,linear,mlp-2,mlp-3")]
    heads: Vec<HeadChoice>,
    /// Comma-separated output dimensions of z (Figure 8: 32 to 2048); with several, a column each, scored on h [default: the base's model.head.projection_dim].
    #[arg(long, value_delimiter = ',')]
    dims: Option<Vec<usize>>,
}

#[derive(Args)]
struct AblateModelArgs {
    /// The base run (its --output is the folder of the whole study).
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated architectures: resnet18, resnet34, resnet50, ...
    #[arg(long, value_delimiter = ',', default_value = "resnet18,resnet34,resnet50")]
    archs: Vec<Arch>,
    /// Comma-separated width multipliers.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    widths: Vec<f64>,
}

#[derive(Args)]
struct AblateColorArgs {
    /// The base run (its --output is the folder of the whole study); its augmentation's colour jitter is varied.
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated colour-distortion strengths s (appendix A); a last column adds Gaussian blur to the last.
    #[arg(long, value_delimiter = ',', default_value = "0.125,0.25,0.5,1")]
    strengths: Vec<f64>,
    /// Comma-separated AutoAugment policies (imagenet, cifar10, svhn), a last column each with AutoAugment in place of the colour distortion; the flag alone: none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "imagenet")]
    auto_augment: Vec<AutoAugmentPolicy>,
}

#[derive(Args)]
struct AblateTransformArgs {
    /// The base run (its --output is the folder of the whole study); each row adds its transformation's op.
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated transformations to predict: grayscale, rotation, noise, sobel.
    #[arg(long, value_delimiter = ',', default_value = "grayscale,rotation,noise,sobel")]
    transformations: Vec<Transformation>,
}

#[derive(Args)]
struct AblateBnArgs {
    /// The base run (its --output is the folder of the whole study), trained with global BatchNorm.
    #[command(flatten)]
    run: RunLayers,
    #[command(flatten)]
    study: StudyFlags,
    /// Comma-separated numbers of devices W, each dividing the batch: a row each, trained in one process with
    /// BatchNorm over each device's batch/W images.
    #[arg(long, value_delimiter = ',', default_value = "2,8,32")]
    devices: Vec<usize>,
}

fn train(args: TrainArgs) -> Result<()> {
    let base = match (&args.run.output, args.resume) {
        (Some(run), true) => checkpoint::saved_config(run)?,
        _ => args.run.base()?,
    };
    let config = args.run.resolve(base)?;
    let config = match args.supervised {
        true => simclr::train::trainer::supervised(config.get().clone())?.validate()?,
        false => config,
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let timeout = Duration::from_secs_f64(config.train.dist_timeout_seconds);
    let device = simclr::device::select(config.train.device)?;
    let launchable = |processes| {
        launch::check_backend(config.train.dist_backend, device.is_cuda())?;
        Ok(launch::check_divides(config.train.batch_size, processes)?)
    };
    // The trainer picks the rank's device itself.
    let Place::Here(group, _) = place(args.nproc_per_node, timeout, config.train.dist_backend, device, &launchable)?
    else {
        return Ok(());
    };
    let rank = group.as_ref().map_or(0, simclr::dist::ProcessGroup::rank);
    let observer = observer::console()?;
    let mut observer = if rank == 0 { observer } else { observer.without_bar() };
    let start = simclr::train::Start::from_env(args.resume)?;
    let report = simclr::train::train_in(config, start, group, &mut observer)?;
    if let Some(position) = report.interrupted_at {
        if rank == 0 {
            eprint!("{report}");
        }
        return Err(simclr::Error::Interrupted(format!("step {}", position.step)).into());
    }
    if rank == 0 {
        print!("{report}");
    }
    Ok(())
}

/// Runs this command again in `processes` processes of this machine, each
/// with torchrun's variables, and says how they ended.
fn launch_local(processes: usize, timeout: Duration) -> Result<()> {
    let (arguments, stop): (Vec<_>, _) = (std::env::args_os().skip(1).collect(), observer::stop_flag()?);
    match launch::spawn_local(processes, &arguments, &stop, Duration::from_secs(10), timeout)? {
        Outcome::Finished => Ok(()),
        Outcome::Stopped => Err(simclr::Error::Interrupted("every process stopped".to_owned()).into()),
        // A rank that failed alone left its cause; one killed (by the
        // kernel's out-of-memory killer, say) left none, but ended first.
        Outcome::Failed { cause: Some((rank, cause)), status, .. } if status.signal().is_none() => {
            anyhow::bail!("rank {rank} of {processes} failed: {cause}; the others were stopped")
        }
        Outcome::Failed { stuck, .. } if !stuck.is_empty() => {
            let (them, they) = if stuck.len() == 1 { ("it", "it was") } else { ("them", "they were") };
            anyhow::bail!(
                "{} of {processes} stopped answering: the others timed out waiting for {them}, so {they} stopped",
                simclr::dist::ranks_said(&stuck, |rank| rank.to_string())
            )
        }
        Outcome::Failed { rank, status, .. } => {
            anyhow::bail!("rank {rank} of {processes} failed ({status}), so the others were stopped")
        }
    }
}

fn embed(args: EmbedArgs) -> Result<()> {
    let mut encoder = args.encoder.options(args.batch_size)?;
    let Place::Here(group, device) = args.processes.place(encoder.device, None)? else {
        return Ok(());
    };
    encoder.device = device;
    let options = simclr::embed::EmbedOptions { encoder, input: args.input, output: args.output };
    let embedded = simclr::embed::embed_in(&options, group.as_ref());
    if let Some(report) = embedded.map_err(|error| simclr::dist::explain(group.as_ref(), error))? {
        print!("{report}");
    }
    Ok(())
}

fn eval(protocol: EvalProtocol) -> Result<()> {
    let (EvalProtocol::Knn { common: args, .. }
    | EvalProtocol::Linear { common: args, .. }
    | EvalProtocol::Finetune { common: args, .. }) = &protocol;
    if let Some(path) = &args.output {
        simclr::io::refuse_folder(path, "--output")?;
    }
    let overrides = &args.encoder.spec;
    let layer = args.encoder.layer;
    let weights = |path: PathBuf| -> Result<_> {
        let spec = simclr::embed::resolve_spec(&path, overrides, layer)?;
        Ok((EncoderSource::Weights(path), spec))
    };
    // A run's folder is its last state's file; a folder of weights (a run's
    // encoders/) is scored file by file, every file's network read before
    // any work starts.
    let run_file = |path: &Option<PathBuf>| path.as_deref().map(simclr::train::checkpoint::weights_file).transpose();
    let (given_weights, given_checkpoint) = (run_file(&args.encoder.weights)?, run_file(&args.checkpoint)?);
    let (networks, folder) = match (&given_weights, &given_checkpoint, args.random_init) {
        (Some(folder), None, false) if folder.is_dir() => {
            let files = simclr::embed::weights_in(folder)?;
            (files.into_iter().map(weights).collect::<Result<Vec<_>>>()?, true)
        }
        (Some(path), None, false) | (None, Some(path), false) => (vec![weights(path.clone())?], false),
        (None, None, true) => {
            let spec = EncoderSpec::default().with(overrides)?;
            (vec![(EncoderSource::RandomInit(args.seed), spec)], false)
        }
        _ => anyhow::bail!("give one of --weights, --checkpoint or --random-init"),
    };
    let Place::Here(group, device) = args.processes.place(simclr::device::select(args.encoder.device)?, None)? else {
        return Ok(());
    };
    let mut options = EvalOptions::new(networks[0].1.clone(), args.train.clone(), args.test.clone());
    (options.limit, options.seed, options.layer) = (args.limit, args.seed, layer);
    (options.on_bad_image, options.precision, options.device) =
        (args.encoder.on_bad_image, args.encoder.precision, device);
    let (output, seed) = (args.output.clone(), args.seed);
    if let EvalProtocol::Knn { labels, .. } | EvalProtocol::Linear { labels, .. } = &protocol {
        options.labels = labels.clone();
    }
    let protocol = match protocol {
        EvalProtocol::Knn { config, .. } => Protocol::Knn(config),
        EvalProtocol::Linear { config, .. } => Protocol::Linear(LinearConfig { seed, ..config }),
        EvalProtocol::Finetune { config, .. } => Protocol::Finetune(FinetuneConfig { seed, ..config }),
    };
    let mut reports = Vec::new();
    for (source, spec) in networks {
        let loaded = simclr::embed::load_network(&source, &spec, layer, options.device);
        options.spec = spec;
        let evaluated = simclr::dist::agree(group.as_ref(), loaded)
            .and_then(|network| simclr::eval::evaluate_in(&network, &options, &protocol, group.as_ref()));
        if let Some(report) = evaluated.map_err(|error| simclr::dist::explain(group.as_ref(), error))? {
            println!("{report}");
            reports.push(report);
        }
    }
    // Rank 0 alone has the reports.
    let Some(last) = reports.last() else {
        return Ok(());
    };
    eprint!("{}", simclr::data::Skipped(&last.skipped));
    let json = match folder {
        false => serde_json::to_string_pretty(last)?,
        true => {
            let best = reports.iter().max_by(|a, b| a.top1.total_cmp(&b.top1)).expect("a report");
            println!("best: {} | top-1 {:.2}%", best.encoder, 100.0 * best.top1);
            let epoch_of = |report: &EvalReport| {
                let name = Path::new(&report.encoder).file_name().and_then(|name| name.to_str());
                name.and_then(simclr::train::trainer::snapshot_epoch)
            };
            let kept = reports.iter().map(|report| KeptScore { epoch: epoch_of(report), report });
            serde_json::to_string_pretty(&kept.collect::<Vec<_>>())?
        }
    };
    if let Some(path) = output {
        simclr::io::write_atomic(&path, (json + "\n").as_bytes())?;
    }
    Ok(())
}

/// One score of `eval` over a folder of weights, with the epoch of a kept
/// encoder (`epoch-NNNN.safetensors`).
#[derive(serde::Serialize)]
struct KeptScore<'a> {
    epoch: Option<usize>,
    #[serde(flatten)]
    report: &'a EvalReport,
}

fn neighbors(args: NeighborsArgs) -> Result<()> {
    let mut encoder = args.encoder.options(args.batch_size)?;
    let hnsw = args.options.kind == simclr::retrieval::IndexKind::Hnsw;
    let refused = hnsw.then_some("--index-kind hnsw builds its graph in one process (the exact search is shared)");
    let Place::Here(group, device) = args.processes.place(encoder.device, refused)? else {
        return Ok(());
    };
    encoder.device = device;
    let found = simclr::retrieval::neighbors_in(&encoder, &args.options, group.as_ref());
    let Some(report) = found.map_err(|error| simclr::dist::explain(group.as_ref(), error))? else {
        return Ok(());
    };
    print!("{report}");
    eprint!("{}", simclr::data::Skipped(&report.skipped));
    if let Some(gallery) = &args.options.gallery {
        eprintln!("gallery: {}", gallery.display());
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    match args.what {
        Some(BenchWhat::Augment { options, json }) => return print(&simclr::bench::bench_augment(&options)?, json),
        Some(BenchWhat::Input { options, json }) => return print(&simclr::bench::bench_input(&options)?, json),
        None => {}
    }
    let options = args.options;
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
    let layers = RunLayers { config: args.config, data: Some(args.data.clone()), ..Default::default() };
    let config = layers.resolve(layers.base()?)?;
    simclr::io::refuse_folder(&args.output, "--output")?;
    simclr::io::sheet_format(&args.output)?;
    if let Some(path) = &args.params {
        simclr::io::refuse_folder(path, "--params")?;
    }
    let images =
        Dataset::open(&args.data, &DataFormat::Auto)?.subset(Some(args.images), args.options.seed).decode_all()?;
    let pipeline = simclr::augment::Pipeline::new(&config.augment, config.view_size());
    simclr::augment::preview::write_preview(&images, &pipeline, args.options, &args.output, args.params.as_deref())?;
    (0..2).for_each(|view| eprintln!("view {}: {}", view + 1, pipeline.describe(view)));
    println!("preview: {}", args.output.display());
    if let Some(path) = &args.params {
        println!("parameters: {}", path.display());
    }
    Ok(())
}

fn ablate(kind: AblateKind) -> Result<()> {
    let mut console = observer::console()?;
    let grid = match kind {
        AblateKind::Augment(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::AUGMENT_VARIED, &mut console)?;
            ablation::augment_pairs(&base, &args.ops, &mut study)?
        }
        AblateKind::Histogram(args) => {
            let (base, mut study) =
                args.pairs.study.study(&args.pairs.run, ablation::HISTOGRAM_VARIED, &mut console)?;
            ablation::histogram_pairs(&base, &args.pairs.ops, &args.strengths, &mut study)?
        }
        AblateKind::Loss(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::LOSS_VARIED, &mut console)?;
            let axes = ablation::LossAxes {
                objectives: &args.losses,
                similarities: &args.similarities,
                temperatures: &args.temperatures,
                negatives: &args.negatives,
            };
            ablation::loss_grid(&base, &axes, &mut study)?
        }
        AblateKind::Batch(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::BATCH_VARIED, &mut console)?;
            ablation::batch_grid(&base, &args.batch_sizes, &args.lengths, &mut study)?
        }
        AblateKind::Model(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::MODEL_VARIED, &mut console)?;
            ablation::model_grid(&base, &args.archs, &args.widths, &mut study)?
        }
        AblateKind::Color(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::COLOR_VARIED, &mut console)?;
            ablation::color_grid(&base, &args.strengths, &args.auto_augment, &mut study)?
        }
        AblateKind::Transform(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::TRANSFORM_VARIED, &mut console)?;
            ablation::transform_grid(&base, &args.transformations, &mut study)?
        }
        AblateKind::Bn(args) => {
            let (base, mut study) = args.study.study(&args.run, ablation::BN_VARIED, &mut console)?;
            ablation::bn_grid(&base, &args.devices, &mut study)?
        }
        AblateKind::Head(args) => {
            let dims = args.dims.as_ref().map(|_| ablation::HEAD_DIMS_VARIED);
            let varied: Vec<(&str, &str)> = ablation::HEAD_VARIED.iter().copied().chain(dims).collect();
            let (base, mut study) = args.study.study(&args.run, &varied, &mut console)?;
            ablation::head_grid(&base, &args.heads, args.dims.as_deref().unwrap_or_default(), &mut study)?
        }
    };
    print!("{grid}");
    println!("table: {}\nheatmap: {}", grid.csv_path.display(), grid.png_path.display());
    Ok(())
}

/// Whether log lines may carry colour codes: only to a terminal, and not
/// where `NO_COLOR` is set (no-color.org). Written to a file or a pipe (a
/// SLURM job's output, `tee`, CI), the codes would be noise in every line.
fn colours_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

fn main() -> ExitCode {
    observer::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // In a multi-process run, rank 0 tells the story; the others only warn.
            let quiet = std::env::var("RANK").is_ok_and(|rank| rank != "0");
            (if quiet { "warn" } else { "info" }).into()
        }))
        .with_writer(std::io::stderr)
        .with_ansi(colours_on_stderr())
        .init();
    simclr::device::quiet_out_of_memory_panics();
    #[cfg(feature = "fault-injection")]
    simclr::train::faults::install();
    let result = match Cli::parse().command {
        Command::Train(args) => train(args),
        Command::Embed(args) => embed(args),
        Command::Export(args) => simclr::io::refuse_folder(&args.output, "--output")
            .and_then(|()| simclr::train::checkpoint::weights_file(&args.weights))
            .and_then(|weights| {
                let spec = simclr::embed::resolve_spec(&weights, &args.spec, args.layer)?;
                simclr::export::export_torchscript(&weights, &spec, args.layer, &args.output)
            })
            .map(|exported| print!("{exported}"))
            .map_err(Into::into),
        Command::Eval { protocol } => eval(protocol),
        Command::Neighbors(args) => neighbors(args),
        Command::Report { run, device } => simclr::device::select(device)
            .and_then(|device| simclr::report::write_report(&run, device))
            .map(|paths| paths.iter().for_each(|path| println!("{}", path.display())))
            .map_err(Into::into),
        Command::Bench(args) => bench(args),
        Command::AugmentPreview(args) => augment_preview(args),
        Command::Ablate { kind } => ablate(kind),
        Command::Shard(options) => {
            simclr::data::shards::shard(&options).map(|report| println!("{report}")).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if matches!(error.downcast_ref(), Some(simclr::Error::Interrupted(_))) => {
            ExitCode::from(launch::STOPPED as u8)
        }
        Err(error) => {
            // In one write, which a pipe keeps whole: eprintln! writes its
            // pieces apart, and the processes of a run, sharing the
            // launcher's stderr, printed "error: error: ..." lines.
            let line = format!("error: {error:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}
