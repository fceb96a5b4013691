//! `simclr eval`: one protocol (kNN, linear or fine-tuning) on one network
//! (weights, a run's checkpoint, or random init as the baseline; see
//! [`crate::embed::load_network`]) over a labelled train and test split.
//! kNN and the linear classifier compute features once and run on them;
//! fine-tuning, and the linear classifier on views (`--augment`), read the
//! training images every epoch.
use std::path::PathBuf;
use std::time::Instant;

use tch::{nn, Device};

use super::features::{Batches, FeatureNet, Labelled};
use super::{
    finetune_in, knn_votes_across, linear_eval_across, Accuracy, FineTuned, FinetuneConfig, Hits, KnnConfig,
    LinearConfig, Task,
};
use crate::data::config::{BadImagePolicy, DataFormat};
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::Dataset;
use crate::device::{Precision, PrecisionChoice};
use crate::dist::{agree, ProcessGroup};
use crate::model::{EncoderSpec, Layer, SimClr};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    Knn(KnnConfig),
    Linear(LinearConfig),
    Finetune(FinetuneConfig),
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Knn(_) => "knn",
            Protocol::Linear(config) if config.augment => "linear-augmented",
            Protocol::Linear(_) => "linear",
            Protocol::Finetune(_) => "finetune",
        }
    }
}

/// A network to evaluate, its variables loaded (by
/// [`crate::embed::load_network`]): the model (headless for weights that
/// hold only an encoder) and the name reports give it.
pub struct Network {
    /// Owns the variables `model` computes with.
    pub store: nn::VarStore,
    pub model: SimClr,
    pub name: String,
}

/// The training images whose labels kNN and linear use: a class-balanced
/// fraction, the images `eval finetune` labels with the same fraction and
/// seed, or those a list names ([`super::listed`]) (fine-tuning's own are
/// [`FinetuneConfig`]'s `fraction`, `labelled_images` and `subset_file`).
/// Low-shot evaluation, the frozen features' side of the paper's
/// semi-supervised table.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LabelSubset {
    /// Fraction of each class's training images whose labels are used (1%, 10% in the paper's
    /// semi-supervised table), drawn with --seed among the readable images: those `eval finetune
    /// --fraction` labels with the same seed
    #[arg(long, default_value_t = 1.0)]
    pub fraction: f64,
    /// The training images whose labels are used, listed in a file, in place of --fraction: as
    /// `eval finetune --labelled-images` takes them (the paper's ImageNet 1% and 10% lists)
    #[arg(long, value_name = "LIST", conflicts_with = "fraction")]
    pub labelled_images: Option<PathBuf>,
    /// List the labelled images used here, one per line.
    #[arg(long)]
    pub subset_file: Option<PathBuf>,
}

impl Default for LabelSubset {
    fn default() -> Self {
        Self { fraction: 1.0, labelled_images: None, subset_file: None }
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The network and how images are prepared for it.
    pub spec: EncoderSpec,
    /// Labelled images: ImageFolder, CIFAR batches or tar shards with classes.
    pub train: PathBuf,
    pub test: PathBuf,
    /// Use at most this many images of each split (a seeded subset).
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub device: Device,
    pub seed: u64,
    /// Where features are read (kNN and linear) and fine-tuning's
    /// classifier goes: h, or a layer of the projection head, which only a
    /// run's checkpoint holds (fine-tuning then trains the head's layers
    /// up to it with the encoder).
    pub layer: Layer,
    /// An unreadable image stops the evaluation, or is left out of its
    /// split (fine-tuning then reads each image once before it starts).
    pub on_bad_image: BadImagePolicy,
    /// The arithmetic of the forward passes (and of fine-tuning's training).
    pub precision: PrecisionChoice,
    /// kNN's and linear's labelled training images: all by default.
    pub labels: LabelSubset,
}

impl EvalOptions {
    pub fn new(spec: EncoderSpec, train: PathBuf, test: PathBuf) -> Self {
        Self {
            spec,
            train,
            test,
            limit: None,
            batch_size: super::features::FEATURE_BATCH,
            device: Device::Cpu,
            seed: 0,
            layer: Layer::H,
            on_bad_image: BadImagePolicy::Stop,
            precision: PrecisionChoice::Auto,
            labels: LabelSubset::default(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub protocol: String,
    pub encoder: String,
    /// The layer the features came from (h, z or head:k).
    pub layer: String,
    pub arch: String,
    pub top1: f64,
    pub top5: f64,
    pub train_images: usize,
    /// Labelled training images used (a fraction of them with `--fraction`).
    pub labelled_images: usize,
    pub test_images: usize,
    pub classes: usize,
    pub feature_dim: i64,
    pub seconds: f64,
    /// Images of either split left out as unreadable, as "path: reason".
    pub skipped: Vec<String>,
    /// The arithmetic of kNN's and linear's features, or of fine-tuning's
    /// training (`--precision`).
    pub precision: Precision,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{} | {}{} | {} labelled of {} train / {} test images, {} classes | top-1 {:.2}% | top-5 {:.2}%",
            self.protocol,
            self.precision.in_words(),
            self.encoder,
            if self.layer == "h" { String::new() } else { format!(" at {}", self.layer) },
            self.labelled_images,
            self.train_images,
            self.test_images,
            self.classes,
            100.0 * self.top1,
            100.0 * self.top5
        )
    }
}

fn labelled(path: &std::path::Path, limit: Option<usize>, seed: u64) -> Result<Dataset> {
    let dataset = Dataset::open(path, &DataFormat::Auto)?.subset(limit, seed);
    if !dataset.is_labelled() {
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            message: "evaluation needs labelled images (class sub-folders or CIFAR batches)".to_owned(),
        });
    }
    Ok(dataset)
}

/// A protocol's score and the images it was computed on.
struct Scored {
    accuracy: Accuracy,
    labelled_images: usize,
    train_images: usize,
    test_images: usize,
    skipped: Vec<String>,
    precision: Precision,
}

/// `protocol` on `network`, read at `options.layer`.
pub fn evaluate(network: &Network, options: &EvalOptions, protocol: &Protocol) -> Result<EvalReport> {
    let report = evaluate_in(network, options, protocol, None)?;
    Ok(report.expect("one process reports"))
}

/// [`evaluate`] as one rank of `group` (alone when `None`), every rank
/// calling it with the same options: the ranks share the feature
/// extraction (each its part of both splits, gathered in order; for kNN
/// each keeps its part of the bank, and the queries' neighbours are chosen
/// among every part's: [`super::knn_votes_across`]), so kNN and linear score
/// as one process does, up to the rounding of features computed in other
/// batches. The linear classifier is fitted with each rank holding its
/// part of the training features ([`super::linear::fit_linear_across`]),
/// and fine-tuning shares each batch among the ranks
/// ([`super::finetune_in`]). Rank 0 gets the report; the others get `None`.
pub fn evaluate_in(
    network: &Network,
    options: &EvalOptions,
    protocol: &Protocol,
    group: Option<&ProcessGroup>,
) -> Result<Option<EvalReport>> {
    let layer = options.layer;
    let mut problems = Vec::new();
    match protocol {
        Protocol::Knn(config) => config.check("--", &mut problems),
        Protocol::Linear(config) => config.check(&mut problems),
        Protocol::Finetune(config) => config.check(&mut problems),
    }
    let labels = &options.labels;
    let subset = *labels != LabelSubset::default();
    match protocol {
        Protocol::Finetune(_) if subset => problems.push(
            "fine-tuning's labelled images are its own --fraction, --labelled-images and --subset-file, not the \
             options'"
                .to_owned(),
        ),
        _ => super::finetune::check_fraction(labels.fraction, &mut problems),
    }
    if options.limit == Some(0) {
        problems.push("--limit 0: must be at least 1".to_owned());
    }
    super::refuse(problems)?;
    if let Some(group) = group {
        // Each rank has a device of its own; the rest must be the same.
        let shared = EvalOptions { device: Device::Cpu, ..options.clone() };
        group.check_same("eval settings", &format!("{} {shared:?} {protocol:?}", network.name))?;
    }
    let rank = group.map_or(0, |group| group.rank());
    if rank == 0 && crate::io::same_file(&options.train, &options.test) {
        // A CIFAR folder opens as its training batches, whichever split it is given as.
        tracing::warn!(
            "--train and --test are both {}: each test image is among the training images, so the score says \
             nothing of unseen images; give a held-out split (of CIFAR batches, test_batch.bin)",
            options.test.display()
        );
    }
    let started = Instant::now();
    let pool = worker_pool(0)?;
    let policy = options.on_bad_image;
    let splits = labelled(&options.train, options.limit, options.seed).and_then(|train| {
        let test = labelled(&options.test, options.limit, options.seed)?.labelled_as(&train)?;
        Ok((train, test))
    });
    let (train, test) = agree(group, splits)?;
    if let Some(group) = group {
        // Each rank computes the features of its part of each split, by position.
        group.check_same("eval images", &format!("{} {}", train.fingerprint(), test.fingerprint()))?;
    }
    let (train, test) = (train.with_policy(policy), test.with_policy(policy));
    let classes = train.classes.len();
    // kNN and linear on a fraction of the labels: drawn as fine-tuning draws
    // its own, among the readable images (so these are read once first
    // under the skip policy), and all of them counted as the training split.
    let (train, listed) = match subset {
        false => (train, None),
        true => {
            let train = train.without_unreadable_across(&pool, group)?;
            let chosen = match &labels.labelled_images {
                Some(list) => agree(group, super::listed::listed_subset(&train, list))?,
                None => super::finetune::balanced_subset(&train, labels.fraction, options.seed)?,
            };
            if let Some(path) = &labels.subset_file {
                super::finetune::write_subset_file(path, &train, &chosen, group)?;
            }
            let listed = train.len();
            (train.select(&chosen), Some(listed))
        }
    };

    tch::manual_seed(options.seed as i64);
    let Network { store, model, name } = network;
    let net = FeatureNet::at(model, layer)?;
    let spec = &options.spec;
    let format = ViewFormat::of_encoder(spec);
    let device = options.device;
    // kNN and linear compute features once: an unreadable image is left out
    // as it is met.
    let precision = options.precision.on(device, false);
    let batches = Batches { format, batch_size: options.batch_size, device, policy, precision };
    let features = |split: &Dataset, path: &std::path::Path| {
        let labelled = batches.labelled_across(net, &split.samples, &pool, group)?;
        match labelled.features.size()[0] {
            0 => Err(crate::data::none_readable(path, labelled.skipped.len())),
            _ => Ok(labelled),
        }
    };
    // kNN and linear: each rank keeps its part of the training features (a
    // kNN bank, a classifier's rows), and all the test's; `score` gets them
    // and how many training rows all parts hold.
    let frozen = |score: &dyn Fn(&Labelled, usize, &Labelled) -> Result<Accuracy>| -> Result<Scored> {
        let (part, train_images) = batches.labelled_part(net, &train.samples, &pool, group)?;
        if train_images == 0 {
            return Err(crate::data::none_readable(&options.train, part.skipped.len()));
        }
        let test = features(&test, &options.test)?;
        Ok(Scored {
            accuracy: score(&part, train_images, &test)?,
            labelled_images: train_images,
            train_images: listed.unwrap_or(train_images),
            test_images: test.features.size()[0] as usize,
            // Those left out before a fraction was drawn, then those met.
            skipped: [listed.map_or_else(Vec::new, |_| train.skipped()), part.skipped, test.skipped].concat(),
            precision,
        })
    };
    // Fine-tuning, and the linear classifier on views, read the training
    // images every epoch: the unreadable are found once, before them.
    let readable = |train: Dataset, test: Dataset| -> Result<Task> {
        let train = train.without_unreadable_across(&pool, group)?;
        let test = test.without_unreadable_across(&pool, group)?;
        for (split, path) in [(&train, &options.train), (&test, &options.test)] {
            if split.is_empty() {
                return Err(crate::data::none_readable(path, split.skipped().len()));
            }
        }
        Ok(Task { train, test, classes: classes as i64, format })
    };
    let scored = match protocol {
        Protocol::Finetune(config) => {
            let task = readable(train, test)?;
            let FineTuned { accuracy, labelled_images, precision } =
                finetune_in(store, net, &task, config, options.precision, &pool, group)?;
            let skipped = [task.train.skipped(), task.test.skipped()].concat();
            Scored {
                accuracy,
                labelled_images,
                train_images: task.train.len(),
                test_images: task.test.len(),
                skipped,
                precision,
            }
        }
        Protocol::Knn(config) => frozen(&|bank, train_images, test| {
            if config.k > train_images && rank == 0 {
                tracing::warn!(
                    "--k {} is more than the {train_images} training images: every one of them votes, as with --k \
                     {train_images}",
                    config.k
                );
            }
            let votes = knn_votes_across(&bank.features, &bank.labels, &test.features, classes as i64, *config, group)?;
            Ok(Hits::of(&votes, &test.labels).accuracy())
        })?,
        Protocol::Linear(config) if config.augment => {
            let task = readable(train, test)?;
            let classifier = super::fit_linear_on_views(net, &task, config, &batches, &pool, group)?;
            let test = features(&task.test, &options.test)?;
            let accuracy = super::accuracy(&tch::no_grad(|| classifier.logits(&test.features)), &test.labels);
            Scored {
                accuracy,
                labelled_images: task.train.len(),
                train_images: listed.unwrap_or(task.train.len()),
                test_images: task.test.len(),
                skipped: [task.train.skipped(), task.test.skipped()].concat(),
                precision,
            }
        }
        Protocol::Linear(config) => frozen(&|part, _, test| {
            let (train_rows, test_rows) = (&part.features, &test.features);
            linear_eval_across(train_rows, &part.labels, test_rows, &test.labels, classes as i64, config, group)
        })?,
    };
    if rank != 0 {
        return Ok(None);
    }
    let Scored { accuracy: Accuracy { top1, top5 }, labelled_images, train_images, test_images, skipped, precision } =
        scored;
    Ok(Some(EvalReport {
        protocol: protocol.name().to_owned(),
        encoder: name.clone(),
        layer: layer.to_string(),
        arch: spec.arch.name().to_owned(),
        top1,
        top5,
        train_images,
        labelled_images,
        test_images,
        classes,
        feature_dim: net.dim(),
        seconds: started.elapsed().as_secs_f64(),
        skipped,
        precision,
    }))
}
