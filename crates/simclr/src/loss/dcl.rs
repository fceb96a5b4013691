//! Decoupled contrastive loss (Yeh et al., "Decoupled Contrastive
//! Learning", ECCV 2022): NT-Xent with the positive taken out of the
//! denominator, ℓ_i = -sim(z_i, z_p)/τ + log Σ_{k∉{i,p}} exp(sim(z_i, z_k)/τ),
//! averaged over the 2N anchors. The positive's share of NT-Xent's
//! denominator scales down the gradient of every pair the model already
//! matches well (the paper's "negative-positive coupling"), most at small
//! batches and early in training; removing it is lightly's `DCLLoss`
//! without a weighting function.
use tch::Tensor;

use super::similarity::{similarity_matrix, Layout, Similarity};
use crate::Result;

/// As [`super::nt_xent::nt_xent`], with the positive out of the denominator.
pub fn dcl(z: &Tensor, keys: &Tensor, layout: Layout, temperature: f64, similarity: Similarity) -> Result<Tensor> {
    let logits = similarity_matrix(z, keys, similarity) / temperature;
    let positives = layout.positive_index(z.device()).unsqueeze(1);
    let positive = logits.gather(1, &positives, false).squeeze_dim(1);
    // A copy with -inf at the positives (gather's backward reads the
    // logits, so they are not written), then at the anchors' own entries
    // in place, as NT-Xent does: exp(-inf) = 0 leaves both out of the sum.
    let negatives = logits.scatter_value(1, &positives, f64::NEG_INFINITY);
    let _ = layout.own_entries(&negatives).fill_(f64::NEG_INFINITY);
    let denominator = negatives.logsumexp([1i64].as_slice(), false);
    Ok((denominator - positive).mean(logits.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::nt_xent::nt_xent;
    use crate::loss::similarity::by_hand::{mean_over_anchors, rows};
    use tch::{Device, Kind};

    /// The decoupled loss with loops, in f64: for anchor i with positive p,
    /// -s_ip/τ + log Σ_{k∉{i,p}} exp(s_ik/τ), s the cosine similarity.
    fn reference(z: &[Vec<f64>], tau: f64) -> f64 {
        mean_over_anchors(z, |i, p, sim| {
            let denominator: f64 = (0..z.len()).filter(|&k| k != i && k != p).map(|k| (sim(i, k) / tau).exp()).sum();
            -sim(i, p) / tau + denominator.ln()
        })
    }

    #[test]
    fn matches_the_decoupled_loss_written_out() {
        let z = (Tensor::arange(8 * 5, (Kind::Double, Device::Cpu)) * 0.731 + 0.2).sin().reshape([8, 5]);
        let loss = dcl(&z, &z, Layout::local(4), 0.3, Similarity::Cosine).unwrap().double_value(&[]);
        let expected = reference(&rows(&z), 0.3);
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
        // Control: NT-Xent, whose denominator holds the positive, is another loss.
        let coupled = nt_xent(&z, &z, Layout::local(4), 0.3, Similarity::Cosine).unwrap().double_value(&[]);
        assert!((coupled - expected).abs() > 1e-2, "{coupled} vs {expected}");
    }

    #[test]
    fn its_gradient_is_nt_xents_without_the_positives_pull_on_the_denominator() {
        // d ℓ_i / d s_ip is -1/τ exactly (NT-Xent's is -(1 - P_ip)/τ), so the
        // pull on a pair never fades as the pair is matched.
        let tau = 0.5;
        // Dot products with identity keys: the rows are the similarity matrix.
        let similarities =
            (Tensor::arange(36, (Kind::Double, Device::Cpu)) * 0.37).sin().reshape([6, 6]).set_requires_grad(true);
        let keys = Tensor::eye(6, (Kind::Double, Device::Cpu));
        let layout = Layout::of(&similarities, &keys, 0).unwrap();
        let loss = dcl(&similarities, &keys, layout, tau, Similarity::Dot).unwrap();
        let gradient = Tensor::run_backward(&[&loss], &[&similarities], false, false).remove(0);
        for i in 0..6 {
            let p = (i + 3) % 6;
            let pull = gradient.double_value(&[i, p]);
            assert!((pull + 1.0 / (6.0 * tau)).abs() < 1e-12, "anchor {i}: {pull}");
            assert_eq!(gradient.double_value(&[i, i]), 0.0);
        }
    }
}
