//! NT-Logistic (Table 2): ℓ_i = -log σ(sim(z_i, z_p)/τ) - Σ_{k negative} log σ(-sim(z_i, z_k)/τ),
//! averaged over the 2N anchors.
use tch::{Kind, Tensor};

use super::similarity::{similarity_matrix, Layout, Similarity};
use crate::Result;

/// As [`super::nt_xent::nt_xent`], for NT-Logistic.
pub fn nt_logistic(
    z: &Tensor,
    keys: &Tensor,
    layout: Layout,
    temperature: f64,
    similarity: Similarity,
) -> Result<Tensor> {
    let logits = similarity_matrix(z, keys, similarity) / temperature;
    let positive = layout.positive_similarity(&logits).log_sigmoid().neg();
    let negatives = (-&logits).log_sigmoid().neg() * layout.negative_mask(z.device()).to_kind(logits.kind());
    Ok((positive + negatives.sum_dim_intlist([1i64].as_slice(), false, None)).mean(None::<Kind>))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let loss = nt_logistic(&z, &z, Layout::local(2), tau, Similarity::Cosine).unwrap().double_value(&[]);
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }
}
