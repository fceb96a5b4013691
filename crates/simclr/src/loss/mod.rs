//! Contrastive objectives over a batch of 2N projections z, where rows i and
//! i + N are the two views of one image (section 2.1 and Table 2).
pub mod margin_triplet;
pub mod nt_logistic;
pub mod nt_xent;
pub mod similarity;

use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use similarity::{Layout, Similarity};

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Normalised temperature-scaled cross entropy, eq. (1): the paper's choice.
    NtXent,
    /// Normalised temperature-scaled logistic loss (Table 2).
    NtLogistic,
    /// Margin triplet loss (Table 2).
    MarginTriplet,
}

names!(Objective, "loss", { NtXent => "nt-xent", NtLogistic => "nt-logistic", MarginTriplet => "margin-triplet" });

/// The `[loss]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub objective: Objective,
    /// τ: the paper's 0.1 with LARS at large batch (Table 5); 0.5 for CIFAR-10.
    pub temperature: f64,
    /// Cosine similarity (ℓ2-normalised z) or plain dot product (Table 5).
    pub similarity: Similarity,
    /// m for the margin triplet loss.
    pub margin: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { objective: Objective::NtXent, temperature: 0.1, similarity: Similarity::Cosine, margin: 1.0 }
    }
}

impl LossConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if !crate::checks::is_positive_finite(self.temperature) {
            problems.push(format!("loss.temperature = {}: must be a finite number > 0", self.temperature));
        }
        if !(self.margin >= 0.0 && self.margin.is_finite()) {
            problems.push(format!("loss.margin = {}: must be a finite number >= 0", self.margin));
        }
    }

    /// The configured loss of a batch's projections `z` (`[2N, d]`, laid
    /// out [first views; second views]) against each other: a scalar
    /// averaged over the 2N anchors.
    pub fn compute(&self, z: &Tensor) -> Result<Tensor> {
        self.compute_against(z, z, 0)
    }

    /// The loss of this rank's projections `z` against `keys`, the
    /// projections of every rank in which `z` sits at row `offset`: each
    /// anchor meets the negatives of the global batch.
    pub fn compute_against(&self, z: &Tensor, keys: &Tensor, offset: i64) -> Result<Tensor> {
        let layout = Layout::of(z, keys, offset)?;
        let (tau, similarity) = (self.temperature, self.similarity);
        match self.objective {
            Objective::NtXent => nt_xent::nt_xent(z, keys, layout, tau, similarity),
            Objective::NtLogistic => nt_logistic::nt_logistic(z, keys, layout, tau, similarity),
            Objective::MarginTriplet => margin_triplet::margin_triplet(z, keys, layout, self.margin, similarity),
        }
    }
}
