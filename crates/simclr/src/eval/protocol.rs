//! `simclr eval`: one protocol (kNN, linear or fine-tuning) on one network
//! (weights, a run's checkpoint, or random init as the baseline; see
//! [`crate::embed::load_network`]) over a labelled train and test split.
//! Features are computed once, then the protocol runs on them.
use std::path::PathBuf;
use std::time::Instant;

use tch::{nn, Device};

use super::features::{FeatureNet, Frozen};
use super::{finetune, knn_accuracy, linear_eval, Accuracy, FinetuneConfig, KnnConfig, LinearConfig, Task};
use crate::data::config::{BadImagePolicy, DataFormat};
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::Dataset;
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
    /// Where features are read (kNN and linear): h, or a layer of the
    /// projection head, which only a run's checkpoint holds.
    pub layer: Layer,
    /// An unreadable image stops the evaluation, or is left out of its
    /// split (each image is then read once before the evaluation).
    pub on_bad_image: BadImagePolicy,
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
    /// Labelled training images used (fine-tuning takes a fraction).
    pub labelled_images: usize,
    pub test_images: usize,
    pub classes: usize,
    pub feature_dim: i64,
    pub seconds: f64,
    /// Images of either split left out as unreadable, as "path: reason".
    pub skipped: Vec<String>,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} | {}{} | {} labelled of {} train / {} test images, {} classes | top-1 {:.2}% | top-5 {:.2}%",
            self.protocol,
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

/// `protocol` on `network`, read at `options.layer`.
pub fn evaluate(network: &Network, options: &EvalOptions, protocol: &Protocol) -> Result<EvalReport> {
    let layer = options.layer;
    if layer != Layer::H && matches!(protocol, Protocol::Finetune(_)) {
        return Err(Error::InvalidArgument(format!(
            "--layer {layer}: fine-tuning trains the encoder from h; the layer is for knn and linear"
        )));
    }
    let mut problems = Vec::new();
    match protocol {
        Protocol::Knn(config) => config.check("--", &mut problems),
        Protocol::Linear(config) => config.check(&mut problems),
        Protocol::Finetune(config) => config.check(&mut problems),
    }
    if options.limit == Some(0) {
        problems.push("--limit 0: must be at least 1".to_owned());
    }
    super::refuse(problems)?;
    let canonical = |path: &std::path::Path| path.canonicalize().ok();
    if canonical(&options.train).is_some_and(|train| canonical(&options.test) == Some(train)) {
        // A CIFAR folder opens as its training batches, whichever split it is given as.
        tracing::warn!(
            "--train and --test are both {}: each test image is among the training images, so the score says \
             nothing of unseen images; give a held-out split (of CIFAR batches, test_batch.bin)",
            options.test.display()
        );
    }
    let started = Instant::now();
    let pool = worker_pool(0)?;
    let readable = |dataset: Dataset| dataset.with_policy(options.on_bad_image).without_unreadable(&pool);
    let train = readable(labelled(&options.train, options.limit, options.seed)?);
    let test = readable(labelled(&options.test, options.limit, options.seed)?.labelled_as(&train)?);
    for (split, path) in [(&train, &options.train), (&test, &options.test)] {
        if split.is_empty() {
            return Err(crate::data::none_readable(path, split.skipped().len()));
        }
    }
    let skipped = [train.skipped(), test.skipped()].concat();
    let classes = train.classes.len();
    if let Protocol::Knn(config) = protocol {
        if config.k > train.len() {
            tracing::warn!(
                "--k {} is more than the {} training images: every one of them votes, as with --k {}",
                config.k,
                train.len(),
                train.len()
            );
        }
    }

    tch::manual_seed(options.seed as i64);
    let Network { store, model, name } = network;
    let net = FeatureNet::at(model, layer)?;
    let spec = &options.spec;

    let format = ViewFormat { size: spec.image_size, mean: spec.mean, std: spec.std };
    let device = options.device;
    let task = Task { train, test, classes: classes as i64, format };
    let frozen =
        || Frozen::compute(net, &task.train.samples, &task.test.samples, format, options.batch_size, device, &pool);
    let (Accuracy { top1, top5 }, labelled_images) = match protocol {
        Protocol::Finetune(config) => finetune(store, &model.encoder, &task, config, &pool)?,
        Protocol::Knn(config) => {
            let f = frozen()?;
            let accuracy = knn_accuracy(&f.train, &f.train_labels, &f.test, &f.test_labels, task.classes, *config);
            (accuracy, task.train.len())
        }
        Protocol::Linear(config) => {
            let f = frozen()?;
            (linear_eval(&f.train, &f.train_labels, &f.test, &f.test_labels, task.classes, config)?, task.train.len())
        }
    };
    Ok(EvalReport {
        protocol: protocol.name().to_owned(),
        encoder: name.clone(),
        layer: layer.to_string(),
        arch: spec.arch.name().to_owned(),
        top1,
        top5,
        train_images: task.train.len(),
        labelled_images,
        test_images: task.test.len(),
        classes,
        feature_dim: net.dim(),
        seconds: started.elapsed().as_secs_f64(),
        skipped,
    })
}
