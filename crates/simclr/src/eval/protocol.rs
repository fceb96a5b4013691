//! `simclr eval`: one protocol (kNN or linear) on one encoder (weights, a
//! run's checkpoint, or random init as the baseline) over a labelled train
//! and test split. Features are computed once, then the protocol runs on
//! them.
use std::path::PathBuf;
use std::time::Instant;

use tch::{nn, Device};

use super::features::Frozen;
use super::{finetune, knn_accuracy, linear_eval, Accuracy, FinetuneConfig, KnnConfig, LinearConfig, Task};
use crate::data::config::DataFormat;
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::Dataset;
use crate::model::{EncoderSpec, ResNet};
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

#[derive(Debug, Clone, PartialEq)]
pub enum EncoderSource {
    /// torchvision-named safetensors, or a run's checkpoint (prefixes
    /// `encoder.` and `model.encoder.` are understood).
    Weights(PathBuf),
    /// Untrained weights drawn with this seed: the baseline every
    /// self-supervised result is compared with.
    RandomInit(u64),
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub encoder: EncoderSource,
    /// The network and how images are prepared for it.
    pub spec: EncoderSpec,
    /// Labelled images: ImageFolder or CIFAR batches.
    pub train: PathBuf,
    pub test: PathBuf,
    /// Use at most this many images of each split (a seeded subset).
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub device: Device,
    pub seed: u64,
}

impl EvalOptions {
    pub fn new(encoder: EncoderSource, spec: EncoderSpec, train: PathBuf, test: PathBuf) -> Self {
        Self {
            encoder,
            spec,
            train,
            test,
            limit: None,
            batch_size: super::features::FEATURE_BATCH,
            device: Device::Cpu,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub protocol: String,
    pub encoder: String,
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
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} | {} | {} labelled of {} train / {} test images, {} classes | top-1 {:.2}% | top-5 {:.2}%",
            self.protocol,
            self.encoder,
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

pub fn evaluate(options: &EvalOptions, protocol: &Protocol) -> Result<EvalReport> {
    if let Protocol::Knn(config) = protocol {
        let mut problems = Vec::new();
        config.check("--", &mut problems);
        if !problems.is_empty() {
            return Err(Error::Config(problems));
        }
    }
    let started = Instant::now();
    let train = labelled(&options.train, options.limit, options.seed)?;
    let test = labelled(&options.test, options.limit, options.seed)?;
    let classes = train.classes.len().max(test.classes.len());

    tch::manual_seed(options.seed as i64);
    let store = nn::VarStore::new(options.device);
    let spec = &options.spec;
    let encoder = ResNet::new(&store.root(), spec.arch, spec.width_multiplier, spec.stem);
    crate::device::use_channels_last(&store);
    let encoder_name = match &options.encoder {
        EncoderSource::Weights(path) => {
            crate::io::torchvision::load_encoder(&store.variables(), path)?;
            path.display().to_string()
        }
        EncoderSource::RandomInit(seed) => format!("random init (seed {seed})"),
    };

    let format = ViewFormat { size: spec.image_size, mean: spec.mean, std: spec.std };
    let pool = worker_pool(0)?;
    let device = options.device;
    let task = Task { train, test, classes: classes as i64, format };
    let frozen = || {
        Frozen::compute(&encoder, &task.train.samples, &task.test.samples, format, options.batch_size, device, &pool)
    };
    let (Accuracy { top1, top5 }, labelled_images) = match protocol {
        Protocol::Finetune(config) => finetune(&store, &encoder, &task, config, &pool)?,
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
        encoder: encoder_name,
        arch: spec.arch.name().to_owned(),
        top1,
        top5,
        train_images: task.train.len(),
        labelled_images,
        test_images: task.test.len(),
        classes,
        feature_dim: encoder.feature_dim(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
