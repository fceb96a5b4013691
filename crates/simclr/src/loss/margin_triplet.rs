//! Margin triplet loss (Table 2): ℓ_i = mean over negatives k of
//! max(sim(z_i, z_k) - sim(z_i, z_p) + m, 0), averaged over the 2N anchors.
//! Table 2 writes one negative; the mean over all 2(N-1) uses every
//! negative of the batch, as the paper's comparison does. With semi-hard
//! negative mining ([`Negatives::SemiHard`]) the hinges of the negatives
//! more similar than the positive are left out of the sum, which is still
//! divided by 2(N-1), so that a kept negative weighs what it weighs
//! without mining.
use tch::{Kind, Tensor};

use super::similarity::{similarity_matrix, Layout, Similarity};
use super::Negatives;
use crate::Result;

/// As [`super::nt_xent::nt_xent`], for the margin triplet loss with margin
/// m over the `which` negatives.
pub fn margin_triplet(
    z: &Tensor,
    keys: &Tensor,
    layout: Layout,
    (margin, which): (f64, Negatives),
    similarity: Similarity,
) -> Result<Tensor> {
    let similarities = similarity_matrix(z, keys, similarity);
    let positive = layout.positive_similarity(&similarities).unsqueeze(1);
    let mask = layout.kept_negatives(&similarities, which).to_kind(similarities.kind());
    let hinge = (similarities - positive + margin).clamp_min(0.0) * &mask;
    let per_anchor = hinge.sum_dim_intlist([1i64].as_slice(), false, None) / (layout.keys - 2) as f64;
    Ok(per_anchor.mean(None::<Kind>))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::similarity::by_hand::{assert_matches_loops, kept_negatives, mean_over_anchors};

    #[test]
    fn zero_when_positives_beat_negatives_by_the_margin() {
        let a = [1.0, 0.0];
        let b = [0.0, 1.0];
        let z = Tensor::from_slice2(&[a, b, a, b]).to_kind(Kind::Double);
        // sim(pos) = 1, sim(neg) = 0: hinge max(0 - 1 + m, 0).
        let loss = |margin| {
            let loss = margin_triplet(&z, &z, Layout::local(2), (margin, Negatives::All), Similarity::Cosine);
            loss.unwrap().double_value(&[])
        };
        assert_eq!(loss(0.5), 0.0);
        assert!((loss(1.5) - 0.5).abs() < 1e-9);
    }

    /// The loss with loops, in f64, over the negatives `which` keeps.
    fn reference(z: &[Vec<f64>], margin: f64, which: Negatives) -> f64 {
        let count = (z.len() - 2) as f64;
        mean_over_anchors(z, |i, p, sim| {
            let negatives = kept_negatives(z.len(), (i, p), sim, which);
            negatives.map(|k| (sim(i, k) - sim(i, p) + margin).max(0.0)).sum::<f64>() / count
        })
    }

    #[test]
    fn semi_hard_mining_keeps_the_negatives_less_similar_than_the_positive() {
        let loss = |z: &Tensor, which| {
            let loss = margin_triplet(z, z, Layout::local(6), (0.4, which), Similarity::Cosine);
            loss.unwrap().double_value(&[])
        };
        assert_matches_loops(loss, |z, which| reference(z, 0.4, which), 0.05);
    }
}
