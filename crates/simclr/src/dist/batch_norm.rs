//! Global BatchNorm ("Global BN", section 2.2): in training, every
//! BatchNorm normalises with the mean and variance of the global batch.
//!
//! Each rank takes the mean and the sum of squared deviations of its slice
//! per channel; one differentiable all-gather brings every rank's, which
//! merge into the global mean and variance (Chan et al.'s parallel
//! variance, as libtorch's `batch_norm_gather_stats_with_counts`); the
//! normalisation is written with ordinary tensor ops, so autograd yields
//! SyncBN's exact backward on any device.
//! The running statistics move with the global mean and the unbiased
//! global variance, as `torch.nn.SyncBatchNorm`'s do.
use std::cell::Cell;
use std::ptr::NonNull;

use tch::{nn, Kind, Tensor};

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
        Some(group) if train && group.size() > 1 => {
            global_batch_norm(x, bn, group).unwrap_or_else(|error| std::panic::panic_any(CollectiveFailed(error)))
        }
        _ => x.apply_t(bn, train),
    }
}

fn global_batch_norm(x: &Tensor, bn: &nn::BatchNorm, group: &ProcessGroup) -> crate::Result<Tensor> {
    let channels = x.size()[1];
    let reduced: Vec<i64> = (0..x.dim() as i64).filter(|&dim| dim != 1).collect();
    let shape: Vec<i64> = (0..x.dim()).map(|dim| if dim == 1 { channels } else { 1 }).collect();
    // Statistics in fp32 at least (fp64 stays fp64), whatever autocast gives.
    let kind = if x.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let xk = x.to_kind(kind);
    // Each rank's mean and sum of squared deviations (two passes over its
    // slice, as precise as one process's BatchNorm), merged over the ranks
    // by the parallel-variance formula: no E[x²] - E[x]² cancellation.
    let local_mean = xk.mean_dim(reduced.as_slice(), false, kind);
    let local_m2 = (&xk - local_mean.view(shape.as_slice())).square().sum_dim_intlist(reduced.as_slice(), false, kind);
    let gathered = group.all_gather_grad(&Tensor::cat(&[local_mean, local_m2], 0).unsqueeze(0))?;
    let (means, m2s) = (gathered.narrow(1, 0, channels), gathered.narrow(1, channels, channels));
    // Every rank holds an equal slice of `count` values per channel.
    let count = (x.numel() as i64 / channels) as f64;
    let total = count * group.size() as f64;
    let mean = means.mean_dim([0i64].as_slice(), false, kind);
    let m2 = m2s.sum_dim_intlist([0i64].as_slice(), false, kind)
        + (&means - mean.unsqueeze(0)).square().sum_dim_intlist([0i64].as_slice(), false, kind) * count;
    let variance = m2 / total;
    let scale = match &bn.ws {
        Some(weight) => (&variance + EPS).rsqrt() * weight,
        None => (&variance + EPS).rsqrt(),
    };
    let y = (&xk - mean.view(shape.as_slice())) * scale.view(shape.as_slice());
    let y = match &bn.bs {
        Some(bias) => y + bias.view(shape.as_slice()),
        None => y,
    };
    tch::no_grad(|| {
        let unbiased = variance.detach() * (total / (total - 1.0).max(1.0));
        let (mut running_mean, mut running_var) = (bn.running_mean.shallow_clone(), bn.running_var.shallow_clone());
        let _ =
            running_mean.g_mul_scalar_(1.0 - MOMENTUM).g_add_(&(mean.detach() * MOMENTUM).to_kind(running_mean.kind()));
        let _ = running_var.g_mul_scalar_(1.0 - MOMENTUM).g_add_(&(unbiased * MOMENTUM).to_kind(running_var.kind()));
    });
    Ok(y.to_kind(x.kind()))
}
