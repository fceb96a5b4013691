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

/// Where training-mode BatchNorm normalises over a global batch: the group,
/// and every rank's number of images where the slices differ in size.
#[derive(Clone, Copy)]
struct Global {
    group: NonNull<ProcessGroup>,
    images: Option<NonNull<[i64]>>,
}

thread_local! {
    /// The global batch BatchNorm normalises over, while
    /// [`with_global_batch_norm`] runs on this thread.
    static GLOBAL: Cell<Option<Global>> = const { Cell::new(None) };
}

/// Runs `forward` with every training-mode [`batch_norm`] on this thread
/// normalising over `group`'s global batch. The autograd graph it builds
/// must be back-propagated before `group` is dropped.
pub fn with_global_batch_norm<T>(group: &ProcessGroup, forward: impl FnOnce() -> T) -> T {
    normalising_over(Global { group: NonNull::from(group), images: None }, forward)
}

/// [`with_global_batch_norm`] where the ranks' slices may differ in size:
/// `images[r]` is rank r's number of images, each at least one (a
/// fine-tuning batch, which need not split evenly); where they differ,
/// each rank's statistics are weighted by its count.
pub fn with_uneven_global_batch_norm<T>(group: &ProcessGroup, images: &[i64], forward: impl FnOnce() -> T) -> T {
    normalising_over(Global { group: NonNull::from(group), images: Some(NonNull::from(images)) }, forward)
}

fn normalising_over<T>(global: Global, forward: impl FnOnce() -> T) -> T {
    struct Restore(Option<Global>);
    impl Drop for Restore {
        fn drop(&mut self) {
            GLOBAL.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(GLOBAL.with(|cell| cell.replace(Some(global))));
    forward()
}

/// `bn` applied to `x` ([N, C] or [N, C, H, W]): in training under
/// [`with_global_batch_norm`] with more than one rank, over the global
/// batch; otherwise as `nn::BatchNorm` does.
///
/// A failed collective panics with [`CollectiveFailed`] (a forward pass
/// returns no `Result`); [`collectives_as_errors`] turns it back into the
/// error.
pub fn batch_norm(x: &Tensor, bn: &nn::BatchNorm, train: bool) -> Tensor {
    // SAFETY: the pointers are set only while `normalising_over` runs
    // `forward`, which borrows the group and the counts, on this thread.
    let global = GLOBAL.with(Cell::get);
    match global {
        Some(Global { group, images }) if train && unsafe { group.as_ref() }.size() > 1 => {
            let (group, images) = unsafe { (group.as_ref(), images.map(|images| images.as_ref())) };
            group
                .batch_norm(x, bn, MOMENTUM, EPS, images)
                .unwrap_or_else(|error| std::panic::panic_any(CollectiveFailed(error)))
        }
        _ => x.apply_t(bn, train),
    }
}

/// Runs `step`, turning a [`CollectiveFailed`] panic in it (a forward pass
/// under [`with_global_batch_norm`]) back into its error; other panics go on.
pub fn collectives_as_errors<T>(step: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<CollectiveFailed>() {
            Ok(failed) => Err(failed.0),
            Err(payload) => std::panic::resume_unwind(payload),
        },
    }
}
