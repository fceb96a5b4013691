//! NT-Logistic (Table 2): ℓ_i = -log σ(sim(z_i, z_p)/τ) - Σ_{k negative} log σ(-sim(z_i, z_k)/τ),
//! averaged over the 2N anchors; the sum over all negatives or over the
//! semi-hard ones ([`Negatives`]).
use tch::{Kind, Tensor};

use super::similarity::{similarity_matrix, Layout, Similarity};
use super::Negatives;
use crate::Result;

/// As [`super::nt_xent::nt_xent`], for NT-Logistic at temperature τ over
/// the `which` negatives.
pub fn nt_logistic(
    z: &Tensor,
    keys: &Tensor,
    layout: Layout,
    (temperature, which): (f64, Negatives),
    similarity: Similarity,
) -> Result<Tensor> {
    let logits = similarity_matrix(z, keys, similarity) / temperature;
    let positive = layout.positive_similarity(&logits).log_sigmoid().neg();
    let kept = layout.kept_negatives(&logits, which).to_kind(logits.kind());
    let negatives = (-&logits).log_sigmoid().neg() * kept;
    Ok((positive + negatives.sum_dim_intlist([1i64].as_slice(), false, None)).mean(None::<Kind>))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::similarity::by_hand::{assert_matches_loops, kept_negatives, mean_over_anchors};

    #[test]
    fn two_pairs_by_hand() {
        // Views: a, a', b, b' laid out as [a, b, a', b'] with a ⟂ b.
        let a = [1.0, 0.0];
        let b = [0.0, 1.0];
        let z = Tensor::from_slice2(&[a, b, a, b]).to_kind(Kind::Double);
        let tau = 0.5;
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        // Positive similarity 1, the two negatives 0.
        let expected = -sig(1.0 / tau).ln() - 2.0 * sig(0.0).ln();
        let loss = nt_logistic(&z, &z, Layout::local(2), (tau, Negatives::All), Similarity::Cosine);
        let loss = loss.unwrap().double_value(&[]);
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    /// Table 2's loss with loops, in f64, over the negatives `which` keeps.
    fn reference(z: &[Vec<f64>], tau: f64, which: Negatives) -> f64 {
        let log_sigmoid = |x: f64| -(1.0 + (-x).exp()).ln();
        mean_over_anchors(z, |i, p, sim| {
            let negatives = kept_negatives(z.len(), (i, p), sim, which);
            -log_sigmoid(sim(i, p) / tau) - negatives.map(|k| log_sigmoid(-sim(i, k) / tau)).sum::<f64>()
        })
    }

    #[test]
    fn matches_table_two_over_all_negatives_and_over_the_semi_hard_ones() {
        let loss = |z: &Tensor, which| {
            let loss = nt_logistic(z, z, Layout::local(6), (0.5, which), Similarity::Cosine);
            loss.unwrap().double_value(&[])
        };
        assert_matches_loops(loss, |z, which| reference(z, 0.5, which), 0.1);
    }
}
