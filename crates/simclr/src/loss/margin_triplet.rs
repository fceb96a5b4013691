//! Margin triplet loss (Table 2): ℓ_i = mean over negatives k of
//! max(sim(z_i, z_k) - sim(z_i, z_p) + m, 0), averaged over the 2N anchors.
//! Table 2 writes one negative; the mean over all 2(N-1) uses every
//! negative of the batch, as the paper's comparison does.
use tch::{Kind, Tensor};

use super::similarity::{similarity_matrix, Layout, Similarity};
use crate::Result;

/// As [`super::nt_xent::nt_xent`], for the margin triplet loss.
pub fn margin_triplet(
    z: &Tensor,
    keys: &Tensor,
    layout: Layout,
    margin: f64,
    similarity: Similarity,
) -> Result<Tensor> {
    let similarities = similarity_matrix(z, keys, similarity);
    let positive = layout.positive_similarity(&similarities).unsqueeze(1);
    let mask = layout.negative_mask(z.device()).to_kind(similarities.kind());
    let hinge = (similarities - positive + margin).clamp_min(0.0) * &mask;
    let per_anchor = hinge.sum_dim_intlist([1i64].as_slice(), false, None) / (layout.keys - 2) as f64;
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
        assert_eq!(margin_triplet(&z, &z, Layout::local(2), 0.5, Similarity::Cosine).unwrap().double_value(&[]), 0.0);
        let loss = margin_triplet(&z, &z, Layout::local(2), 1.5, Similarity::Cosine).unwrap().double_value(&[]);
        assert!((loss - 0.5).abs() < 1e-9);
    }
}
