//! Weighted k-nearest-neighbour classification on frozen features, the
//! usual self-supervised monitor (Wu et al. 2018, arXiv 1805.01978): cosine
//! similarity, the k most similar bank entries vote with weight exp(s/T).
//! Queries go in chunks so that a 50k-image bank against 10k queries fits in
//! memory on the CPU as on a GPU.
use tch::{Kind, Tensor};

use super::Hits;
use crate::dist::{best_across, ProcessGroup, ReduceOp};
use crate::loss::similarity::l2_normalize as normalize;

/// Rows of similarity computed at once: chunk x bank floats in memory.
const QUERY_CHUNK: i64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct KnnConfig {
    /// Neighbours that vote: 200 is the common monitor setting.
    #[arg(long, default_value_t = KnnConfig::default().k)]
    pub k: usize,
    /// T in exp(s/T): 0.1.
    #[arg(long, default_value_t = KnnConfig::default().temperature)]
    pub temperature: f64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self { k: 200, temperature: 0.1 }
    }
}

impl KnnConfig {
    /// Pushes a line per bad field, named `{prefix}k` and `{prefix}temperature`:
    /// `train.knn_k = 0` in a run's config, `--k 0` on the command line
    /// (prefix `--`).
    pub fn check(&self, prefix: &str, problems: &mut Vec<String>) {
        let named = |field: &str, value: &dyn std::fmt::Display| match prefix {
            "--" => format!("--{field} {value}"),
            _ => format!("{prefix}{field} = {value}"),
        };
        if self.k == 0 {
            problems.push(format!("{}: must be at least 1", named("k", &0)));
        }
        if !crate::checks::is_positive_finite(self.temperature) {
            problems.push(format!("{}: must be > 0", named("temperature", &self.temperature)));
        }
    }
}

/// The `k` most similar rows of `bank` for each row of `queries` (both of
/// unit length), best first: `[Q, k]` cosine similarities and positions in
/// `bank`. Queries go `QUERY_CHUNK` at a time, so that no more than chunk x
/// bank similarities are held at once (all of 50k x 50k would be 10 GB).
pub fn nearest(bank: &Tensor, queries: &Tensor, k: i64) -> (Tensor, Tensor) {
    if queries.size()[0] == 0 {
        let empty = |kind| Tensor::zeros([0, k], (kind, bank.device()));
        return (empty(bank.kind()), empty(Kind::Int64));
    }
    let (similarities, positions): (Vec<Tensor>, Vec<Tensor>) = queries
        .split(QUERY_CHUNK, 0)
        .iter()
        .map(|chunk| chunk.matmul(&bank.transpose(0, 1)).topk(k, 1, true, true))
        .unzip();
    (Tensor::cat(&similarities, 0), Tensor::cat(&positions, 0))
}

/// Each query's weighted votes per class, `[Q, classes]`.
pub fn knn_votes(bank: &Tensor, bank_labels: &Tensor, queries: &Tensor, classes: i64, config: KnnConfig) -> Tensor {
    let bank = normalize(bank);
    let k = (config.k as i64).min(bank.size()[0]);
    let (top_similarity, top_index) = nearest(&bank, &normalize(queries), k);
    let neighbour_labels = bank_labels.index_select(0, &top_index.flatten(0, -1)).view_as(&top_index);
    votes(&top_similarity, &neighbour_labels, classes, config.temperature)
}

/// The votes per class, `[Q, classes]`, of neighbours of cosine
/// `similarity` and class `labels` (both `[Q, k]`): exp(s/T) each.
fn votes(similarity: &Tensor, labels: &Tensor, classes: i64, temperature: f64) -> Tensor {
    let weights = (similarity / temperature).exp();
    Tensor::zeros([similarity.size()[0], classes], (Kind::Float, similarity.device())).scatter_add(1, labels, &weights)
}

/// Predicted class of each query, `[Q]` int64.
pub fn knn_predict(bank: &Tensor, bank_labels: &Tensor, queries: &Tensor, classes: i64, config: KnnConfig) -> Tensor {
    knn_votes(bank, bank_labels, queries, classes, config).argmax(1, false)
}

/// The kNN classifier's hits on `queries` (its top-1 and top-5 accuracy by
/// [`Hits::accuracy`]).
pub fn knn_hits(
    bank: &Tensor,
    bank_labels: &Tensor,
    queries: &Tensor,
    query_labels: &Tensor,
    classes: i64,
    config: KnnConfig,
) -> Hits {
    Hits::of(&knn_votes(bank, bank_labels, queries, classes, config), query_labels)
}

/// Queries whose candidates one all-gather of [`knn_votes_across`] carries:
/// ranks x chunk x k similarities and labels (8 ranks, k 200: 78 MB).
const GATHERED_QUERIES: i64 = 4096;

/// [`knn_votes`] with the bank shared among `group`'s ranks, each holding
/// its part (a part may be empty) and all the `queries`. Each rank finds
/// every query's k most similar rows of its part, the ranks' candidates are
/// gathered (a chunk of queries at a time), and every rank votes with each
/// query's k most similar of all candidates: the votes of one process
/// holding the whole bank, up to rounding and ties, on every rank. No rank
/// ever holds more of the bank than its part (an ImageNet bank of 2048-d
/// features is 10.5 GB). Without a group, [`knn_votes`].
pub fn knn_votes_across(
    bank: &Tensor,
    bank_labels: &Tensor,
    queries: &Tensor,
    classes: i64,
    config: KnnConfig,
    group: Option<&ProcessGroup>,
) -> crate::Result<Tensor> {
    let Some(group) = group else { return Ok(knn_votes(bank, bank_labels, queries, classes, config)) };
    let mut rows = Tensor::from_slice(&[bank.size()[0]]);
    group.all_reduce(&mut rows, ReduceOp::Sum)?;
    let k = (config.k as i64).min(rows.int64_value(&[0]));
    let bank = normalize(bank);
    let mut chunks = vec![Tensor::zeros([0, classes], (Kind::Float, bank.device()))];
    for chunk in normalize(queries).split(GATHERED_QUERIES, 0) {
        // This part's k best (fewer where it holds fewer rows) against every part's.
        let (similarity, position) = nearest(&bank, &chunk, k.min(bank.size()[0]));
        let labels = bank_labels.index_select(0, &position.flatten(0, -1)).view_as(&position);
        let (top, labels) = best_across(group, &similarity, &labels, k, k)?;
        chunks.push(votes(&top, &labels, classes, config.temperature));
    }
    Ok(Tensor::cat(&chunks, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::seeded_uniform;
    use tch::Device;

    #[test]
    fn separable_clusters_are_classified() {
        let options = (Kind::Float, Device::Cpu);
        let mut rng = rand::SeedableRng::seed_from_u64(1);
        let centres = Tensor::eye(3, options) * 5.0;
        let bank_labels = Tensor::arange(3, (Kind::Int64, Device::Cpu)).repeat([100]);
        let bank = centres.index_select(0, &bank_labels) + seeded_uniform(&[300, 3], 0.87, &mut rng);
        let query_labels = Tensor::arange(3, (Kind::Int64, Device::Cpu)).repeat([300]);
        let queries = centres.index_select(0, &query_labels) + seeded_uniform(&[900, 3], 0.87, &mut rng);
        let accuracy = knn_hits(&bank, &bank_labels, &queries, &query_labels, 3, KnnConfig::default()).accuracy();
        assert_eq!(accuracy.top1, 1.0, "the clusters do not overlap: {accuracy:?}");
    }

    #[test]
    fn nearest_in_chunks_is_nearest_at_once() {
        // 600 queries: two whole chunks and a part of one.
        let mut rng = rand::SeedableRng::seed_from_u64(2);
        let bank = normalize(&seeded_uniform(&[400, 8], 1.0, &mut rng));
        let queries = normalize(&seeded_uniform(&[2 * QUERY_CHUNK + 88, 8], 1.0, &mut rng));
        let (similarity, position) = nearest(&bank, &queries, 5);
        let (whole_similarity, whole_position) = queries.matmul(&bank.transpose(0, 1)).topk(5, 1, true, true);
        assert!(similarity.equal(&whole_similarity) && position.equal(&whole_position));
        let (none, _) = nearest(&bank, &queries.narrow(0, 0, 0), 5);
        assert_eq!(none.size(), [0, 5]);
    }

    #[test]
    fn weights_favour_the_closest_neighbour() {
        // One very close neighbour of class 1 outweighs two distant ones of class 0.
        let bank = Tensor::from_slice2(&[[1.0f32, 0.0], [0.0, 1.0], [0.05, 1.0]]);
        let labels = Tensor::from_slice(&[1i64, 0, 0]);
        let query = Tensor::from_slice2(&[[1.0f32, 0.02]]);
        let config = KnnConfig { k: 3, temperature: 0.1 };
        assert_eq!(knn_predict(&bank, &labels, &query, 2, config).int64_value(&[0]), 1);
    }
}
