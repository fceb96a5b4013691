//! Pretraining: the loop, its checkpoints and its metrics log.
pub mod checkpoint;
pub mod metrics;
pub mod trainer;

pub use trainer::{train, Control, Observer, Progress, TrainReport, Trainer};
