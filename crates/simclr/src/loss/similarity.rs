//! The pieces every contrastive objective shares: the pairwise similarity
//! matrix, the index of each anchor's positive, and the mask of negatives.
use tch::{Kind, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    /// sim(u, v) = uᵀv / (‖u‖‖v‖).
    Cosine,
    /// sim(u, v) = uᵀv.
    Dot,
}

names!(Similarity, "similarity", { Cosine => "cosine", Dot => "dot" });

/// Checks that `z` is `[2N, d]` with N >= 2 and returns N.
pub fn pair_count(z: &Tensor) -> Result<i64> {
    let size = z.size();
    match size.as_slice() {
        [rows, _] if rows % 2 == 0 && *rows >= 4 => Ok(rows / 2),
        [rows, _] if *rows == 2 => Err(Error::InvalidArgument(
            "batch size 1: a contrastive loss needs at least 2 images per batch, since the other images \
             are the negatives"
                .to_owned(),
        )),
        _ => Err(Error::InvalidArgument(format!(
            "contrastive loss expects projections of shape [2N, d] with N >= 2, got {size:?}"
        ))),
    }
}

/// Rows scaled to unit ℓ2 norm, as `torch.nn.functional.normalize(eps=1e-12)`,
/// in at least fp32.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let x = if x.kind() == Kind::Double { x.shallow_clone() } else { x.to_kind(Kind::Float) };
    let norm = x.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    x / norm
}

impl Similarity {
    /// Rows ready for dot products: unit-normalised for cosine similarity,
    /// in at least fp32.
    pub fn prepare(self, z: &Tensor) -> Tensor {
        match self {
            Similarity::Cosine => l2_normalize(z),
            Similarity::Dot if z.kind() == Kind::Double => z.shallow_clone(),
            Similarity::Dot => z.to_kind(Kind::Float),
        }
    }
}

/// Cosine or dot similarity of every anchor (row of `anchors`) with every
/// row of `keys`, in fp32 (fp64 stays fp64).
pub fn similarity_matrix(anchors: &Tensor, keys: &Tensor, similarity: Similarity) -> Tensor {
    // In one process the keys are the anchors: prepared once.
    let same =
        anchors.data_ptr() == keys.data_ptr() && anchors.size() == keys.size() && anchors.stride() == keys.stride();
    let anchors = similarity.prepare(anchors);
    let keys = if same { anchors.shallow_clone() } else { similarity.prepare(keys) };
    anchors.matmul(&keys.transpose(0, 1))
}

/// Where a batch's anchors sit among the keys they are compared with. The
/// batch is 2n projections laid out [first views; second views] (anchor
/// i's positive is i ± n); the keys are the projections of every rank, the
/// batch among them at rows `offset..offset + 2n`. In one process the keys
/// are the batch itself, at offset 0. A loss is taken over the batch's rows
/// `first..first + rows`: all 2n of them, or a block of them where a loss
/// is taken in parts ([`Layout::block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pairs: i64,
    pub offset: i64,
    pub keys: i64,
    pub first: i64,
    pub rows: i64,
}

impl Layout {
    pub fn of(anchors: &Tensor, keys: &Tensor, offset: i64) -> Result<Self> {
        let pairs = pair_count(anchors)?;
        let (anchor_size, key_size) = (anchors.size(), keys.size());
        if key_size.len() != 2 || key_size[1] != anchor_size[1] || offset < 0 || offset + 2 * pairs > key_size[0] {
            return Err(Error::InvalidArgument(format!(
                "anchors {anchor_size:?} at row {offset} of keys {key_size:?}: the keys must hold the anchors"
            )));
        }
        Ok(Self { pairs, offset, keys: key_size[0], first: 0, rows: 2 * pairs })
    }

    /// One process: the keys are the anchors.
    pub fn local(pairs: i64) -> Self {
        Self { pairs, offset: 0, keys: 2 * pairs, first: 0, rows: 2 * pairs }
    }

    /// The anchors at the batch's rows `first..first + rows` alone.
    pub fn block(self, first: i64, rows: i64) -> Self {
        assert!(
            first >= 0 && rows > 0 && first + rows <= 2 * self.pairs,
            "rows {first}..{} of a batch of {} anchors",
            first + rows,
            2 * self.pairs
        );
        Self { first, rows, ..self }
    }

    /// The key row of each anchor's positive.
    pub fn positive_index(&self, device: tch::Device) -> Tensor {
        let partner =
            Tensor::arange_start(self.first + self.pairs, self.first + self.pairs + self.rows, (Kind::Int64, device));
        partner.remainder(2 * self.pairs) + self.offset
    }

    /// [rows, keys]: true at each anchor's own row.
    pub fn self_mask(&self, device: tch::Device) -> Tensor {
        let own = Tensor::arange(self.rows, (Kind::Int64, device)) + (self.offset + self.first);
        let mask = Tensor::zeros([self.rows, self.keys], (Kind::Bool, device));
        mask.scatter_value(1, &own.unsqueeze(1), 1.0)
    }

    /// The entries of `matrix` ([rows, keys]) where each anchor meets
    /// itself: a diagonal view, which writes through.
    pub fn own_entries(&self, matrix: &Tensor) -> Tensor {
        matrix.narrow(1, self.offset + self.first, self.rows).diagonal(0, 0, 1)
    }

    /// [rows, keys]: true at the negatives, every key but the anchor and its positive.
    pub fn negative_mask(&self, device: tch::Device) -> Tensor {
        let positives = self.positive_index(device);
        let positive_mask =
            Tensor::zeros([self.rows, self.keys], (Kind::Bool, device)).scatter_value(1, &positives.unsqueeze(1), 1.0);
        self.self_mask(device).logical_or(&positive_mask).logical_not()
    }

    /// [rows, keys]: true at the negatives `which` keeps for each anchor,
    /// from `similarities` ([rows, keys], or any increasing function of
    /// them, such as logits): all of them, or the semi-hard ones, less
    /// similar to the anchor than its positive.
    pub fn kept_negatives(&self, similarities: &Tensor, which: super::Negatives) -> Tensor {
        let negatives = self.negative_mask(similarities.device());
        match which {
            super::Negatives::All => negatives,
            super::Negatives::SemiHard => {
                let positive = self.positive_similarity(similarities).unsqueeze(1);
                negatives.logical_and(&similarities.lt_tensor(&positive))
            }
        }
    }

    /// The similarity of each anchor with its positive, from [rows, keys].
    pub fn positive_similarity(&self, similarities: &Tensor) -> Tensor {
        similarities.gather(1, &self.positive_index(similarities.device()).unsqueeze(1), false).squeeze_dim(1)
    }
}

/// Losses written out with loops, in f64, for the tests of each loss.
#[cfg(test)]
pub(crate) mod by_hand {
    /// The mean over the anchors of `z` (2N rows; anchor i's positive is
    /// i ± N) of `term(i, p, s)`, where s(a, b) is the cosine similarity of
    /// rows a and b.
    pub fn mean_over_anchors(z: &[Vec<f64>], term: impl Fn(usize, usize, &dyn Fn(usize, usize) -> f64) -> f64) -> f64 {
        let n2 = z.len();
        let norm = |v: &Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let sim =
            |a: usize, b: usize| z[a].iter().zip(&z[b]).map(|(x, y)| x * y).sum::<f64>() / (norm(&z[a]) * norm(&z[b]));
        (0..n2).map(|i| term(i, (i + n2 / 2) % n2, &sim)).sum::<f64>() / n2 as f64
    }

    /// The negatives of anchor `i` (positive `p`) among `count` rows that
    /// `which` keeps, by the similarity `sim`.
    pub fn kept_negatives<'a>(
        count: usize,
        (i, p): (usize, usize),
        sim: &'a dyn Fn(usize, usize) -> f64,
        which: crate::loss::Negatives,
    ) -> impl Iterator<Item = usize> + 'a {
        let semi_hard = which == crate::loss::Negatives::SemiHard;
        (0..count).filter(move |&k| k != i && k != p && (!semi_hard || sim(i, k) < sim(i, p)))
    }

    /// Checks a loss (of 12 fixed projections of 5 dimensions, over all
    /// negatives or the semi-hard ones) against its `reference` with loops;
    /// the negative control: mining drops at least `dropped` of the loss
    /// (some negatives of these projections are harder than their positive).
    pub fn assert_matches_loops(
        loss: impl Fn(&tch::Tensor, crate::loss::Negatives) -> f64,
        reference: impl Fn(&[Vec<f64>], crate::loss::Negatives) -> f64,
        dropped: f64,
    ) {
        let z = projections(12, 5);
        let losses = crate::loss::Negatives::ALL.map(|which| {
            let (loss, expected) = (loss(&z, which), reference(&rows(&z), which));
            assert!((loss - expected).abs() < 1e-12, "{which:?}: {loss} vs {expected}");
            loss
        });
        assert!(losses[0] - losses[1] > dropped, "{losses:?}");
    }

    /// `[rows, dim]` f64 projections from a closed-form formula: the same in
    /// every run, without the generator the crate's tests share across
    /// threads.
    pub fn projections(rows: i64, dim: i64) -> tch::Tensor {
        let options = (tch::Kind::Double, tch::Device::Cpu);
        (tch::Tensor::arange(rows * dim, options) * 0.618 + 0.3).sin().reshape([rows, dim])
    }

    /// The rows of a `[rows, d]` f64 tensor.
    pub fn rows(z: &tch::Tensor) -> Vec<Vec<f64>> {
        (0..z.size()[0]).map(|i| Vec::<f64>::try_from(z.get(i)).unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn masks_partition_each_row() {
        let negatives = Layout::local(3).negative_mask(Device::Cpu);
        assert_eq!(negatives.sum(Kind::Int64).int64_value(&[]), 6 * 4);
        assert_eq!(negatives.int64_value(&[0, 3]), 0);
        assert_eq!(negatives.int64_value(&[0, 0]), 0);
        assert_eq!(negatives.int64_value(&[4, 2]), 1);
        assert_eq!(Vec::<i64>::try_from(Layout::local(2).positive_index(Device::Cpu)).unwrap(), vec![2, 3, 0, 1]);
    }

    #[test]
    fn a_block_looks_up_its_own_anchors() {
        // Rows 2..5 of a batch of 3 pairs at row 4 of 12 keys.
        let block = Layout { pairs: 3, offset: 4, keys: 12, first: 0, rows: 6 }.block(2, 3);
        assert_eq!(Vec::<i64>::try_from(block.positive_index(Device::Cpu)).unwrap(), vec![9, 4, 5]);
        let own = block.self_mask(Device::Cpu).nonzero();
        assert_eq!(Vec::<i64>::try_from(own.select(1, 1)).unwrap(), vec![6, 7, 8]);
        let matrix = Tensor::zeros([3, 12], (Kind::Float, Device::Cpu));
        let _ = block.own_entries(&matrix).fill_(1.0);
        assert!(matrix.to_kind(Kind::Bool).equal(&block.self_mask(Device::Cpu)));
        let negatives = block.negative_mask(Device::Cpu);
        assert_eq!(negatives.size(), [3, 12]);
        assert_eq!(
            Vec::<i64>::try_from(negatives.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)).unwrap(),
            vec![10; 3]
        );
        assert_eq!(negatives.int64_value(&[0, 9]) + negatives.int64_value(&[0, 6]), 0);
    }

    #[test]
    fn batch_of_one_is_a_clear_error() {
        let z = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        assert!(pair_count(&z).unwrap_err().to_string().contains("batch size 1"));
        let z = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        assert!(pair_count(&z).is_err());
    }
}
