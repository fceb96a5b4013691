//! The `[optim]` section: which optimiser, its hyper-parameters, and how
//! the learning rate scales with the batch (appendix B.1).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Layer-wise adaptive rate scaling (You et al. 2017), the paper's choice.
    Lars,
    /// SGD with momentum.
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov and Hutter 2019).
    Adamw,
}

names!(OptimizerKind, "optimizer", { Lars => "lars", Sgd => "sgd", Adamw => "adamw" });

/// How the peak learning rate follows the batch size N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// learning_rate × N / 256 (the paper's 0.3 × N/256).
    Linear,
    /// learning_rate × √N (appendix B.1's 0.075 × √N, better for small batches).
    Sqrt,
    /// learning_rate as it is.
    None,
}

/// The `[optim]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub optimizer: OptimizerKind,
    /// Base rate before scaling; absent means 0.3 (linear), 0.075 (sqrt) or 0.001 (none).
    pub learning_rate: Option<f64>,
    pub lr_scaling: LrScaling,
    /// The paper's 1e-6 (ImageNet); 1e-4 in its CIFAR-10 runs.
    pub weight_decay: f64,
    pub momentum: f64,
    /// LARS's η: the paper's 0.001.
    pub trust_coefficient: f64,
    /// Linear warm-up length in epochs (the paper's 10), then cosine decay.
    pub warmup_epochs: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Lars,
            learning_rate: None,
            lr_scaling: LrScaling::Linear,
            weight_decay: 1e-6,
            momentum: 0.9,
            trust_coefficient: 0.001,
            warmup_epochs: 10.0,
        }
    }
}

impl OptimConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if let Some(rate) = self.learning_rate {
            if !crate::checks::is_positive_finite(rate) {
                problems.push(format!("optim.learning_rate = {rate}: must be a finite number > 0"));
            }
        }
        for (field, value) in [("optim.weight_decay", self.weight_decay), ("optim.warmup_epochs", self.warmup_epochs)] {
            if !crate::checks::is_non_negative_finite(value) {
                problems.push(format!("{field} = {value}: must be a finite number >= 0"));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            problems.push(format!("optim.momentum = {}: must be in [0, 1)", self.momentum));
        }
        if !crate::checks::is_positive_finite(self.trust_coefficient) {
            problems.push(format!("optim.trust_coefficient = {}: must be > 0", self.trust_coefficient));
        }
    }

    /// The peak learning rate for batch size `batch_size`.
    pub fn peak_learning_rate(&self, batch_size: usize) -> f64 {
        let n = batch_size as f64;
        match self.lr_scaling {
            LrScaling::Linear => self.learning_rate.unwrap_or(0.3) * n / 256.0,
            LrScaling::Sqrt => self.learning_rate.unwrap_or(0.075) * n.sqrt(),
            LrScaling::None => self.learning_rate.unwrap_or(0.001),
        }
    }
}
