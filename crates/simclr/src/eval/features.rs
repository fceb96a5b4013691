//! h (or a projection-head layer, see [`Layer`]) for every image of a
//! dataset: centre views, the network in eval mode (BatchNorm running
//! statistics, folded into the convolutions), no gradients, in batches.
use tch::{Device, Kind, Tensor};

use crate::augment::{center_view, FloatImage};
use crate::data::config::BadImagePolicy;
use crate::data::loader::{map_readable, pipelined, ReadableBatch, ViewFormat};
use crate::data::Sample;
use crate::device::{Pinned, Precision};
use crate::dist::{part, ProcessGroup};
use crate::model::{FoldedResNet, Layer, ProjectionHead, ResNet, SimClr};
use crate::{Error, Result};

/// The network features come from: the encoder, then the first `depth`
/// linear layers of a projection head (none: h itself).
#[derive(Clone, Copy)]
pub struct FeatureNet<'a> {
    encoder: &'a ResNet,
    head: Option<(&'a ProjectionHead, usize)>,
}

impl<'a> FeatureNet<'a> {
    /// `model` read at `layer`; an error names a head layer it lacks.
    pub fn at(model: &'a SimClr, layer: Layer) -> Result<Self> {
        let depth = layer.depth_in(&model.head)?;
        Ok(Self { encoder: &model.encoder, head: (depth > 0).then_some((&model.head, depth)) })
    }

    /// The features of `images` with gradients, BatchNorm in training
    /// mode on the batch's statistics when `train` (what fine-tuning
    /// trains), else on its running ones.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Tensor {
        let h = self.encoder.forward_t(images, train);
        match self.head {
            None => h,
            Some((head, depth)) => head.forward_to(&h, depth, train),
        }
    }

    /// [`FeatureNet::forward_t`] in eval mode with the encoder's BatchNorms
    /// folded into its convolutions once, as [`FrozenNet`] computes
    /// features; call it under `tch::no_grad`.
    pub fn folded(&self) -> impl Fn(&Tensor) -> Tensor + 'a {
        let (encoder, head) = (self.encoder.fold(), self.head);
        move |images| {
            let h = encoder.forward(images);
            match head {
                None => h,
                Some((head, depth)) => head.forward_to(&h, depth, false),
            }
        }
    }

    /// The size of a feature vector.
    pub fn dim(&self) -> i64 {
        match self.head {
            None => self.encoder.feature_dim(),
            Some((head, depth)) => head.dim_after(depth),
        }
    }
}

/// h.
impl<'a> From<&'a ResNet> for FeatureNet<'a> {
    fn from(encoder: &'a ResNet) -> Self {
        Self { encoder, head: None }
    }
}

/// Features `[M, feature_dim]` (fp32, on `device`; the forward pass in
/// `precision`) of `samples`, in order; an unreadable image's error ends it.
pub fn extract_features<'a>(
    net: impl Into<FeatureNet<'a>>,
    samples: &[Sample],
    format: ViewFormat,
    batch_size: usize,
    device: Device,
    precision: Precision,
    pool: &rayon::ThreadPool,
) -> Result<Tensor> {
    let mut chunks = Vec::new();
    let batches = Batches { format, batch_size, device, policy: BadImagePolicy::Stop, precision };
    batches.each(net.into(), samples, pool, &mut |features, _| {
        chunks.push(features);
        Ok(())
    })?;
    Ok(Tensor::cat(&chunks, 0))
}

/// How [`Batches::each`] feeds images through a network.
#[derive(Debug, Clone, Copy)]
pub struct Batches {
    pub format: ViewFormat,
    pub batch_size: usize,
    pub device: Device,
    /// Under the skip policy an unreadable image is left out; under the
    /// stop policy its error ends the pass.
    pub policy: BadImagePolicy,
    /// The forward pass's arithmetic; the features are fp32 either way.
    pub precision: Precision,
}

impl Batches {
    /// Features of `samples`, batch by batch in order: `sink` gets each
    /// batch's `[rows, feature_dim]` fp32 features on the device and the
    /// positions in `samples` of its rows, so that the caller need not hold
    /// every feature at once. Returns the images skipped, as "path: reason",
    /// each also warned of when met.
    ///
    /// On a GPU the next batch is decoded on `pool` while the encoder runs
    /// this one, as a PyTorch DataLoader's workers do, so the device does not
    /// wait for the CPU. On the CPU the two would share the same cores, where
    /// the encoder's OpenMP threads can stall while others hold them: 3,000
    /// CIFAR-10 JPEGs through ResNet-18 on 2 cores took 21.1/19.6/20.1 s
    /// decoded in turn and 21.2/24.2/19.9 s prefetched, alternating; so
    /// batches are decoded in turn there.
    pub fn each<'a>(
        &self,
        net: impl Into<FeatureNet<'a>>,
        samples: &[Sample],
        pool: &rayon::ThreadPool,
        sink: &mut dyn FnMut(Tensor, Vec<usize>) -> Result<()>,
    ) -> Result<Vec<String>> {
        let size = self.format.size;
        self.each_view(net.into(), samples, pool, &|image, _| center_view(image, size), sink)
    }

    /// [`Batches::each`] with the images seen through `view` instead of
    /// centre views: `view(image, position)` makes the float view (pixels in
    /// [0, 1], `format.size` square, normalised after it) of the image at
    /// `position` in `samples`, such as a centre view with a known
    /// transformation applied ([`super::transform`]).
    pub fn each_view(
        &self,
        net: FeatureNet,
        samples: &[Sample],
        pool: &rayon::ThreadPool,
        view: &(dyn Fn(&image::RgbImage, usize) -> FloatImage + Sync),
        sink: &mut dyn FnMut(Tensor, Vec<usize>) -> Result<()>,
    ) -> Result<Vec<String>> {
        self.each_in(net, samples, pool, self.device.is_cuda(), view, sink)
    }

    /// Features of `samples` with the labels of their rows (on the device),
    /// and the images skipped ("path: reason"); under the skip policy the
    /// features have no rows when no image could be read.
    pub fn labelled(&self, net: FeatureNet, samples: &[Sample], pool: &rayon::ThreadPool) -> Result<Labelled> {
        let (mut chunks, mut rows) = (Vec::new(), Vec::new());
        let skipped = self.each(net, samples, pool, &mut |features, read| {
            chunks.push(features);
            rows.extend(read);
            Ok(())
        })?;
        let features = match chunks.is_empty() {
            true => Tensor::zeros([0, net.dim()], (Kind::Float, self.device)),
            false => Tensor::cat(&chunks, 0),
        };
        let read: Vec<i64> = rows.iter().map(|&row| samples[row].label.map_or(-1, |label| label as i64)).collect();
        Ok(Labelled { features, labels: crate::device::upload_slice(&read, self.device), skipped })
    }

    /// [`Batches::labelled`] shared among `group`'s ranks: each computes the
    /// features of its [`part`] of `samples`, and every rank gets all of
    /// them, in order, as one process would compute them (up to the
    /// rounding of other batches); an error on any rank stops every rank,
    /// naming it. Without a group, [`Batches::labelled`].
    pub fn labelled_across(
        &self,
        net: FeatureNet,
        samples: &[Sample],
        pool: &rayon::ThreadPool,
        group: Option<&ProcessGroup>,
    ) -> Result<Labelled> {
        let Some(group) = group else { return self.labelled(net, samples, pool) };
        let mine = self.labelled(net, part(samples, group.rank(), group.size()), pool);
        group.agree(mine)?.gathered(group)
    }

    /// [`Batches::labelled`] shared among `group`'s ranks, each keeping the
    /// features of its [`part`] of `samples` (a shared kNN bank:
    /// [`crate::eval::knn_votes_across`]): its part, with the images left out
    /// of every part (in order), and how many rows all parts hold; an error
    /// on any rank stops every rank, naming it. Without a group, all of
    /// `samples`.
    pub fn labelled_part(
        &self,
        net: FeatureNet,
        samples: &[Sample],
        pool: &rayon::ThreadPool,
        group: Option<&ProcessGroup>,
    ) -> Result<(Labelled, usize)> {
        let Some(group) = group else {
            let labelled = self.labelled(net, samples, pool)?;
            let rows = labelled.features.size()[0] as usize;
            return Ok((labelled, rows));
        };
        let mine = group.agree(self.labelled(net, part(samples, group.rank(), group.size()), pool))?;
        let mut rows = Tensor::from_slice(&[mine.features.size()[0]]);
        group.all_reduce(&mut rows, crate::dist::ReduceOp::Sum)?;
        let skipped = group.all_gather_lines(&mine.skipped)?;
        Ok((Labelled { skipped, ..mine }, rows.int64_value(&[0]) as usize))
    }

    fn each_in(
        &self,
        net: FeatureNet,
        samples: &[Sample],
        pool: &rayon::ThreadPool,
        prefetch: bool,
        view: &(dyn Fn(&image::RgbImage, usize) -> FloatImage + Sync),
        sink: &mut dyn FnMut(Tensor, Vec<usize>) -> Result<()>,
    ) -> Result<Vec<String>> {
        let Self { format, device, policy, .. } = *self;
        let batch_size = self.batch_size.max(1);
        let frozen = self.frozen(net);
        // A batch's views, the positions in `samples` of its rows, and its
        // unreadable images.
        let ready = |(number, batch): (usize, &[Sample])| -> Result<(Pinned, Vec<usize>, Vec<Error>)> {
            let first = number * batch_size;
            let ReadableBatch { images, read, mut unreadable } =
                map_readable(batch, format, pool, device, |image, position| view(image, first + position))?;
            if policy == BadImagePolicy::Stop && !unreadable.is_empty() {
                return Err(unreadable.remove(0));
            }
            let rows = read.into_iter().map(|position| first + position).collect();
            Ok((images, rows, unreadable))
        };
        let mut skipped = Vec::new();
        let mut consume = |(images, rows, unreadable): (Pinned, Vec<usize>, Vec<Error>)| -> Result<()> {
            for error in unreadable {
                tracing::warn!("skipping unreadable image: {error}");
                skipped.push(error.to_string());
            }
            match rows.is_empty() {
                true => Ok(()),
                false => sink(frozen.features(images), rows),
            }
        };
        pipelined(prefetch, samples.chunks(batch_size).enumerate().map(ready), &mut consume)?;
        Ok(skipped)
    }
}

/// A [`FeatureNet`] as features are read from it: BatchNorm on its running
/// statistics, folded into the convolutions; no gradients; the forward pass
/// in a [`Precision`] on a device.
pub struct FrozenNet<'a> {
    encoder: FoldedResNet,
    head: Option<(&'a ProjectionHead, usize)>,
    device: Device,
    precision: Precision,
}

impl FrozenNet<'_> {
    /// `[rows, feature_dim]` fp32 features of a batch of views.
    pub fn features(&self, images: Pinned) -> Tensor {
        let images = images.upload().to_kind(self.encoder.kind());
        let features = tch::no_grad(|| {
            self.precision.run(self.device, || {
                let h = self.encoder.forward(&images);
                match self.head {
                    None => h,
                    Some((head, depth)) => head.forward_to(&h, depth, false),
                }
            })
        });
        features.to_kind(Kind::Float)
    }
}

impl Batches {
    /// `net` frozen as these batches compute features.
    pub fn frozen<'a>(&self, net: FeatureNet<'a>) -> FrozenNet<'a> {
        FrozenNet { encoder: net.encoder.fold(), head: net.head, device: self.device, precision: self.precision }
    }
}

/// What [`Batches::labelled`] gives: `[M, feature_dim]` fp32 features of
/// the images read, their `[M]` int64 labels (-1 where unlabelled), and the
/// images skipped.
pub struct Labelled {
    pub features: Tensor,
    pub labels: Tensor,
    pub skipped: Vec<String>,
}

impl Labelled {
    /// Every rank's rows, labels and skipped images, one rank's after
    /// another.
    fn gathered(self, group: &ProcessGroup) -> Result<Labelled> {
        Ok(Labelled {
            features: group.all_gather_rows(&self.features)?,
            labels: group.all_gather_rows(&self.labels)?,
            skipped: group.all_gather_lines(&self.skipped)?,
        })
    }
}

/// The labels of `samples` as an `[M]` int64 tensor (unlabelled samples are
/// -1), sent without waiting for the device: fine-tuning makes one per step.
pub fn labels(samples: &[Sample], device: Device) -> Tensor {
    let labels: Vec<i64> = samples.iter().map(|s| s.label.map_or(-1, |l| l as i64)).collect();
    crate::device::upload_slice(&labels, device)
}

/// Rows of images per forward pass when features are extracted for evaluation.
pub const FEATURE_BATCH: usize = 256;

/// Features and labels of a labelled bank (training) split and a query
/// (test) split, computed once with the encoder frozen, in fp32 (the
/// training's kNN monitor, `report`).
pub struct Frozen {
    pub train: Tensor,
    pub train_labels: Tensor,
    pub test: Tensor,
    pub test_labels: Tensor,
}

impl Frozen {
    pub fn compute<'a>(
        net: impl Into<FeatureNet<'a>>,
        train: &[Sample],
        test: &[Sample],
        format: ViewFormat,
        batch: usize,
        device: Device,
        pool: &rayon::ThreadPool,
    ) -> Result<Self> {
        let net = net.into();
        Ok(Self {
            train: extract_features(net, train, format, batch, device, Precision::Fp32, pool)?,
            train_labels: labels(train, device),
            test: extract_features(net, test, format, batch, device, Precision::Fp32, pool)?,
            test_labels: labels(test, device),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageSource;
    use crate::model::{Arch, Stem};

    #[test]
    fn prefetched_and_serial_extraction_agree_and_a_bad_file_is_named_or_left_out() {
        let store = tch::nn::VarStore::new(Device::Cpu);
        let encoder = ResNet::new(&store.root(), Arch::Resnet18, 0.125, Stem::Cifar);
        let mut samples = crate::data::synthetic::generate(10, 2, 16, 0).samples;
        let format = ViewFormat { size: 16, mean: [0.5; 3], std: [0.25; 3] };
        let pool = crate::data::loader::worker_pool(2).unwrap();
        let run = |samples: &[Sample], prefetch, policy| {
            let batches = Batches { format, batch_size: 3, device: Device::Cpu, policy, precision: Precision::Fp32 };
            let (mut chunks, mut rows) = (Vec::new(), Vec::new());
            let center = |image: &image::RgbImage, _| center_view(image, format.size);
            let skipped =
                batches.each_in((&encoder).into(), samples, &pool, prefetch, &center, &mut |features, read| {
                    chunks.push(features);
                    rows.extend(read);
                    Ok(())
                })?;
            Ok::<_, Error>((Tensor::cat(&chunks, 0), rows, skipped))
        };
        let (serial, rows, skipped) = run(&samples, false, BadImagePolicy::Stop).unwrap();
        assert_eq!(serial.size(), vec![10, encoder.feature_dim()]);
        assert_eq!((rows, skipped.len()), ((0..10).collect(), 0));
        assert!(serial.equal(&run(&samples, true, BadImagePolicy::Stop).unwrap().0));
        // Missing files in the third batch: each pass names the first, or,
        // under the skip policy, leaves both out and names them.
        samples[7].source = ImageSource::File("no/such/image.jpg".into());
        samples[8].source = ImageSource::File("no/such/other.jpg".into());
        for prefetch in [false, true] {
            let error = run(&samples, prefetch, BadImagePolicy::Stop).unwrap_err().to_string();
            assert!(error.contains("no/such/image.jpg"), "{error}");
            let (features, rows, skipped) = run(&samples, prefetch, BadImagePolicy::Skip).unwrap();
            assert_eq!(rows, [0, 1, 2, 3, 4, 5, 6, 9]);
            assert_eq!(skipped.len(), 2);
            assert!(skipped[0].contains("no/such/image.jpg") && skipped[1].contains("no/such/other.jpg"));
            let kept = serial.index_select(0, &Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 9]));
            // A batch of one where three were: other kernels' rounding,
            // which moved an entry 3.3e-6 (of features up to 12) in one
            // run of thirty beside other tests.
            assert!(features.allclose(&kept, 1e-5, 1e-4, false), "each image's features are its own");
        }
        // A batch of which nothing can be read gives no rows, not an error.
        samples[6].source = ImageSource::File("no/such/third.jpg".into());
        let (_, rows, skipped) = run(&samples, false, BadImagePolicy::Skip).unwrap();
        assert_eq!((rows, skipped.len()), (vec![0, 1, 2, 3, 4, 5, 9], 3));

        // With their labels: those of the rows read, in order; with nothing
        // read, no rows.
        let batches = Batches {
            format,
            batch_size: 3,
            device: Device::Cpu,
            policy: BadImagePolicy::Skip,
            precision: Precision::Fp32,
        };
        let Labelled { features, labels, skipped } = batches.labelled((&encoder).into(), &samples, &pool).unwrap();
        let read = [0usize, 1, 2, 3, 4, 5, 9];
        let expected: Vec<i64> = read.iter().map(|&row| samples[row].label.unwrap() as i64).collect();
        assert_eq!(Vec::<i64>::try_from(&labels).unwrap(), expected);
        assert_eq!((features.size(), skipped.len()), (vec![7, encoder.feature_dim()], 3));
        let none = batches.labelled((&encoder).into(), &samples[6..9], &pool).unwrap();
        assert_eq!((none.features.size(), none.labels.size()), (vec![0, encoder.feature_dim()], vec![0]));
    }

    #[test]
    fn bf16_features_are_fp32_features_rounded() {
        let store = tch::nn::VarStore::new(Device::Cpu);
        let encoder = ResNet::new(&store.root(), Arch::Resnet18, 0.25, Stem::Cifar);
        let samples = crate::data::synthetic::generate(16, 4, 32, 0).samples;
        let format = ViewFormat { size: 32, mean: [0.5; 3], std: [0.25; 3] };
        let pool = crate::data::loader::worker_pool(2).unwrap();
        let features =
            |precision| extract_features(&encoder, &samples, format, 8, Device::Cpu, precision, &pool).unwrap();
        let (fp32, bf16) = (features(Precision::Fp32), features(Precision::Bf16));
        assert_eq!((fp32.kind(), bf16.kind()), (Kind::Float, Kind::Float));
        let cosine = Tensor::cosine_similarity(&fp32, &bf16, 1, 1e-12);
        let (least, largest) = (cosine.min().double_value(&[]), (&fp32 - &bf16).abs().max().double_value(&[]));
        // Measured: least cosine 0.999994, largest difference 0.047.
        assert!(least > 0.999, "bf16 features are fp32's up to rounding: least cosine {least}");
        // The control: bf16 did run, so the features differ.
        assert!(largest > 0.0, "bf16 features equal fp32's bit for bit: autocast did not run");
    }
}
