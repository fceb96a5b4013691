//! The pretraining loop (Algorithm 1): for each batch of N images, two
//! augmented views each, z = g(f(x̃)) for all 2N, the contrastive loss,
//! one optimiser step; the learning rate follows the schedule per step.
//!
//! Both views go through the network as one batch of 2N, so BatchNorm
//! statistics are computed over all 2N views, as the paper's global BN does
//! across devices (section 2.2).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{nn, Device, Tensor};

use super::budget::Budget;
use super::checkpoint::{self, Checkpoint, Position, RunLock, TrainedBy};
use super::graph::GraphedStep;
use super::ledger::Ledger;
use super::metrics::{EpochMetrics, MetricsLog, StepMetrics};
use super::monitor::Monitor;
use super::step::{GradientCache, Objective};
use crate::augment::Pipeline;
use crate::augment::{Backend, DEVICE_DATA_LIMIT};
use crate::config::{RunConfig, ValidConfig};
use crate::data::config::DataFormat;
use crate::data::loader::Shard;
use crate::data::loader::{worker_pool, DeviceData, DeviceViewLoader, ViewFormat, ViewLoader, Views};
use crate::data::stream::{ShardList, Streaming};
use crate::data::{open_splits, Dataset};
use crate::device::Precision;
use crate::dist::launch::Restart;
use crate::dist::{agree, GradientPrecision, Parallel, ProcessGroup, ReduceOp};
use crate::model::SimClr;
use crate::names::counted;
use crate::optim::{Optimizer, Schedule};
use crate::{Error, Result};

/// File names inside the run folder.
pub const CONFIG_FILE: &str = "config.toml";
pub use super::metrics::{EVENTS_FILE, METRICS_FILE};
pub const ENCODER_FILE: &str = "encoder.safetensors";
/// The folder of the encoders `train.encoder_every` writes along a run.
pub const ENCODER_SNAPSHOTS: &str = "encoders";
pub const SUMMARY_FILE: &str = "summary.json";

/// What an [`Observer`] asks of the loop after each step or epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Finish here: write a checkpoint and return with `interrupted_at`
    /// (unless the run has just finished anyway).
    Stop,
}

/// Where a run is, as the loop reports it after each step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub position: Position,
    pub steps_per_epoch: usize,
    /// The planned epochs (a time budget may change them after epoch 1 and 2).
    pub epochs: usize,
    pub learning_rate: f64,
    /// The latest loss read from the device: losses are read every few
    /// steps, so this lags the step (see `Ledger`).
    pub loss: Option<f64>,
    /// Training images per second in this epoch so far.
    pub images_per_second: f64,
    /// The share of this epoch's time so far spent waiting for views: near
    /// 0 when the model bounds the run, large when the input does.
    pub data_wait_share: f64,
}

/// What varies around the loop: signals, a progress bar, logging, and in
/// tests, injected faults. Every method has a default that does nothing.
pub trait Observer {
    /// After each optimiser step.
    fn on_step(&mut self, _progress: &Progress) -> Control {
        Control::Continue
    }

    /// After each epoch, its metrics logged and before its checkpoint.
    fn on_epoch_end(&mut self, _metrics: &EpochMetrics) -> Control {
        Control::Continue
    }

    /// Fault injection: whether the loss of (0-based) step `step` is made
    /// NaN, as a diverging run's would be.
    #[cfg(feature = "fault-injection")]
    fn poison(&mut self, _step: usize) -> bool {
        false
    }
}

/// An observer that lets the run go to its end.
impl Observer for () {}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub output_dir: PathBuf,
    /// The exported encoder; absent when the run was interrupted.
    pub encoder_path: Option<PathBuf>,
    pub checkpoint_path: PathBuf,
    pub epochs: Vec<EpochMetrics>,
    /// kNN top-1 of the encoder before training, when a monitor split exists
    /// (fresh runs only): the random-init baseline, or that of the
    /// encoder the run started from (`model.init_encoder`).
    pub initial_knn_top1: Option<f64>,
    /// The weights the encoder started from, where not a random init.
    pub init_encoder: Option<PathBuf>,
    pub device: Device,
    /// The training step's arithmetic ([`Precision::on`]).
    pub precision: Precision,
    /// Where an interrupted run stopped; `--resume` continues from there.
    pub interrupted_at: Option<Position>,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: usize,
    /// Unreadable images skipped under `data.on_bad_image = "skip"`, as "path: reason".
    pub skipped_images: Vec<String>,
}

impl TrainReport {
    pub fn final_knn_top1(&self) -> Option<f64> {
        self.epochs.iter().rev().find_map(|m| m.knn_top1)
    }
}

/// What a finished run did, as `simclr train` prints it.
impl std::fmt::Display for TrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(position) = self.interrupted_at {
            return writeln!(
                f,
                "interrupted after step {} (epoch {}, batch {}); checkpoint written to {}\n\
                 continue with: simclr train --resume --output {}",
                position.step,
                position.epoch + 1,
                position.batch,
                self.checkpoint_path.display(),
                self.output_dir.display()
            );
        }
        if let Some(last) = self.epochs.last() {
            let (epochs, device, precision) = (counted(last.epoch, "epoch"), self.device, self.precision.name());
            writeln!(f, "trained {epochs} on {device:?} in {precision}: final loss {:.4}", last.loss)?;
        }
        match (self.initial_knn_top1, self.final_knn_top1()) {
            (Some(before), Some(after)) => {
                let start = match &self.init_encoder {
                    Some(weights) => format!("with the encoder of {}", weights.display()),
                    None => "at random init".to_owned(),
                };
                writeln!(f, "kNN top-1: {:.2}% {start} -> {:.2}% after training", 100.0 * before, 100.0 * after)?
            }
            (None, Some(after)) => writeln!(f, "kNN top-1: {:.2}%", 100.0 * after)?,
            _ => {}
        }
        write!(f, "{}", crate::data::Skipped(&self.skipped_images))?;
        if self.skipped_steps > 0 {
            writeln!(f, "skipped {} steps with a non-finite loss or gradient", self.skipped_steps)?;
        }
        if let Some(encoder) = &self.encoder_path {
            writeln!(f, "encoder: {}", encoder.display())?;
        }
        writeln!(f, "checkpoint: {}", self.checkpoint_path.display())
    }
}

/// How a run starts in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run, in a folder that holds none.
    Fresh,
    /// The run in the folder, continued from its checkpoint (`--resume`).
    Resume,
    /// The command of a run started again by its launcher after a failure:
    /// it continues from the folder's checkpoint where there is one, and
    /// starts anew where the run failed before writing any.
    Restart(Restart),
}

impl Start {
    /// `--resume`, else a launcher's restart where this process is one.
    pub fn from_env(resume: bool) -> Result<Self> {
        Ok(match (resume, Restart::from_env()?) {
            (true, _) => Start::Resume,
            (false, Some(restart)) => Start::Restart(restart),
            (false, None) => Start::Fresh,
        })
    }
}

/// Trains a SimCLR model as `config` says (continuing the run in
/// `config.train.output_dir` when `resume`), writing checkpoints, metrics
/// and the exported encoder there; `observer` sees every step and epoch.
pub fn train(config: ValidConfig, resume: bool, observer: &mut dyn Observer) -> Result<TrainReport> {
    let start = if resume { Start::Resume } else { Start::Fresh };
    train_in(config, start, None, observer)
}

/// [`train`] as one rank of `group` (alone when `None`): this rank makes
/// and trains on its slice of every global batch; rank 0 alone writes the
/// run folder. Every rank calls it with the same configuration.
pub fn train_in(
    config: ValidConfig,
    start: Start,
    group: Option<ProcessGroup>,
    observer: &mut dyn Observer,
) -> Result<TrainReport> {
    let (mut trainer, views) = Trainer::new(config, start, group)?;
    let trained = train_epochs(&mut trainer, &views, observer);
    trained.map_err(|error| crate::dist::explain(trainer.group.as_ref(), error))
}

/// The epochs `trainer` has left, with `views`; the report of the run, done
/// or stopped.
fn train_epochs(trainer: &mut Trainer, views: &Views, observer: &mut dyn Observer) -> Result<TrainReport> {
    while !trainer.is_done() {
        let position = trainer.begin_epoch();
        let mut batches = views.epoch(position.epoch as u64, position.batch);
        loop {
            let asked = Instant::now();
            let Some(batch) = batches.next() else { break };
            trainer.waited_for_data(asked.elapsed());
            #[cfg(feature = "fault-injection")]
            if observer.poison(trainer.position.step) {
                trainer.poison_next_step();
            }
            let batch = batch?;
            let labels = trainer.labels(&batch.images);
            let progress = trainer.step(&batch.views, labels.as_ref())?;
            let mid_epoch = progress.position.batch < progress.steps_per_epoch;
            if trainer.after_step(observer.on_step(&progress) == Control::Stop)? && mid_epoch {
                return trainer.interrupt();
            }
        }
        let metrics = trainer.end_epoch()?;
        let stop = trainer.any_rank(observer.on_epoch_end(&metrics) == Control::Stop)?;
        trainer.checkpoint_epoch(stop)?;
        if stop && !trainer.is_done() {
            return trainer.interrupt();
        }
    }
    trainer.finish()
}

/// `config` made the paper's supervised baseline (`--supervised`): trained
/// with labels, the head a linear classifier with an output per class of
/// its training images.
pub fn supervised(mut config: RunConfig) -> Result<RunConfig> {
    let train = open_splits(&config.data, config.train.seed)?.train;
    if !train.is_labelled() {
        return Err(unlabelled(&train));
    }
    config.train.supervised = true;
    config.model.head.kind = crate::model::HeadKind::Linear;
    config.model.head.projection_dim = train.classes.len();
    Ok(config)
}

fn unlabelled(train_set: &Dataset) -> Error {
    Error::Dataset {
        path: train_set.origin.clone(),
        message: "train.supervised needs labelled images (class folders or CIFAR batches)".to_owned(),
    }
}

/// The class of every training image when `config` trains with labels
/// (`train.supervised`), after checking that it can: labelled images and a
/// linear head with an output per class.
fn supervised_classes(config: &ValidConfig, train_set: &Dataset) -> Result<Option<Vec<i64>>> {
    if !config.train.supervised {
        return Ok(None);
    }
    let unlabelled = || unlabelled(train_set);
    let classes: Vec<i64> = train_set
        .samples
        .iter()
        .map(|sample| sample.label.map(|l| l as i64).ok_or_else(unlabelled))
        .collect::<Result<_>>()?;
    let head = &config.model.head;
    let count = train_set.classes.len();
    if head.kind != crate::model::HeadKind::Linear || head.projection_dim != count {
        return Err(Error::Config(vec![format!(
            "train.supervised: model.head must be the classifier, kind = \"linear\" with projection_dim = {count} \
             (the classes of {}); it is {:?} with projection_dim = {} (--supervised sets both)",
            train_set.origin.display(),
            head.kind,
            head.projection_dim
        )]));
    }
    Ok(Some(classes))
}

/// The state of a run between steps: the model, its optimiser and schedule,
/// where the run is, and what it has logged. [`train`] drives it.
pub struct Trainer {
    config: ValidConfig,
    device: Device,
    store: nn::VarStore,
    model: SimClr,
    optimizer: Optimizer,
    /// Chunks each batch when `train.micro_batch_size` is below this rank's share of it.
    gradient_cache: Option<GradientCache>,
    /// Replays each step from a CUDA graph (`train.cuda_graph`, on CUDA).
    graphed: Option<GraphedStep>,
    schedule: Schedule,
    precision: Precision,
    /// What the checkpoints say trained the run.
    trained_by: TrainedBy,
    position: Position,
    steps_per_epoch: usize,
    ledger: Ledger,
    log: MetricsLog,
    epochs: Vec<EpochMetrics>,
    budget: Option<Budget>,
    monitor: Option<Monitor>,
    initial_knn_top1: Option<f64>,
    train_set: Arc<Dataset>,
    format: ViewFormat,
    pool: Arc<rayon::ThreadPool>,
    checkpoint_path: PathBuf,
    /// When the current epoch started, and at which batch (a resumed epoch
    /// starts part-way).
    epoch_started: Instant,
    epoch_first_batch: usize,
    /// Time this epoch's steps waited for their views.
    epoch_data_wait: Duration,
    /// When the last checkpoint was written (or this process started),
    /// for `train.checkpoint_every_minutes`.
    last_saved: Instant,
    /// A checkpoint is due at the end of this epoch, called for by the
    /// steps or the minutes at its last step.
    save_due: bool,
    learning_rate: f64,
    last_loss: Option<f64>,
    /// The other processes of a multi-process run.
    group: Option<ProcessGroup>,
    /// Supervised training: the class of every training image.
    classes: Option<Vec<i64>>,
    /// The run folder, held while the run trains (rank 0's).
    _run_lock: Option<RunLock>,
    #[cfg(feature = "fault-injection")]
    poison_next: bool,
}

impl Trainer {
    /// Sets a run up: data, model, optimiser, and either the checkpoint
    /// (as `start` says) or a fresh run folder. Returns the trainer and the
    /// views it trains on; an error is explained as one in training is.
    pub fn new(config: ValidConfig, start: Start, group: Option<ProcessGroup>) -> Result<(Trainer, Views)> {
        let mut slot = group;
        Self::assemble(config, start, &mut slot).map_err(|error| crate::dist::explain(slot.as_ref(), error))
    }

    /// [`Trainer::new`], which takes the group out of `slot` once it is set up.
    fn assemble(config: ValidConfig, start: Start, slot: &mut Option<ProcessGroup>) -> Result<(Trainer, Views)> {
        let group = &*slot;
        // A run's folder stands for its weights file, which the run records.
        let config = match &config.model.init_encoder {
            Some(weights) => config.with_init_encoder(checkpoint::weights_file(weights)?),
            None => config,
        };
        let mut device = crate::device::select(config.train.device)?;
        if config.train.deterministic {
            crate::device::make_deterministic(device);
        }
        let precision = Precision::on_with(device, config.train.mixed_precision, config.train.mixed_precision_dtype);
        if let Some(group) = &group {
            device = crate::device::of_rank(device, group.rank());
        }
        let output_dir = config.train.output_dir.clone();
        let checkpoint_path = output_dir.join(checkpoint::FILE_NAME);
        let seed = config.train.seed;
        tch::manual_seed(seed as i64);
        let shard = match &group {
            Some(group) => {
                group.check_same("configurations", &config.to_toml())?;
                crate::dist::launch::check_divides(config.train.batch_size, group.size())?;
                Shard { rank: group.rank(), world: group.size() }
            }
            None => Shard::default(),
        };
        let writer = shard.rank == 0;
        // The run folder is checked before the data is read, which can take
        // minutes: a forgotten --resume, or a file where the folder goes, is
        // told at once.
        let opened = match writer {
            true => open_run_folder(&config, start, shard.world, &checkpoint_path),
            false => Ok((None, None)),
        };
        let (saved, run_lock) = agree(group.as_ref(), opened)?;
        // Whether rank 0 continues a saved run (a restart may not).
        let resume = match &group {
            Some(group) => group.any(saved.is_some())?,
            None => saved.is_some(),
        };

        let splits = agree(group.as_ref(), open_splits(&config.data, seed))?;
        if let Some(group) = &group {
            // Each rank takes its slice of every batch by position in the listing.
            group.check_same("training images", &splits.train.fingerprint())?;
        }
        let policy = config.data.on_bad_image;
        let train_set = Arc::new(splits.train.with_policy(policy));
        let pool = worker_pool(config.data.workers)?;
        let format = config.image_format();
        let views = training_views(&config, train_set.clone(), device, &pool)?.sharded(shard);
        let classes = supervised_classes(&config, &train_set)?;
        // Every rank computes the kNN monitor's features of its part of the
        // splits; train.knn_every = 0 keeps no monitor (not even the score
        // at random init, nor the reading of its images under the skip policy).
        let monitored = splits.knn.filter(|_| config.train.knn_every > 0);
        let monitor = monitored.map(|knn| Monitor::of_run(&config, knn, &pool, group.as_ref())).transpose()?;

        let (store, model) = SimClr::in_store(&config.model, device);
        let trainable = store.variables().into_iter().filter(|(_, tensor)| tensor.requires_grad()).collect::<Vec<_>>();
        let mut optimizer = Optimizer::new(&config.optim, trainable);
        if precision == Precision::Fp16 {
            optimizer.scale_losses();
        }
        let graphed = graphed_step(&config, device, group.as_ref())?;
        let gradient_cache = config.train.micro_batch_size.map(|micro| {
            tracing::info!("computing each batch in chunks of {micro} images per process (BatchNorm per chunk)");
            GradientCache::new(&store, micro)
        });

        let steps_per_epoch = views.batches_per_epoch();
        if steps_per_epoch == 0 {
            return Err(no_batch(&views, &train_set, config.train.batch_size, shard.world));
        }
        if let Some(warning) = unread_each_epoch(&views, &train_set, config.train.batch_size, shard.world) {
            if writer {
                tracing::warn!("{warning}");
            }
        }
        let warmup_steps = (config.optim.warmup_epochs * steps_per_epoch as f64).round() as usize;
        let total_steps = config.train.epochs * steps_per_epoch;
        let schedule =
            Schedule { peak: config.optim.peak_learning_rate(config.train.batch_size), warmup_steps, total_steps };
        if warmup_steps > total_steps && config.train.time_budget_seconds.is_none() && writer {
            tracing::warn!(
                "optim.warmup_epochs = {} is longer than the run's {}: the learning rate never reaches \
                 its peak of {:.4}; lower optim.warmup_epochs (the paper warms up for 10 of 100 or more epochs)",
                config.optim.warmup_epochs,
                counted(config.train.epochs, "epoch"),
                schedule.peak
            );
        }

        let mut initial_knn_top1 = None;
        // Rank 0 alone reads and writes the run folder; the others take its
        // state (a resumed run may have any number of processes).
        let trained_by = TrainedBy { processes: shard.world, images: train_set.len(), precision };
        let saved_initial_knn_top1 = saved.as_ref().and_then(|saved| saved.initial_knn_top1);
        let prepared = if writer {
            prepare_run_folder(&config, saved, trained_by, &store, &mut optimizer, &checkpoint_path)
        } else {
            Ok(Position::default())
        };
        let mut position = agree(group.as_ref(), prepared)?;
        if let Some(group) = &group {
            position = share_state(group, &store, &mut optimizer, position)?;
            let bf16 = config.train.gradient_all_reduce == GradientPrecision::Bf16;
            if group.size() > 1 && (config.train.gradient_bucket_mb > 0.0 || bf16) {
                // Without buckets, bf16 takes one of the whole buffer, sent when its last gradient is in.
                let cap = match config.train.gradient_bucket_mb {
                    mb if mb > 0.0 => (mb * 1e6) as usize,
                    _ => usize::MAX,
                };
                optimizer.reduce_in_buckets(group, cap, bf16)?;
            }
        }
        if resume && position.epoch >= config.train.epochs && writer {
            tracing::warn!(
                "the run has trained {} epochs and train.epochs = {}: nothing to train; \
                 --epochs N with N above {} trains on",
                position.epoch,
                config.train.epochs,
                position.epoch
            );
        }
        if !resume {
            if let Some(monitor) = &monitor {
                initial_knn_top1 =
                    Some(monitor.top1((&model.encoder).into(), format, device, &pool, group.as_ref())?);
            }
        } else if monitor.is_some() {
            // As the run's first process measured it (rank 0 read it).
            initial_knn_top1 = saved_initial_knn_top1;
        }
        tracing::info!(
            device = ?device,
            precision = precision.name(),
            images = train_set.len(),
            augment = views.name(),
            view_size = config.view_size(),
            steps_per_epoch,
            peak_learning_rate = schedule.peak,
            "training {} ({}x, {:?} stem)",
            config.model.arch.name(),
            config.model.width_multiplier,
            config.model.stem
        );
        let trainer = Trainer {
            device,
            precision,
            trained_by,
            ledger: Ledger::new(config.train.max_nonfinite_steps, checkpoint_path.clone(), writer),
            log: MetricsLog::new(&output_dir),
            budget: config.train.time_budget_seconds.map(Budget::new),
            epoch_first_batch: position.batch,
            config,
            store,
            model,
            optimizer,
            gradient_cache,
            graphed,
            schedule,
            position,
            steps_per_epoch,
            epochs: Vec::new(),
            monitor,
            initial_knn_top1,
            train_set,
            format,
            pool,
            checkpoint_path,
            epoch_started: Instant::now(),
            epoch_data_wait: Duration::ZERO,
            last_saved: Instant::now(),
            save_due: false,
            learning_rate: 0.0,
            last_loss: None,
            group: slot.take(),
            classes,
            _run_lock: run_lock,
            #[cfg(feature = "fault-injection")]
            poison_next: false,
        };
        Ok((trainer, views))
    }

    /// Whether every planned epoch is done.
    pub fn is_done(&self) -> bool {
        self.position.epoch >= self.config.train.epochs
    }

    /// Starts timing an epoch (or what is left of it, when resumed part-way);
    /// returns where it starts.
    pub fn begin_epoch(&mut self) -> Position {
        self.epoch_started = Instant::now();
        self.epoch_first_batch = self.position.batch;
        self.epoch_data_wait = Duration::ZERO;
        self.position
    }

    /// Counts time the loop spent waiting for a batch of views.
    pub fn waited_for_data(&mut self, wait: Duration) {
        self.epoch_data_wait += wait;
    }

    /// Makes the next step's loss NaN (fault injection).
    #[cfg(feature = "fault-injection")]
    pub fn poison_next_step(&mut self) {
        self.poison_next = true;
    }

    /// Whether the run trains with labels (`train.supervised`).
    pub fn is_supervised(&self) -> bool {
        self.classes.is_some()
    }

    /// The classes of the training images at `indices`, on the device, as
    /// [`Trainer::step`] takes them (`None` unless supervised).
    pub fn labels(&self, indices: &[usize]) -> Option<Tensor> {
        let classes = self.classes.as_ref()?;
        let labels: Vec<i64> = indices.iter().map(|&index| classes[index]).collect();
        Some(crate::device::upload_slice(&labels, self.device))
    }

    /// One optimiser step on a batch of 2N views (Algorithm 1's loop body):
    /// the loss, its gradient, and the update unless either is non-finite.
    /// Supervised, `labels` holds the class of each of the batch's images.
    pub fn step(&mut self, views: &Tensor, labels: Option<&Tensor>) -> Result<Progress> {
        let learning_rate = self.schedule.learning_rate(self.position.step);
        #[cfg(feature = "fault-injection")]
        let poisoned = std::mem::take(&mut self.poison_next);
        #[cfg(not(feature = "fault-injection"))]
        let poisoned = false;
        let (model, optimizer, cache) = (&self.model, &mut self.optimizer, self.gradient_cache.as_ref());
        let global_batch_norm = self.config.train.sync_batch_norm;
        let parallel = self.group.as_ref().map(|group| Parallel { group, global_batch_norm });
        let objective = Objective::new(&self.config.loss, self.precision, parallel).with_labels(labels);
        let (loss, finite) = if let Some(graphed) = &mut self.graphed {
            if poisoned {
                return Err(Error::InvalidArgument("fault injection cannot reach a captured step".to_owned()));
            }
            // Set outside the capture, read by it on the device.
            optimizer.set_learning_rate(learning_rate);
            let step = |views: &Tensor| -> Result<(Tensor, Tensor)> {
                let loss = super::step::backward(model, views, &objective, None, optimizer)?;
                let finite = optimizer.step_if_finite_at_set_rate(&loss);
                Ok((loss, finite))
            };
            super::step::out_of_memory_as_error(|| graphed.run(views, step), self.device, self.config.train.batch_size)?
        } else {
            let step = || -> Result<(Tensor, Tensor)> {
                let mut loss = super::step::backward(model, views, &objective, cache, optimizer)?;
                if poisoned {
                    // The update is skipped for a non-finite loss as for a
                    // non-finite gradient.
                    loss *= f64::NAN;
                }
                if let Some(Parallel { group, .. }) = parallel {
                    // The global batch's gradient and loss, the same on every
                    // rank (one rank's are the global batch's already).
                    optimizer.average_gradient(group)?;
                    if group.size() > 1 {
                        group.all_reduce(&mut loss, ReduceOp::Sum)?;
                        loss /= group.size() as f64;
                    }
                }
                // A non-finite loss or gradient is caught on the device: the
                // update is shut there, and the ledger reads the verdict later.
                let finite = optimizer.step_if_finite(learning_rate, &loss);
                Ok((loss, finite))
            };
            super::step::out_of_memory_as_error(step, self.device, self.config.train.batch_size)?
        };
        self.ledger.push(self.position.step, learning_rate, loss, finite);
        self.position.step += 1;
        self.position.batch += 1;
        self.learning_rate = learning_rate;
        if self.ledger.due() || self.position.batch == self.steps_per_epoch {
            self.settle()?;
        }
        Ok(self.progress())
    }

    /// Whether any rank asks to stop (the one process: whether it does), so
    /// that every rank stops at the same step.
    pub fn any_rank(&self, stop: bool) -> Result<bool> {
        match &self.group {
            Some(group) => group.any(stop),
            None => Ok(stop),
        }
    }

    /// After each step: [`Self::any_rank`] on `stop`, and a checkpoint when
    /// `train.checkpoint_every_steps` or `train.checkpoint_every_minutes`
    /// calls for one (on any rank's clock; one collective for both), in
    /// the middle of an epoch now, at its last step with the epoch's end.
    /// Returns whether to stop (and leaves the checkpoint to the stop).
    pub fn after_step(&mut self, stop: bool) -> Result<bool> {
        let train = &self.config.train;
        let every_steps = train.checkpoint_every_steps;
        let minutes = train.checkpoint_every_minutes;
        let due = (every_steps > 0 && self.position.step.is_multiple_of(every_steps))
            || (minutes > 0.0 && self.last_saved.elapsed().as_secs_f64() >= 60.0 * minutes);
        let [stop, due] = match &self.group {
            Some(group) => group.any_of([stop, due])?,
            None => [stop, due],
        };
        if due && self.position.batch == self.steps_per_epoch {
            self.save_due = true;
        } else if due && !stop {
            self.save_mid_epoch()?;
        }
        Ok(stop)
    }

    /// Writes a checkpoint at a step inside the epoch, its time left out of
    /// the epoch's (as an epoch's checkpoint is), so that the images/s and
    /// the time budget's pace are the training's.
    fn save_mid_epoch(&mut self) -> Result<()> {
        let began = Instant::now();
        self.settle()?;
        self.save_checkpoint()?;
        self.epoch_started += began.elapsed();
        Ok(())
    }

    /// Whether this process writes the run folder: rank 0, or the one process.
    fn writes(&self) -> bool {
        self.group.as_ref().is_none_or(|group| group.rank() == 0)
    }

    /// Where the run is, for observers.
    pub fn progress(&self) -> Progress {
        let batches = (self.position.batch - self.epoch_first_batch) as f64;
        let elapsed = self.epoch_started.elapsed().as_secs_f64();
        Progress {
            position: self.position,
            steps_per_epoch: self.steps_per_epoch,
            epochs: self.config.train.epochs,
            learning_rate: self.learning_rate,
            loss: self.last_loss,
            images_per_second: batches * self.config.train.batch_size as f64 / elapsed,
            data_wait_share: self.epoch_data_wait.as_secs_f64() / elapsed,
        }
    }

    /// Reads the steps the ledger holds; the events log every
    /// `train.log_every_steps`-th step's loss (finite ones: a skipped step
    /// is told as a warning).
    fn settle(&mut self) -> Result<()> {
        let settled = self.ledger.settle(&mut self.position)?;
        if let Some(last) = settled.last() {
            self.last_loss = Some(last.metrics.loss);
        }
        let every = self.config.train.log_every_steps;
        if every > 0 && self.writes() {
            let steps: Vec<StepMetrics> = settled
                .iter()
                .filter(|settled| settled.finite && settled.metrics.step.is_multiple_of(every))
                .map(|settled| settled.metrics)
                .collect();
            self.log.append_steps(&steps);
        }
        Ok(())
    }

    /// Closes the epoch: its mean loss, the time budget's plan, the kNN
    /// monitor when due, and a line in the metrics log.
    pub fn end_epoch(&mut self) -> Result<EpochMetrics> {
        self.settle()?;
        let steps_per_epoch = self.steps_per_epoch;
        let position = &mut self.position;
        position.epoch += 1;
        let seconds = self.epoch_started.elapsed().as_secs_f64();
        // An epoch resumed part-way was timed over its remaining batches.
        let remaining = (steps_per_epoch - self.epoch_first_batch).max(1);
        let whole_epoch_seconds = seconds * steps_per_epoch as f64 / remaining as f64;
        if let Some(budget) = &mut self.budget {
            let mut planned = budget.plan(position.epoch, seconds, whole_epoch_seconds, self.config.train.epochs);
            if let Some(group) = &self.group {
                // Rank 0's clock decides, for every rank.
                let mut shared = Tensor::from_slice(&[planned.map_or(-1, |epochs| epochs as i64)]);
                group.broadcast(&mut shared, 0)?;
                planned = usize::try_from(shared.int64_value(&[0])).ok();
            }
            if let Some(planned) = planned {
                self.config = self.config.with_planned_epochs(planned);
                self.schedule.total_steps = self.config.train.epochs * steps_per_epoch;
                tracing::info!(
                    "time budget {:.0} s at {whole_epoch_seconds:.1} s for epoch {}: training {}",
                    budget.seconds,
                    position.epoch,
                    counted(self.config.train.epochs, "epoch")
                );
            }
        }
        let loss = position.epoch_loss_sum / position.epoch_loss_count.max(1) as f64;
        position.batch = 0;
        position.epoch_loss_sum = 0.0;
        position.epoch_loss_count = 0;
        let (epoch, step) = (position.epoch, position.step);
        let train = &self.config.train;
        let last = epoch == train.epochs;
        let knn_due = train.knn_every > 0 && (epoch % train.knn_every == 0 || last);
        let knn_top1 = match (&self.monitor, knn_due) {
            (Some(monitor), true) => {
                let net = (&self.model.encoder).into();
                Some(monitor.top1(net, self.format, self.device, &self.pool, self.group.as_ref())?)
            }
            _ => None,
        };
        let metrics = EpochMetrics {
            epoch,
            step,
            loss,
            learning_rate: self.learning_rate,
            images_per_second: (steps_per_epoch * train.batch_size) as f64 / seconds,
            seconds,
            data_wait_seconds: self.epoch_data_wait.as_secs_f64(),
            knn_top1,
            wall_time: Some(super::metrics::unix_time()),
        };
        // What is left at the mean pace of this process's epochs, the first
        // left out once there are others (it pays for autotuning and the
        // allocators' growth): in a log file, where no progress bar is
        // drawn, the one sign of the end.
        let paces: Vec<f64> = self.epochs.iter().map(|m| m.seconds).chain([seconds]).collect();
        let paces = &paces[usize::from(paces.len() > 1)..];
        let pace = paces.iter().sum::<f64>() / paces.len() as f64;
        let left = train.epochs.saturating_sub(epoch);
        tracing::info!(
            "epoch {}/{}: loss {:.4}, lr {:.4}, {:.0} images/s, waited {:.0}% for data{}{}{}",
            metrics.epoch,
            train.epochs,
            metrics.loss,
            metrics.learning_rate,
            metrics.images_per_second,
            100.0 * metrics.data_wait_seconds / seconds,
            // fp16's: a scale falling epoch after epoch means overflowing gradients.
            self.optimizer.loss_scale().map(|scale| format!(", loss scale {}", scale.value())).unwrap_or_default(),
            knn_top1.map(|a| format!(", kNN top-1 {:.2}%", 100.0 * a)).unwrap_or_default(),
            match left {
                0 => String::new(),
                left => {
                    // indicatif's rounding, as the progress bar's ETA: "84 seconds", "2 minutes", "3 days".
                    let time = Duration::try_from_secs_f64(pace * left as f64).unwrap_or_default();
                    format!("; {} to go, about {}", counted(left, "epoch"), indicatif::HumanDuration(time))
                }
            }
        );
        if let Some(group) = &self.group {
            // Every rank applies the same averaged gradient to the same
            // weights, so they stay bitwise equal; a difference would mean a
            // bug or a faulty device, and the ranks would train different
            // models without a word. Checked once an epoch.
            group.check_identical(&format!("the weights after epoch {epoch}"), self.optimizer.flat_weights())?;
        }
        let logged = if self.writes() { self.log.append(&metrics) } else { Ok(()) };
        agree(self.group.as_ref(), logged)?;
        self.epochs.push(metrics.clone());
        Ok(metrics)
    }

    /// Writes what an epoch end calls for: the encoder every
    /// `train.encoder_every` epochs, then the checkpoint every
    /// `train.checkpoint_every` epochs, at the end, and when stopping (in
    /// that order, so that a run stopped between the two, resumed from
    /// the checkpoint before, writes the encoder again).
    pub fn checkpoint_epoch(&mut self, stopping: bool) -> Result<()> {
        let every = self.config.train.encoder_every;
        if every > 0 && self.position.epoch.is_multiple_of(every) {
            let path = encoder_snapshot(&self.config.train.output_dir, self.position.epoch);
            self.write_on_rank_0(|trainer| trainer.export_encoder(&path))?;
        }
        let checkpoint_every = self.config.train.checkpoint_every;
        if self.position.epoch.is_multiple_of(checkpoint_every) || self.is_done() || stopping || self.save_due {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        self.save_due = false;
        self.last_saved = Instant::now();
        self.write_on_rank_0(|trainer| {
            checkpoint::save(
                &trainer.checkpoint_path,
                &trainer.store,
                &trainer.optimizer,
                trainer.position,
                trainer.trained_by,
                trainer.initial_knn_top1,
                &trainer.config,
            )
        })
    }

    /// Writes to the run folder where this process does ([`Self::writes`]),
    /// every rank then taking the writer's outcome, so that a failed write
    /// (a full disk) stops them all.
    fn write_on_rank_0(&self, write: impl FnOnce(&Self) -> Result<()>) -> Result<()> {
        let written = if self.writes() { write(self) } else { Ok(()) };
        agree(self.group.as_ref(), written)
    }

    /// Stops here: the pending steps read, a checkpoint written (once per
    /// position), and the report of an interrupted run.
    pub fn interrupt(&mut self) -> Result<TrainReport> {
        if self.position.batch > 0 {
            self.settle()?;
            self.save_checkpoint()?;
        }
        let position = self.position;
        Ok(TrainReport { interrupted_at: Some(position), ..self.report() })
    }

    fn report(&self) -> TrainReport {
        TrainReport {
            output_dir: self.config.train.output_dir.clone(),
            encoder_path: None,
            checkpoint_path: self.checkpoint_path.clone(),
            epochs: self.epochs.clone(),
            initial_knn_top1: self.initial_knn_top1,
            init_encoder: self.config.model.init_encoder.clone(),
            device: self.device,
            precision: self.precision,
            interrupted_at: None,
            skipped_steps: self.position.skipped_steps,
            skipped_images: skipped_images(&self.train_set, self.monitor.as_ref()),
        }
    }

    /// Writes the encoder as it is now, with what it was trained with.
    fn export_encoder(&self, path: &std::path::Path) -> Result<()> {
        let spec = self.config.encoder_spec();
        crate::io::torchvision::export_encoder(&self.store, self.position.step as i64, &spec, path)
    }

    /// Ends a completed run: exports the encoder and writes the summary.
    pub fn finish(&self) -> Result<TrainReport> {
        let written = if self.writes() { self.write_results() } else { Ok(self.report()) };
        agree(self.group.as_ref(), written)
    }

    fn write_results(&self) -> Result<TrainReport> {
        let mut report = self.report();
        let encoder_path = report.output_dir.join(ENCODER_FILE);
        self.export_encoder(&encoder_path)?;
        report.encoder_path = Some(encoder_path);
        let summary = serde_json::json!({
            "epochs": self.position.epoch,
            "steps": self.position.step,
            "final_loss": report.epochs.last().map(|m| m.loss),
            "initial_knn_top1": report.initial_knn_top1,
            "init_encoder": report.init_encoder.as_ref().map(|weights| weights.display().to_string()),
            "final_knn_top1": report.final_knn_top1(),
            "skipped_steps": report.skipped_steps,
            "skipped_images": report.skipped_images,
            "device": format!("{:?}", self.device),
            "precision": self.precision.name(),
        });
        let summary_path = report.output_dir.join(SUMMARY_FILE);
        crate::io::write_atomic(&summary_path, format!("{summary:#}\n").as_bytes())?;
        Ok(report)
    }
}

/// The CUDA graph `train.cuda_graph` asks for, where it applies: on
/// CUDA, in one process, through the shim beside this binary.
fn graphed_step(config: &ValidConfig, device: Device, group: Option<&ProcessGroup>) -> Result<Option<GraphedStep>> {
    if !config.train.cuda_graph {
        return Ok(None);
    }
    if !device.is_cuda() {
        tracing::info!("train.cuda_graph is ignored on {device:?}: CUDA graphs are CUDA's");
        return Ok(None);
    }
    if group.is_some() {
        return Err(Error::InvalidArgument(
            "train.cuda_graph = true in a multi-process run: its collectives are not captured; set \
             train.cuda_graph = false"
                .to_owned(),
        ));
    }
    let binary = std::env::current_exe().map_err(|e| Error::io("the simclr binary", e))?;
    GraphedStep::new(binary.with_file_name(super::graph::LIBRARY), device).map(Some)
}

/// The views the run trains on: `augment.view_size` px, which may be
/// smaller than the `data.image_size` the kNN monitor (and every later
/// eval) reads.
fn training_views(
    config: &ValidConfig,
    train_set: Arc<Dataset>,
    device: Device,
    pool: &Arc<rayon::ThreadPool>,
) -> Result<Views> {
    let format = config.view_format();
    views(config, train_set, Pipeline::new(&config.augment, format.size), format, device, pool)
}

/// The view source `augment.backend` asks for: `auto` uses the device path
/// on CUDA when the decoded images fit there as one tensor, and the hybrid
/// path on CUDA when they do not.
fn views(
    config: &ValidConfig,
    train_set: Arc<Dataset>,
    pipeline: Pipeline,
    format: ViewFormat,
    device: Device,
    pool: &Arc<rayon::ThreadPool>,
) -> Result<Views> {
    let batch_size = config.train.batch_size;
    let seed = config.train.seed;
    let backend = config.augment.backend;
    let data = &config.data;
    let stream = match data.shuffle_buffer {
        0 => None,
        buffer => match ShardList::of(&train_set) {
            Some(shards) => Some(Streaming { shards, readers: data.stream_readers, buffer }),
            None => {
                return Err(Error::Config(vec![format!(
                    "data.shuffle_buffer = {buffer} streams tar shards, but {} is not shards (set it to 0)",
                    train_set.origin.display()
                )]))
            }
        },
    };
    let whole_set_on_device = backend == Backend::Device || (backend == Backend::Auto && device.is_cuda());
    if stream.is_some() && backend == Backend::Device {
        return Err(Error::Config(vec![
            "augment.backend = \"device\" reads every image up front; streaming shards (data.shuffle_buffer > 0) \
             needs \"hybrid\", \"cpu\" or \"auto\""
                .to_owned(),
        ]));
    }
    if whole_set_on_device && stream.is_none() {
        let limit = if backend == Backend::Device { usize::MAX } else { DEVICE_DATA_LIMIT };
        match DeviceViewLoader::load(&train_set, pipeline.clone(), format, batch_size, seed, device, pool, limit)? {
            DeviceData::Ready(loader) => {
                let thread = config.augment.device_thread.unwrap_or(device.is_cuda());
                return Ok(Views::Device(loader.ahead(thread)));
            }
            DeviceData::Unsuitable(reason) if backend == Backend::Device => {
                return Err(Error::Device(format!(
                    "augment.backend = \"device\" keeps the decoded images on the device as one tensor, \
                     but {reason}; use backend \"hybrid\", \"cpu\" or \"auto\""
                )))
            }
            DeviceData::Unsuitable(reason) => tracing::info!("decoding and cropping on the CPU: {reason}"),
        }
    }
    let mut loader = ViewLoader::new(train_set, pipeline, format, batch_size, seed, pool.clone(), device)?
        .reduced_decode(data.reduced_decode)
        .prefetch(data.prefetch_batches);
    if let Some(streaming) = stream {
        loader = loader.streaming(streaming);
    }
    let hybrid = backend == Backend::Hybrid || (backend == Backend::Auto && device.is_cuda());
    Ok(Views::Cpu(if hybrid { loader.hybrid() } else { loader }))
}

/// Why `views` make no full batch of `batch_size` images an epoch: only
/// streamed shards can (read by index, a batch larger than the data is
/// refused where the loader opens), when a deal of the shards can give a
/// process fewer images than its part of a batch.
fn no_batch(views: &Views, train_set: &Dataset, batch_size: usize, processes: usize) -> Error {
    let (shards, least) =
        views.streamed_shards().map_or((0, 0), |shards| (shards.len(), shards.least_share(processes)));
    Error::Dataset {
        path: train_set.origin.clone(),
        message: format!(
            "no full batch of {batch_size} images in an epoch: the {shards} shards are dealt whole to {processes} \
             processes each epoch, and a process may be dealt as few as {least} images for its part of {} each; \
             write smaller shards (simclr shard --per-shard), use fewer processes or a smaller batch, or read by \
             index (data.shuffle_buffer = 0)",
            batch_size / processes
        ),
    }
}

/// Streaming, a warning when the shards' deal leaves more than a batch of
/// images unread each epoch (beyond the remainder any epoch drops): shards
/// of unequal sizes, or a number of them that the processes do not divide.
fn unread_each_epoch(views: &Views, train_set: &Dataset, batch_size: usize, processes: usize) -> Option<String> {
    let shards = views.streamed_shards()?;
    let trained = views.batches_per_epoch() * batch_size;
    (train_set.len() >= trained + batch_size).then(|| {
        format!(
            "streaming {} shards of {} images on {processes} processes trains on {trained} images an epoch \
             ({} x {batch_size}): \
             each process is dealt whole shards, another deal each epoch, and every process trains as many \
             batches as the fewest images a process may be dealt ({}) allow; shards of equal size, as many as a \
             multiple of {processes}, leave none unread (simclr shard --per-shard)",
            shards.len(),
            train_set.len(),
            views.batches_per_epoch(),
            shards.least_share(processes)
        )
    })
}

/// Opens the run folder on rank 0 (or the one process) of a run on
/// `processes` processes, before anything else is read, and holds it (a
/// folder another process trains in is refused, naming it): for a resume,
/// the checkpoint it continues, refused if it cannot be continued so; for
/// a fresh run, the folder, made (a run already there is refused).
fn open_run_folder(
    config: &ValidConfig,
    start: Start,
    processes: usize,
    checkpoint_path: &std::path::Path,
) -> Result<(Option<Checkpoint>, Option<RunLock>)> {
    let output_dir = &config.train.output_dir;
    // Taken before the folder's checkpoint is looked at, so that a run still
    // training there is named as such, not as one to resume. Where there is
    // no folder, a resume is refused below and a fresh run makes it.
    let lock = output_dir.is_dir().then(|| checkpoint::lock_run_folder(output_dir)).transpose()?;
    let resume = match start {
        Start::Fresh => false,
        Start::Resume => true,
        Start::Restart(Restart { counter, count }) => {
            let saved = checkpoint::exists(checkpoint_path);
            let how =
                if saved { "continues from its checkpoint" } else { "starts anew, having failed before its first" };
            tracing::info!("restart {count} of the run ({counter}={count}): it {how}");
            saved
        }
    };
    if resume {
        let mut saved = Checkpoint::read_to_resume(checkpoint_path)?;
        check_resumable(config, &saved, processes, checkpoint_path)?;
        checkpoint::finish_cut_save(&mut saved, checkpoint_path)?;
        return Ok((Some(saved), lock));
    }
    let refuse_a_run_there = || match checkpoint::exists(checkpoint_path) {
        true => Err(Error::Checkpoint {
            path: checkpoint_path.to_path_buf(),
            message: "a run already exists here: continue it with --resume, or choose another --output".to_owned(),
        }),
        false => Ok(()),
    };
    refuse_a_run_there()?;
    refuse_a_folder_among_images(config)?;
    if let Some(weights) = &config.model.init_encoder {
        crate::io::torchvision::check_encoder_file(&config.model, weights)?;
    }
    if let Some(lock) = lock {
        return Ok((None, Some(lock)));
    }
    crate::io::create_dir(output_dir)?;
    let lock = checkpoint::lock_run_folder(output_dir)?;
    // A process that made the folder too may have finished a run in it.
    refuse_a_run_there()?;
    Ok((None, Some(lock)))
}

/// Refuses a run folder inside a folder of images that the run reads (its
/// training images, its kNN monitor's): the images the run writes there
/// (`simclr report`'s figures) would be read with them by its resume and by
/// later runs, and in a folder of class sub-folders its folder would be
/// taken for a class. Shards and CIFAR batches read no such files.
fn refuse_a_folder_among_images(config: &ValidConfig) -> Result<()> {
    let output_dir = resolved(&config.train.output_dir);
    let data = &config.data;
    let read = [
        ("data.path", &data.path),
        ("data.knn_train_path", &data.knn_train_path),
        ("data.knn_test_path", &data.knn_test_path),
    ];
    for (field, path) in read.into_iter().filter_map(|(field, path)| Some((field, path.as_deref()?))) {
        let Ok(folder) = path.canonicalize() else { continue };
        if !folder.is_dir() || !output_dir.starts_with(&folder) {
            continue;
        }
        // The class folder it would be in, or be taken for.
        let first = output_dir.strip_prefix(&folder).ok().and_then(|inside| inside.components().next());
        let first = first.map(|part| part.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        let classes = match crate::data::detect_format(&folder) {
            Ok(DataFormat::ImageFolder) if folder.join(&first).is_dir() => format!(" (as images of class '{first}')"),
            Ok(DataFormat::ImageFolder) => format!(" (as a class '{first}')"),
            Ok(DataFormat::Flat) => String::new(),
            _ => continue,
        };
        return Err(Error::Config(vec![format!(
            "train.output_dir (--output) {} is inside {field} {}, a folder of images the run reads: the \
             images the run writes there (simclr report's figures) would be read with them by its resume \
             and by later runs{classes}; put the run outside it",
            config.train.output_dir.display(),
            path.display()
        )]));
    }
    Ok(())
}

/// `path` made absolute with its links resolved, as far as it exists (a
/// folder not made yet is its nearest existing parent's, canonical, with
/// the rest of it).
fn resolved(path: &std::path::Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return rest.iter().rev().fold(canonical, |path, part| path.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Sets the run folder opened by [`open_run_folder`] up for a run trained
/// as `trained_by` says: the `saved` checkpoint's state restored into
/// `store` and `optimizer`, or a fresh run's metrics log.
fn prepare_run_folder(
    config: &ValidConfig,
    saved: Option<Checkpoint>,
    trained_by: TrainedBy,
    store: &nn::VarStore,
    optimizer: &mut Optimizer,
    checkpoint_path: &std::path::Path,
) -> Result<Position> {
    let output_dir = &config.train.output_dir;
    let position = match saved {
        Some(saved) => {
            let warnings = [
                other_images(saved.images, saved.position, trained_by.images),
                other_precision(saved.precision, trained_by.precision, config.train.mixed_precision),
            ];
            for warning in warnings.into_iter().flatten() {
                tracing::warn!("{warning}");
            }
            let position = saved.restore(store, optimizer)?;
            tracing::info!(epoch = position.epoch, step = position.step, "resumed from {}", checkpoint_path.display());
            position
        }
        None => {
            if let Some(weights) = &config.model.init_encoder {
                crate::io::torchvision::load_simclr_encoder(store, &config.model, weights)?;
                tracing::info!("the encoder starts from {}", weights.display());
            }
            Position::default()
        }
    };
    // Epochs logged after the checkpoint (before a crash) are done again; a
    // run killed before its first checkpoint may have logged epochs, so a
    // fresh start begins a fresh log.
    MetricsLog::new(output_dir).truncate_after(position.epoch, position.step)?;
    remove_encoder_snapshots_after(output_dir, position.epoch)?;
    remove_stale_temporaries(output_dir, checkpoint_path)?;
    crate::io::write_atomic(&output_dir.join(CONFIG_FILE), config.to_toml().as_bytes())?;
    Ok(position)
}

/// Where `train.encoder_every` writes the encoder of `epoch`.
pub fn encoder_snapshot(output_dir: &std::path::Path, epoch: usize) -> PathBuf {
    output_dir.join(ENCODER_SNAPSHOTS).join(format!("epoch-{epoch:04}.safetensors"))
}

/// The epoch whose encoder a file of [`encoder_snapshot`]'s name holds, by
/// the file's name (`epoch-0012.safetensors`, `epoch-12000.safetensors`).
pub fn snapshot_epoch(name: &str) -> Option<usize> {
    name.strip_prefix("epoch-")?.strip_suffix(".safetensors")?.parse().ok()
}

/// Removes the encoders `train.encoder_every` wrote after `epoch` (the
/// epochs a resumed run trains again; a time-budgeted run may now end
/// before them). Other files in the folder are left alone.
fn remove_encoder_snapshots_after(output_dir: &std::path::Path, epoch: usize) -> Result<()> {
    remove_files_named(&output_dir.join(ENCODER_SNAPSHOTS), |name| snapshot_epoch(name).is_some_and(|e| e > epoch))
}

/// Removes the temporary files of the run's own writes that a killed
/// process left (a SIGKILL in the middle of a checkpoint's write leaves one
/// as large as the checkpoint, and a run on machines that are taken back
/// is killed often), in the run folder and `encoders/`. Those of other
/// files (`report` drawing into the folder meanwhile) are left alone.
fn remove_stale_temporaries(output_dir: &std::path::Path, checkpoint_path: &std::path::Path) -> Result<()> {
    let mut ours = checkpoint::written_files(checkpoint_path).to_vec();
    ours.extend([METRICS_FILE, EVENTS_FILE, CONFIG_FILE, ENCODER_FILE, SUMMARY_FILE].map(|name| output_dir.join(name)));
    remove_files_named(output_dir, |name| {
        crate::io::temporary_target(name).is_some_and(|target| ours.contains(&output_dir.join(target)))
    })?;
    remove_files_named(&output_dir.join(ENCODER_SNAPSHOTS), |name| crate::io::temporary_target(name).is_some())
}

/// Removes the files of `folder` (none where it does not exist) whose
/// names `doomed` picks.
fn remove_files_named(folder: &std::path::Path, doomed: impl Fn(&str) -> bool) -> Result<()> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(folder, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(folder, e))?.path();
        if path.file_name().and_then(|name| name.to_str()).is_some_and(&doomed) && path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Refuses a resume that would not continue the run saved: with another
/// optimiser, whose state would be read as the saved one's (AdamW's first
/// moment as SGD's momentum, say); or part-way through an epoch of streamed
/// shards on another number of processes than the one that stopped there:
/// the shards are dealt by process, so the rest of the epoch would not be
/// the rest of the one begun (images read twice, others not at all).
fn check_resumable(config: &ValidConfig, saved: &Checkpoint, processes: usize, path: &std::path::Path) -> Result<()> {
    let refuse = |message: String| Err(Error::Checkpoint { path: path.to_path_buf(), message });
    let (saved_with, asked) = (saved.config.optim.optimizer, config.optim.optimizer);
    if saved_with != asked {
        return refuse(format!(
            "the run was trained with optim.optimizer = \"{}\", whose state a resume with \"{}\" cannot \
             continue; resume with \"{}\", or start a new run",
            saved_with.name(),
            asked.name(),
            saved_with.name()
        ));
    }
    // The network and the schedule's steps are the run's: another network
    // does not load, and another batch size counts other steps.
    let changed = config.changed_from(&saved.config, &["model", "train.supervised", "train.batch_size"]);
    if !changed.is_empty() {
        return refuse(format!(
            "a resume continues the run as it was trained, and these differ from it: {}; resume without them, \
             or start a new run",
            changed.join(", ")
        ));
    }
    let Position { epoch, batch, .. } = saved.position;
    let on = |count: usize| if count == 1 { "1 process".to_owned() } else { format!("{count} processes") };
    match saved.processes {
        Some(stopped_on) if config.data.shuffle_buffer > 0 && batch > 0 && stopped_on != processes => refuse(format!(
            "the run stopped after batch {batch} of epoch {} streaming shards on {}, and the epoch's shards are \
             dealt among the processes: resume it on {}, not {processes}",
            epoch + 1,
            on(stopped_on),
            on(stopped_on)
        )),
        _ => Ok(()),
    }
}

/// What a resume on `images` training images is told when the run was
/// trained on another number (images added to or taken from its folder):
/// it goes on, as the images may be meant, but the order of its epochs and
/// the schedule's steps per epoch follow the new count, so it no longer
/// reproduces the run it continues.
fn other_images(trained_on: Option<usize>, saved_at: Position, images: usize) -> Option<String> {
    let trained_on = trained_on.filter(|&trained_on| trained_on != images)?;
    let part_way = match saved_at.batch {
        0 => String::new(),
        batch => format!(
            ", and the rest of epoch {} comes from the new order, not the one its first {batch} batches came from",
            saved_at.epoch + 1
        ),
    };
    Some(format!(
        "the run was trained on {} and its training set now has {images}: the order of each epoch and the \
         schedule's steps per epoch follow the new count{part_way}",
        counted(trained_on, "image")
    ))
}

/// What a resume in `precision` is told when the run was trained in the
/// other (moved between a CPU with bf16 instructions and one without, or
/// `train.mixed_precision` changed): it goes on, but its steps round
/// otherwise from here, so it no longer reproduces the run it continues.
fn other_precision(trained_in: Option<Precision>, precision: Precision, mixed_precision: bool) -> Option<String> {
    let trained_in = trained_in.filter(|&trained_in| trained_in != precision)?.name();
    let why = match (precision, mixed_precision) {
        (Precision::Bf16 | Precision::Fp16, _) => "; --set train.mixed_precision=false keeps fp32",
        (Precision::Fp32, true) => " (this device does not compute bf16 natively)",
        (Precision::Fp32, false) => " (train.mixed_precision = false)",
    };
    Some(format!(
        "the run was trained in {trained_in} and resumes in {}{why}: its steps round otherwise from here, \
         so it will not reproduce a run trained in {trained_in} throughout",
        precision.name()
    ))
}

/// Makes every rank start from rank 0's weights, BatchNorm statistics,
/// optimiser state and position.
fn share_state(
    group: &ProcessGroup,
    store: &nn::VarStore,
    optimizer: &mut Optimizer,
    position: Position,
) -> Result<Position> {
    optimizer.broadcast(group, 0)?;
    let mut buffers: Vec<(String, Tensor)> =
        store.variables().into_iter().filter(|(_, tensor)| !tensor.requires_grad()).collect();
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, buffer) in &mut buffers {
        tch::no_grad(|| group.broadcast(buffer, 0))?;
    }
    let Position { epoch, step, batch, epoch_loss_sum, epoch_loss_count, skipped_steps, nonfinite_in_row } = position;
    let mut numbers = Tensor::from_slice(&[
        epoch as f64,
        step as f64,
        batch as f64,
        epoch_loss_sum,
        epoch_loss_count as f64,
        skipped_steps as f64,
        nonfinite_in_row as f64,
    ]);
    group.broadcast(&mut numbers, 0)?;
    let numbers = Vec::<f64>::try_from(&numbers).map_err(|e: tch::TchError| Error::Distributed(e.to_string()))?;
    Ok(Position {
        epoch: numbers[0] as usize,
        step: numbers[1] as usize,
        batch: numbers[2] as usize,
        epoch_loss_sum: numbers[3],
        epoch_loss_count: numbers[4] as usize,
        skipped_steps: numbers[5] as usize,
        nonfinite_in_row: numbers[6] as usize,
    })
}

/// The unreadable images of the training set and the monitor splits, once each.
fn skipped_images(train: &Dataset, monitor: Option<&Monitor>) -> Vec<String> {
    let mut all: Vec<String> = train.skipped();
    if let Some(monitor) = monitor {
        all.extend(monitor.skipped());
    }
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_views_are_augment_view_size_and_the_images_keep_theirs() {
        let pool = worker_pool(1).unwrap();
        let train_set = Arc::new(crate::data::synthetic::generate(8, 2, 16, 0));
        for backend in [Backend::Cpu, Backend::Device] {
            // The control: without view_size the views are data.image_size.
            for (view_size, side) in [(Some(8), 8), (None, 16)] {
                let mut config = RunConfig::default();
                config.data.image_size = 16;
                config.augment.backend = backend;
                config.augment.view_size = view_size;
                config.train.batch_size = 4;
                let config = config.validate().unwrap();
                let views = training_views(&config, train_set.clone(), Device::Cpu, &pool).unwrap();
                let batch = views.epoch(0, 0).next().unwrap().unwrap();
                assert_eq!(batch.views.size(), [8, 3, side, side], "{backend:?}, view_size {view_size:?}");
                assert_eq!(config.encoder_spec().image_size, 16);
            }
        }
        let mut config = RunConfig::default();
        config.augment.view_size = Some(4);
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("augment.view_size = 4: must be at least 8"), "{refused}");
        // A small image size is told once, by its own field.
        let mut config = RunConfig::default();
        config.data.image_size = 4;
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("data.image_size = 4") && !refused.contains("augment.view_size"), "{refused}");
    }

    #[test]
    fn a_resume_removes_the_encoders_kept_after_its_checkpoint_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        remove_encoder_snapshots_after(dir.path(), 0).unwrap();
        let kept = [1, 2, 10, 12000].map(|epoch| encoder_snapshot(dir.path(), epoch));
        assert!(kept[3].ends_with("encoders/epoch-12000.safetensors"), "{}", kept[3].display());
        let others = ["notes.txt", "epoch-0011.npy", "epoch-x.safetensors"]
            .map(|name| dir.path().join(ENCODER_SNAPSHOTS).join(name));
        for path in kept.iter().chain(&others) {
            crate::io::write_atomic(path, b"x").unwrap();
        }
        remove_encoder_snapshots_after(dir.path(), 2).unwrap();
        let exists = |paths: &[PathBuf]| paths.iter().map(|path| path.exists()).collect::<Vec<_>>();
        assert_eq!(exists(&kept), [true, true, false, false]);
        assert_eq!(exists(&others), [true, true, true]);
        // A fresh start (epoch 0) removes every one.
        remove_encoder_snapshots_after(dir.path(), 0).unwrap();
        assert_eq!(exists(&kept[..2]), [false, false]);
    }

    #[test]
    fn the_temporary_files_of_a_killed_runs_writes_are_removed_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        remove_stale_temporaries(dir.path(), &dir.path().join(checkpoint::FILE_NAME)).unwrap();
        let in_run = |name: &str| dir.path().join(name);
        let stale = [
            in_run("checkpoint.safetensors.new.tmp4242"),
            in_run("checkpoint.safetensors.tmp17"),
            in_run("metrics.tfevents.tmp9"),
            in_run("config.toml.tmp9"),
            in_run("encoder.safetensors.tmp12"),
            dir.path().join(ENCODER_SNAPSHOTS).join("epoch-0003.safetensors.tmp77"),
        ];
        let others = [
            in_run("checkpoint.safetensors"),
            in_run("checkpoint.safetensors.new"),
            in_run("curves.png.tmp8"),
            in_run("notes.tmp"),
            dir.path().join(ENCODER_SNAPSHOTS).join("epoch-0002.safetensors"),
        ];
        for path in stale.iter().chain(&others) {
            crate::io::create_dir(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        remove_stale_temporaries(dir.path(), &dir.path().join(checkpoint::FILE_NAME)).unwrap();
        let exists = |paths: &[PathBuf]| paths.iter().map(|path| path.exists()).collect::<Vec<_>>();
        assert_eq!(exists(&stale), [false; 6]);
        assert_eq!(exists(&others), [true; 5]);
    }

    #[test]
    fn a_resume_on_another_number_of_images_is_told_so() {
        let at = |epoch, batch| Position { epoch, batch, ..Default::default() };
        assert_eq!(other_images(Some(48), at(1, 0), 48), None);
        assert_eq!(other_images(None, at(1, 0), 72), None, "a checkpoint from before the count was kept");
        let warning = other_images(Some(48), at(1, 0), 72).unwrap();
        assert!(warning.starts_with("the run was trained on 48 images and its training set now has 72"), "{warning}");
        let part_way = other_images(Some(1), at(2, 3), 72).unwrap();
        assert!(part_way.contains("trained on 1 image and") && part_way.contains("the rest of epoch 3"), "{part_way}");
    }

    #[test]
    fn a_resume_in_another_precision_is_told_so() {
        assert_eq!(other_precision(Some(Precision::Bf16), Precision::Bf16, true), None);
        assert_eq!(other_precision(None, Precision::Bf16, true), None, "a checkpoint from before it was kept");
        let to_bf16 = other_precision(Some(Precision::Fp32), Precision::Bf16, true).unwrap();
        assert!(to_bf16.starts_with("the run was trained in fp32 and resumes in bf16; --set"), "{to_bf16}");
        let to_fp32 = other_precision(Some(Precision::Bf16), Precision::Fp32, true).unwrap();
        assert!(to_fp32.contains("resumes in fp32 (this device does not compute bf16 natively)"), "{to_fp32}");
        let asked = other_precision(Some(Precision::Bf16), Precision::Fp32, false).unwrap();
        assert!(asked.contains("(train.mixed_precision = false)"), "{asked}");
    }
}
