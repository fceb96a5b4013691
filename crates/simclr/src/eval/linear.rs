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
    /// Set from the evaluation's `--seed`.
    #[arg(skip)]
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        Self { epochs: 100, batch_size: 256, learning_rate: 0.1, momentum: 0.9, weight_decay: 0.0, seed: 0 }
    }
}

impl LinearConfig {
    /// Pushes a line per bad setting, named as its flag.
    pub fn check(&self, problems: &mut Vec<String>) {
        for (flag, count) in [("--epochs", self.epochs), ("--batch-size", self.batch_size)] {
            if count == 0 {
                problems.push(format!("{flag} 0: must be at least 1"));
            }
        }
        super::check_sgd(self.learning_rate, self.momentum, problems);
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
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
    if test.size()[0] == 0 {
        return Err(Error::InvalidArgument("linear evaluation needs test features, got 0 rows".to_owned()));
    }
    let classifier = fit_linear(train, train_labels, classes, config)?;
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
    let rows = train.size()[0];
    let mut problems = Vec::new();
    config.check(&mut problems);
    super::refuse(problems)?;
    if rows == 0 {
        return Err(Error::InvalidArgument("a linear classifier needs training features, got 0 rows".to_owned()));
    }
    let device = train.device();
    let train = train.to_kind(Kind::Float);
    let mean = train.mean_dim([0i64].as_slice(), true, Kind::Float);
    // A single row has no spread: the deviation is then taken as 1.
    let deviation =
        if rows > 1 { train.std_dim([0i64].as_slice(), false, true).clamp_min(1e-6) } else { mean.ones_like() };
    let train = (&train - &mean) / &deviation;

    let store = nn::VarStore::new(device);
    let features = train.size()[1];
    let classifier = super::seeded_linear(store.root() / "fc", features, classes, config.seed);
    let mut optimizer = nn::Sgd { momentum: config.momentum, nesterov: true, wd: config.weight_decay, dampening: 0.0 }
        .build(&store, 0.0)?;

    let batch = (config.batch_size as i64).min(rows);
    let steps_per_epoch = (rows + batch - 1) / batch;
    let total_steps = (steps_per_epoch as usize * config.epochs) as f64;
    let peak = config.learning_rate * batch as f64 / 256.0;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<i64> = (0..rows).collect();
    let mut step = 0usize;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        let permutation = crate::device::upload_slice(&order, device);
        for start in (0..rows).step_by(batch as usize) {
            let index = permutation.narrow(0, start, batch.min(rows - start));
            let logits = train.index_select(0, &index).apply(&classifier);
            let loss = logits.cross_entropy_for_logits(&train_labels.index_select(0, &index));
            optimizer.set_lr(peak * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps).cos()));
            optimizer.backward_step(&loss);
            step += 1;
        }
    }
    // ((h - μ) / σ) Wᵀ + b = h (W / σ)ᵀ + (b - (W / σ) μ)
    let weight = tch::no_grad(|| &classifier.ws / &deviation);
    let bias =
        tch::no_grad(|| classifier.bs.as_ref().expect("nn::linear has a bias") - weight.matmul(&mean.squeeze_dim(0)));
    Ok(LinearClassifier { weight, bias })
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
