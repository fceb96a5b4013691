//! Image sources. A [`Dataset`] is a list of samples, each an image file or
//! an image in memory, with a class label when the source has one (labels
//! are only used for evaluation: SimCLR trains without them).
pub mod cifar_binary;
pub mod config;
pub mod decode;
pub mod image_folder;
pub mod listing;
pub mod loader;
pub mod shards;
pub mod stream;
pub mod synthetic;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};
use config::{BadImagePolicy, DataConfig, DataFormat};

pub use decode::{decode, decode_bytes};
pub use loader::ViewLoader;

/// Where one sample's pixels are.
#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    Memory(Arc<RgbImage>),
    /// A member of a tar shard, read by its offset.
    Shard(shards::Member),
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub source: ImageSource,
    pub label: Option<usize>,
}

impl Sample {
    /// The decoded RGB image, checked for size.
    pub fn image(&self) -> Result<Arc<RgbImage>> {
        self.image_reduced(&|_, _| 1).map(|(image, _)| image)
    }

    /// The image decoded smaller by `reduction(width, height)` (see
    /// [`decode::decode_reduced`]), asked with the full size read from the
    /// file's header; returns the full size too.
    pub fn image_reduced(&self, reduction: &dyn Fn(u32, u32) -> u32) -> Result<(Arc<RgbImage>, (u32, u32))> {
        if let ImageSource::Memory(image) = &self.source {
            return Ok((image.clone(), image.dimensions()));
        }
        let (bytes, path) = self.stored()?.expect("files and shard members are stored");
        decode::decode_for(&bytes, &path, reduction)
    }

    /// The image's stored bytes and the name errors give it; `None` for an
    /// image held in memory.
    pub fn stored(&self) -> Result<Option<(Vec<u8>, PathBuf)>> {
        match &self.source {
            ImageSource::Memory(_) => Ok(None),
            ImageSource::File(path) => Ok(Some((std::fs::read(path).map_err(|e| Error::io(path, e))?, path.clone()))),
            ImageSource::Shard(member) => Ok(Some((member.read()?, member.path()))),
        }
    }

    /// A name for messages and listings: the path, or `#index` in memory.
    pub fn describe(&self, index: usize) -> String {
        match &self.source {
            ImageSource::File(path) => path.display().to_string(),
            ImageSource::Shard(member) => member.path().display().to_string(),
            ImageSource::Memory(_) => format!("#{index}"),
        }
    }
}

/// The lines a report gives the images it skipped ("path: reason" each),
/// none when there are none.
pub struct Skipped<'a>(pub &'a [String]);

impl std::fmt::Display for Skipped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.is_empty() {
            writeln!(f, "skipped {}:", crate::names::counted(self.0.len(), "unreadable image"))?;
            for line in self.0 {
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

/// The error of an input none of whose `images` could be read under the
/// skip policy (each was warned of as it was met).
pub(crate) fn none_readable(input: &Path, images: usize) -> Error {
    Error::Dataset {
        path: input.to_path_buf(),
        message: format!("none of its {} could be read (each is named above)", crate::names::counted(images, "image")),
    }
}

/// An image read for training ([`Dataset::training_image`]).
pub struct TrainingImage {
    /// The sample read: the one asked for or, under the skip policy, the
    /// one that stood in for it, whose class is then the views' class.
    pub index: usize,
    pub image: Arc<RgbImage>,
    /// The sample's full width and height, whatever the decode's reduction.
    pub size: (u32, u32),
}

/// A list of samples and, for labelled sources, the class names.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// What the samples were read from, for messages.
    pub origin: PathBuf,
    pub samples: Vec<Sample>,
    pub classes: Vec<String>,
    on_bad_image: BadImagePolicy,
    /// Unreadable images met under the skip policy: path to reason.
    skipped: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Dataset {
    pub fn new(origin: &Path, samples: Vec<Sample>, classes: Vec<String>) -> Self {
        Self {
            origin: origin.to_path_buf(),
            samples,
            classes,
            on_bad_image: BadImagePolicy::Stop,
            skipped: Default::default(),
        }
    }

    pub fn with_policy(mut self, policy: BadImagePolicy) -> Self {
        self.on_bad_image = policy;
        self
    }

    /// A CRC of the listing: every sample's name and label in order, and the
    /// class names. Processes that take parts of a dataset by position
    /// compare it, since one machine's copy with a file more or less would
    /// shift every position after it.
    pub fn fingerprint(&self) -> String {
        let mut listing = crc32fast::Hasher::new();
        listing.update(format!("{} {:?}\n", self.samples.len(), self.classes).as_bytes());
        for (index, sample) in self.samples.iter().enumerate() {
            listing.update(format!("{} {:?}\n", sample.describe(index), sample.label).as_bytes());
        }
        format!("{:08x}", listing.finalize())
    }

    fn record_skip(&self, index: usize, error: &Error) {
        let mut skipped = self.skipped.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let name = self.samples[index].describe(index);
        if let std::collections::btree_map::Entry::Vacant(entry) = skipped.entry(name) {
            tracing::warn!("skipping unreadable image: {error}");
            entry.insert(error.to_string());
        }
    }

    /// The image of sample `index` for training. Under the skip policy an
    /// unreadable one is recorded and the next readable sample stands in
    /// (its views still drawn for `index`, so runs stay reproducible).
    pub fn training_image(&self, index: usize) -> Result<TrainingImage> {
        self.training_image_reduced(index, &|_, _| 1)
    }

    /// [`Dataset::training_image`] decoded smaller as [`Sample::image_reduced`] is.
    pub fn training_image_reduced(&self, index: usize, reduction: &dyn Fn(u32, u32) -> u32) -> Result<TrainingImage> {
        match self.samples[index].image_reduced(reduction) {
            Ok((image, size)) => Ok(TrainingImage { index, image, size }),
            Err(error) => self.instead_of(index, error, reduction),
        }
    }

    /// What stands in for sample `index`, which failed with `error`: under
    /// the skip policy the error is recorded and the next readable sample
    /// is read instead; under the stop policy, the error.
    pub fn instead_of(&self, index: usize, error: Error, reduction: &dyn Fn(u32, u32) -> u32) -> Result<TrainingImage> {
        if self.on_bad_image == BadImagePolicy::Stop {
            return Err(error);
        }
        self.record_skip(index, &error);
        (1..self.samples.len())
            .map(|offset| (index + offset) % self.samples.len())
            .find_map(|other| {
                let (image, size) = self.samples[other].image_reduced(reduction).ok()?;
                Some(TrainingImage { index: other, image, size })
            })
            .ok_or_else(|| Error::Dataset { path: self.origin.clone(), message: "no readable image left".to_owned() })
    }

    /// Under the skip policy, reads every image once and drops (and records)
    /// the unreadable ones; under the stop policy, returns the set unchanged.
    pub fn without_unreadable(self, pool: &rayon::ThreadPool) -> Self {
        self.without_unreadable_across(pool, None).expect("one process agrees with itself")
    }

    /// [`Dataset::without_unreadable`] shared among `group`'s ranks: each
    /// reads its [`crate::dist::part`] of the samples (and warns of what it
    /// cannot read), and every rank leaves out, and records, the unreadable
    /// images of every part.
    pub fn without_unreadable_across(
        mut self,
        pool: &rayon::ThreadPool,
        group: Option<&crate::dist::ProcessGroup>,
    ) -> Result<Self> {
        if self.on_bad_image == BadImagePolicy::Stop {
            return Ok(self);
        }
        use rayon::prelude::*;
        let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.size()));
        let mine = crate::dist::part_range(self.samples.len(), rank, world);
        // This rank's unreadable images, with the reasons recorded for them.
        let unreadable: Vec<(usize, String)> = pool.install(|| {
            mine.into_par_iter()
                .filter_map(|index| {
                    let error = self.samples[index].image().err()?;
                    self.record_skip(index, &error);
                    Some((index, error.to_string()))
                })
                .collect()
        });
        let unreadable: Vec<usize> = match group {
            None => unreadable.into_iter().map(|(index, _)| index).collect(),
            Some(group) => {
                let mine: Vec<String> = unreadable.iter().map(|(index, reason)| format!("{index}\t{reason}")).collect();
                let mut all = Vec::new();
                for line in group.all_gather_lines(&mine)? {
                    let (index, reason) = line.split_once('\t').unwrap_or(("", ""));
                    let index: usize =
                        index.parse().map_err(|_| Error::Distributed(format!("a skipped image's line: {line}")))?;
                    let name = self.samples[index].describe(index);
                    let mut skipped = self.skipped.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    skipped.entry(name).or_insert_with(|| reason.to_owned());
                    all.push(index);
                }
                all
            }
        };
        let mut index = 0;
        self.samples.retain(|_| {
            index += 1;
            unreadable.binary_search(&(index - 1)).is_err()
        });
        Ok(self)
    }

    /// Every unreadable image skipped so far, as "path: reason".
    pub fn skipped(&self) -> Vec<String> {
        let skipped = self.skipped.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        skipped.values().cloned().collect()
    }

    /// Every image, decoded (for previews and benchmarks of a few images).
    pub fn decode_all(&self) -> Result<Vec<RgbImage>> {
        self.samples.iter().map(|sample| sample.image().map(|image| (*image).clone())).collect()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `self` with its labels renumbered into `reference`'s classes, matched
    /// by name, so that a class has one number in both: a test split may
    /// hold fewer classes than the training split (its own numbering would
    /// then shift), or list them otherwise. An image of a class `reference`
    /// lacks is an error naming the class, since nothing trained on
    /// `reference` can predict it.
    pub fn labelled_as(mut self, reference: &Dataset) -> Result<Self> {
        if self.classes == reference.classes {
            return Ok(self);
        }
        let numbers: Vec<Option<usize>> =
            self.classes.iter().map(|name| reference.classes.iter().position(|other| other == name)).collect();
        let unknown: std::collections::BTreeSet<&str> = self
            .samples
            .iter()
            .filter_map(|sample| sample.label.filter(|&label| numbers[label].is_none()))
            .map(|label| self.classes[label].as_str())
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Dataset {
                path: self.origin.clone(),
                message: format!(
                    "holds images of classes {unknown:?}, which {} does not have (its classes: {}), so nothing \
                     trained on it can predict them",
                    reference.origin.display(),
                    reference.classes.join(", ")
                ),
            });
        }
        for sample in &mut self.samples {
            sample.label = sample.label.and_then(|label| numbers[label]);
        }
        self.classes = reference.classes.clone();
        Ok(self)
    }

    pub fn is_labelled(&self) -> bool {
        !self.classes.is_empty() && self.samples.iter().all(|s| s.label.is_some())
    }

    /// Opens `path` in the given format (`Auto` looks at what is there).
    pub fn open(path: &Path, format: &DataFormat) -> Result<Self> {
        if let Ok(false) = path.try_exists() {
            return Err(Error::Dataset { path: path.to_path_buf(), message: "no such file or folder".to_owned() });
        }
        let format = match format {
            DataFormat::Auto => detect_format(path)?,
            other => other.clone(),
        };
        let dataset = match format {
            DataFormat::CifarBinary => cifar_binary::open(path)?,
            DataFormat::ImageFolder => image_folder::open_labelled(path)?,
            DataFormat::Flat => image_folder::open_flat(path)?,
            DataFormat::Shards => shards::open(path)?,
            DataFormat::Synthetic | DataFormat::Auto => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    message: "the synthetic dataset takes no path".to_owned(),
                })
            }
        };
        if dataset.is_empty() {
            return Err(Error::Dataset {
                path: path.to_path_buf(),
                message: format!("no images found (looked for {})", image_folder::EXTENSIONS.join(", ")),
            });
        }
        Ok(dataset)
    }

    /// At most `limit` samples, drawn without replacement with `seed`, in
    /// their original order.
    pub fn subset(self, limit: Option<usize>, seed: u64) -> Self {
        let Some(limit) = limit.filter(|&l| l < self.samples.len()) else { return self };
        let mut keep: Vec<usize> = (0..self.samples.len()).collect();
        keep.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        keep.truncate(limit);
        keep.sort_unstable();
        self.select(&keep)
    }

    /// The samples at `indices`, in that order (the classes, the policy and
    /// the images skipped so far kept).
    pub fn select(mut self, indices: &[usize]) -> Self {
        self.samples = indices.iter().map(|&i| self.samples[i].clone()).collect();
        self
    }
}

/// Decides the format of a path: CIFAR binary batches, class sub-folders, or
/// a flat folder.
pub fn detect_format(path: &Path) -> Result<DataFormat> {
    if path.is_file() {
        return if path.extension().is_some_and(|e| e == "bin") {
            Ok(DataFormat::CifarBinary)
        } else if shards::is_shard(path) {
            Ok(DataFormat::Shards)
        } else {
            Err(Error::Dataset {
                path: path.to_path_buf(),
                message: "expected a folder of images or shards, a .tar shard or a CIFAR .bin batch".to_owned(),
            })
        };
    }
    let entries = image_folder::sorted_entries(path)?;
    if entries.iter().any(|p| p.extension().is_some_and(|e| e == "bin")) {
        Ok(DataFormat::CifarBinary)
    } else if entries.iter().any(|p| p.is_file() && shards::is_shard(p)) {
        Ok(DataFormat::Shards)
    } else if entries.iter().any(|p| p.is_dir()) {
        Ok(DataFormat::ImageFolder)
    } else {
        Ok(DataFormat::Flat)
    }
}

/// The training set and, when labels exist, the kNN monitor's two splits.
pub struct Splits {
    pub train: Dataset,
    pub knn: Option<(Dataset, Dataset)>,
}

/// Opens what a run's `[data]` section names. Without a path this is the
/// synthetic dataset, whose training set doubles as the kNN memory bank.
pub fn open_splits(config: &DataConfig, seed: u64) -> Result<Splits> {
    let Some(path) = &config.path else {
        let train = synthetic::generate(config.synthetic_images, config.synthetic_classes, config.image_size, seed);
        let test = synthetic::generate(
            (config.synthetic_images / 5).max(config.synthetic_classes),
            config.synthetic_classes,
            config.image_size,
            seed.wrapping_add(0x5EED),
        );
        return Ok(Splits { train: train.clone(), knn: Some((train, test)) });
    };
    let train = Dataset::open(path, &config.format)?.subset(config.limit, seed);
    let knn = match (&config.knn_train_path, &config.knn_test_path) {
        (Some(bank), Some(queries)) => {
            let bank = Dataset::open(bank, &DataFormat::Auto)?.subset(config.knn_limit, seed);
            let queries = Dataset::open(queries, &DataFormat::Auto)?.subset(config.knn_limit, seed);
            for split in [&bank, &queries] {
                if !split.is_labelled() {
                    return Err(Error::Dataset {
                        path: split.origin.clone(),
                        message: "the kNN monitor needs labelled images (class sub-folders or CIFAR batches)"
                            .to_owned(),
                    });
                }
            }
            let queries = queries.labelled_as(&bank)?;
            Some((bank, queries))
        }
        (None, None) => None,
        _ => {
            return Err(Error::Config(vec![
                "data.knn_train_path and data.knn_test_path go together: give both or neither".to_owned(),
            ]))
        }
    };
    Ok(Splits { train, knn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_with_fewer_classes_is_numbered_as_the_reference() {
        let image = || ImageSource::Memory(Arc::new(RgbImage::new(8, 8)));
        let split = |origin: &str, classes: &[&str], labels: &[usize]| {
            let samples = labels.iter().map(|&label| Sample { source: image(), label: Some(label) }).collect();
            Dataset::new(Path::new(origin), samples, classes.iter().map(|c| c.to_string()).collect())
        };
        let train = split("train", &["bird", "cat", "dog", "truck"], &[0, 1, 2, 3]);
        // Its own numbering: cat 0, truck 1; the training split's: 1 and 3.
        let test = split("test", &["cat", "truck"], &[0, 1, 1]).labelled_as(&train).unwrap();
        let labels: Vec<Option<usize>> = test.samples.iter().map(|sample| sample.label).collect();
        assert_eq!(labels, [Some(1), Some(3), Some(3)]);
        assert_eq!(test.classes, train.classes);
        // A class the reference lacks is named; an empty class folder is not.
        let error = split("test", &["cat", "fish", "owl"], &[0, 1]).labelled_as(&train).unwrap_err().to_string();
        assert!(error.contains("test") && error.contains("{\"fish\"}") && !error.contains("owl"), "{error}");
    }

    #[test]
    fn subset_is_seeded_and_ordered() {
        let dataset = synthetic::generate(50, 5, 16, 0);
        let a = dataset.clone().subset(Some(10), 3);
        let b = dataset.clone().subset(Some(10), 3);
        let labels = |d: &Dataset| d.samples.iter().map(|s| s.label).collect::<Vec<_>>();
        assert_eq!(a.len(), 10);
        assert_eq!(labels(&a), labels(&b));
        assert_eq!(dataset.subset(Some(100), 3).len(), 50);
    }
}
