//! Semi-supervised evaluation (section 6, appendix B.5): the pretrained
//! encoder, unfrozen, plus a linear layer trained on a class-balanced
//! fraction (1%, 10%, 100%) of the labels, then scored on the test split.
//! The encoder may keep the first layers of its projection head, trained
//! with it: SimCLR v2 (arXiv 2006.10029, section 2) fine-tunes from the
//! middle layer of a 3-layer head.
//!
//! As in the paper: SGD with Nesterov momentum, learning rate 0.05 × B/256
//! with cosine decay, no weight decay, and only random crop (with resize) and
//! horizontal flip as augmentation. Run from random init, the same command
//! is the supervised-from-scratch baseline on the same labels.
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use super::features::{labels, Batches, FeatureNet, Labelled, FEATURE_BATCH};
use super::linear::{fit_linear, moments, standardisation_of_moments, LinearClassifier, LinearConfig, Standardised};
use super::{accuracy, Accuracy, Task};
use crate::augment::{view_rng, AugmentConfig, OpConfig, Pipeline};
use crate::data::config::BadImagePolicy;
use crate::data::loader::{map_batch, pipelined};
use crate::data::{Dataset, Sample};
use crate::device::{Pinned, Precision, PrecisionChoice};
use crate::dist::{agree, collectives_as_errors, part, part_range, with_uneven_global_batch_norm, ProcessGroup};
use crate::{Error, Result};

/// Fine-tuning the whole encoder and a new linear layer on a class-balanced
/// fraction of the labels (Appendix B.5).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct FinetuneConfig {
    /// Fraction of each class's labelled images: 0.01, 0.1 or 1.0 in the paper.
    #[arg(long, default_value_t = FinetuneConfig::default().fraction)]
    pub fraction: f64,
    /// The labelled images listed in a file, in place of --fraction: one a line, by path, path
    /// under --train, or file name (the paper's ImageNet subsets, imagenet_subsets/1percent.txt and
    /// 10percent.txt of google-research/simclr), or a --subset-file written before.
    #[arg(long, value_name = "LIST", conflicts_with = "fraction")]
    pub labelled_images: Option<PathBuf>,
    /// Default: the paper's 60 for fractions up to 1% (of the training images, listed ones too), 30 above.
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = FinetuneConfig::default().batch_size)]
    pub batch_size: usize,
    /// Base rate, scaled by batch/256: the paper's 0.05.
    #[arg(long, default_value_t = FinetuneConfig::default().learning_rate)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = FinetuneConfig::default().momentum)]
    pub momentum: f64,
    /// Set from the evaluation's `--seed`.
    #[arg(skip)]
    pub seed: u64,
    /// List the labelled images used here, one per line.
    #[arg(long)]
    pub subset_file: Option<PathBuf>,
    /// `random` (the paper) or `linear-probe` (fitted first on the frozen features of the subset).
    #[arg(long, default_value = "random")]
    pub head_init: HeadInit,
}

/// How the new linear layer on top of the encoder starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadInit {
    /// PyTorch's default initialisation, as in the paper.
    #[default]
    Random,
    /// A linear classifier first fitted on the frozen encoder's features of
    /// the labelled subset (linear probing then fine-tuning, "LP-FT", Kumar
    /// et al. 2022): the first steps then no longer push a random head's
    /// gradients into pretrained features.
    LinearProbe,
}

names!(HeadInit, "head init", { Random => "random", LinearProbe => "linear-probe" });

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            fraction: 0.1,
            labelled_images: None,
            epochs: None,
            batch_size: 256,
            learning_rate: 0.05,
            momentum: 0.9,
            seed: 0,
            subset_file: None,
            head_init: HeadInit::Random,
        }
    }
}

impl FinetuneConfig {
    /// Appendix B.5's fine-tuning length: 60 epochs on 1% of the labels
    /// (or fewer), 30 on 10% and above.
    pub fn paper_epochs(fraction: f64) -> usize {
        if fraction <= 0.01 {
            60
        } else {
            30
        }
    }

    /// Pushes a line per bad setting, named as its flag. Train-mode
    /// BatchNorm needs two images to a batch.
    pub fn check(&self, problems: &mut Vec<String>) {
        check_fraction(self.fraction, problems);
        if self.epochs == Some(0) {
            problems.push("--epochs 0: must be at least 1".to_owned());
        }
        if self.batch_size < 2 {
            problems.push(format!(
                "--batch-size {}: must be at least 2, as BatchNorm trains on a batch's statistics",
                self.batch_size
            ));
        }
        super::check_sgd(self.learning_rate, self.momentum, problems);
    }

    /// The epochs given, else [`Self::paper_epochs`] of the fraction, or
    /// of the share of the `total` training images that `labelled`, the
    /// images listed, are (the paper's 1% list holds 12,811 of ImageNet's
    /// 1,281,167).
    pub fn epochs(&self, labelled: usize, total: usize) -> usize {
        let share = match self.labelled_images {
            Some(_) => labelled as f64 / total.max(1) as f64,
            None => self.fraction,
        };
        self.epochs.unwrap_or_else(|| Self::paper_epochs(share))
    }
}

/// Pushes a line when a label fraction is outside (0, 1], named as its flag.
pub(crate) fn check_fraction(fraction: f64, problems: &mut Vec<String>) {
    if !(fraction > 0.0 && fraction <= 1.0) {
        problems.push(format!("--fraction {fraction}: must be in (0, 1]"));
    }
}

/// Pushes a line when batches of `batch_size` images cannot give each of
/// `world` processes one, `what` naming the training.
fn check_shared_batch(batch_size: usize, world: usize, what: &str, problems: &mut Vec<String>) {
    if batch_size < world {
        problems.push(format!(
            "--batch-size {batch_size}: {what} on {world} processes needs at least {world} images a batch, one a process"
        ));
    }
}

/// Lists `subset`'s images of `train` in `path`, one per line as
/// [`Sample::describe`] names them; rank 0 writes it, and every rank learns
/// whether it could.
pub(crate) fn write_subset_file(
    path: &std::path::Path,
    train: &Dataset,
    subset: &[usize],
    group: Option<&ProcessGroup>,
) -> Result<()> {
    let written = match group.map_or(0, |group| group.rank()) {
        0 => {
            let listing: String = subset.iter().map(|&i| format!("{}\n", train.samples[i].describe(i))).collect();
            crate::io::write_atomic(path, listing.as_bytes())
        }
        _ => Ok(()),
    };
    agree(group, written)
}

/// Indices of a class-balanced subset: from each class, round(fraction × its
/// count) images (at least one), drawn with `seed`; sorted.
pub fn balanced_subset(dataset: &Dataset, fraction: f64, seed: u64) -> Result<Vec<usize>> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::InvalidArgument(format!("label fraction {fraction}: must be in (0, 1]")));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); dataset.classes.len()];
    for (index, sample) in dataset.samples.iter().enumerate() {
        if let Some(label) = sample.label {
            by_class[label].push(index);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::new();
    for members in by_class.iter_mut().filter(|m| !m.is_empty()) {
        members.shuffle(&mut rng);
        let take = ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len());
        chosen.extend_from_slice(&members[..take]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}

/// What fine-tuning gives: the test accuracy, the labelled images it used
/// and the arithmetic it trained in.
#[derive(Debug, Clone, Copy)]
pub struct FineTuned {
    pub accuracy: Accuracy,
    pub labelled_images: usize,
    pub precision: Precision,
}

/// Fine-tunes `net` (an encoder, or one with the first layers of its
/// projection head, whose variables live in `store`) with a new linear
/// classifier on its output, on a balanced subset of the task's training
/// split, then scores it on the test split. `choice` `auto` trains in bf16
/// autocast where pretraining would (CUDA, a CPU with bf16 instructions;
/// see `train.mixed_precision`) and computes features in fp32.
pub fn finetune<'a>(
    store: &nn::VarStore,
    net: impl Into<FeatureNet<'a>>,
    task: &Task,
    config: &FinetuneConfig,
    choice: PrecisionChoice,
    pool: &rayon::ThreadPool,
) -> Result<FineTuned> {
    finetune_in(store, net, task, config, choice, pool, None)
}

/// [`finetune`] as one rank of `group` (alone when `None`), every rank
/// calling it with the same arguments: each global batch (the same
/// batches, from the same seed, as one process draws) is cut into the
/// ranks' contiguous [`part`]s, BatchNorm normalises over the whole batch
/// (uneven parts weighted by their sizes), and the ranks' gradients are
/// summed, so the ranks take one process's steps up to float summation
/// order. The features (a linear-probe head's, the test split's) are
/// shared as `eval`'s are. With W processes every batch needs W images:
/// a last batch of fewer is left out (one process leaves out a last batch
/// of one image, which train-mode BatchNorm cannot take).
#[allow(clippy::too_many_arguments)]
pub fn finetune_in<'a>(
    store: &nn::VarStore,
    net: impl Into<FeatureNet<'a>>,
    task: &Task,
    config: &FinetuneConfig,
    choice: PrecisionChoice,
    pool: &rayon::ThreadPool,
    group: Option<&ProcessGroup>,
) -> Result<FineTuned> {
    let net = net.into();
    let (train, test, format) = (&task.train, &task.test, task.format);
    let world = group.map_or(1, ProcessGroup::size);
    let mut problems = Vec::new();
    config.check(&mut problems);
    check_shared_batch(config.batch_size, world, "fine-tuning", &mut problems);
    super::refuse(problems)?;
    let subset = match &config.labelled_images {
        Some(list) => agree(group, super::listed::listed_subset(train, list))?,
        None => balanced_subset(train, config.fraction, config.seed)?,
    };
    if subset.len() < world.max(2) {
        let chosen = match &config.labelled_images {
            Some(list) => format!("--labelled-images {}", list.display()),
            None => format!("--fraction {}", config.fraction),
        };
        return Err(Error::InvalidArgument(format!(
            "{chosen} labels {} training images, fewer than the {} a batch needs on {world} process{}",
            subset.len(),
            world.max(2),
            if world == 1 { "" } else { "es" }
        )));
    }
    if let Some(path) = &config.subset_file {
        write_subset_file(path, train, &subset, group)?;
    }
    let device = store.device();
    let precision = choice.on(device, true);
    // What `choice.on(device, false)` gives, without warning a second time.
    let features_in = if choice == PrecisionChoice::Auto { Precision::Fp32 } else { precision };
    let batches =
        Batches { format, batch_size: FEATURE_BATCH, device, policy: BadImagePolicy::Stop, precision: features_in };
    let features_of = |samples: &[Sample]| batches.labelled_across(net, samples, pool, group);
    let classifier = super::seeded_linear(store.root() / "fc", net.dim(), task.classes, config.seed);
    if config.head_init == HeadInit::LinearProbe {
        let chosen: Vec<Sample> = subset.iter().map(|&i| train.samples[i].clone()).collect();
        let features = features_of(&chosen)?.features;
        let probe = LinearConfig { seed: config.seed, ..Default::default() };
        let probe = fit_linear(&features, &labels(&chosen, device), task.classes, &probe)?;
        let bias = classifier.bs.as_ref().expect("nn::linear has a bias");
        tch::no_grad(|| {
            classifier.ws.shallow_clone().copy_(&probe.weight);
            bias.shallow_clone().copy_(&probe.bias);
        });
    }
    if let Some(group) = group {
        // Every rank starts from rank 0's network: the same file and seed
        // give the same one, and the linear probe's fit is not left to
        // agree by itself.
        let mut variables: Vec<(String, Tensor)> = store.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, variable) in &mut variables {
            tch::no_grad(|| group.broadcast(variable, 0))?;
        }
    }
    let mut optimizer =
        nn::Sgd { momentum: config.momentum, nesterov: true, wd: 0.0, dampening: 0.0 }.build(store, 0.0)?;
    let trainable = store.trainable_variables();
    let batch = config.batch_size.min(subset.len());
    let plan = ViewBatches {
        subset: &subset,
        batch,
        epochs: config.epochs(subset.len(), train.len()),
        fewest: world.max(2),
        seed: config.seed,
    };
    let (peak, total_steps) = (config.learning_rate * batch as f64 / 256.0, plan.steps());
    let mut step = 0usize;
    let mut scale = (precision == Precision::Fp16).then(|| crate::optim::LossScale::new(device));
    plan.train(task, pool, device, group, |images, samples, sizes| {
        // In the network's dtype (fp32; fp64 in tests).
        let images = images.upload().to_kind(store.kind());
        let forward = || precision.run(device, || net.forward_t(&images, true).apply(&classifier));
        let logits = match group {
            Some(group) => with_uneven_global_batch_norm(group, sizes, forward),
            None => forward(),
        };
        // The loss in fp32 at least, outside autocast, as in pretraining;
        // this rank's share of the batch's mean.
        let half = matches!(logits.kind(), Kind::BFloat16 | Kind::Half);
        let logits = if half { logits.to_kind(Kind::Float) } else { logits };
        let share = samples.len() as f64 / sizes.iter().sum::<i64>() as f64;
        let loss = logits.cross_entropy_for_logits(&labels(samples, device)) * share;
        super::descend(&mut optimizer, &loss, (peak, step, total_steps), &trainable, group, scale.as_mut())?;
        step += 1;
        Ok(())
    })?;

    let Labelled { features, labels: test_labels, .. } = features_of(&test.samples)?;
    let logits = tch::no_grad(|| features.to_kind(classifier.ws.kind()).apply(&classifier));
    let accuracy = accuracy(&logits, &test_labels);
    Ok(FineTuned { accuracy, labelled_images: subset.len(), precision })
}

/// The batches fine-tuning trains on, and the linear evaluation on views
/// ([`fit_linear_on_views`]): each epoch a new shuffle of `subset` (indices
/// into the training split), drawn from `seed` as one process draws it,
/// cut into batches of `batch` images; a batch of fewer than `fewest` is
/// left out (train-mode BatchNorm cannot take one image, nor can a batch
/// of fewer images than processes be shared among them).
struct ViewBatches<'a> {
    subset: &'a [usize],
    batch: usize,
    epochs: usize,
    fewest: usize,
    seed: u64,
}

impl ViewBatches<'_> {
    /// The steps the learning rate's schedule spans.
    fn steps(&self) -> f64 {
        (self.subset.len().div_ceil(self.batch) * self.epochs) as f64
    }

    /// Calls `step` on each batch in turn with this rank's [`part`] of it,
    /// seen through random crops (with resize) and horizontal flips, the
    /// only augmentation of appendix B.5 (each image's view a function of
    /// the seed, the epoch and the image), with the samples of the part
    /// and every rank's number of images. On a GPU the next batch is made
    /// while `step` runs, as features are (`Batches::each` says why not on
    /// the CPU). An image one rank cannot read stops every rank, and so
    /// does a collective that fails inside `step`.
    fn train(
        &self,
        task: &Task,
        pool: &rayon::ThreadPool,
        device: tch::Device,
        group: Option<&ProcessGroup>,
        mut step: impl FnMut(Pinned, &[Sample], &[i64]) -> Result<()>,
    ) -> Result<()> {
        let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.size()));
        let augment = AugmentConfig::with_ops(vec![
            OpConfig::RandomResizedCrop(Default::default()),
            OpConfig::HorizontalFlip(Default::default()),
        ]);
        let pipeline = Pipeline::new(&augment, task.format.size);
        let (batch, fewest, seed) = (self.batch, self.fewest, self.seed);
        let mut order = self.subset.to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xF1E7);
        let batches = (0..self.epochs).flat_map(move |epoch| {
            order.shuffle(&mut rng);
            let batches: Vec<Vec<usize>> =
                order.chunks(batch).filter(|c| c.len() >= fewest).map(<[usize]>::to_vec).collect();
            batches.into_iter().map(move |indices| (epoch, indices))
        });
        let views = |(epoch, indices): (usize, Vec<usize>)| -> Result<(Pinned, Vec<Sample>, Vec<i64>)> {
            let sizes = (0..world).map(|r| part_range(indices.len(), r, world).len() as i64).collect();
            let mine = part(&indices, rank, world);
            let samples: Vec<Sample> = mine.iter().map(|&i| task.train.samples[i].clone()).collect();
            let images = map_batch(&samples, task.format, pool, device, |image, position| {
                let mut rng = view_rng(seed, epoch as u64, mine[position] as u64, 2);
                pipeline.view(0, image, &mut rng)
            })?;
            Ok((images, samples, sizes))
        };
        pipelined(device.is_cuda(), batches.map(views).map(Ok), |prepared| {
            let (images, samples, sizes) = agree(group, prepared)?;
            collectives_as_errors(|| step(images, &samples, &sizes))
        })
    }
}

/// The linear evaluation of the paper's code (google-research/simclr's
/// `--train_mode=finetune --fine_tune_after_block=4`, which `eval linear
/// --augment` scores on the test split's centre views): a linear classifier
/// on the frozen `net`, trained on random crops and flips of every image
/// of the task's training split, their features
/// computed again at every step as `batches` computes them (BatchNorm on
/// its running statistics, no gradients, in its precision). `config` is the
/// classifier's on cached features ([`super::linear`]): SGD with Nesterov
/// momentum, rate × B/256 on a cosine schedule, weight decay; and the
/// features are standardised as there, with the mean and deviation of the
/// training images' centre views. Shared among `group`'s ranks as
/// fine-tuning is: each makes and reads its part of every batch, and the
/// gradients are summed, so the ranks fit one process's classifier up to
/// float summation order.
pub fn fit_linear_on_views(
    net: FeatureNet,
    task: &Task,
    config: &LinearConfig,
    batches: &Batches,
    pool: &rayon::ThreadPool,
    group: Option<&ProcessGroup>,
) -> Result<LinearClassifier> {
    let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.size()));
    let mut problems = Vec::new();
    config.check(&mut problems);
    check_shared_batch(config.batch_size, world, "training", &mut problems);
    super::refuse(problems)?;
    let (device, rows) = (batches.device, task.train.len());
    if rows < world {
        return Err(Error::InvalidArgument(format!(
            "{rows} labelled training images, fewer than the {world} processes that share each batch"
        )));
    }
    // The standardisation from each rank's part of the centre views, batch
    // by batch (an ImageNet split's features would take gigabytes).
    let mut sums = Tensor::zeros([2, net.dim()], (Kind::Double, device));
    let mine = part(&task.train.samples, rank, world);
    let summed = batches.each(net, mine, pool, &mut |features, _| {
        sums += moments(&features);
        Ok(())
    });
    agree(group, summed)?;
    if let Some(group) = group {
        group.all_reduce(&mut sums, crate::dist::ReduceOp::Sum)?;
    }
    let (mean, deviation) = standardisation_of_moments(&sums, rows as i64);
    let store = nn::VarStore::new(device);
    let classifier = super::seeded_linear(store.root() / "fc", net.dim(), task.classes, config.seed);
    let mut optimizer = config.optimizer(&store)?;
    let trainable = store.trainable_variables();
    let subset: Vec<usize> = (0..rows).collect();
    let batch = config.batch_size.min(rows);
    let plan = ViewBatches { subset: &subset, batch, epochs: config.epochs, fewest: world, seed: config.seed };
    let (peak, total_steps) = (config.learning_rate * batch as f64 / 256.0, plan.steps());
    let frozen = batches.frozen(net);
    let mut step = 0usize;
    plan.train(task, pool, device, group, |images, samples, sizes| {
        let logits = ((frozen.features(images) - &mean) / &deviation).apply(&classifier);
        let share = samples.len() as f64 / sizes.iter().sum::<i64>() as f64;
        let loss = logits.cross_entropy_for_logits(&labels(samples, device)) * share;
        super::descend(&mut optimizer, &loss, (peak, step, total_steps), &trainable, group, None)?;
        step += 1;
        Ok(())
    })?;
    Ok(Standardised { net: classifier, mean, deviation }.folded())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::ViewFormat;
    use crate::data::synthetic;
    use crate::model::{HeadConfig, HeadKind, Layer, ModelConfig, ResNet, SimClr};
    use tch::Device;

    #[test]
    fn subsets_are_balanced_and_reproducible() {
        let dataset = synthetic::generate(200, 4, 8, 0);
        let subset = balanced_subset(&dataset, 0.1, 7).unwrap();
        assert_eq!(subset.len(), 20);
        for class in 0..4 {
            let count = subset.iter().filter(|&&i| dataset.samples[i].label == Some(class)).count();
            assert_eq!(count, 5, "class {class}");
        }
        assert_eq!(subset, balanced_subset(&dataset, 0.1, 7).unwrap());
        assert_ne!(subset, balanced_subset(&dataset, 0.1, 8).unwrap());
        // At least one image per class, and the whole set at 100%.
        assert_eq!(balanced_subset(&dataset, 0.001, 7).unwrap().len(), 4);
        assert_eq!(balanced_subset(&dataset, 1.0, 7).unwrap().len(), 200);
        assert!(balanced_subset(&dataset, 0.0, 7).is_err());
    }

    fn small_encoder(store: &nn::VarStore) -> ResNet {
        ResNet::new(&store.root(), crate::model::Arch::Resnet18, 0.125, crate::model::Stem::Cifar)
    }

    /// A small encoder on `store` whose convolutions are drawn from a
    /// seeded generator (Kaiming's fan-out variance, as a uniform): other
    /// test threads draw from libtorch's global generator too.
    fn seeded_encoder(store: &nn::VarStore) -> ResNet {
        let encoder = small_encoder(store);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut variables: Vec<(String, tch::Tensor)> =
            store.variables().into_iter().filter(|(_, v)| v.dim() == 4).collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, variable) in variables {
            let size = variable.size();
            let bound = (6.0_f64 / (size[0] * size[2] * size[3]) as f64).sqrt();
            tch::no_grad(|| variable.shallow_clone().copy_(&crate::eval::seeded_uniform(&size, bound, &mut rng)));
        }
        encoder
    }

    /// 160 synthetic images of 4 classes, 24 pixels a side, as both the
    /// training and the test split: these tests check that a fit optimises
    /// (generalisation is the CIFAR-10 test's business).
    fn fitting_task() -> Task {
        let images = synthetic::generate(160, 4, 24, 1);
        let format = ViewFormat { size: 24, mean: [0.5; 3], std: [0.25; 3] };
        Task { train: images.clone(), test: images, classes: 4, format }
    }

    #[test]
    fn the_linear_classifier_on_views_fits_and_leaves_the_network_as_it_was() {
        let store = nn::VarStore::new(Device::Cpu);
        let encoder = seeded_encoder(&store);
        let before: Vec<(String, Tensor)> = store.variables().into_iter().map(|(n, v)| (n, v.copy())).collect();
        let task = fitting_task();
        let policy = BadImagePolicy::Stop;
        let batches =
            Batches { format: task.format, batch_size: 64, device: Device::Cpu, policy, precision: Precision::Fp32 };
        let pool = crate::data::loader::worker_pool(2).unwrap();
        let config =
            LinearConfig { epochs: 10, batch_size: 32, learning_rate: 1.0, augment: true, ..Default::default() };
        let classifier = fit_linear_on_views((&encoder).into(), &task, &config, &batches, &pool, None).unwrap();
        let test = batches.labelled((&encoder).into(), &task.test.samples, &pool).unwrap();
        let accuracy = accuracy(&classifier.logits(&test.features), &test.labels);
        // Measured on an AVX2 EPYC: 0.4375 (the classifier on cached centre
        // views of these untrained features, scored on the images it was
        // fitted on, 0.6875; crops of 8% of a shape are harder).
        assert!(accuracy.top1 > 0.35, "chance is 0.25: {accuracy:?}");
        // Frozen: every weight and running statistic as it was.
        let after = store.variables();
        let moved: Vec<&String> =
            before.iter().filter(|(name, value)| !after[name].equal(value)).map(|(n, _)| n).collect();
        assert!(moved.is_empty(), "{moved:?}");
    }

    #[test]
    fn fine_tuning_fits_its_training_images() {
        let task = fitting_task();
        let store = nn::VarStore::new(Device::Cpu);
        seeded_encoder(&store);
        let pool = crate::data::loader::worker_pool(2).unwrap();
        // In fp32, then as pretraining would train on this CPU: bf16 where
        // it has bf16 instructions.
        for choice in [PrecisionChoice::Fp32, PrecisionChoice::Auto] {
            let config = FinetuneConfig {
                fraction: 1.0,
                epochs: Some(20),
                batch_size: 32,
                learning_rate: 0.2,
                ..Default::default()
            };
            let mut tuned = nn::VarStore::new(Device::Cpu);
            let encoder = small_encoder(&tuned);
            tuned.copy(&store).unwrap();
            let FineTuned { accuracy, labelled_images, precision } =
                finetune(&tuned, &encoder, &task, &config, choice, &pool).unwrap();
            assert_eq!((labelled_images, precision), (160, choice.on(Device::Cpu, true)));
            // Measured (seeded, so in every run on one CPU): fp32 0.756 on a
            // Xeon with AMX, 0.731 on an AVX2 EPYC; bf16 0.675 on the Xeon.
            let bound = match precision {
                Precision::Fp32 => 0.65,
                Precision::Bf16 | Precision::Fp16 => 0.6,
            };
            assert!(accuracy.top1 > bound, "{}: chance is 0.25: {accuracy:?}", precision.name());
        }
    }

    #[test]
    fn fine_tuning_from_a_head_layer_trains_the_head_up_to_it() {
        // A 3-layer head with BatchNorm (SimCLR v2's), fine-tuned from its
        // first layer: the encoder and that layer (its Linear and
        // BatchNorm, running statistics included) move, the layers above
        // it do not, and the classifier reads the layer's 16 features.
        let task = Task {
            train: synthetic::generate(24, 3, 16, 1),
            test: synthetic::generate(9, 3, 16, 2),
            classes: 3,
            format: ViewFormat { size: 16, mean: [0.5; 3], std: [0.25; 3] },
        };
        let model_config = ModelConfig {
            arch: crate::model::Arch::Resnet18,
            width_multiplier: 0.125,
            stem: crate::model::Stem::Cifar,
            head: HeadConfig {
                kind: HeadKind::Mlp,
                layers: 3,
                hidden_dim: Some(16),
                projection_dim: 8,
                batch_norm: true,
            },
            ..Default::default()
        };
        let config = FinetuneConfig { fraction: 1.0, epochs: Some(1), batch_size: 8, ..Default::default() };
        let pool = crate::data::loader::worker_pool(1).unwrap();
        let tune = |layer: Layer| {
            let store = nn::VarStore::new(Device::Cpu);
            let model = SimClr::new(&store.root(), &model_config);
            let before: Vec<(String, Tensor)> =
                store.variables().into_iter().map(|(name, value)| (name, value.copy())).collect();
            let net = FeatureNet::at(&model, layer).unwrap();
            finetune(&store, net, &task, &config, PrecisionChoice::Fp32, &pool).unwrap();
            let after = store.variables();
            let mut moved: Vec<String> = before
                .iter()
                .filter(|(name, value)| !after[name].equal(value))
                .map(|(name, _)| name.split('.').take(3).collect::<Vec<_>>().join("."))
                .collect();
            moved.sort();
            moved.dedup();
            (moved, after["fc.weight"].size())
        };
        let of_head = |moved: &[String]| -> Vec<String> {
            moved.iter().filter(|name| name.starts_with("projection_head.")).cloned().collect()
        };
        let (moved, classifier) = tune(Layer::Head(1));
        assert_eq!(of_head(&moved), ["projection_head.layers.0", "projection_head.layers.1"]);
        assert!(moved.iter().any(|name| name.starts_with("encoder.")), "{moved:?}");
        assert_eq!(classifier, [3, 16]);
        // The control: fine-tuned from h (64 features at this width), the head stays as it was.
        let (moved, classifier) = tune(Layer::H);
        assert!(of_head(&moved).is_empty() && moved.iter().any(|name| name.starts_with("encoder.")), "{moved:?}");
        assert_eq!(classifier, [3, 64]);
    }
}
