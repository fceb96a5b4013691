//! Pretraining: the loop, its checkpoints and its metrics log.
mod budget;
pub mod checkpoint;
mod console;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod graph;
mod ledger;
pub mod metrics;
pub mod monitor;
pub mod step;
pub mod tensorboard;
pub mod trainer;

pub use console::Console;
pub use monitor::{knn_top1_at, FinishedRun};
pub use step::{GradientCache, Objective};
pub use trainer::{train, train_in, Control, Observer, Progress, Start, TrainReport, Trainer};
