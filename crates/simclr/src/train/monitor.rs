//! The kNN monitor: during training, the weighted kNN top-1 ([`crate::eval::knn`])
//! of labelled queries against a labelled bank, by the encoder's features.
//!
//! On several processes each computes the features of its part of both
//! splits (contiguous, in order), so the monitor takes 1/W of one process's
//! time: the bank's parts are gathered in order, so that every rank holds
//! the one-process bank row for row, each rank classifies its own queries,
//! and the counts of correct answers are summed. The score is the
//! one-process score up to the rounding of features computed in other
//! batches.
use rayon::ThreadPool;
use tch::{Device, Tensor};

use super::checkpoint::{self, Checkpoint};
use crate::config::ValidConfig;
use crate::data::config::BadImagePolicy;
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::{open_splits, Dataset, Sample};
use crate::device::Precision;
use crate::dist::{ProcessGroup, ReduceOp};
use crate::eval::features::{extract_features, labels, FeatureNet, FEATURE_BATCH};
use crate::eval::knn::{knn_votes, KnnConfig};
use crate::eval::top_k_hits;
use crate::model::Layer;
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
    /// image is read once here, and the unreadable ones are left out (on
    /// every rank: the parts are cut from what is left).
    pub fn new(bank: Dataset, queries: Dataset, policy: BadImagePolicy, config: KnnConfig, pool: &ThreadPool) -> Self {
        Monitor {
            classes: bank.classes.len().max(queries.classes.len()) as i64,
            bank: bank.with_policy(policy).without_unreadable(pool),
            queries: queries.with_policy(policy).without_unreadable(pool),
            config,
        }
    }

    /// The monitor a run configured by `config` keeps, on `knn`'s splits.
    pub(super) fn of_run(config: &ValidConfig, (bank, queries): (Dataset, Dataset), pool: &ThreadPool) -> Self {
        let knn = KnnConfig { k: config.train.knn_k, temperature: config.train.knn_temperature };
        Monitor::new(bank, queries, config.data.on_bad_image, knn, pool)
    }

    /// The images left out as unreadable, as "path: reason".
    pub fn skipped(&self) -> Vec<String> {
        [self.bank.skipped(), self.queries.skipped()].concat()
    }

    /// Checks that every rank holds the same splits: the ranks' parts are
    /// cut by position, and a rank that had left out other images (one
    /// machine's copy of a file damaged) would pair features with the wrong
    /// labels.
    pub fn check_same(&self, group: &ProcessGroup) -> Result<()> {
        let mut listing = crc32fast::Hasher::new();
        for set in [&self.bank, &self.queries] {
            listing.update(format!("{}\n", set.len()).as_bytes());
            for (index, sample) in set.samples.iter().enumerate() {
                listing.update(format!("{} {:?}\n", sample.describe(index), sample.label).as_bytes());
            }
        }
        group.check_same("kNN monitor images", &format!("{:08x}", listing.finalize()))
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
        let features =
            |samples: &[Sample]| extract_features(net, samples, format, FEATURE_BATCH, device, Precision::Fp32, pool);
        let (bank, queries) = (&self.bank.samples, &self.queries.samples);
        let world = group.map_or(1, ProcessGroup::size);
        // Parts of no image would have no features to gather; splits that
        // small are computed whole on every rank.
        let Some(group) = group.filter(|_| bank.len().min(queries.len()) >= world) else {
            let (bank_features, query_features) = (features(bank)?, features(queries)?);
            let (correct, _) = self.correct(&bank_features, bank, &query_features, queries, device);
            return Ok(correct as f64 / queries.len() as f64);
        };
        let rank = group.rank();
        let computed = features(part(bank, rank, world)).and_then(|b| Ok((b, features(part(queries, rank, world))?)));
        let (bank_part, query_features) = group.agree(computed)?;
        let bank_features = gathered(group, &bank_part, bank.len())?;
        let (correct, count) = self.correct(&bank_features, bank, &query_features, part(queries, rank, world), device);
        let mut counts = Tensor::from_slice(&[correct, count]);
        group.all_reduce(&mut counts, ReduceOp::Sum)?;
        Ok(counts.int64_value(&[0]) as f64 / counts.int64_value(&[1]) as f64)
    }

    /// How many of `queries` the bank's kNN vote classifies correctly, and
    /// how many there are.
    fn correct(
        &self,
        bank_features: &Tensor,
        bank: &[Sample],
        query_features: &Tensor,
        queries: &[Sample],
        device: Device,
    ) -> (i64, i64) {
        let votes = knn_votes(bank_features, &labels(bank, device), query_features, self.classes, self.config);
        (top_k_hits(&votes, &labels(queries, device), 1), queries.len() as i64)
    }
}

/// Rank `rank`'s part of `samples` split in `world` contiguous parts whose
/// sizes differ by at most one.
fn part(samples: &[Sample], rank: usize, world: usize) -> &[Sample] {
    &samples[bounds(samples.len(), rank, world)]
}

/// The positions of rank `rank`'s [`part`] of `total` rows.
fn bounds(total: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    rank * total / world..(rank + 1) * total / world
}

/// Every rank's `features` of its [`part`] of `total` rows, in rank order:
/// the parts are padded to the longest for the all-gather, and cut back.
fn gathered(group: &ProcessGroup, features: &Tensor, total: usize) -> Result<Tensor> {
    let world = group.size();
    let longest = total.div_ceil(world) as i64;
    let padding = longest - features.size()[0];
    let padded = features.constant_pad_nd([0, 0, 0, padding]);
    let all = group.all_gather(&padded)?;
    let parts: Vec<Tensor> =
        (0..world).map(|rank| all.narrow(0, rank as i64 * longest, bounds(total, rank, world).len() as i64)).collect();
    Ok(Tensor::cat(&parts, 0))
}

/// The kNN monitor's score of the network in the run folder `run_dir`
/// (its latest checkpoint), read at `layer`: how a study scores z = g(h)
/// beside the h the monitor scored during training.
pub fn knn_top1_at(run_dir: &std::path::Path, layer: Layer) -> Result<f64> {
    let saved = Checkpoint::read_latest(&run_dir.join(checkpoint::FILE_NAME))?;
    let config = saved.config.clone().validate()?;
    let device = crate::device::select(config.train.device)?;
    let (_store, model, _) = saved.into_model(device)?;
    let pool = worker_pool(config.data.workers)?;
    let knn = open_splits(&config.data, config.train.seed)?.knn.ok_or_else(|| {
        Error::InvalidArgument(format!("{}: the run has no kNN monitor to score it with", run_dir.display()))
    })?;
    let format = ViewFormat { size: config.data.image_size, mean: config.data.mean, std: config.data.std };
    Monitor::of_run(&config, knn, &pool).top1(FeatureNet::at(&model, layer)?, format, device, &pool, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageSource;

    #[test]
    fn parts_cover_the_samples_in_order_and_differ_by_at_most_one() {
        let samples: Vec<Sample> =
            (0..10).map(|i| Sample { source: ImageSource::File(i.to_string().into()), label: Some(i) }).collect();
        for world in 1..=10 {
            let parts: Vec<&[Sample]> = (0..world).map(|rank| part(&samples, rank, world)).collect();
            let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(sizes.iter().sum::<usize>(), 10, "{world} parts: {sizes:?}");
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{world} parts: {sizes:?}");
            let joined: Vec<Option<usize>> = parts.concat().iter().map(|s| s.label).collect();
            assert_eq!(joined, samples.iter().map(|s| s.label).collect::<Vec<_>>());
        }
    }
}
