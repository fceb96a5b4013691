//! Data-parallel training across processes (the paper's section 2.2):
//! each rank holds a contiguous slice of every global batch, the
//! projections of all ranks are gathered so every anchor meets all
//! 2(N-1) negatives, and BatchNorm normalises with statistics of the
//! global batch. Built on c10d through the C++ shim `c10d.cpp`.
//!
//! The gradient is the one-process gradient of the global batch: the
//! gather's backward is a sum reduce-scatter and the statistics' all-reduce
//! is differentiable (all-reduce in backward), so with L = (1/W) Σ_r L_r
//! the ranks' parameter gradients sum to W·∇L; averaging them over the W
//! ranks gives ∇L exactly (see `../shared/notes/distributed.md`).
mod batch_norm;
mod group;
pub mod launch;

pub use batch_norm::{
    batch_norm, collectives_as_errors, with_global_batch_norm, with_uneven_global_batch_norm, CollectiveFailed,
};
pub use group::{GradientBuckets, GroupOptions, ProcessGroup, ReduceOp, Rendezvous, StoreServer};

/// Rank `rank`'s part of `items` cut into `world` contiguous parts, in rank
/// order, whose sizes differ by at most one: how the ranks share work that
/// is not a training batch (the kNN monitor's and `eval`'s features, whose
/// parts [`ProcessGroup::all_gather_rows`] puts back together in order).
pub fn part<T>(items: &[T], rank: usize, world: usize) -> &[T] {
    &items[part_range(items.len(), rank, world)]
}

/// The positions of rank `rank`'s [`part`] of `total` items.
pub fn part_range(total: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    rank * total / world..(rank + 1) * total / world
}

/// [`ProcessGroup::agree`] where there is a group; `outcome` itself alone.
pub fn agree<T>(group: Option<&ProcessGroup>, outcome: crate::Result<T>) -> crate::Result<T> {
    match group {
        Some(group) => group.agree(outcome),
        None => outcome,
    }
}

/// [`ProcessGroup::explain`] where there is a group; `error` itself alone.
pub fn explain(group: Option<&ProcessGroup>, error: crate::Error) -> crate::Error {
    match group {
        Some(group) => group.explain(error),
        None => error,
    }
}

/// `ranks` as a message names them, each said by `each` (a number, with
/// its machine, say): "rank 1", "ranks 1 and 3", "ranks 1, 2 and 3"; past
/// eight, "ranks 0, 1, ..., 7 and 4 more" (`each` asked of the eight
/// alone). Empty where `ranks` is.
pub fn ranks_said(ranks: &[usize], each: impl Fn(usize) -> String) -> String {
    const LISTED: usize = 8;
    let mut listed: Vec<String> = ranks.iter().take(LISTED).map(|&rank| each(rank)).collect();
    if ranks.len() > LISTED {
        listed.push(format!("{} more", ranks.len() - LISTED));
    }
    match listed.split_last() {
        Some((only, [])) => format!("rank {only}"),
        Some((last, rest)) => format!("ranks {} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Every rank's best candidates for the same `[Q]` rows, merged: this
/// rank's `similarity` (float) and `payload` (int64, what a candidate is:
/// a label, a position), `[Q, n]` with n at most `k`, are padded to `k` with
/// candidates that lose to any other (similarity -inf), gathered from every
/// rank, and each row keeps the `keep` best of all, best first. `keep` must
/// not exceed the real candidates of all ranks together, so that no padding
/// is kept.
pub fn best_across(
    group: &ProcessGroup,
    similarity: &tch::Tensor,
    payload: &tch::Tensor,
    k: i64,
    keep: i64,
) -> crate::Result<(tch::Tensor, tch::Tensor)> {
    use tch::{Kind, Tensor};
    let (rows, found) = (similarity.size()[0], similarity.size()[1]);
    let device = similarity.device();
    let padded = |tensor: Tensor, filler: f64, kind: Kind| {
        Tensor::cat(&[tensor, Tensor::full([rows, k - found], filler, (kind, device))], 1)
    };
    // [W rows, k] -> [rows, W k]: every rank's candidates for each row.
    let across = |tensor: &Tensor| -> crate::Result<Tensor> {
        let all = group.all_gather(tensor)?.reshape([group.size() as i64, rows, k]);
        Ok(all.permute([1, 0, 2]).reshape([rows, -1]))
    };
    let similarity = across(&padded(similarity.to_kind(Kind::Float), f64::NEG_INFINITY, Kind::Float))?;
    let payload = across(&padded(payload.shallow_clone(), 0.0, Kind::Int64))?;
    let (best, chosen) = similarity.topk(keep, 1, true, true);
    Ok((best, payload.gather(1, &chosen, false)))
}

/// Every rank's gradients of `variables` summed, in place: one all-reduce
/// of them all, flat (a classifier's or fine-tuning's, outside the
/// trainer's optimiser). A variable without a gradient (one the loss does
/// not reach, as a projection head's layers above the one fine-tuned from;
/// the same on every rank) is left out.
pub fn sum_gradients(group: &ProcessGroup, variables: &[tch::Tensor]) -> crate::Result<()> {
    let gradients: Vec<tch::Tensor> = variables.iter().map(tch::Tensor::grad).filter(tch::Tensor::defined).collect();
    let mut flat = tch::Tensor::cat(&gradients.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
    group.all_reduce(&mut flat, ReduceOp::Sum)?;
    let mut offset = 0;
    for gradient in &gradients {
        let length = gradient.numel() as i64;
        tch::no_grad(|| gradient.shallow_clone().copy_(&flat.narrow(0, offset, length).view_as(gradient)));
        offset += length;
    }
    Ok(())
}

/// How a training step of one rank takes part in a multi-process run.
#[derive(Debug, Clone, Copy)]
pub struct Parallel<'a> {
    pub group: &'a ProcessGroup,
    /// BatchNorm over the global batch (the paper's Global BN); `false`
    /// normalises each rank's slice alone, for comparison.
    pub global_batch_norm: bool,
}

/// What carries a multi-process run's CUDA tensors (`train.dist_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    #[default]
    Auto,
    Gloo,
    Nccl,
}

/// The precision the gradient travels in between processes
/// (`train.gradient_all_reduce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GradientPrecision {
    /// As computed: the gradient of one process holding the global batch.
    #[default]
    Fp32,
    /// Rounded to bf16 for the all-reduce (half the bytes, as DDP's
    /// `bf16_compress_hook`), summed in bf16, back to fp32 after.
    Bf16,
}

#[cfg(test)]
mod tests {
    #[test]
    fn parts_cover_the_items_in_order_and_differ_by_at_most_one() {
        let items: Vec<usize> = (0..10).collect();
        for world in 1..=12 {
            let parts: Vec<&[usize]> = (0..world).map(|rank| super::part(&items, rank, world)).collect();
            let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{world} parts: {sizes:?}");
            assert_eq!(parts.concat(), items, "{world} parts: {sizes:?}");
        }
    }

    #[test]
    fn ranks_are_said_as_a_sentence_names_them() {
        let said = |ranks: &[usize]| super::ranks_said(ranks, |rank| rank.to_string());
        assert_eq!(said(&[]), "");
        assert_eq!(said(&[1]), "rank 1");
        assert_eq!(said(&[1, 3]), "ranks 1 and 3");
        assert_eq!(said(&[1, 2, 3]), "ranks 1, 2 and 3");
        assert_eq!(said(&(0..8).collect::<Vec<_>>()), "ranks 0, 1, 2, 3, 4, 5, 6 and 7");
        assert_eq!(said(&(0..11).collect::<Vec<_>>()), "ranks 0, 1, 2, 3, 4, 5, 6, 7 and 3 more");
        // Each rank said its own way, the eight listed alone.
        let asked = std::cell::Cell::new(0);
        let each = |rank: usize| {
            asked.set(asked.get() + 1);
            format!("{rank} (on vm)")
        };
        assert_eq!(super::ranks_said(&[2, 5], each), "ranks 2 (on vm) and 5 (on vm)");
        super::ranks_said(&(0..11).collect::<Vec<_>>(), each);
        assert_eq!(asked.get(), 2 + 8);
    }
}
