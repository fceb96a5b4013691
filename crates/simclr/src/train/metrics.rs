//! The run's log, one entry per epoch, in the run folder twice: as JSON
//! lines (`metrics.jsonl`) and as TensorBoard events (`metrics.tfevents`,
//! [`super::tensorboard`]), appended so a resumed run continues them.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::tensorboard;
use crate::{Error, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";
/// TensorBoard reads a file whose name holds "tfevents".
pub const EVENTS_FILE: &str = "metrics.tfevents";

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
    /// When the epoch ended, in seconds since the Unix epoch (absent from
    /// logs written before 2026-12-06).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time: Option<f64>,
}

impl EpochMetrics {
    /// The epoch's scalars as TensorBoard event records, at its last
    /// optimiser step (an entry without a time is given `now`'s).
    fn events(&self, now: f64) -> Vec<u8> {
        let (step, wall_time) = (self.step as i64, self.wall_time.unwrap_or(now));
        let data_wait = if self.seconds > 0.0 { self.data_wait_seconds / self.seconds } else { 0.0 };
        let scalars = [
            ("train/loss", Some(self.loss)),
            ("train/learning_rate", Some(self.learning_rate)),
            ("train/epoch", Some(self.epoch as f64)),
            ("train/images_per_second", Some(self.images_per_second)),
            ("train/data_wait_fraction", Some(data_wait)),
            ("monitor/knn_top1", self.knn_top1),
        ];
        scalars
            .into_iter()
            .filter_map(|(tag, value)| Some(tensorboard::scalar(wall_time, step, tag, value? as f32)))
            .flatten()
            .collect()
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}

pub struct MetricsLog {
    path: PathBuf,
    events: PathBuf,
}

impl MetricsLog {
    /// The log of the run in `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        Self { path: run_dir.join(METRICS_FILE), events: run_dir.join(EVENTS_FILE) }
    }

    pub fn append(&self, metrics: &EpochMetrics) -> Result<()> {
        let line = serde_json::to_string(metrics).expect("metrics are plain numbers");
        let open = |path: &Path| {
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))
        };
        writeln!(open(&self.path)?, "{line}").map_err(|e| Error::io(&self.path, e))?;
        let now = unix_time();
        let mut events = if self.events.exists() { Vec::new() } else { tensorboard::file_version(now) };
        events.extend(metrics.events(now));
        open(&self.events)?.write_all(&events).map_err(|e| Error::io(&self.events, e))
    }

    /// Drops entries of epochs after `epoch` (a resumed run redoes them).
    /// The events are written again from the entries kept, so that the file
    /// never holds an epoch twice (and a log from before the events file
    /// gains one).
    pub fn truncate_after(&self, epoch: usize) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let kept: Vec<EpochMetrics> = self.read()?.into_iter().filter(|m| m.epoch <= epoch).collect();
        let lines: String =
            kept.iter().map(|m| serde_json::to_string(m).expect("metrics are plain numbers") + "\n").collect();
        crate::io::write_atomic(&self.path, lines.as_bytes())?;
        let now = unix_time();
        let events: Vec<u8> =
            tensorboard::file_version(now).into_iter().chain(kept.iter().flat_map(|m| m.events(now))).collect();
        crate::io::write_atomic(&self.events, &events)
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

    fn entry(epoch: usize) -> EpochMetrics {
        EpochMetrics {
            epoch,
            step: 10 * epoch,
            loss: 1.5,
            learning_rate: 0.1,
            images_per_second: 100.0,
            seconds: 2.0,
            data_wait_seconds: 0.1,
            knn_top1: (epoch == 2).then_some(0.25),
            wall_time: Some(1765040000.0 + epoch as f64),
        }
    }

    #[test]
    fn a_last_line_cut_short_is_passed_over_and_other_damage_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(dir.path());
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

    #[test]
    fn the_events_file_holds_the_logs_entries_and_a_resume_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(dir.path());
        for epoch in 1..=3 {
            log.append(&entry(epoch)).unwrap();
        }
        let records = || tensorboard::read_records(&std::fs::read(dir.path().join(EVENTS_FILE)).unwrap());
        let of = |epochs: &[usize]| -> Vec<Vec<u8>> {
            epochs.iter().flat_map(|&epoch| tensorboard::read_records(&entry(epoch).events(0.0))).collect()
        };
        // The file version, then five scalars an epoch and the kNN where it ran.
        assert_eq!(records().len(), 1 + 5 + 6 + 5);
        assert_eq!(records()[1..], of(&[1, 2, 3]));
        assert!(records()[6..12].iter().any(|event| event.windows(16).any(|tag| tag == b"monitor/knn_top1")));
        // A resume from epoch 2 redoes epoch 3: once in the file, as in the JSON lines.
        log.truncate_after(2).unwrap();
        log.append(&entry(3)).unwrap();
        assert_eq!(records()[1..], of(&[1, 2, 3]));
        assert_eq!(log.read().unwrap(), [entry(1), entry(2), entry(3)]);
        // The control: without the rewrite, epoch 3 would stand twice.
        log.append(&entry(3)).unwrap();
        assert_eq!(records()[1..], of(&[1, 2, 3, 3]));
        // A fresh start keeps nothing but the file version.
        log.truncate_after(0).unwrap();
        assert_eq!(records().len(), 1);
    }
}
