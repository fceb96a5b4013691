//! Training steps replayed from a CUDA graph (`train.cuda_graph`).
//!
//! An eager step issues its kernels one by one, several hundred for a
//! ResNet-18 forward pass, backward pass and update; a replayed graph
//! issues them as one launch, so the host's time per step drops out and the
//! GPU runs the kernels back to back (see [`crate::cuda_graph`]).
//!
//! The first step runs once on a side stream, where cuDNN's autotuning and
//! the allocator's first allocations happen outside the capture, and is then
//! captured (a capture records the work and runs none of it); every later
//! step is the capture replayed. A replay reads and writes the memory the
//! capture did, so each step's views are copied into the captured input, its
//! learning rate into the optimiser's rate on the device
//! ([`Optimizer::set_learning_rate`]), and its loss and verdict out of the
//! captured outputs before the next replay overwrites them. The update's
//! verdict on non-finite values is taken on the device as in every GPU step
//! (`Optimizer::step_if_finite`), so nothing in the step waits for the host.
//!
//! The optimiser keeps its step count and learning rate on the device for
//! this, and in fp16 its loss scale, which the step multiplies the loss by,
//! divides the gradient by and updates in place (`optim::LossScale`): a
//! replay scales by the scale the last one left, as an eager step would.
//! What a capture cannot hold is refused where the config is checked
//! (gradient caching; supervised training, whose labels change every step)
//! or where the trainer starts (several processes: their collectives are
//! not captured).
//!
//! [`Optimizer::set_learning_rate`]: crate::optim::Optimizer::set_learning_rate
use std::path::PathBuf;

use tch::{Device, Tensor};

use crate::cuda_graph::CudaGraph;
use crate::{Error, Result};

/// The shim library's file name; it is looked for beside the `simclr`
/// binary, where `./x.sh build-cuda` builds it.
pub const LIBRARY: &str = "libsimclr_graph.so";

/// A step's loss and its verdict (a 0-d bool: whether the update was taken).
pub type Outcome = (Tensor, Tensor);

/// The training step as a CUDA graph: captured at the first call of
/// [`GraphedStep::run`], replayed at every later one.
pub struct GraphedStep {
    library: PathBuf,
    device: Device,
    captured: Option<Captured>,
}

struct Captured {
    graph: CudaGraph,
    /// The views every replay reads.
    input: Tensor,
    /// What every replay writes.
    outcome: Outcome,
}

impl GraphedStep {
    /// Steps on `device` through the shim at `library`, which must exist.
    pub fn new(library: PathBuf, device: Device) -> Result<Self> {
        if !device.is_cuda() {
            return Err(Error::Device(format!("train.cuda_graph needs a CUDA device, not {device:?}")));
        }
        if !library.is_file() {
            return Err(Error::Device(format!(
                "train.cuda_graph: {} is missing; ./x.sh build-cuda builds it beside the \
                 simclr binary (or set train.cuda_graph = false)",
                library.display()
            )));
        }
        Ok(Self { library, device, captured: None })
    }

    /// Trains on `views` by `step`, which must compute one whole step (the
    /// loss, its gradient and the update at the rate set) from the views it
    /// is given and return its [`Outcome`]. At the first call `step` runs
    /// twice, once for real and once captured; later calls replay the
    /// capture on a copy of `views` and do not call it.
    pub fn run(&mut self, views: &Tensor, mut step: impl FnMut(&Tensor) -> Result<Outcome>) -> Result<Outcome> {
        if let Some(captured) = &mut self.captured {
            if views.size() != captured.input.size() {
                return Err(Error::InvalidArgument(format!(
                    "train.cuda_graph: a batch of views {:?}, where the captured step takes {:?}; every batch \
                     must have one shape (or set train.cuda_graph = false)",
                    views.size(),
                    captured.input.size()
                )));
            }
            tch::no_grad(|| captured.input.copy_(views));
            captured.graph.replay()?;
            let (loss, finite) = &captured.outcome;
            return Ok((loss.copy(), finite.copy()));
        }
        let input = views.copy();
        let mut outcomes = Vec::with_capacity(2);
        let graph = CudaGraph::capture(&self.library, self.device, 1, || {
            outcomes.push(step(&input)?);
            Ok(())
        })?;
        let [first, outcome]: [Outcome; 2] = outcomes.try_into().map_err(|outcomes: Vec<Outcome>| {
            Error::Device(format!("train.cuda_graph: the step ran {} times while captured, not 2", outcomes.len()))
        })?;
        self.captured = Some(Captured { graph, input, outcome });
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_needs_cuda_and_the_shim_and_names_what_is_missing() {
        let library = PathBuf::from("/nonexistent/libsimclr_graph.so");
        let error = GraphedStep::new(library.clone(), Device::Cpu).err().expect("not on the CPU");
        assert!(error.to_string().contains("train.cuda_graph needs a CUDA device, not Cpu"), "{error}");
        let error = GraphedStep::new(library, Device::Cuda(0)).err().expect("no shim there");
        let message = error.to_string();
        assert!(
            message.contains("/nonexistent/libsimclr_graph.so is missing") && message.contains("./x.sh build-cuda"),
            "{message}"
        );
    }
}
