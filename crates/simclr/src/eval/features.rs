//! h for every image of a dataset: centre views, encoder in eval mode
//! (BatchNorm running statistics), no gradients, in batches.
use tch::{Device, Kind, Tensor};

use crate::data::loader::{center_batch, ViewFormat};
use crate::data::Sample;
use crate::model::ResNet;
use crate::Result;

/// Features `[M, feature_dim]` (fp32, on `device`) of `samples`, in order.
pub fn extract_features(
    encoder: &ResNet,
    samples: &[Sample],
    format: ViewFormat,
    batch_size: usize,
    device: Device,
    pool: &rayon::ThreadPool,
) -> Result<Tensor> {
    let mut chunks = Vec::with_capacity(samples.len().div_ceil(batch_size));
    for batch in samples.chunks(batch_size.max(1)) {
        let images = center_batch(batch, format, pool)?.to_device(device);
        let h = tch::no_grad(|| encoder.forward_t(&images, false));
        chunks.push(h.to_kind(Kind::Float));
    }
    Ok(Tensor::cat(&chunks, 0))
}

/// The labels of `samples` as an `[M]` int64 tensor (unlabelled samples are -1).
pub fn labels(samples: &[Sample], device: Device) -> Tensor {
    let labels: Vec<i64> = samples.iter().map(|s| s.label.map_or(-1, |l| l as i64)).collect();
    Tensor::from_slice(&labels).to_device(device)
}

/// Rows of images per forward pass when features are extracted for evaluation.
pub const FEATURE_BATCH: usize = 256;

/// Features and labels of a labelled bank (training) split and a query
/// (test) split, computed once with the encoder frozen.
pub struct Frozen {
    pub train: Tensor,
    pub train_labels: Tensor,
    pub test: Tensor,
    pub test_labels: Tensor,
}

impl Frozen {
    pub fn compute(
        encoder: &ResNet,
        train: &[Sample],
        test: &[Sample],
        format: ViewFormat,
        batch: usize,
        device: Device,
        pool: &rayon::ThreadPool,
    ) -> Result<Self> {
        Ok(Self {
            train: extract_features(encoder, train, format, batch, device, pool)?,
            train_labels: labels(train, device),
            test: extract_features(encoder, test, format, batch, device, pool)?,
            test_labels: labels(test, device),
        })
    }
}
