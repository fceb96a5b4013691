//! The run's log, one entry per epoch, in the run folder twice: as JSON
//! lines (`metrics.jsonl`) and as TensorBoard events (`metrics.tfevents`,
//! [`super::tensorboard`]), appended so a resumed run continues them. The
//! events also hold the loss and learning rate of every few steps
//! (`train.log_every_steps`), for curves finer than an epoch.
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

/// One optimiser step, as logged in the events alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// Optimiser steps taken, this one included.
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    /// When the step was taken, in seconds since the Unix epoch.
    pub wall_time: f64,
}

impl StepMetrics {
    /// The step's scalars, tagged as PyTorch Lightning tags a value logged
    /// per step beside its per-epoch mean.
    fn events(&self) -> Vec<u8> {
        let (wall_time, step) = (self.wall_time, self.step as i64);
        let mut events = tensorboard::scalar(wall_time, step, "train/loss_step", self.loss as f32);
        events.extend(tensorboard::scalar(wall_time, step, "train/learning_rate_step", self.learning_rate as f32));
        events
    }
}

fn open_to_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}

pub struct MetricsLog {
    path: PathBuf,
    events: PathBuf,
    /// Why steps' events could not be written, told by the next
    /// [`MetricsLog::append`] (whose error every rank agrees on).
    failed: Option<Error>,
}

impl MetricsLog {
    /// The log of the run in `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        Self { path: run_dir.join(METRICS_FILE), events: run_dir.join(EVENTS_FILE), failed: None }
    }

    /// Where the log is: `metrics.jsonl` of the run's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, metrics: &EpochMetrics) -> Result<()> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        let line = serde_json::to_string(metrics).expect("metrics are plain numbers");
        writeln!(open_to_append(&self.path)?, "{line}").map_err(|e| Error::io(&self.path, e))?;
        self.append_events(&metrics.events(unix_time()))
    }

    /// Adds steps' scalars to the events. A failure (a full disk) is told
    /// once here and returned by the next [`MetricsLog::append`], so that
    /// the ranks of a multi-process run stop together; steps are not
    /// written after it.
    pub fn append_steps(&mut self, steps: &[StepMetrics]) {
        if self.failed.is_some() || steps.is_empty() {
            return;
        }
        let events: Vec<u8> = steps.iter().flat_map(StepMetrics::events).collect();
        if let Err(error) = self.append_events(&events) {
            tracing::warn!("{error}");
            self.failed = Some(error);
        }
    }

    /// Appends records to the events file, opened by its file version when new.
    fn append_events(&self, records: &[u8]) -> Result<()> {
        let mut events = if self.events.exists() { Vec::new() } else { tensorboard::file_version(unix_time()) };
        events.extend_from_slice(records);
        open_to_append(&self.events)?.write_all(&events).map_err(|e| Error::io(&self.events, e))
    }

    /// Drops what was logged after the checkpoint at `epoch` and `step` (a
    /// resumed run does it again): the JSON lines of later epochs, the
    /// events of later steps. A missing events file (a log from before it
    /// existed) is written from the entries kept, and so is a damaged one,
    /// whose steps are then lost.
    pub fn truncate_after(&self, epoch: usize, step: usize) -> Result<()> {
        if !self.path.exists() && !self.events.exists() {
            return Ok(());
        }
        // Steps may be logged before the first epoch ends, the JSON lines not.
        let mut kept = Vec::new();
        if self.path.exists() {
            kept = self.read()?.into_iter().filter(|m| m.epoch <= epoch).collect();
            let lines: String =
                kept.iter().map(|m| serde_json::to_string(m).expect("metrics are plain numbers") + "\n").collect();
            crate::io::write_atomic(&self.path, lines.as_bytes())?;
        }
        let events = match self.events_up_to(step as i64) {
            Ok(events) => events,
            Err(reason) => {
                if self.events.exists() {
                    let from = match self.path.exists() {
                        true => format!("from {}, without steps", self.path.display()),
                        // Only steps were logged: none of them is kept.
                        false => "with no entries (no epoch was logged)".to_string(),
                    };
                    tracing::warn!("{}: {reason}; written again {from}", self.events.display());
                }
                let now = unix_time();
                tensorboard::file_version(now).into_iter().chain(kept.iter().flat_map(|m| m.events(now))).collect()
            }
        };
        crate::io::write_atomic(&self.events, &events)
    }

    /// The records of the events file up to `step`, the file version first.
    fn events_up_to(&self, step: i64) -> std::result::Result<Vec<u8>, String> {
        let file = std::fs::read(&self.events).map_err(|e| e.to_string())?;
        let (records, cut) = tensorboard::read_records(&file)?;
        if cut {
            tracing::warn!("{}: its last record is cut short; passed over", self.events.display());
        }
        let mut kept = Vec::new();
        for (index, record) in records.into_iter().enumerate() {
            let at = tensorboard::event_step(record).ok_or_else(|| format!("record {index} is not an event"))?;
            if at <= step {
                kept.extend(tensorboard::record(record));
            }
        }
        Ok(kept)
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
        let mut log = MetricsLog::new(dir.path());
        for epoch in 1..=3 {
            log.append(&entry(epoch)).unwrap();
        }
        let text = std::fs::read_to_string(&log.path).unwrap();
        let cut = &text[..text.len() - 20];
        std::fs::write(&log.path, cut).unwrap();
        assert_eq!(log.read().unwrap(), [entry(1), entry(2)]);
        log.truncate_after(1, 10).unwrap();
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
        let mut log = MetricsLog::new(dir.path());
        for epoch in 1..=3 {
            log.append(&entry(epoch)).unwrap();
        }
        let records = || records_of(&std::fs::read(dir.path().join(EVENTS_FILE)).unwrap());
        let of = |epochs: &[usize]| -> Vec<Vec<u8>> {
            epochs.iter().flat_map(|&epoch| records_of(&entry(epoch).events(0.0))).collect()
        };
        // The file version, then five scalars an epoch and the kNN where it ran.
        assert_eq!(records().len(), 1 + 5 + 6 + 5);
        assert_eq!(records()[1..], of(&[1, 2, 3]));
        assert!(records()[6..12].iter().any(|event| event.windows(16).any(|tag| tag == b"monitor/knn_top1")));
        // A resume from epoch 2 redoes epoch 3: once in the file, as in the JSON lines.
        log.truncate_after(2, 20).unwrap();
        log.append(&entry(3)).unwrap();
        assert_eq!(records()[1..], of(&[1, 2, 3]));
        assert_eq!(log.read().unwrap(), [entry(1), entry(2), entry(3)]);
        // The control: without the rewrite, epoch 3 would stand twice.
        log.append(&entry(3)).unwrap();
        assert_eq!(records()[1..], of(&[1, 2, 3, 3]));
        // A fresh start keeps nothing but the file version.
        log.truncate_after(0, 0).unwrap();
        assert_eq!(records().len(), 1);
    }

    fn step(step: usize) -> StepMetrics {
        StepMetrics { step, loss: 5.0 - 0.1 * step as f64, learning_rate: 0.01 * step as f64, wall_time: 1765040000.5 }
    }

    /// The data of the records of a file of whole ones.
    fn records_of(file: &[u8]) -> Vec<Vec<u8>> {
        let (records, cut) = tensorboard::read_records(file).unwrap();
        assert!(!cut);
        records.into_iter().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn steps_are_kept_up_to_the_checkpoint_a_resume_starts_from() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::new(dir.path());
        let steps = |range: std::ops::RangeInclusive<usize>| range.map(step).collect::<Vec<_>>();
        // Two epochs of 10 steps (entry(epoch) is at step 10 * epoch), then 5 steps of a third.
        log.append_steps(&steps(1..=10));
        log.append(&entry(1)).unwrap();
        log.append_steps(&steps(11..=20));
        log.append(&entry(2)).unwrap();
        log.append_steps(&steps(21..=25));
        let path = dir.path().join(EVENTS_FILE);
        let records = || records_of(&std::fs::read(&path).unwrap())[1..].to_vec();
        // What was logged: steps 1 to `last`, after each tenth the entry of its
        // epoch, up to epoch `epochs`.
        let logged = |epochs: usize, last: usize| -> Vec<Vec<u8>> {
            let mut events = Vec::new();
            for at in 1..=last {
                events.extend(step(at).events());
                if at % 10 == 0 && at / 10 <= epochs {
                    events.extend(entry(at / 10).events(0.0));
                }
            }
            records_of(&events)
        };
        assert_eq!(records(), logged(2, 25));
        // A record cut short at the end (the process died appending it) is passed over.
        let mut file = std::fs::read(&path).unwrap();
        file.extend_from_slice(&step(26).events()[..30]);
        std::fs::write(&path, &file).unwrap();
        // Stopped part-way through epoch 3, at step 23: its steps after 23 go.
        log.truncate_after(2, 23).unwrap();
        assert_eq!(records(), logged(2, 23));
        // From the checkpoint of epoch 1: epoch 2 and its steps go too.
        log.truncate_after(1, 10).unwrap();
        assert_eq!(records(), logged(1, 10));
        assert_eq!(log.read().unwrap(), [entry(1)]);
        // The control: a damaged file is written again from the JSON lines,
        // which do not hold the steps.
        let mut file = std::fs::read(&path).unwrap();
        let middle = file.len() / 2;
        file[middle] ^= 1;
        std::fs::write(&path, &file).unwrap();
        log.truncate_after(1, 10).unwrap();
        assert_eq!(records(), records_of(&entry(1).events(0.0)));

        // Steps logged before the first epoch's entry (no JSON lines yet):
        // kept up to a checkpoint part-way through it, none for a fresh start.
        std::fs::remove_file(&log.path).unwrap();
        std::fs::remove_file(&path).unwrap();
        log.append_steps(&steps(1..=5));
        log.truncate_after(0, 3).unwrap();
        assert_eq!(records(), logged(0, 3));
        assert!(!log.path.exists());
        log.truncate_after(0, 0).unwrap();
        assert_eq!(records(), logged(0, 0));
    }

    #[test]
    fn steps_that_cannot_be_written_fail_the_next_epochs_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::new(dir.path());
        // The events "file" a folder: every write to it fails.
        std::fs::create_dir(dir.path().join(EVENTS_FILE)).unwrap();
        log.append_steps(&[step(1)]);
        let error = log.append(&entry(1)).unwrap_err().to_string();
        assert!(error.contains(EVENTS_FILE), "{error}");
        // Told once: the entry after it fails on its own write.
        assert!(log.append(&entry(2)).unwrap_err().to_string().contains(EVENTS_FILE));
    }
}
