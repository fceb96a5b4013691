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

pub use batch_norm::{batch_norm, with_global_batch_norm, CollectiveFailed};
pub use group::{GradientBuckets, GroupOptions, ProcessGroup, ReduceOp, Rendezvous, StoreServer};

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
