//! Margin triplet loss (Table 2): ℓ_i = mean over negatives k of
//! max(sim(z_i, z_k) - sim(z_i, z_p) + m, 0), averaged over the 2N anchors.
//! Table 2 writes one negative; the mean over all 2(N-1) uses every
//! negative of the batch, as the paper's comparison does.
use tch::{Kind, Tensor};

use super::similarity::{negative_mask, pair_count, positive_similarity, similarity_matrix, Similarity};
use crate::Result;

pub fn margin_triplet(z: &Tensor, margin: f64, similarity: Similarity) -> Result<Tensor> {
    let pairs = pair_count(z)?;
    let similarities = similarity_matrix(z, similarity);
    let positive = positive_similarity(&similarities, pairs).unsqueeze(1);
    let mask = negative_mask(pairs, z.device()).to_kind(similarities.kind());
    let hinge = (similarities - positive + margin).clamp_min(0.0) * &mask;
    let per_anchor = hinge.sum_dim_intlist([1i64].as_slice(), false, None) / (2 * pairs - 2) as f64;
    Ok(per_anchor.mean(None::<Kind>))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_when_positives_beat_negatives_by_the_margin() {
        let a = [1.0, 0.0];
        let b = [0.0, 1.0];
        let z = Tensor::from_slice2(&[a, b, a, b]).to_kind(Kind::Double);
        // sim(pos) = 1, sim(neg) = 0: hinge max(0 - 1 + m, 0).
        assert_eq!(margin_triplet(&z, 0.5, Similarity::Cosine).unwrap().double_value(&[]), 0.0);
        let loss = margin_triplet(&z, 1.5, Similarity::Cosine).unwrap().double_value(&[]);
        assert!((loss - 0.5).abs() < 1e-9);
    }
}
