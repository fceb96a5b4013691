//! How many dimensions a representation uses: the effective rank of its
//! features (Roy and Vetterli 2007), as RankMe (Garrido et al. 2023, arXiv
//! 2210.02885) measures self-supervised representations: exp of the entropy
//! of the singular values, normalised to sum to one. Appendix B.4 of the
//! paper finds the projection head's output z of lower rank than h, the
//! head discarding what the contrastive task does not need.
use tch::{Kind, Tensor};

/// RankMe's ε, added to each normalised singular value so that a zero one
/// has a finite logarithm.
const EPSILON: f64 = 1e-7;

/// The effective rank of the rows of `features` (`[n, d]`, as they are, not
/// centred, as RankMe takes them): 1 where every row lies on one line,
/// min(n, d) where every singular value is equal, in between otherwise.
/// Unchanged by the scale of the features and the order of the rows.
pub fn effective_rank(features: &Tensor) -> f64 {
    effective_rank_of(&singular_values(features))
}

/// The singular values of `features` (`[n, d]`), largest first, in f64.
pub fn singular_values(features: &Tensor) -> Tensor {
    features.to_kind(Kind::Double).svd(true, false).1
}

/// [`effective_rank`] from the singular values themselves.
pub fn effective_rank_of(singular: &Tensor) -> f64 {
    let shares = singular / singular.sum(Kind::Double).clamp_min(f64::MIN_POSITIVE) + EPSILON;
    let entropy = -(&shares * shares.log()).sum(Kind::Double);
    entropy.exp().double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// `[rows, columns]` rows whose singular values are `values`: a scaled
    /// identity's first columns, rotated by a fixed orthogonal matrix.
    fn with_singular_values(values: &[f64], rows: i64, columns: i64) -> Tensor {
        let options = (Kind::Double, Device::Cpu);
        let diagonal = Tensor::zeros([rows, columns], options);
        for (i, &value) in values.iter().enumerate() {
            let _ = diagonal.get(i as i64).get(i as i64).fill_(value);
        }
        let mixing = (Tensor::arange(rows * rows, options) * 0.618 + 0.3).sin().reshape([rows, rows]);
        let (orthogonal, _) = Tensor::linalg_qr(&mixing, "reduced");
        orthogonal.matmul(&diagonal)
    }

    #[test]
    fn equal_singular_values_count_and_unequal_ones_count_by_their_entropy() {
        let three = effective_rank(&with_singular_values(&[2.0, 2.0, 2.0], 10, 6));
        assert!((three - 3.0).abs() < 1e-4, "{three}");
        let one = effective_rank(&with_singular_values(&[5.0], 10, 6));
        assert!((one - 1.0).abs() < 1e-4, "{one}");
        // Shares 3/4 and 1/4: exp(-(0.75 ln 0.75 + 0.25 ln 0.25)).
        let expected = (-(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln())).exp();
        let unequal = effective_rank(&with_singular_values(&[3.0, 1.0], 10, 6));
        assert!((unequal - expected).abs() < 1e-4, "{unequal} against {expected}");
        // Scale and row order leave it as it is.
        let features = with_singular_values(&[4.0, 2.0, 1.0, 0.5], 10, 6);
        let scaled = effective_rank(&(&features * 1000.0));
        let reordered = effective_rank(&features.flip([0]));
        let rank = effective_rank(&features);
        assert!((scaled - rank).abs() < 1e-9 && (reordered - rank).abs() < 1e-9, "{rank} {scaled} {reordered}");
        assert!(rank > 2.0 && rank < 4.0, "{rank}");
        // Features that are all zero use no dimension: 1, not NaN.
        let zeros = effective_rank(&Tensor::zeros([5, 3], (Kind::Float, Device::Cpu)));
        assert!((zeros - 1.0).abs() < 1e-3, "{zeros}");
    }
}
