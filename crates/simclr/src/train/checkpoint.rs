//! Checkpoints: model variables, optimiser state, the position in the
//! schedule and the resolved config, in one safetensors file written
//! atomically (see [`crate::io::write_atomic`]), so a crash or a bad input
//! never leaves a half-written or missing checkpoint behind.
//!
//! The data order and every augmentation are pure functions of (seed,
//! epoch, image, view), so the seed and the epoch are the whole RNG state.
use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Tensor};

use crate::config::RunConfig;
use crate::device::Precision;
use crate::model::SimClr;
use crate::optim::Optimizer;
use crate::{Error, Result};

pub const FILE_NAME: &str = "checkpoint.safetensors";
/// The checkpoint before the latest, kept until a newer one is complete.
pub const PREVIOUS_FILE_NAME: &str = "checkpoint.prev.safetensors";

/// The weights file `path` names: a run's folder (one holding its
/// `config.toml`) stands for the run's last state, its checkpoint (which
/// every layer, the projection head's too, can be read from), else the
/// encoder it exported; any other path is itself.
pub fn weights_file(path: &Path) -> Result<std::path::PathBuf> {
    if !path.is_dir() || !path.join(super::trainer::CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    [FILE_NAME, super::trainer::ENCODER_FILE].iter().map(|name| path.join(name)).find(|file| file.is_file()).ok_or_else(
        || {
            Error::InvalidArgument(format!(
                "{}: a run folder with neither {} nor {} (a run killed before its first checkpoint keeps none)",
                path.display(),
                FILE_NAME,
                super::trainer::ENCODER_FILE
            ))
        },
    )
}

/// The lock file of a run folder (see [`lock_run_folder`]).
pub const LOCK_FILE_NAME: &str = ".lock";

/// A run folder held by this process: while it lives, no other process
/// trains in the folder. The lock is `flock`'s, which the kernel releases
/// when the process ends, however it ends, so none outlives its run.
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code, reason = "held for its lock")] std::fs::File);

/// Takes the run folder `dir` (which exists) for this process, or names
/// the process that holds it. Where the file system cannot lock (some
/// network ones), the run goes on unlocked, with a warning.
pub fn lock_run_folder(dir: &Path) -> Result<RunLock> {
    use std::io::{Read, Write};
    let path = dir.join(LOCK_FILE_NAME);
    let open = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
    let mut file = open.map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the message below; where the disk is full,
            // that goes unsaid.
            let _ = file.set_len(0).and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim().parse::<u32>().map(|pid| format!(" (pid {pid})")).unwrap_or_default();
            return Err(Error::InvalidArgument(format!(
                "run folder {}: another process{holder} is training there; wait for it to end, or choose another \
                 --output",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(error)) => tracing::warn!(
            "cannot lock {} ({error}): the run goes on, but nothing keeps a second process from training in {}",
            path.display(),
            dir.display()
        ),
    }
    Ok(RunLock(file))
}

fn previous(path: &Path) -> std::path::PathBuf {
    path.with_file_name(PREVIOUS_FILE_NAME)
}

/// Where a new checkpoint is written before it takes `path`'s place.
fn fresh(path: &Path) -> std::path::PathBuf {
    path.with_extension("safetensors.new")
}

/// The files writing the checkpoint at `path` makes: the latest, the one
/// before it, and the new one on its way.
pub(crate) fn written_files(path: &Path) -> [std::path::PathBuf; 3] {
    [path.to_path_buf(), previous(path), fresh(path)]
}

/// The configuration of the run in `run_dir`, from its latest checkpoint:
/// what `--resume` continues.
pub fn saved_config(run_dir: &Path) -> Result<RunConfig> {
    Ok(Checkpoint::read_to_resume(&run_dir.join(FILE_NAME))?.config)
}

/// The encoder a run's checkpoint holds, as its config describes it (read
/// from the file's header alone).
pub fn encoder_spec(checkpoint: &Path) -> Result<crate::model::EncoderSpec> {
    Ok(stored_config(&crate::io::read_metadata(checkpoint)?, checkpoint)?.encoder_spec())
}

/// The run configuration in a checkpoint's metadata; an error when the
/// metadata is not a simclr checkpoint's.
fn stored_config(metadata: &HashMap<String, String>, path: &Path) -> Result<RunConfig> {
    let bad = |message: String| Error::Checkpoint { path: path.to_path_buf(), message };
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not a simclr checkpoint (expected format {FORMAT})")));
    }
    let config_text = metadata.get("config").ok_or_else(|| bad("metadata 'config' missing".to_owned()))?;
    toml::from_str(config_text).map_err(|e| bad(format!("stored config: {e}")))
}

/// The network a run's checkpoint holds (encoder and projection head, as
/// its configuration builds them) on `device`, with its variables loaded.
pub fn load_model(path: &Path, device: tch::Device) -> Result<(nn::VarStore, SimClr, RunConfig)> {
    Checkpoint::read(path)?.into_model(device)
}

/// Whether a run folder holds a checkpoint (latest, previous, or a new
/// one whose save was cut short).
pub fn exists(path: &Path) -> bool {
    written_files(path).iter().any(|file| file.exists())
}

/// Finishes the save of `checkpoint`, read by [`Checkpoint::read_latest`]
/// from the new file a stop left before `save` renamed it into place at
/// `path`: the latest moves aside and the new one takes its place, as
/// `save` would have done. Does nothing for any other checkpoint.
pub(crate) fn finish_cut_save(checkpoint: &mut Checkpoint, path: &Path) -> Result<()> {
    if checkpoint.path != fresh(path) {
        return Ok(());
    }
    take_place(path)?;
    checkpoint.path = path.to_path_buf();
    Ok(())
}
const FORMAT: &str = "simclr-checkpoint-1";

/// Where a run stands: epochs finished, optimiser steps taken, and, in the
/// epoch under way, batches done and their summed loss (so the epoch's mean
/// comes out the same after a resume); the steps skipped for a non-finite
/// loss or gradient, in all and in a row up to now (so a resumed run
/// reports them all, and stops where the uninterrupted one would).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Position {
    pub epoch: usize,
    pub step: usize,
    pub batch: usize,
    pub epoch_loss_sum: f64,
    pub epoch_loss_count: usize,
    pub skipped_steps: usize,
    pub nonfinite_in_row: usize,
}

/// What trained a run when its checkpoint was saved, kept in the checkpoint
/// so that a resume can say what it continues on otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainedBy {
    pub processes: usize,
    /// The training images (a folder may gain or lose some between a stop and its resume).
    pub images: usize,
    /// The training step's arithmetic, which follows the device ([`Precision::on`]).
    pub precision: Precision,
}

/// Saves a run's state at `position`, trained as `trained_by` says, with
/// its kNN monitor's score at random init where there was one (kept so
/// that a resumed run still reports where it started).
pub fn save(
    path: &Path,
    store: &nn::VarStore,
    optimizer: &Optimizer,
    position: Position,
    trained_by: TrainedBy,
    initial_knn_top1: Option<f64>,
    config: &RunConfig,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> =
        store.variables().into_iter().map(|(name, tensor)| (format!("model.{name}"), tensor)).collect();
    tensors.extend(optimizer.state_tensors().into_iter().map(|(name, tensor)| (format!("optim.{name}"), tensor)));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut metadata = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("epoch".to_owned(), position.epoch.to_string()),
        ("step".to_owned(), position.step.to_string()),
        ("batch".to_owned(), position.batch.to_string()),
        // Rust's shortest round-trip formatting: parsing gives the same f64 back.
        ("epoch_loss_sum".to_owned(), position.epoch_loss_sum.to_string()),
        ("epoch_loss_count".to_owned(), position.epoch_loss_count.to_string()),
        ("skipped_steps".to_owned(), position.skipped_steps.to_string()),
        ("nonfinite_in_row".to_owned(), position.nonfinite_in_row.to_string()),
        ("processes".to_owned(), trained_by.processes.to_string()),
        ("images".to_owned(), trained_by.images.to_string()),
        ("precision".to_owned(), trained_by.precision.name().to_owned()),
        ("config".to_owned(), config.to_toml()),
    ]);
    if let Some(top1) = initial_knn_top1 {
        metadata.insert("initial_knn_top1".to_owned(), top1.to_string());
    }
    // The new checkpoint is complete and on disk before the old one moves
    // aside: a crash at any point leaves the latest or the previous one whole.
    let fresh = fresh(path);
    crate::io::save(&fresh, &tensors, Some(metadata)).map_err(|error| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot write a new checkpoint ({error}); the previous checkpoint, if any, is unchanged"),
    })?;
    take_place(path)
}

/// The renames that end a save: the latest checkpoint at `path` (if any)
/// moves aside to the previous one's name and the new one takes its place.
fn take_place(path: &Path) -> Result<()> {
    if path.exists() {
        std::fs::rename(path, previous(path)).map_err(|e| Error::io(path, e))?;
    }
    std::fs::rename(fresh(path), path).map_err(|e| Error::io(path, e))
}

/// A checkpoint read back: its config first, so the model can be rebuilt.
pub struct Checkpoint {
    pub config: RunConfig,
    pub position: Position,
    /// The processes that trained the run when it was saved (`None` in
    /// checkpoints written before this was recorded).
    pub processes: Option<usize>,
    /// The training images it was trained on (`None` likewise).
    pub images: Option<usize>,
    /// The precision it was trained in (`None` likewise).
    pub precision: Option<Precision>,
    /// The kNN monitor's score at random init (`None` without a monitor,
    /// and likewise).
    pub initial_knn_top1: Option<f64>,
    tensors: HashMap<String, Tensor>,
    path: std::path::PathBuf,
}

impl Checkpoint {
    /// The latest checkpoint at `path`, or, when it is missing or damaged,
    /// the previous one beside it, with a warning. A whole new checkpoint
    /// that a stop left before it took `path`'s place (a kill between
    /// `save`'s write and its renames) comes first: `save` writes it last
    /// and renames it away, so whenever it is there it is the newest.
    pub fn read_latest(path: &Path) -> Result<Self> {
        let fresh = fresh(path);
        if fresh.exists() {
            match Self::read(&fresh) {
                Ok(checkpoint) => {
                    tracing::warn!(
                        "continuing from {}, a checkpoint whose save was cut short before it took the place of {}",
                        fresh.display(),
                        path.display()
                    );
                    return Ok(checkpoint);
                }
                Err(error) => tracing::warn!("{error}; the latest checkpoint is read instead"),
            }
        }
        let latest = match Self::read(path) {
            Ok(checkpoint) => return Ok(checkpoint),
            Err(error) => error,
        };
        let previous = previous(path);
        if !previous.exists() {
            return Err(latest);
        }
        match Self::read(&previous) {
            Ok(checkpoint) => {
                tracing::warn!("{latest}; continuing from the previous checkpoint {}", previous.display());
                Ok(checkpoint)
            }
            Err(other) => Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("unusable ({latest}), and so is the previous one ({other})"),
            }),
        }
    }

    /// [`Checkpoint::read_latest`] for `--resume`: a run folder with no
    /// checkpoint at all (latest, previous or new) is named as one with
    /// nothing to resume, not by the missing file's I/O error.
    pub fn read_to_resume(path: &Path) -> Result<Self> {
        if !exists(path) {
            return Err(Error::Checkpoint {
                path: path.parent().unwrap_or(path).to_path_buf(),
                message: "nothing to resume, the folder holds no checkpoint (leave out --resume to start a run there)"
                    .to_owned(),
            });
        }
        Self::read_latest(path)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Checkpoint { path: path.to_path_buf(), message };
        let loaded = crate::io::load(path)?;
        let config = stored_config(&loaded.metadata, path)?;
        fn field<T: std::str::FromStr>(metadata: &HashMap<String, String>, key: &str) -> Option<T> {
            metadata.get(key).and_then(|v| v.parse().ok())
        }
        let missing = |key: &str| bad(format!("metadata '{key}' missing or malformed"));
        let metadata = &loaded.metadata;
        let position = Position {
            epoch: field(metadata, "epoch").ok_or_else(|| missing("epoch"))?,
            step: field(metadata, "step").ok_or_else(|| missing("step"))?,
            batch: field(metadata, "batch").ok_or_else(|| missing("batch"))?,
            epoch_loss_sum: field(metadata, "epoch_loss_sum").ok_or_else(|| missing("epoch_loss_sum"))?,
            epoch_loss_count: field(metadata, "epoch_loss_count").ok_or_else(|| missing("epoch_loss_count"))?,
            // Checkpoints written before these were kept count from 0.
            skipped_steps: field(metadata, "skipped_steps").unwrap_or(0),
            nonfinite_in_row: field(metadata, "nonfinite_in_row").unwrap_or(0),
        };
        let (processes, images, precision) =
            (field(metadata, "processes"), field(metadata, "images"), field(metadata, "precision"));
        let initial_knn_top1 = field(metadata, "initial_knn_top1");
        let path = path.to_path_buf();
        Ok(Self { config, position, processes, images, precision, initial_knn_top1, tensors: loaded.tensors, path })
    }

    /// Copies the saved variables and optimiser state into a freshly built run.
    pub fn restore(mut self, store: &nn::VarStore, optimizer: &mut Optimizer) -> Result<Position> {
        self.copy_model(store)?;
        let bad = |message: String| Error::Checkpoint { path: self.path.clone(), message };
        let optim_state = self
            .tensors
            .drain()
            .filter_map(|(name, tensor)| name.strip_prefix("optim.").map(|n| (n.to_owned(), tensor)))
            .collect();
        optimizer.load_state(optim_state).map_err(|e| bad(e.to_string()))?;
        Ok(self.position)
    }

    /// The network it holds (see [`load_model`]).
    pub fn into_model(mut self, device: tch::Device) -> Result<(nn::VarStore, SimClr, RunConfig)> {
        let (store, model) = SimClr::in_store(&self.config.model, device);
        self.copy_model(&store)?;
        Ok((store, model, self.config))
    }

    /// Copies the saved model variables into `store`'s, every one checked.
    fn copy_model(&mut self, store: &nn::VarStore) -> Result<()> {
        let bad = |message: String| Error::Checkpoint { path: self.path.clone(), message };
        for (name, mut variable) in store.variables() {
            let saved = self
                .tensors
                .remove(&format!("model.{name}"))
                .ok_or_else(|| bad(format!("variable '{name}' missing")))?;
            if saved.size() != variable.size() {
                return Err(bad(format!(
                    "variable '{name}' has shape {:?}, expected {:?}",
                    saved.size(),
                    variable.size()
                )));
            }
            tch::no_grad(|| variable.copy_(&saved));
        }
        Ok(())
    }
}
