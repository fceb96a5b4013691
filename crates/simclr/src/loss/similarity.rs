//! The pieces every contrastive objective shares: the pairwise similarity
//! matrix, the index of each anchor's positive, and the mask of negatives.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Similarity {
    /// sim(u, v) = uᵀv / (‖u‖‖v‖).
    Cosine,
    /// sim(u, v) = uᵀv.
    Dot,
}

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

/// The `[2N, 2N]` matrix of sim(z_i, z_j), computed in at least fp32.
pub fn similarity_matrix(z: &Tensor, similarity: Similarity) -> Tensor {
    let z = match similarity {
        Similarity::Cosine => l2_normalize(z),
        Similarity::Dot if z.kind() == Kind::Double => z.shallow_clone(),
        Similarity::Dot => z.to_kind(Kind::Float),
    };
    z.matmul(&z.transpose(0, 1))
}

/// For anchor i, the row of its positive: i + N, or i - N for the second views.
pub fn positive_index(pairs: i64, device: tch::Device) -> Tensor {
    let first = Tensor::arange_start(pairs, 2 * pairs, (Kind::Int64, device));
    let second = Tensor::arange(pairs, (Kind::Int64, device));
    Tensor::cat(&[first, second], 0)
}

/// True on the diagonal: an anchor is never compared with itself.
pub fn self_mask(pairs: i64, device: tch::Device) -> Tensor {
    Tensor::eye(2 * pairs, (Kind::Bool, device))
}

/// True where j is a negative of anchor i: neither i itself nor its positive.
pub fn negative_mask(pairs: i64, device: tch::Device) -> Tensor {
    let positives = positive_index(pairs, device);
    let positive_mask =
        Tensor::zeros([2 * pairs, 2 * pairs], (Kind::Bool, device)).scatter_value(1, &positives.unsqueeze(1), 1.0);
    self_mask(pairs, device).logical_or(&positive_mask).logical_not()
}

/// Each anchor's similarity to its positive, `[2N]`.
pub fn positive_similarity(similarities: &Tensor, pairs: i64) -> Tensor {
    similarities.gather(1, &positive_index(pairs, similarities.device()).unsqueeze(1), false).squeeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn masks_partition_each_row() {
        let negatives = negative_mask(3, Device::Cpu);
        assert_eq!(negatives.sum(Kind::Int64).int64_value(&[]), 6 * 4);
        assert_eq!(negatives.int64_value(&[0, 3]), 0);
        assert_eq!(negatives.int64_value(&[0, 0]), 0);
        assert_eq!(negatives.int64_value(&[4, 2]), 1);
        assert_eq!(Vec::<i64>::try_from(positive_index(2, Device::Cpu)).unwrap(), vec![2, 3, 0, 1]);
    }

    #[test]
    fn batch_of_one_is_a_clear_error() {
        let z = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        assert!(pair_count(&z).unwrap_err().to_string().contains("batch size 1"));
        let z = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        assert!(pair_count(&z).is_err());
    }
}
