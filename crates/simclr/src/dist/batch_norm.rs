//! Global BatchNorm ("Global BN", section 2.2): in training, every
//! BatchNorm normalises with the mean and variance of the global batch.
//!
//! Each rank takes the mean and the sum of squared deviations of its slice
//! per channel; one all-gather brings every rank's, which merge into the
//! global mean and variance (Chan et al.'s parallel variance, as libtorch's
//! `batch_norm_gather_stats_with_counts`); libtorch's fused kernels
//! normalise with them, and the backward is SyncBN's (one all-reduce of two
//! per-channel sums), on any device: a custom autograd function in the shim
//! (`GlobalBatchNorm` in `c10d.cpp`). The running statistics move with the
//! global mean and the unbiased global variance, as `torch.nn.SyncBatchNorm`'s
//! do.
use std::cell::Cell;
use std::ptr::NonNull;

use tch::{nn, Tensor};

use super::ProcessGroup;

/// tch's BatchNorm defaults, which every BatchNorm of the model keeps (its
/// config is private to tch).
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// The panic payload of a collective that failed inside a forward pass:
/// the error, to be returned where the pass was started.
#[derive(Debug)]
pub struct CollectiveFailed(pub crate::Error);

thread_local! {
    /// The group whose global batch BatchNorm normalises over, while
    /// [`with_global_batch_norm`] runs on this thread.
    static GROUP: Cell<Option<NonNull<ProcessGroup>>> = const { Cell::new(None) };
}

/// Runs `forward` with every training-mode [`batch_norm`] on this thread
/// normalising over `group`'s global batch. The autograd graph it builds
/// must be back-propagated before `group` is dropped.
pub fn with_global_batch_norm<T>(group: &ProcessGroup, forward: impl FnOnce() -> T) -> T {
    struct Restore(Option<NonNull<ProcessGroup>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            GROUP.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(GROUP.with(|cell| cell.replace(Some(NonNull::from(group)))));
    forward()
}

/// `bn` applied to `x` ([N, C] or [N, C, H, W]): in training under
/// [`with_global_batch_norm`] with more than one rank, over the global
/// batch; otherwise as `nn::BatchNorm` does.
///
/// A failed collective panics with [`CollectiveFailed`] (a forward pass
/// returns no `Result`); the trainer turns it back into the error.
pub fn batch_norm(x: &Tensor, bn: &nn::BatchNorm, train: bool) -> Tensor {
    // SAFETY: the pointer is set only while `with_global_batch_norm`
    // borrows the group, on this thread.
    let group = GROUP.with(Cell::get).map(|group| unsafe { group.as_ref() });
    match group {
        Some(group) if train && group.size() > 1 => group
            .batch_norm(x, bn, MOMENTUM, EPS)
            .unwrap_or_else(|error| std::panic::panic_any(CollectiveFailed(error))),
        _ => x.apply_t(bn, train),
    }
}
