//! Metrics as JSON lines (`metrics.jsonl` in the run folder), one per epoch,
//! appended so a resumed run continues the same log.
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What one epoch did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based number of the epoch just finished.
    pub epoch: usize,
    /// Optimiser steps taken so far.
    pub step: usize,
    /// Mean training loss over the epoch.
    pub loss: f64,
    /// Learning rate of the epoch's last step.
    pub learning_rate: f64,
    /// Training images (pairs of views) per second over the epoch.
    pub images_per_second: f64,
    pub seconds: f64,
    /// Of `seconds`, the time the steps waited for their views (the input
    /// pipeline bounds the run when this is a large share).
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// kNN top-1 accuracy on the monitor split, when it ran this epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1: Option<f64>,
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf() }
    }

    pub fn append(&self, metrics: &EpochMetrics) -> Result<()> {
        let line = serde_json::to_string(metrics).expect("metrics are plain numbers");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        writeln!(file, "{line}").map_err(|e| Error::io(&self.path, e))
    }

    /// Drops entries of epochs after `epoch` (a resumed run redoes them).
    pub fn truncate_after(&self, epoch: usize) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let kept: String = self
            .read()?
            .iter()
            .filter(|m| m.epoch <= epoch)
            .map(|m| serde_json::to_string(m).expect("metrics are plain numbers") + "\n")
            .collect();
        crate::io::write_atomic(&self.path, kept.as_bytes())
    }

    /// Every entry logged so far.
    pub fn read(&self) -> Result<Vec<EpochMetrics>> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| Error::io(&self.path, e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| Error::RunFile { path: self.path.clone(), message: e.to_string() })
            })
            .collect()
    }
}
