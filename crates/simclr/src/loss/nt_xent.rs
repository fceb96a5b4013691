//! NT-Xent, eq. (1): for anchor i with positive p(i),
//! ℓ_i = -log exp(sim(z_i, z_p)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ),
//! averaged over all 2N anchors (both orders of every pair, as the paper's
//! L = 1/2N Σ_k [ℓ(2k-1, 2k) + ℓ(2k, 2k-1)]).
use tch::Tensor;

use super::similarity::{similarity_matrix, Layout, Similarity};
use crate::Result;

/// The mean of ℓ_i over the anchors `z` ([rows, d]) against the `keys`
/// ([2N, d]) they sit in where `layout` says (the anchors themselves in one
/// process).
pub fn nt_xent(z: &Tensor, keys: &Tensor, layout: Layout, temperature: f64, similarity: Similarity) -> Result<Tensor> {
    let logits = similarity_matrix(z, keys, similarity) / temperature;
    // exp(-inf) = 0 removes k = i from the denominator. The anchors' own
    // entries are a diagonal of `logits`, filled in place: one kernel, where
    // a [2n, keys] mask took four and a copy of the logits.
    let _ = layout.own_entries(&logits).fill_(f64::NEG_INFINITY);
    // Cross entropy written out: tch's `cross_entropy_for_logits` computes
    // the log-softmax in fp32 even for fp64 inputs.
    let log_probabilities = logits.log_softmax(1, logits.kind());
    let positives = layout.positive_index(z.device()).unsqueeze(1);
    Ok(log_probabilities.gather(1, &positives, false).mean(logits.kind()).neg())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::similarity::by_hand::{mean_over_anchors, rows};
    use tch::{Device, Kind};

    /// Direct evaluation of eq. (1) with loops, in f64.
    fn reference(z: &[Vec<f64>], tau: f64) -> f64 {
        mean_over_anchors(z, |i, p, sim| {
            let denominator: f64 = (0..z.len()).filter(|&k| k != i).map(|k| (sim(i, k) / tau).exp()).sum();
            -((sim(i, p) / tau).exp() / denominator).ln()
        })
    }

    #[test]
    fn matches_equation_one() {
        let z = Tensor::randn([6, 5], (Kind::Double, Device::Cpu));
        let loss = nt_xent(&z, &z, Layout::local(3), 0.3, Similarity::Cosine).unwrap().double_value(&[]);
        let expected = reference(&rows(&z), 0.3);
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
    }

    #[test]
    fn the_anchors_as_their_own_keys_give_what_a_copy_of_them_gives() {
        // One process passes the anchors themselves (normalised once, their
        // diagonal filled in place); a copy takes the path of gathered keys.
        let z = Tensor::randn([8, 5], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let offset_keys = Tensor::cat(&[Tensor::randn([4, 5], (Kind::Double, Device::Cpu)), z.copy()], 0);
        let layouts = [Layout::local(4), Layout::of(&z, &offset_keys, 4).unwrap()];
        let mut results = Vec::new();
        for (keys, layout) in [(z.shallow_clone(), layouts[0]), (z.copy(), layouts[0]), (offset_keys, layouts[1])] {
            let loss = nt_xent(&z, &keys, layout, 0.5, Similarity::Cosine).unwrap();
            let gradient = Tensor::run_backward(&[&loss], &[&z], false, false).remove(0);
            results.push((loss.double_value(&[]), gradient));
        }
        let (loss, gradient) = &results[0];
        for (other_loss, other_gradient) in &results[1..2] {
            assert!((loss - other_loss).abs() < 1e-12, "{loss} vs {other_loss}");
            assert!(gradient.allclose(other_gradient, 1e-10, 1e-12, false));
        }
        // Keys from other ranks add negatives: another loss.
        assert!((loss - results[2].0).abs() > 1e-3);
    }

    #[test]
    fn identical_pairs_far_from_others_give_low_loss() {
        let base = Tensor::eye(4, (Kind::Float, Device::Cpu));
        let z = Tensor::cat(&[&base, &base], 0);
        let low = nt_xent(&z, &z, Layout::local(4), 0.1, Similarity::Cosine).unwrap().double_value(&[]);
        let shuffled = Tensor::cat(&[&base, &base.flip([0])], 0);
        let high = nt_xent(&shuffled, &shuffled, Layout::local(4), 0.1, Similarity::Cosine).unwrap().double_value(&[]);
        assert!(low < 0.01 && high > 5.0, "{low} {high}");
    }
}
