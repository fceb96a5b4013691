//! Evaluating representations h on labelled data (section 4, appendix B):
//! the kNN monitor and linear evaluation on frozen features, both scored by
//! top-1 and top-5 accuracy.
pub mod features;
pub mod finetune;
pub mod knn;
pub mod linear;
pub mod protocol;

use tch::{Kind, Tensor};

pub use features::extract_features;
pub use finetune::{finetune, FinetuneConfig};
pub use knn::{knn_accuracy, KnnConfig};
pub use linear::{linear_eval, LinearConfig};
pub use protocol::{evaluate, EncoderSource, EvalOptions, EvalReport, Protocol};

/// A labelled train and test split, and how their images become tensors.
pub struct Task {
    pub train: crate::data::Dataset,
    pub test: crate::data::Dataset,
    pub classes: i64,
    pub format: crate::data::loader::ViewFormat,
}

/// Top-1 and top-5 accuracy in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Accuracy {
    pub top1: f64,
    pub top5: f64,
}

/// Fraction of rows whose label is among their `k` highest scores.
pub fn top_k_accuracy(scores: &Tensor, labels: &Tensor, k: i64) -> f64 {
    let k = k.min(scores.size()[1]);
    let (_, top) = scores.topk(k, 1, true, true);
    let hit = top.eq_tensor(&labels.unsqueeze(1)).any_dim(1, false);
    hit.to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

/// Top-1 and top-5 of per-class `scores` (logits or votes) against `labels`.
pub fn accuracy(scores: &Tensor, labels: &Tensor) -> Accuracy {
    Accuracy { top1: top_k_accuracy(scores, labels, 1), top5: top_k_accuracy(scores, labels, 5) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts_hits_among_the_highest_scores() {
        let scores = Tensor::from_slice2(&[[0.1f32, 0.7, 0.2], [0.5, 0.1, 0.4]]);
        let labels = Tensor::from_slice(&[2i64, 0]);
        assert_eq!(top_k_accuracy(&scores, &labels, 1), 0.5);
        assert_eq!(top_k_accuracy(&scores, &labels, 2), 1.0);
        assert_eq!(top_k_accuracy(&scores, &labels, 9), 1.0);
    }
}
