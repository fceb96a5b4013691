//! Optimisers and the learning-rate schedule (section 2.2 and appendix B).
//!
//! Updates are written out here rather than taken from `tch::nn::Optimizer`
//! because LARS is not in libtorch, and because every optimiser's state
//! (momentum and moment buffers) must go into checkpoints by name.
//!
//! BatchNorm and bias parameters, the one-dimensional ones, are excluded
//! from weight decay and from LARS adaptation, as in the paper's code
//! (`exclude_from_weight_decay=['batch_normalization', 'bias']`).
pub mod adamw;
pub mod lars;
pub mod schedule;
pub mod sgd;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use schedule::Schedule;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Layer-wise adaptive rate scaling (You et al. 2017), the paper's choice.
    Lars,
    /// SGD with momentum.
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov and Hutter 2019).
    Adamw,
}

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
            if !crate::config::is_positive_finite(rate) {
                problems.push(format!("optim.learning_rate = {rate}: must be a finite number > 0"));
            }
        }
        for (field, value) in [("optim.weight_decay", self.weight_decay), ("optim.warmup_epochs", self.warmup_epochs)] {
            if !(value >= 0.0 && value.is_finite()) {
                problems.push(format!("{field} = {value}: must be a finite number >= 0"));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            problems.push(format!("optim.momentum = {}: must be in [0, 1)", self.momentum));
        }
        if !crate::config::is_positive_finite(self.trust_coefficient) {
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

/// One trainable tensor and what applies to it.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// Weight decay and LARS adaptation apply (false for BatchNorm and biases).
    pub decay_and_adapt: bool,
}

/// ∇w + λw for parameters under weight decay; ∇w as it is for the others.
fn decayed_gradient(param: &Param, grad: &Tensor, weight_decay: f64) -> Tensor {
    if param.decay_and_adapt && weight_decay != 0.0 {
        grad + weight_decay * &param.tensor
    } else {
        grad.shallow_clone()
    }
}

/// The hyper-parameters every update needs, besides the learning rate.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
}

/// An optimiser over named parameters with named state buffers.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    hyper: Hyper,
    params: Vec<Param>,
    /// Per parameter: momentum (LARS, SGD) or first and second moments (AdamW).
    state: Vec<Vec<Tensor>>,
    steps: i64,
}

impl Optimizer {
    pub fn new(config: &OptimConfig, named: Vec<(String, Tensor)>) -> Self {
        let kind = config.optimizer;
        let slots = if kind == OptimizerKind::Adamw { 2 } else { 1 };
        let mut params: Vec<Param> =
            named.into_iter().map(|(name, tensor)| Param { decay_and_adapt: tensor.dim() > 1, name, tensor }).collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        let state = params.iter().map(|p| (0..slots).map(|_| p.tensor.zeros_like().detach()).collect()).collect();
        let hyper = Hyper {
            weight_decay: config.weight_decay,
            momentum: config.momentum,
            trust_coefficient: config.trust_coefficient,
        };
        Self { kind, hyper, params, state, steps: 0 }
    }

    pub fn zero_grad(&mut self) {
        for param in &mut self.params {
            let mut grad = param.tensor.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Whether every gradient is finite: one reduction over all of them.
    pub fn gradients_finite(&self) -> bool {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.tensor.grad())
            .filter(|g| g.defined())
            .map(|g| g.norm().to_kind(tch::Kind::Float))
            .collect();
        norms.is_empty() || Tensor::stack(&norms, 0).sum(tch::Kind::Float).isfinite().int64_value(&[]) != 0
    }

    /// Applies one update with learning rate `lr` from the current gradients.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        tch::no_grad(|| {
            for (param, state) in self.params.iter_mut().zip(&mut self.state) {
                let grad = param.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                match self.kind {
                    OptimizerKind::Lars => lars::update(param, &grad, &mut state[0], lr, self.hyper),
                    OptimizerKind::Sgd => sgd::update(param, &grad, &mut state[0], lr, self.hyper),
                    OptimizerKind::Adamw => adamw::update(param, &grad, state, lr, self.hyper, self.steps),
                }
            }
        });
    }

    /// The state to checkpoint: `{slot}.{parameter name}` plus the step count.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("steps".to_owned(), Tensor::from(self.steps))];
        for (param, slots) in self.params.iter().zip(&self.state) {
            for (slot, tensor) in slots.iter().enumerate() {
                out.push((format!("{slot}.{}", param.name), tensor.shallow_clone()));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] gave, checking every name and shape.
    pub fn load_state(&mut self, mut saved: HashMap<String, Tensor>) -> Result<()> {
        let missing = |name: &str| Error::InvalidArgument(format!("optimiser state '{name}' is missing"));
        self.steps = saved.remove("steps").ok_or_else(|| missing("steps"))?.int64_value(&[]);
        for (param, slots) in self.params.iter().zip(&mut self.state) {
            for (slot, tensor) in slots.iter_mut().enumerate() {
                let name = format!("{slot}.{}", param.name);
                let value = saved.remove(&name).ok_or_else(|| missing(&name))?;
                if value.size() != tensor.size() {
                    return Err(Error::InvalidArgument(format!(
                        "optimiser state '{name}' has shape {:?}, expected {:?}",
                        value.size(),
                        tensor.size()
                    )));
                }
                tch::no_grad(|| tensor.copy_(&value));
            }
        }
        Ok(())
    }
}
