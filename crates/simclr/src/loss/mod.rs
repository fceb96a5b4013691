//! Contrastive objectives over a batch of 2N projections z, where rows i and
//! i + N are the two views of one image (section 2.1 and Table 2).
pub mod dcl;
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
    /// NT-Xent with the positive out of the denominator (decoupled
    /// contrastive learning, Yeh et al. 2022): not in the paper.
    Dcl,
}

names!(Objective, "loss", { NtXent => "nt-xent", NtLogistic => "nt-logistic", MarginTriplet => "margin-triplet", Dcl => "dcl" });

/// Which of an anchor's 2(N-1) negatives enter NT-Logistic and the margin
/// triplet loss (Table 2's "sh" columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negatives {
    /// Every view of the batch's other images.
    All,
    /// Semi-hard negative mining (Schroff et al. 2015, eq. 4): only the
    /// negatives the anchor finds less similar than its positive. The
    /// margin triplet loss's hinge keeps, of those, the ones within the
    /// margin: FaceNet's semi-hard triplets. The negatives more similar
    /// than the positive (the hard ones) are dropped: FaceNet found that
    /// they can collapse a model early in training.
    SemiHard,
}

names!(Negatives, "negatives", { All => "all", SemiHard => "semi-hard" });

impl Objective {
    /// Whether `loss.negatives = "semi-hard"` applies: Table 2's losses
    /// whose negatives all weigh alike.
    pub fn mines_negatives(self) -> bool {
        matches!(self, Objective::NtLogistic | Objective::MarginTriplet)
    }
}

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
    /// All negatives or the semi-hard ones (NT-Logistic and the margin
    /// triplet loss only; NT-Xent weighs its negatives by their hardness
    /// already, through the softmax).
    pub negatives: Negatives,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            objective: Objective::NtXent,
            temperature: 0.1,
            similarity: Similarity::Cosine,
            margin: 1.0,
            negatives: Negatives::All,
        }
    }
}

impl LossConfig {
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if !crate::checks::is_positive_finite(self.temperature) {
            problems.push(format!("loss.temperature = {}: must be a finite number > 0", self.temperature));
        }
        if !crate::checks::is_non_negative_finite(self.margin) {
            problems.push(format!("loss.margin = {}: must be a finite number >= 0", self.margin));
        }
        if self.negatives == Negatives::SemiHard && !self.objective.mines_negatives() {
            problems.push(format!(
                "loss.negatives = \"semi-hard\" with loss.objective = \"{}\": semi-hard negative mining is for \
                 nt-logistic and margin-triplet (Table 2), whose terms weigh every negative alike",
                self.objective.name()
            ));
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
        self.compute_at(z, keys, Layout::of(z, keys, offset)?)
    }

    /// The mean loss of the anchors `layout` places among `keys`.
    fn compute_at(&self, anchors: &Tensor, keys: &Tensor, layout: Layout) -> Result<Tensor> {
        let (tau, similarity, negatives) = (self.temperature, self.similarity, self.negatives);
        match self.objective {
            Objective::NtXent => nt_xent::nt_xent(anchors, keys, layout, tau, similarity),
            Objective::NtLogistic => nt_logistic::nt_logistic(anchors, keys, layout, (tau, negatives), similarity),
            Objective::MarginTriplet => {
                margin_triplet::margin_triplet(anchors, keys, layout, (self.margin, negatives), similarity)
            }
            Objective::Dcl => dcl::dcl(anchors, keys, layout, tau, similarity),
        }
    }

    /// The loss of the batch `layout` places among `keys` (a leaf that
    /// requires grad; the batch's rows are its rows from `layout.offset`),
    /// with its gradient in `keys`, taken `block` anchors at a time.
    ///
    /// Every loss here is a mean over anchors of a term that involves one
    /// anchor's row of similarities, so blocks of anchors, weighted by their
    /// share, sum to the loss and, by linearity, to its gradient. Each
    /// block's graph is freed by its backward pass, so the [2n, keys]
    /// matrices of a whole batch (1 GiB per fp32 copy at batch 8192, and the
    /// loss holds several) are never held at once: [block, keys] ones are.
    /// The keys are prepared (normalised) once, and the blocks' gradients
    /// summed there before one pass back through the normalisation.
    pub fn gradient_in_blocks(&self, keys: &Tensor, layout: Layout, block: i64) -> Result<(Tensor, Tensor)> {
        let prepared = self.similarity.prepare(keys);
        let leaf = prepared.detach().set_requires_grad(true);
        // Prepared rows meet by their dot product.
        let on_prepared = Self { similarity: Similarity::Dot, ..self.clone() };
        let anchors = 2 * layout.pairs;
        let mut loss = Tensor::zeros([], (leaf.kind(), leaf.device()));
        let mut gradient = leaf.zeros_like();
        for first in (0..anchors).step_by(block.max(1) as usize) {
            let part = layout.block(first, block.min(anchors - first));
            let rows = leaf.narrow(0, layout.offset + first, part.rows);
            let share = on_prepared.compute_at(&rows, &leaf, part)? * (part.rows as f64 / anchors as f64);
            gradient += Tensor::f_run_backward(&[&share], &[&leaf], false, false)?.remove(0);
            loss += share.detach();
        }
        let sent = (prepared * gradient).sum(leaf.kind());
        Ok((loss, Tensor::f_run_backward(&[&sent], &[keys], false, false)?.remove(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::similarity::by_hand::projections;

    /// The loss of the batch at `offset` among `keys` and its gradient in
    /// them, whole or in blocks of `block` anchors.
    fn loss_and_gradient(config: &LossConfig, keys: &Tensor, offset: i64, block: Option<i64>) -> (f64, Tensor) {
        let keys = keys.copy().set_requires_grad(true);
        let batch = keys.narrow(0, offset, 10);
        let (loss, gradient) = match block {
            Some(block) => config.gradient_in_blocks(&keys, Layout::of(&batch, &keys, offset).unwrap(), block).unwrap(),
            None => {
                let loss = config.compute_against(&batch, &keys, offset).unwrap();
                let gradient = Tensor::run_backward(&[&loss], &[&keys], false, false).remove(0);
                (loss, gradient)
            }
        };
        (loss.double_value(&[]), gradient)
    }

    #[test]
    fn blocks_of_anchors_give_the_whole_loss_and_its_gradient() {
        // A batch of 5 pairs, alone (offset 0 of its own 10 rows) and among
        // the 16 keys of three ranks (at rows 4..14 of them).
        let keys = projections(16, 6);
        let alone = keys.narrow(0, 4, 10).copy();
        let configs = Objective::ALL.into_iter().flat_map(|objective| {
            let mined = objective.mines_negatives().then_some(Negatives::SemiHard);
            [Negatives::All].into_iter().chain(mined).map(move |negatives| (objective, negatives))
        });
        for (objective, negatives) in configs {
            for similarity in [Similarity::Cosine, Similarity::Dot] {
                let config = LossConfig { objective, similarity, negatives, temperature: 0.5, ..Default::default() };
                for (keys, offset) in [(&alone, 0), (&keys, 4)] {
                    let (loss, gradient) = loss_and_gradient(&config, keys, offset, None);
                    // Blocks of 3, 3, 3 and 1 anchors; of 4, 4 and 2; one of all 10.
                    for block in [3, 4, 10] {
                        let what =
                            format!("{objective:?}, {negatives:?}, {similarity:?}, offset {offset}, blocks of {block}");
                        let (in_blocks, block_gradient) = loss_and_gradient(&config, keys, offset, Some(block));
                        assert!((in_blocks - loss).abs() < 1e-12 * loss.abs(), "{what}: {in_blocks} against {loss}");
                        let difference = (&block_gradient - &gradient).abs().max().double_value(&[]);
                        assert!(difference < 1e-12 * gradient.abs().max().double_value(&[]), "{what}: {difference:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_block_placed_at_the_wrong_rows_is_noticed() {
        // Negative control for the test above: each block's anchors taken
        // from their rows but laid out as the batch's first rows (their
        // positives and own entries looked up for other anchors).
        let keys = projections(10, 6);
        for objective in Objective::ALL {
            let config = LossConfig { objective, temperature: 0.5, ..Default::default() };
            let whole = config.compute(&keys).unwrap().double_value(&[]);
            let layout = Layout::local(5);
            let misplaced: f64 = [0, 4, 8]
                .iter()
                .map(|&first| {
                    let rows = 4.min(10 - first);
                    let anchors = keys.narrow(0, first, rows);
                    let part = config.compute_at(&anchors, &keys, layout.block(0, rows)).unwrap();
                    part.double_value(&[]) * rows as f64 / 10.0
                })
                .sum();
            assert!((misplaced - whole).abs() > 1e-3 * whole.abs(), "{objective:?}: {misplaced} against {whole}");
        }
    }

    #[test]
    fn semi_hard_mining_is_refused_for_the_losses_that_weigh_their_negatives() {
        for objective in Objective::ALL {
            let config = LossConfig { objective, negatives: Negatives::SemiHard, ..Default::default() };
            let mut problems = Vec::new();
            config.check(&mut problems);
            if objective.mines_negatives() {
                assert!(problems.is_empty(), "{objective:?}: {problems:?}");
            } else {
                assert_eq!(problems.len(), 1, "{objective:?}");
                assert!(problems[0].contains("loss.negatives") && problems[0].contains(objective.name()));
            }
        }
    }
}
