//! h (or a projection-head layer, see [`Layer`]) for every image of a
//! dataset: centre views, the network in eval mode (BatchNorm running
//! statistics, folded into the convolutions), no gradients, in batches.
use tch::{Device, Kind, Tensor};

use crate::data::loader::{center_batch, send_until_error, ViewFormat};
use crate::data::Sample;
use crate::device::Pinned;
use crate::model::{Layer, ProjectionHead, ResNet, SimClr};
use crate::Result;

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

/// Features `[M, feature_dim]` (fp32, on `device`) of `samples`, in order.
///
/// On a GPU the next batch is decoded on `pool` while the encoder runs this
/// one, as a PyTorch DataLoader's workers do, so the device does not wait
/// for the CPU. On the CPU the two would share the same cores, where the
/// encoder's OpenMP threads can stall while others hold them: 3,000 CIFAR-10
/// JPEGs through ResNet-18 on 2 cores took 21.1/19.6/20.1 s decoded in
/// turn and 21.2/24.2/19.9 s prefetched, alternating; so batches are
/// decoded in turn there.
pub fn extract_features<'a>(
    net: impl Into<FeatureNet<'a>>,
    samples: &[Sample],
    format: ViewFormat,
    batch_size: usize,
    device: Device,
    pool: &rayon::ThreadPool,
) -> Result<Tensor> {
    extract(net.into(), samples, format, batch_size, device, pool, device.is_cuda())
}

fn extract(
    net: FeatureNet,
    samples: &[Sample],
    format: ViewFormat,
    batch_size: usize,
    device: Device,
    pool: &rayon::ThreadPool,
    prefetch: bool,
) -> Result<Tensor> {
    let batches = samples.chunks(batch_size.max(1));
    let encoder = net.encoder.fold();
    let forward = |images: Pinned| {
        let images = images.upload();
        tch::no_grad(|| {
            let h = encoder.forward(&images).to_kind(Kind::Float);
            match net.head {
                None => h,
                Some((head, depth)) => head.forward_to(&h, depth, false),
            }
        })
    };
    let ready = |batch| center_batch(batch, format, pool).map(|images| Pinned::new(images, device));
    let chunks: Vec<Tensor> = if prefetch {
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || send_until_error(&sender, batches.map(ready)));
            receiver.into_iter().map(|images| images.map(forward)).collect::<Result<_>>()
        })?
    } else {
        batches.map(|batch| ready(batch).map(forward)).collect::<Result<_>>()?
    };
    Ok(Tensor::cat(&chunks, 0))
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
/// (test) split, computed once with the encoder frozen.
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
            train: extract_features(net, train, format, batch, device, pool)?,
            train_labels: labels(train, device),
            test: extract_features(net, test, format, batch, device, pool)?,
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
    fn prefetched_and_serial_extraction_agree_and_report_a_bad_file() {
        let store = tch::nn::VarStore::new(Device::Cpu);
        let encoder = ResNet::new(&store.root(), Arch::Resnet18, 0.125, Stem::Cifar);
        let mut samples = crate::data::synthetic::generate(10, 2, 16, 0).samples;
        let format = ViewFormat { size: 16, mean: [0.5; 3], std: [0.25; 3] };
        let pool = crate::data::loader::worker_pool(2).unwrap();
        let run =
            |samples: &[Sample], prefetch| extract((&encoder).into(), samples, format, 3, Device::Cpu, &pool, prefetch);
        let (serial, prefetched) = (run(&samples, false).unwrap(), run(&samples, true).unwrap());
        assert_eq!(serial.size(), vec![10, encoder.feature_dim()]);
        assert!(serial.equal(&prefetched));
        // A missing file in the third batch: both report it by name.
        samples[7].source = ImageSource::File("no/such/image.jpg".into());
        for prefetch in [false, true] {
            let error = run(&samples, prefetch).unwrap_err().to_string();
            assert!(error.contains("no/such/image.jpg"), "{error}");
        }
    }
}
