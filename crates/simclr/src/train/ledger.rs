//! The losses of steps not yet read back from the device.
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::checkpoint::Position;
use super::metrics::StepMetrics;
use crate::{Error, Result};

/// Steps whose loss and verdict (finite or not) are still on the device.
/// They are read in one go every [`Ledger::READ_EVERY`] steps, at the end of
/// an epoch and before a checkpoint: one host-device synchronisation per
/// batch of steps, so a GPU is never left idle waiting for the host.
pub(super) struct Ledger {
    pending: Vec<Pending>,
    max_nonfinite_in_row: usize,
    checkpoint_path: PathBuf,
    /// Whether a skipped step is told: on rank 0 alone, since every rank
    /// skips the same steps (the gradient they test is all-reduced).
    tells: bool,
}

/// A step whose loss is still on the device.
struct Pending {
    step: usize,
    learning_rate: f64,
    /// When it was taken (launched, on a device that runs asynchronously).
    wall_time: f64,
    loss: Tensor,
    finite: Tensor,
}

/// A step read back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settled {
    pub metrics: StepMetrics,
    /// Whether the loss and gradient were finite (the update was made).
    pub finite: bool,
}

impl Ledger {
    /// Steps between reads: a non-finite run is stopped at most this many
    /// steps late (the steps themselves were shut on the device).
    const READ_EVERY: usize = 16;

    pub(super) fn new(max_nonfinite_in_row: usize, checkpoint_path: PathBuf, tells: bool) -> Self {
        Self { pending: Vec::new(), max_nonfinite_in_row, checkpoint_path, tells }
    }

    /// Step `step`, taken at `learning_rate`, with its loss and verdict.
    pub(super) fn push(&mut self, step: usize, learning_rate: f64, loss: Tensor, finite: Tensor) {
        self.pending.push(Pending { step, learning_rate, wall_time: super::metrics::unix_time(), loss, finite });
    }

    pub(super) fn due(&self) -> bool {
        self.pending.len() >= Self::READ_EVERY
    }

    /// Reads the pending steps, adds the finite ones to the epoch's loss,
    /// counts the others in `position` (which a checkpoint keeps, so a
    /// resumed run counts on from there), and fails once too many in a row
    /// were not; returns the steps read.
    pub(super) fn settle(&mut self, position: &mut Position) -> Result<Vec<Settled>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let pending = std::mem::take(&mut self.pending);
        let pairs: Vec<Tensor> = pending
            .iter()
            .map(|step| Tensor::stack(&[step.loss.to_kind(Kind::Double), step.finite.to_kind(Kind::Double)], 0))
            .collect();
        let read = Vec::<f64>::try_from(&Tensor::stack(&pairs, 0).reshape([-1]).to_device(Device::Cpu))?;
        let mut settled = Vec::with_capacity(pending.len());
        for (step, pair) in pending.iter().zip(read.chunks(2)) {
            let (value, finite) = (pair[0], pair[1] != 0.0);
            let Pending { step, learning_rate, wall_time, .. } = *step;
            // Numbered as the steps taken, this one included.
            let metrics = StepMetrics { step: step + 1, loss: value, learning_rate, wall_time };
            settled.push(Settled { metrics, finite });
            if finite {
                position.nonfinite_in_row = 0;
                position.epoch_loss_sum += value;
                position.epoch_loss_count += 1;
                continue;
            }
            position.nonfinite_in_row += 1;
            position.skipped_steps += 1;
            if self.tells {
                tracing::warn!(step, "non-finite loss or gradient ({value}): step skipped");
            }
            if position.nonfinite_in_row >= self.max_nonfinite_in_row {
                return Err(Error::NonFinite(format!(
                    "{} steps in a row (up to step {step}) gave a non-finite loss or gradient; \
                     likely causes: a learning rate too high (optim.learning_rate), a temperature too low \
                     (loss.temperature), or reduced precision (train.mixed_precision). The last checkpoint, \
                     from before the fault, is {}",
                    position.nonfinite_in_row,
                    self.checkpoint_path.display()
                )));
            }
        }
        Ok(settled)
    }
}
