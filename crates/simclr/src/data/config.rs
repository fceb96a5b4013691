//! The `[data]` section: where training and monitor images come from and
//! how views are normalised.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::checks::MIN_IMAGE_SIDE;
use crate::normalization::{check_std, IMAGENET_MEAN, IMAGENET_STD};

/// Where training images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Decided from what `path` holds: CIFAR binary batches, class
    /// sub-folders (ImageFolder) or a flat folder of images.
    Auto,
    /// `path/<class>/*.jpg`; labels are used for evaluation only.
    ImageFolder,
    /// `path/*.jpg`, no labels.
    Flat,
    /// The CIFAR-10/100 binary batches (`data_batch_*.bin`, `train.bin`).
    CifarBinary,
    /// WebDataset-style tar shards (`key.jpg` with an optional `key.cls`):
    /// one `.tar` or a folder of them (see `data/shards.rs`).
    Shards,
    /// The built-in procedurally generated labelled dataset.
    Synthetic,
}

/// What to do with an image that cannot be read (`data.on_bad_image` in
/// training, `--on-bad-image` in embed, neighbors and eval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadImagePolicy {
    /// Stop with an error naming the file (in training, the last checkpoint stays).
    Stop,
    /// Warn of it, name it in the report, and go on without it: in
    /// training another image stands in for it; elsewhere it is left out.
    Skip,
}

names!(BadImagePolicy, "bad-image policy", { Stop => "stop", Skip => "skip" });

/// The `[data]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training images; absent means the built-in synthetic dataset.
    pub path: Option<PathBuf>,
    pub format: DataFormat,
    /// Side of the square views fed to the encoder (224 for ImageNet, 32 for CIFAR).
    pub image_size: u32,
    /// Use at most this many training images (a seeded, class-balanced-by-chance subset).
    pub limit: Option<usize>,
    /// Labelled images for the kNN monitor: the memory bank...
    pub knn_train_path: Option<PathBuf>,
    /// ...and the queries scored against it.
    pub knn_test_path: Option<PathBuf>,
    /// Use at most this many images of each kNN split.
    pub knn_limit: Option<usize>,
    /// Per-channel normalisation applied after augmentation (ImageNet's by default).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Images in the synthetic training set (and a fifth as many for its test split).
    pub synthetic_images: usize,
    pub synthetic_classes: usize,
    /// Threads that decode and augment; 0 means one per core.
    pub workers: usize,
    /// Batches of views made ahead of the one training (the bounded queue
    /// between the data workers and the training loop).
    pub prefetch_batches: usize,
    /// Decode JPEGs at 1/2, 1/4 or 1/8 of their size where every view's crop
    /// keeps at least the view's size (see `data/decode.rs`); false always
    /// decodes in full.
    pub reduced_decode: bool,
    /// Tar shards only: 0 reads images by index (random access, the same
    /// run as from the folder the shards were written from); more streams
    /// each process's shards front to back through shuffle buffers of this
    /// many images per reader (see `data/stream.rs`), reproducible for a
    /// given seed, `stream_readers` and number of processes.
    pub shuffle_buffer: usize,
    /// Streaming shards: the threads that read each process's shards, each
    /// through its own shuffle buffer (decoding is the `workers`' part). A
    /// number of its own, not one per core, since the order depends on it:
    /// a run resumed on a machine with other cores reads the rest of its
    /// epoch as it would have.
    #[serde(skip_serializing_if = "is_default_stream_readers")]
    pub stream_readers: usize,
    pub on_bad_image: BadImagePolicy,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: None,
            format: DataFormat::Auto,
            image_size: 224,
            limit: None,
            knn_train_path: None,
            knn_test_path: None,
            knn_limit: None,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            synthetic_images: 2000,
            synthetic_classes: 10,
            workers: 0,
            prefetch_batches: 2,
            reduced_decode: true,
            shuffle_buffer: 0,
            stream_readers: DEFAULT_STREAM_READERS,
            on_bad_image: BadImagePolicy::Stop,
        }
    }
}

/// Shards read at once by default. Left out of a written config at this
/// value, so that configs written before the field existed read back
/// unchanged (a study compares them as text).
const DEFAULT_STREAM_READERS: usize = 4;

fn is_default_stream_readers(readers: &usize) -> bool {
    *readers == DEFAULT_STREAM_READERS
}

impl DataConfig {
    /// Pushes one line per bad field of the section.
    pub(crate) fn check(&self, problems: &mut Vec<String>) {
        if self.image_size < MIN_IMAGE_SIDE {
            problems.push(format!("data.image_size = {}: must be at least {MIN_IMAGE_SIDE}", self.image_size));
        }
        for (field, value) in [("data.limit", self.limit), ("data.knn_limit", self.knn_limit)] {
            if value == Some(0) {
                problems.push(format!("{field} = 0: must be at least 1"));
            }
        }
        if self.prefetch_batches == 0 {
            problems.push("data.prefetch_batches = 0: must be at least 1".to_owned());
        }
        if self.stream_readers == 0 {
            problems.push("data.stream_readers = 0: must be at least 1".to_owned());
        }
        if let (Some(limit), buffer @ 1..) = (self.limit, self.shuffle_buffer) {
            // The subset is drawn by index; a stream reads its shards whole.
            problems.push(format!(
                "data.limit = {limit} with data.shuffle_buffer = {buffer}: the subset is drawn by index, and \
                 streamed shards are read whole; read them by index (data.shuffle_buffer = 0), or write shards \
                 of the subset (simclr shard)"
            ));
        }
        if let Err(problem) = check_std(&self.std) {
            problems.push(format!("data.std = {problem}"));
        }
        if self.synthetic_classes < 2 {
            problems.push(format!("data.synthetic_classes = {}: need at least 2", self.synthetic_classes));
        }
        if self.synthetic_images < self.synthetic_classes {
            problems.push(format!("data.synthetic_images = {}: need at least one per class", self.synthetic_images));
        }
    }
}
