//! The kNN monitor: during training, the weighted kNN top-1 ([`crate::eval::knn`])
//! of labelled queries against a labelled bank, by the encoder's features.
//!
//! On several processes each computes the features of its part of both
//! splits (contiguous, in order), so the monitor takes 1/W of one process's
//! time: each rank keeps its part of the bank and gets all the queries,
//! finds every query's k nearest in its part, and the ranks' candidates are
//! gathered to vote ([`crate::eval::knn_votes_across`]), so that no rank
//! holds the whole bank. The score is the one-process score up to the
//! rounding of features computed in other batches (and ties).
use std::path::Path;

use rayon::ThreadPool;
use tch::Device;

use super::checkpoint::{self, Checkpoint};
use crate::config::ValidConfig;
use crate::data::config::BadImagePolicy;
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::{open_splits, Dataset};
use crate::device::Precision;
use crate::dist::ProcessGroup;
use crate::eval::features::{Batches, FeatureNet, FEATURE_BATCH};
use crate::eval::knn::{knn_votes_across, KnnConfig};
use crate::eval::Hits;
use crate::model::{Layer, SimClr};
use crate::{Error, Result};

/// A labelled bank and labelled queries, and how to score them.
pub struct Monitor {
    bank: Dataset,
    queries: Dataset,
    classes: i64,
    config: KnnConfig,
}

impl Monitor {
    /// The monitor on `bank` and `queries`. Under the skip policy every
    /// image is read once here, and the unreadable ones are left out (a
    /// run's ranks share that reading: `Monitor::of_run`).
    pub fn new(bank: Dataset, queries: Dataset, policy: BadImagePolicy, config: KnnConfig, pool: &ThreadPool) -> Self {
        Monitor {
            classes: bank.classes.len().max(queries.classes.len()) as i64,
            bank: bank.with_policy(policy).without_unreadable(pool),
            queries: queries.with_policy(policy).without_unreadable(pool),
            config,
        }
    }

    /// The monitor a run configured by `config` keeps, on `knn`'s splits.
    /// With a `group`, the ranks compare their listings of the splits, and
    /// under the skip policy each reads its part of them once, all leaving
    /// out what any could not read.
    pub(super) fn of_run(
        config: &ValidConfig,
        (bank, queries): (Dataset, Dataset),
        pool: &ThreadPool,
        group: Option<&ProcessGroup>,
    ) -> Result<Self> {
        let knn = KnnConfig { k: config.train.knn_k, temperature: config.train.knn_temperature };
        let listed = Monitor::new(bank, queries, BadImagePolicy::Stop, knn, pool);
        if let Some(group) = group {
            listed.check_same(group)?;
        }
        let policy = config.data.on_bad_image;
        Ok(Monitor {
            bank: listed.bank.with_policy(policy).without_unreadable_across(pool, group)?,
            queries: listed.queries.with_policy(policy).without_unreadable_across(pool, group)?,
            ..listed
        })
    }

    /// The images left out as unreadable, as "path: reason".
    pub fn skipped(&self) -> Vec<String> {
        [self.bank.skipped(), self.queries.skipped()].concat()
    }

    /// Checks that every rank holds the same splits: the ranks' parts are
    /// cut by position, and one machine's copy with an image more or fewer
    /// would pair features with the wrong labels.
    pub fn check_same(&self, group: &ProcessGroup) -> Result<()> {
        let listings = format!("{} {}", self.bank.fingerprint(), self.queries.fingerprint());
        group.check_same("kNN monitor images", &listings)
    }

    /// The kNN top-1 of the queries against the bank, by `net`'s features;
    /// with a `group`, every rank calls it at the same point and gets the
    /// same score.
    pub fn top1(
        &self,
        net: FeatureNet,
        format: ViewFormat,
        device: Device,
        pool: &ThreadPool,
        group: Option<&ProcessGroup>,
    ) -> Result<f64> {
        Ok(self.scored(net, format, device, pool, group)?.0)
    }

    /// [`Monitor::top1`] and the bank's features it scored with (this
    /// rank's part of them with a `group`): `[images, dim]`.
    pub fn scored(
        &self,
        net: FeatureNet,
        format: ViewFormat,
        device: Device,
        pool: &ThreadPool,
        group: Option<&ProcessGroup>,
    ) -> Result<(f64, tch::Tensor)> {
        let batches = Self::batches(format, device);
        // Each rank holds its part of the bank and all the queries.
        let (bank, _) = batches.labelled_part(net, &self.bank.samples, pool, group)?;
        let queries = batches.labelled_across(net, &self.queries.samples, pool, group)?;
        let votes =
            knn_votes_across(&bank.features, &bank.labels, &queries.features, self.classes, self.config, group)?;
        Ok((Hits::of(&votes, &queries.labels).accuracy().top1, bank.features))
    }

    /// The features of the bank by `net`, in one process: `[images, dim]`.
    pub fn bank_features(
        &self,
        net: FeatureNet,
        format: ViewFormat,
        device: Device,
        pool: &ThreadPool,
    ) -> Result<tch::Tensor> {
        let batches = Self::batches(format, device);
        Ok(batches.labelled(net, &self.bank.samples, pool)?.features)
    }

    /// How the monitor turns its images into features: the splits were
    /// read once already, an image that fails now stops.
    fn batches(format: ViewFormat, device: Device) -> Batches {
        Batches { format, batch_size: FEATURE_BATCH, device, policy: BadImagePolicy::Stop, precision: Precision::Fp32 }
    }
}

/// The kNN monitor's score of the network in the run folder `run_dir`
/// (its latest checkpoint), read at `layer`: how a study scores z = g(h)
/// beside the h the monitor scored during training.
pub fn knn_top1_at(run_dir: &Path, layer: Layer) -> Result<f64> {
    FinishedRun::open(run_dir)?.knn_top1(layer)
}

/// A run's network as its latest checkpoint holds it, on the run's device,
/// with the kNN monitor's splits (bank, queries), to score it after
/// training.
pub struct FinishedRun {
    pub config: ValidConfig,
    /// Owns the variables `model` computes with.
    store: tch::nn::VarStore,
    pub model: SimClr,
    pub device: Device,
    pub pool: std::sync::Arc<ThreadPool>,
    pub splits: (Dataset, Dataset),
    /// The kNN monitor on `splits`, built at its first use and kept (under
    /// the skip policy, building it reads every image).
    monitor: std::cell::OnceCell<Monitor>,
}

impl FinishedRun {
    /// The run in `run_dir`; an error names a run without a kNN monitor.
    pub fn open(run_dir: &Path) -> Result<Self> {
        let saved = Checkpoint::read_latest(&run_dir.join(checkpoint::FILE_NAME))?;
        let config = saved.config.clone().validate()?;
        let device = crate::device::select(config.train.device)?;
        let (store, model, _) = saved.into_model(device)?;
        let pool = worker_pool(config.data.workers)?;
        let splits = open_splits(&config.data, config.train.seed)?.knn.ok_or_else(|| {
            Error::InvalidArgument(format!("{}: the run has no kNN monitor to score it with", run_dir.display()))
        })?;
        Ok(Self { config, store, model, device, pool, splits, monitor: Default::default() })
    }

    /// The kNN monitor's score of the network read at `layer`.
    pub fn knn_top1(&self, layer: Layer) -> Result<f64> {
        Ok(self.knn_scored(layer)?.0)
    }

    /// [`FinishedRun::knn_top1`] and the features at `layer` of the
    /// monitor's bank it scored with: `[images, dim]`, fp32.
    pub fn knn_scored(&self, layer: Layer) -> Result<(f64, tch::Tensor)> {
        let (format, net) = (self.config.image_format(), FeatureNet::at(&self.model, layer)?);
        self.monitor()?.scored(net, format, self.device, &self.pool, None)
    }

    /// The features at `layer` of the kNN monitor's bank: `[images, dim]`, fp32.
    pub fn bank_features(&self, layer: Layer) -> Result<tch::Tensor> {
        self.bank_features_of(&self.model, layer)
    }

    /// [`FinishedRun::bank_features`] of another network of the run's
    /// configuration (such as [`FinishedRun::initial`]).
    pub fn bank_features_of(&self, model: &SimClr, layer: Layer) -> Result<tch::Tensor> {
        let (format, net) = (self.config.image_format(), FeatureNet::at(model, layer)?);
        self.monitor()?.bank_features(net, format, self.device, &self.pool)
    }

    /// The network as training initialised it: the run's configuration,
    /// its seed given to torch before the network is built, as the trainer
    /// does, and the encoder's weights read from `model.init_encoder`
    /// where the run started from one. The store owns the variables the
    /// network computes with.
    pub fn initial(&self) -> Result<(tch::nn::VarStore, SimClr)> {
        tch::manual_seed(self.config.train.seed as i64);
        let (store, model) = SimClr::in_store(&self.config.model, self.device);
        if let Some(weights) = &self.config.model.init_encoder {
            crate::io::torchvision::load_simclr_encoder(&store, &self.config.model, weights)?;
        }
        Ok((store, model))
    }

    /// The trained network's variable `name` (a state-dict key such as
    /// `projection_head.layers.0.weight`), if it has one.
    pub fn variable(&self, name: &str) -> Option<tch::Tensor> {
        self.store.variables().remove(name)
    }

    fn monitor(&self) -> Result<&Monitor> {
        if let Some(monitor) = self.monitor.get() {
            return Ok(monitor);
        }
        let monitor = Monitor::of_run(&self.config, self.splits.clone(), &self.pool, None)?;
        Ok(self.monitor.get_or_init(|| monitor))
    }
}
