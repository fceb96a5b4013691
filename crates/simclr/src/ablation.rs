//! `simclr ablate augment`: the paper's Figure 5 experiment at any scale.
//!
//! For every ordered pair of ops (first, second), and each op alone on the
//! diagonal, a model is trained briefly with the base run's settings and
//! scored by the kNN monitor. As in section 3, the ops act on one branch
//! only: view 1 is the image resized to the training size (the identity
//! for same-sized data such as CIFAR), view 2 applies the first op and then
//! the second, each with probability 1. A sizing op (crop) always runs
//! first, so (crop, x) and (x, crop) are one experiment, trained once.
//! Writes `ablation.csv` and the heatmap `ablation.png`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::augment::{AugmentConfig, OpConfig};
use crate::config::RunConfig;
use crate::report::Heatmap;
use crate::train::{train, Observer};
use crate::{Error, Result};

/// The heatmap of an ablation: kNN top-1 of each (first, second) pair.
#[derive(Debug, Clone)]
pub struct AugmentAblation {
    pub names: Vec<String>,
    /// `top1[first][second]`.
    pub top1: Vec<Vec<f64>>,
    pub csv_path: PathBuf,
    pub png_path: PathBuf,
}

/// The table of top-1 accuracies, first op down, second op across.
impl std::fmt::Display for AugmentAblation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>22}", "1st \\ 2nd")?;
        for name in &self.names {
            write!(f, " {name:>20}")?;
        }
        writeln!(f)?;
        for (name, row) in self.names.iter().zip(&self.top1) {
            write!(f, "{name:>22}")?;
            for score in row {
                write!(f, " {:>19.2}%", 100.0 * score)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// The ops of view 2 for the pair (first, second): each applied always,
/// a sizing op moved to the front.
fn view_ops(first: &OpConfig, second: Option<&OpConfig>) -> Vec<OpConfig> {
    let mut ops: Vec<OpConfig> =
        std::iter::once(first).chain(second).map(|op| op.clone().with_probability(1.0)).collect();
    ops.sort_by_key(|op| !op.is_sizing());
    ops
}

/// Trains one run per distinct pair under `output_dir`, then writes the table and the heatmap.
pub fn augment_pairs(
    base: &RunConfig,
    ops: &[OpConfig],
    output_dir: &Path,
    observer: &mut dyn Observer,
) -> Result<AugmentAblation> {
    if ops.is_empty() {
        return Err(Error::InvalidArgument("ablate augment needs at least one op".to_owned()));
    }
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let names: Vec<String> = ops.iter().map(|op| op.name().to_owned()).collect();
    let mut done: HashMap<String, f64> = HashMap::new();
    let mut top1 = vec![vec![0.0; ops.len()]; ops.len()];
    for (i, first) in ops.iter().enumerate() {
        for (j, second) in ops.iter().enumerate() {
            let second_view = view_ops(first, (i != j).then_some(second));
            let key = second_view.iter().map(OpConfig::name).collect::<Vec<_>>().join("+");
            if let Some(score) = done.get(&key) {
                top1[i][j] = *score;
                continue;
            }
            let mut config = base.clone();
            config.augment =
                AugmentConfig { ops: Some(Vec::new()), second_view: Some(second_view), ..base.augment.clone() };
            config.train.output_dir = output_dir.join(&key);
            tracing::info!("ablation: training with view 2 = {key}");
            let report = train(config.validate()?, false, observer)?;
            if report.interrupted_at.is_some() {
                return Err(Error::Interrupted(format!("ablation run {key}")));
            }
            let score = report.final_knn_top1().ok_or_else(|| {
                Error::InvalidArgument(
                    "ablate augment scores each run with the kNN monitor: give labelled splits \
                     (data.knn_train_path and data.knn_test_path) or use the synthetic data, and train.knn_every > 0"
                        .to_owned(),
                )
            })?;
            done.insert(key, score);
            top1[i][j] = score;
        }
    }
    let mut csv = String::from("first,second,knn_top1\n");
    for (i, row) in top1.iter().enumerate() {
        for (j, score) in row.iter().enumerate() {
            csv.push_str(&format!("{},{},{score:.4}\n", names[i], names[j]));
        }
    }
    let csv_path = output_dir.join("ablation.csv");
    crate::io::write_atomic(&csv_path, csv.as_bytes())?;
    let png_path = output_dir.join("ablation.png");
    let cells: Vec<Vec<Option<f64>>> = top1.iter().map(|row| row.iter().map(|v| Some(*v)).collect()).collect();
    Heatmap {
        caption: "kNN top-1 (%) with view 2 = 1st op, then 2nd op (view 1 unaugmented)",
        rows: &names,
        columns: &names,
        x_desc: "2nd transformation",
        y_desc: "1st transformation",
        annotate: true,
    }
    .draw(&cells, &png_path)?;
    Ok(AugmentAblation { names, top1, csv_path, png_path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{CropConfig, CutoutConfig};

    #[test]
    fn pairs_apply_both_ops_always_and_crop_first() {
        let crop = OpConfig::RandomResizedCrop(CropConfig::default());
        let cutout = OpConfig::Cutout(CutoutConfig::default());
        let ops = view_ops(&cutout, Some(&crop));
        assert_eq!(ops.iter().map(OpConfig::name).collect::<Vec<_>>(), ["random-resized-crop", "cutout"]);
        assert_eq!(ops[1], OpConfig::Cutout(CutoutConfig { probability: 1.0, ..Default::default() }));
        assert_eq!(view_ops(&cutout, None).len(), 1);
    }
}
