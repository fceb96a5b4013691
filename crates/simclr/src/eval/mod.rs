//! Evaluating representations h on labelled data (section 4, appendix B):
//! the kNN monitor and linear evaluation on frozen features, both scored by
//! top-1 and top-5 accuracy; and what a representation keeps of the
//! augmentations, by predicting the transformation an image was given
//! (section 4.2, Table 3), and how many dimensions it uses (its effective
//! rank, appendix B.4); and colour histograms as a representation, the
//! shortcut crops leave (section 3, Figure 6).
pub mod features;
pub mod finetune;
pub mod histogram;
pub mod knn;
pub mod linear;
pub mod listed;
pub mod protocol;
pub mod spectrum;
pub mod transform;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, Kind, Tensor};

pub use features::extract_features;
pub use finetune::{finetune, finetune_in, fit_linear_on_views, FineTuned, FinetuneConfig};
pub use histogram::{histogram_shortcut, Shortcut};
pub use knn::{knn_hits, knn_votes, knn_votes_across, KnnConfig};
pub use linear::{fit_linear_across, linear_eval, linear_eval_across, LinearConfig};
pub use protocol::{evaluate, evaluate_in, EvalOptions, EvalReport, LabelSubset, Network, Protocol};
pub use spectrum::{effective_rank, effective_rank_of, singular_values};
pub use transform::{Probe, Transformation};

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

/// Rows whose label is among their `k` highest scores.
pub fn top_k_hits(scores: &Tensor, labels: &Tensor, k: i64) -> i64 {
    let k = k.min(scores.size()[1]);
    let (_, top) = scores.topk(k, 1, true, true);
    top.eq_tensor(&labels.unsqueeze(1)).any_dim(1, false).sum(Kind::Int64).int64_value(&[])
}

/// Top-1 and top-5 of per-class `scores` (logits or votes) against `labels`.
pub fn accuracy(scores: &Tensor, labels: &Tensor) -> Accuracy {
    Hits::of(scores, labels).accuracy()
}

/// How many rows have their label first, and among the first five, of how
/// many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hits {
    pub top1: i64,
    pub top5: i64,
    pub rows: i64,
}

impl Hits {
    /// The hits of per-class `scores` against `labels`.
    pub fn of(scores: &Tensor, labels: &Tensor) -> Self {
        Self { top1: top_k_hits(scores, labels, 1), top5: top_k_hits(scores, labels, 5), rows: scores.size()[0] }
    }

    pub fn accuracy(self) -> Accuracy {
        let rows = self.rows as f64;
        Accuracy { top1: self.top1 as f64 / rows, top5: self.top5 as f64 / rows }
    }
}

/// Pushes a line per bad setting of an SGD fit on the labels (the linear
/// classifier's, fine-tuning's), named as the flags are.
fn check_sgd(learning_rate: f64, momentum: f64, problems: &mut Vec<String>) {
    if !crate::checks::is_positive_finite(learning_rate) {
        problems.push(format!("--learning-rate {learning_rate}: must be a finite number > 0"));
    }
    if !(0.0..1.0).contains(&momentum) {
        problems.push(format!("--momentum {momentum}: must be in [0, 1)"));
    }
}

/// One step of an SGD fit on the labels (the linear classifier's,
/// fine-tuning's): `loss` back-propagated at step `step` of `total_steps`
/// of a cosine schedule from `peak`, the gradients of `trainable` summed
/// over `group`'s ranks first where there is one.
///
/// With `scale` (a forward pass in fp16), the loss is scaled for the
/// backward pass and the gradients unscaled after it; a step whose
/// gradients overflowed is skipped, as in pretraining (see
/// [`crate::optim::LossScale`]).
fn descend(
    optimizer: &mut nn::Optimizer,
    loss: &Tensor,
    (peak, step, total_steps): (f64, usize, f64),
    trainable: &[Tensor],
    group: Option<&crate::dist::ProcessGroup>,
    scale: Option<&mut crate::optim::LossScale>,
) -> crate::Result<()> {
    optimizer.set_lr(peak * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps).cos()));
    optimizer.zero_grad();
    match &scale {
        Some(scale) => scale.scaled(loss).f_backward()?,
        None => loss.f_backward()?,
    }
    if let Some(group) = group {
        crate::dist::sum_gradients(group, trainable)?;
    }
    if let Some(scale) = scale {
        let mut finite = Tensor::from(true).to_device(loss.device());
        for variable in trainable {
            let mut gradient = variable.grad();
            if gradient.defined() {
                scale.unscale(&mut gradient);
                finite = finite.logical_and(&gradient.isfinite().all());
            }
        }
        let _ = scale.update(loss, &finite);
        if !bool::try_from(&finite)? {
            return Ok(());
        }
    }
    optimizer.step();
    Ok(())
}

/// `Err(Error::Config)` listing `problems`, if there are any.
fn refuse(problems: Vec<String>) -> crate::Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::Config(problems))
    }
}

/// Values drawn uniformly from [-bound, bound] by `rng`, as a float tensor
/// of `shape` on the CPU.
pub(crate) fn seeded_uniform(shape: &[i64], bound: f64, rng: &mut ChaCha8Rng) -> Tensor {
    let count = shape.iter().product::<i64>() as usize;
    let values: Vec<f32> = (0..count).map(|_| rng.random_range(-bound..=bound) as f32).collect();
    Tensor::from_slice(&values).view(shape)
}

/// A linear layer at `path`, initialised as PyTorch's `nn.Linear` (weight
/// and bias uniform in ±1/√inputs) from `seed` alone. libtorch's global
/// generator would make a seeded evaluation depend on whatever else drew
/// from it in between (an earlier model, another thread).
pub(crate) fn seeded_linear(path: nn::Path, inputs: i64, outputs: i64, seed: u64) -> nn::Linear {
    let zero = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true };
    let device = path.device();
    let layer = nn::linear(path, inputs, outputs, zero);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (inputs as f64).sqrt();
    let bias = layer.bs.as_ref().expect("the layer was made with a bias");
    tch::no_grad(|| {
        layer.ws.shallow_clone().copy_(&seeded_uniform(&[outputs, inputs], bound, &mut rng).to_device(device));
        bias.shallow_clone().copy_(&seeded_uniform(&[outputs], bound, &mut rng).to_device(device));
    });
    layer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts_hits_among_the_highest_scores() {
        let scores = Tensor::from_slice2(&[[0.1f32, 0.7, 0.2], [0.5, 0.1, 0.4]]);
        let labels = Tensor::from_slice(&[2i64, 0]);
        assert_eq!(top_k_hits(&scores, &labels, 1), 1);
        assert_eq!(top_k_hits(&scores, &labels, 2), 2);
        assert_eq!(top_k_hits(&scores, &labels, 9), 2);
        let hits = Hits::of(&scores, &labels);
        assert_eq!(hits, Hits { top1: 1, top5: 2, rows: 2 });
        assert_eq!(hits.accuracy(), Accuracy { top1: 0.5, top5: 1.0 });
    }

    #[test]
    fn seeded_linear_layers_depend_on_the_seed_alone() {
        let layer = |seed| {
            let store = nn::VarStore::new(tch::Device::Cpu);
            let layer = seeded_linear(store.root() / "fc", 64, 10, seed);
            // Draws from the global generator in between change nothing.
            let _ = Tensor::randn([100], (Kind::Float, tch::Device::Cpu));
            (layer.ws.copy(), layer.bs.unwrap().copy())
        };
        let ((w1, b1), (w2, b2), (w3, _)) = (layer(4), layer(4), layer(5));
        assert!(w1.equal(&w2) && b1.equal(&b2));
        assert!(!w1.equal(&w3));
        // nn.Linear's bound, 1/√64, nearly reached by 640 draws.
        let largest = w1.abs().max().double_value(&[]);
        assert!((0.12..=0.125).contains(&largest), "largest |w| {largest}");
    }
}
