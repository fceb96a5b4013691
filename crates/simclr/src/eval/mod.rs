//! Evaluating representations h on labelled data (section 4, appendix B).
pub mod features;
pub mod knn;

pub use features::extract_features;
pub use knn::{knn_accuracy, KnnConfig};
