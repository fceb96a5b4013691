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

    /// Every entry logged so far. A last line cut short (no line break
    /// after it: the machine went down, or the disk filled, while it was
    /// appended) is passed over with a warning, as the epoch it was to log
    /// is trained again on resume; damage anywhere else is an error.
    pub fn read(&self) -> Result<Vec<EpochMetrics>> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let (whole, cut) = text.rsplit_once('\n').unwrap_or(("", &text));
        let parse = |line: &str| serde_json::from_str::<EpochMetrics>(line);
        let mut entries = whole
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse(l).map_err(|e| Error::RunFile { path: self.path.clone(), message: e.to_string() }))
            .collect::<Result<Vec<_>>>()?;
        match parse(cut) {
            Ok(entry) => entries.push(entry),
            Err(_) if cut.trim().is_empty() => {}
            Err(error) => tracing::warn!("{}: its last line is cut short ({error}); passed over", self.path.display()),
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_last_line_cut_short_is_passed_over_and_other_damage_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(&dir.path().join("metrics.jsonl"));
        let entry = |epoch| EpochMetrics {
            epoch,
            step: 10 * epoch,
            loss: 1.5,
            learning_rate: 0.1,
            images_per_second: 100.0,
            seconds: 2.0,
            data_wait_seconds: 0.1,
            knn_top1: None,
        };
        for epoch in 1..=3 {
            log.append(&entry(epoch)).unwrap();
        }
        let text = std::fs::read_to_string(&log.path).unwrap();
        let cut = &text[..text.len() - 20];
        std::fs::write(&log.path, cut).unwrap();
        assert_eq!(log.read().unwrap(), [entry(1), entry(2)]);
        log.truncate_after(1).unwrap();
        assert_eq!(log.read().unwrap(), [entry(1)]);
        // A last line whole but for its line break is read.
        std::fs::write(&log.path, text.trim_end()).unwrap();
        assert_eq!(log.read().unwrap(), [entry(1), entry(2), entry(3)]);
        // A damaged line before the last is an error naming the file.
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&log.path, format!("{}\n{}\n{}\n", lines[0], &lines[1][..9], lines[2])).unwrap();
        let error = log.read().unwrap_err().to_string();
        assert!(error.contains("metrics.jsonl"), "{error}");
    }
}
