//! Linear evaluation (section 4, appendix B.6): a linear classifier trained
//! on frozen features h, computed once and cached, then scored on the test
//! split by top-1 and top-5 accuracy.
//!
//! As in the paper: SGD with Nesterov momentum 0.9 and a cosine schedule,
//! learning rate 0.1 × B/256, no weight decay by default. Features are
//! standardised with the training split's mean and deviation first: the
//! problem stays linear (the scaling folds into the weights), and SGD no
//! longer depends on the scale of h, which varies by orders of magnitude
//! between a random and a trained encoder.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::nn::OptimizerConfig;
use tch::{nn, Kind, Tensor};

use super::{accuracy, Accuracy};
use crate::dist::ProcessGroup;
use crate::{Error, Result};

/// A linear classifier on frozen features, trained with SGD (Nesterov) on a
/// cosine schedule.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LinearConfig {
    #[arg(long, default_value_t = LinearConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = LinearConfig::default().batch_size)]
    pub batch_size: usize,
    /// Base rate, scaled by batch/256 (the paper's 0.1).
    #[arg(long, default_value_t = LinearConfig::default().learning_rate)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = LinearConfig::default().momentum)]
    pub momentum: f64,
    #[arg(long, default_value_t = LinearConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Train on random crops and flips of the images, their features computed by the frozen
    /// encoder at every step, as the paper's code evaluates (90 epochs on ImageNet there): a
    /// forward pass over the training images an epoch, where cached features take one in all
    #[arg(long)]
    pub augment: bool,
    /// Set from the evaluation's `--seed`.
    #[arg(skip)]
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 256,
            learning_rate: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            augment: false,
            seed: 0,
        }
    }
}

impl LinearConfig {
    /// The classifier's optimiser over `store`'s variables: SGD with
    /// Nesterov momentum and the weight decay; the rate is set every step.
    pub(crate) fn optimizer(&self, store: &nn::VarStore) -> Result<nn::Optimizer> {
        let sgd = nn::Sgd { momentum: self.momentum, nesterov: true, wd: self.weight_decay, dampening: 0.0 };
        Ok(sgd.build(store, 0.0)?)
    }

    /// Pushes a line per bad setting, named as its flag.
    pub fn check(&self, problems: &mut Vec<String>) {
        for (flag, count) in [("--epochs", self.epochs), ("--batch-size", self.batch_size)] {
            if count == 0 {
                problems.push(format!("{flag} 0: must be at least 1"));
            }
        }
        super::check_sgd(self.learning_rate, self.momentum, problems);
        if !crate::checks::is_non_negative_finite(self.weight_decay) {
            problems.push(format!("--weight-decay {}: must be a finite number >= 0", self.weight_decay));
        }
    }
}

/// Trains the classifier on (`train`, `train_labels`) and scores it on the test split.
pub fn linear_eval(
    train: &Tensor,
    train_labels: &Tensor,
    test: &Tensor,
    test_labels: &Tensor,
    classes: i64,
    config: &LinearConfig,
) -> Result<Accuracy> {
    linear_eval_across(train, train_labels, test, test_labels, classes, config, None)
}

/// [`linear_eval`] with the training rows shared among `group`'s ranks, as
/// [`fit_linear_across`] takes them; every rank holds all the test rows
/// and gets the score.
pub fn linear_eval_across(
    train: &Tensor,
    train_labels: &Tensor,
    test: &Tensor,
    test_labels: &Tensor,
    classes: i64,
    config: &LinearConfig,
    group: Option<&ProcessGroup>,
) -> Result<Accuracy> {
    if test.size()[0] == 0 {
        return Err(Error::InvalidArgument("linear evaluation needs test features, got 0 rows".to_owned()));
    }
    let classifier = fit_linear_across(train, train_labels, classes, config, group)?;
    let logits = tch::no_grad(|| classifier.logits(test));
    Ok(accuracy(&logits, test_labels))
}

/// A linear classifier on raw features h: `logits = h Wᵀ + b`, with the
/// standardisation it was trained behind folded into W and b.
#[derive(Debug)]
pub struct LinearClassifier {
    /// `[classes, features]`.
    pub weight: Tensor,
    /// `[classes]`.
    pub bias: Tensor,
}

impl LinearClassifier {
    pub fn logits(&self, features: &Tensor) -> Tensor {
        features.to_kind(Kind::Float).linear(&self.weight, Some(&self.bias))
    }
}

/// Fits a linear classifier on standardised features by SGD (Nesterov,
/// cosine schedule), then folds the standardisation into its weights.
pub fn fit_linear(
    train: &Tensor,
    train_labels: &Tensor,
    classes: i64,
    config: &LinearConfig,
) -> Result<LinearClassifier> {
    fit_linear_across(train, train_labels, classes, config, None)
}

/// [`fit_linear`] with the training rows shared among `group`'s ranks (all
/// of them here when `None`): each holds a part (`train`, `train_labels`;
/// the parts in rank order are one process's rows, and a part may be
/// empty), so that no rank holds every row (an ImageNet split of 2048-d
/// features is 10.5 GB). The standardisation comes from every part's sums;
/// every rank draws the batches one process would, from the same seed,
/// takes the loss of the batch's rows it holds (its share of the batch's
/// mean), and the gradients are summed: every rank gets one process's
/// classifier, up to float summation order.
pub fn fit_linear_across(
    train: &Tensor,
    train_labels: &Tensor,
    classes: i64,
    config: &LinearConfig,
    group: Option<&ProcessGroup>,
) -> Result<LinearClassifier> {
    let build = |path: nn::Path, features| super::seeded_linear(path / "fc", features, classes, config.seed);
    Ok(fit_standardised(train, train_labels, config, group, build)?.folded())
}

/// A network trained on standardised features, with the standardisation:
/// `[1, features]` fp32 `mean` and `deviation` of the training rows.
pub(crate) struct Standardised<M> {
    pub net: M,
    pub mean: Tensor,
    pub deviation: Tensor,
}

impl Standardised<nn::Linear> {
    /// The classifier on raw features: the standardisation folded into it.
    pub fn folded(&self) -> LinearClassifier {
        let Self { net: classifier, mean, deviation } = self;
        // ((h - μ) / σ) Wᵀ + b = h (W / σ)ᵀ + (b - (W / σ) μ)
        let weight = tch::no_grad(|| &classifier.ws / deviation);
        let bias = classifier.bs.as_ref().expect("nn::linear has a bias");
        let bias = tch::no_grad(|| bias - weight.matmul(&mean.squeeze_dim(0)));
        LinearClassifier { weight, bias }
    }
}

impl<M: nn::Module> Standardised<M> {
    /// The logits of raw features.
    pub fn logits(&self, features: &Tensor) -> Tensor {
        tch::no_grad(|| ((features.to_kind(Kind::Float) - &self.mean) / &self.deviation).apply(&self.net))
    }
}

/// Fits the network `build` makes (from a path on its store and the
/// number of features) to the labels on standardised features, by SGD
/// (Nesterov, cosine schedule), with the training rows shared among
/// `group`'s ranks as [`fit_linear_across`] describes: the linear
/// classifier, and the MLP that predicts a transformation
/// ([`super::transform`]).
pub(crate) fn fit_standardised<M: nn::Module>(
    train: &Tensor,
    train_labels: &Tensor,
    config: &LinearConfig,
    group: Option<&ProcessGroup>,
    build: impl FnOnce(nn::Path, i64) -> M,
) -> Result<Standardised<M>> {
    let mut problems = Vec::new();
    config.check(&mut problems);
    super::refuse(problems)?;
    let device = train.device();
    let train = train.to_kind(Kind::Float);
    // This rank's rows are [first, first + held) of all `rows`.
    let held = train.size()[0];
    let (first, rows) = match group {
        None => (0, held),
        Some(group) => {
            let counts = Vec::<i64>::try_from(&group.all_gather(&Tensor::from_slice(&[held]))?)?;
            (counts[..group.rank()].iter().sum(), counts.iter().sum())
        }
    };
    if rows == 0 {
        return Err(Error::InvalidArgument("a classifier on features needs training features, got 0 rows".to_owned()));
    }
    let (mean, deviation) = standardisation(&train, rows, group)?;
    let train = (&train - &mean) / &deviation;

    let store = nn::VarStore::new(device);
    let net = build(store.root(), train.size()[1]);
    let mut optimizer = config.optimizer(&store)?;
    let trainable = store.trainable_variables();

    let batch = (config.batch_size as i64).min(rows);
    let steps_per_epoch = (rows + batch - 1) / batch;
    let total_steps = (steps_per_epoch as usize * config.epochs) as f64;
    let peak = config.learning_rate * batch as f64 / 256.0;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<i64> = (0..rows).collect();
    let mut step = 0usize;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        // One process takes its batches from the permutation on the device.
        let permutation = group.is_none().then(|| crate::device::upload_slice(&order, device));
        for start in (0..rows).step_by(batch as usize) {
            let size = batch.min(rows - start);
            let loss = match &permutation {
                Some(permutation) => {
                    let index = permutation.narrow(0, start, size);
                    let logits = train.index_select(0, &index).apply(&net);
                    logits.cross_entropy_for_logits(&train_labels.index_select(0, &index))
                }
                None => {
                    // The batch's rows this rank holds (maybe none), as its own rows.
                    let batch = &order[start as usize..(start + size) as usize];
                    let mine: Vec<i64> = batch
                        .iter()
                        .filter(|&&row| (first..first + held).contains(&row))
                        .map(|row| row - first)
                        .collect();
                    let index = crate::device::upload_slice(&mine, device);
                    let logits = train.index_select(0, &index).apply(&net);
                    let labels = train_labels.index_select(0, &index);
                    logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Sum, -100, 0.0) / size as f64
                }
            };
            super::descend(&mut optimizer, &loss, (peak, step, total_steps), &trainable, group, None)?;
            step += 1;
        }
    }
    Ok(Standardised { net, mean, deviation })
}

/// The per-feature mean and deviation (`[1, features]`, fp32) of all `rows`
/// training rows, of which `train` holds this rank's part: a single row has
/// no spread, so its deviation is taken as 1. Across ranks, from every
/// part's sums and sums of squares in fp64.
fn standardisation(train: &Tensor, rows: i64, group: Option<&ProcessGroup>) -> Result<(Tensor, Tensor)> {
    let dims = [0i64];
    match group {
        None => {
            let mean = train.mean_dim(dims.as_slice(), true, Kind::Float);
            Ok(spread(mean, train.std_dim(dims.as_slice(), false, true), rows))
        }
        Some(group) => {
            let mut sums = moments(train);
            group.all_reduce(&mut sums, crate::dist::ReduceOp::Sum)?;
            Ok(standardisation_of_moments(&sums, rows))
        }
    }
}

/// The sums of `features`' rows and of their squares, `[2, features]`
/// fp64: what [`standardisation_of_moments`] reads, added over batches or
/// ranks.
pub(crate) fn moments(features: &Tensor) -> Tensor {
    let sum = |tensor: &Tensor| tensor.sum_dim_intlist([0i64].as_slice(), true, Kind::Double);
    Tensor::cat(&[sum(features), sum(&features.to_kind(Kind::Double).square())], 0)
}

/// [`standardisation`] from the [`moments`] of all `rows` rows.
pub(crate) fn standardisation_of_moments(sums: &Tensor, rows: i64) -> (Tensor, Tensor) {
    let sums = sums / rows as f64;
    let mean = sums.get(0).unsqueeze(0);
    let variance = (sums.get(1).unsqueeze(0) - mean.square()).clamp_min(0.0);
    spread(mean.to_kind(Kind::Float), variance.sqrt().to_kind(Kind::Float), rows)
}

/// `mean` and `deviation`, where a single row's deviation (no spread) is 1
/// and none is below 1e-6.
fn spread(mean: Tensor, deviation: Tensor, rows: i64) -> (Tensor, Tensor) {
    let deviation = if rows > 1 { deviation.clamp_min(1e-6) } else { mean.ones_like() };
    (mean, deviation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn separates_linearly_separable_classes() {
        let options = (Kind::Float, Device::Cpu);
        let labels = Tensor::arange(4, (Kind::Int64, Device::Cpu)).repeat([50]);
        let centres = Tensor::eye(4, options).repeat([1, 2]) * 3.0;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let train = centres.index_select(0, &labels) + crate::eval::seeded_uniform(&[200, 8], 1.73, &mut rng);
        let test = centres.index_select(0, &labels) + crate::eval::seeded_uniform(&[200, 8], 1.73, &mut rng);
        let config = LinearConfig { epochs: 20, batch_size: 32, ..Default::default() };
        // Features of scale 1000: standardisation keeps SGD stable.
        let accuracy = linear_eval(&(train * 1000.0), &labels, &(test * 1000.0), &labels, 4, &config).unwrap();
        assert!(accuracy.top1 > 0.9, "{accuracy:?}");
        assert!(accuracy.top5 == 1.0);
    }

    #[test]
    fn folded_standardisation_gives_the_same_logits() {
        let labels = Tensor::arange(3, (Kind::Int64, Device::Cpu)).repeat([20]);
        let train = crate::eval::seeded_uniform(&[60, 5], 1.73, &mut ChaCha8Rng::seed_from_u64(3)) * 7.0 + 3.0;
        let config = LinearConfig { epochs: 3, batch_size: 16, ..Default::default() };
        let classifier = fit_linear(&train, &labels, 3, &config).unwrap();
        assert_eq!(classifier.weight.size(), vec![3, 5]);
        // The same fit, applied behind the standardisation by hand.
        let mean = train.mean_dim([0i64].as_slice(), true, Kind::Float);
        let deviation = train.std_dim([0i64].as_slice(), false, true);
        let standardised = (&train - &mean) / &deviation;
        let by_hand = standardised.linear(
            &(&classifier.weight * &deviation),
            Some(&(&classifier.bias + classifier.weight.matmul(&mean.squeeze_dim(0)))),
        );
        let difference = (classifier.logits(&train) - by_hand).abs().max().double_value(&[]);
        assert!(difference < 1e-4, "{difference}");
    }
}
