//! Batches of views, made on worker threads while the previous batch trains.
//!
//! A producer thread asks a rayon pool for each batch (read, decode, then
//! two views per image) and hands it over a bounded channel
//! (`data.prefetch_batches` deep), so input overlaps the training step and
//! a slow consumer holds the workers back rather than filling memory. A
//! view depends only on (seed, epoch, image index, view), never on thread
//! timing. The CPU path makes whole views on the workers; the hybrid path
//! makes only their geometry there (decode, crop, resize: what needs the
//! image itself) and sends 8-bit views to the device, where the pixel ops
//! run in batch as on the device path.
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::stream::{ShardList, Streamed, Streaming};
use super::{decode, Dataset, Sample, TrainingImage};
use crate::augment::{view_rng, Pipeline, ViewParams};
use crate::device::{Pinned, Staged};
use crate::model::EncoderSpec;
use crate::{Error, Result};
use image::RgbImage;

/// How a batch of views is laid out and normalised.
#[derive(Debug, Clone, Copy)]
pub struct ViewFormat {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ViewFormat {
    /// The format an encoder reads its images in: its `image_size` px,
    /// normalised with its `mean` and `std` (embedding and evaluation).
    pub fn of_encoder(spec: &EncoderSpec) -> Self {
        Self { size: spec.image_size, mean: spec.mean, std: spec.std }
    }

    fn floats(&self) -> usize {
        3 * (self.size * self.size) as usize
    }

    /// Packs `count` normalised CHW images into a `[count, 3, size, size]` tensor.
    #[cfg(test)]
    fn tensor(&self, data: &[f32], count: usize) -> Tensor {
        let side = i64::from(self.size);
        Tensor::from_slice(data).view([count as i64, 3, side, side])
    }
}

/// (x - mean) / std per channel of `[n, 3, h, w]` batches in [0, 1], with
/// mean and std put on the batches' device once, not with every batch.
struct Normalization {
    mean: Tensor,
    std: Tensor,
}

impl Normalization {
    fn new(format: ViewFormat, device: tch::Device) -> Self {
        let column = |values: [f32; 3]| Tensor::from_slice(&values).to_device(device).view([1, 3, 1, 1]);
        Self { mean: column(format.mean), std: column(format.std) }
    }

    fn apply(&self, images: &Tensor) -> Tensor {
        (images - &self.mean) / &self.std
    }
}

/// The epoch's image order: a permutation of `0..len` seeded by (seed, epoch).
pub(crate) fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let seed = crate::augment::splitmix64(seed ^ crate::augment::splitmix64(epoch));
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order
}

fn check_batch_size(dataset: &Dataset, batch_size: usize) -> Result<()> {
    if dataset.len() < batch_size {
        return Err(Error::InvalidArgument(format!(
            "a batch of {batch_size} images (train.batch_size, or --batch-size) is larger than the {} images of {}",
            dataset.len(),
            dataset.origin.display()
        )));
    }
    Ok(())
}

/// Which part of every global batch this process makes: rank r of w takes
/// images r·N/w..(r+1)·N/w of each batch of N, so w processes together make
/// the one-process batches (the views of an image do not depend on who
/// makes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { rank: 0, world: 1 }
    }
}

impl Shard {
    /// This rank's part of a global batch's image indices.
    pub fn of<'a>(&self, batch: &'a [usize]) -> &'a [usize] {
        let part = batch.len() / self.world;
        &batch[self.rank * part..(self.rank + 1) * part]
    }
}

/// A batch of views and the images they were made from.
pub struct Batch {
    /// `[2N, 3, size, size]`: rows 0..N the first view of each image, N..2N
    /// the second, in the same order.
    pub views: Tensor,
    /// The dataset index of each row pair's image, where supervised training
    /// reads its classes: under the skip policy, that of the image which
    /// stood in for an unreadable one.
    pub images: Vec<usize>,
}

/// Where the trainer's views are made (`augment.backend`).
pub enum Views {
    Cpu(ViewLoader),
    Device(DeviceViewLoader),
}

impl Views {
    /// Full batches per epoch; the remainder is dropped, as in the paper's code.
    pub fn batches_per_epoch(&self) -> usize {
        match self {
            Views::Cpu(loader) => loader.batches_per_epoch(),
            Views::Device(loader) => loader.batches_per_epoch(),
        }
    }

    /// The shards streamed (the CPU loader's); `None` when read by index.
    pub fn streamed_shards(&self) -> Option<&ShardList> {
        match self {
            Views::Cpu(loader) => loader.stream.as_ref().map(|streaming| &streaming.shards),
            Views::Device(_) => None,
        }
    }

    /// Makes only `shard`'s part of every batch.
    pub fn sharded(mut self, shard: Shard) -> Self {
        match &mut self {
            Views::Cpu(loader) => loader.shard = shard,
            Views::Device(loader) => loader.shard = shard,
        }
        self
    }

    /// The batches of `epoch` from batch `first` on, their views on the
    /// training device (with a shard of w, its part: `[2N/w, ...]`).
    pub fn epoch(&self, epoch: u64, first: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        match self {
            Views::Cpu(loader) => Box::new(loader.epoch(epoch, first)),
            Views::Device(loader) => loader.epoch(epoch, first),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Views::Cpu(loader) if loader.hybrid.is_some() => "hybrid",
            Views::Cpu(_) => "cpu",
            Views::Device(_) => "device",
        }
    }
}

/// The device path: every decoded image kept on the training device as one
/// `[len, 3, h, w]` uint8 tensor (CIFAR-10's 50,000 images are 154 MB), each
/// batch augmented there with [`Pipeline::render_batch`]. Parameters are
/// drawn on the host from the same [`view_rng`] as the CPU path, so both
/// backends make the same views up to interpolation details.
pub struct DeviceViewLoader {
    renderer: Renderer,
    /// The sample each row of the images on the device holds: its own, or
    /// under the skip policy the one read in its place
    /// ([`Dataset::training_image`]).
    sources: Arc<Vec<usize>>,
    len: usize,
    batch_size: usize,
    shard: Shard,
    /// Whether batches are made a step ahead on a thread of their own (see
    /// [`DeviceBatches`]).
    ahead: bool,
}

/// What makes a batch's views: the images on the device and the pipeline.
struct Renderer {
    images: Tensor,
    width: u32,
    height: u32,
    pipeline: Pipeline,
    normalization: Normalization,
    seed: u64,
    /// Whether both views render as one batch of 2N, so that each op runs
    /// once per step rather than once per view: where the views draw from
    /// the same ops, on a GPU. There every small kernel costs a launch
    /// whatever the batch, and the CIFAR pipeline issues 783 ATen ops, 218
    /// of them kernels, per batch (`tools/bench/count_ops.sh augment`, 256 views
    /// on the CPU; PyTorch's batched version 377 and 136). Timed on CPU tensors,
    /// one batch of 512 views took 0.85 times as long as two of 256 at 8x8
    /// pixels, where dispatch is most of the cost, as on a GPU; but 1.2
    /// times as long at 32x32, where the larger batch leaves the CPU's cache.
    together: bool,
}

/// What [`DeviceViewLoader::load`] found.
pub enum DeviceData {
    Ready(DeviceViewLoader),
    /// The images cannot live on the device as one tensor; says why.
    Unsuitable(String),
}

impl DeviceViewLoader {
    /// Decodes every training image on the pool (under the dataset's
    /// bad-image policy) and moves them to `device` as one tensor, if they
    /// all have one size and take at most `byte_limit` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        dataset: &Dataset,
        pipeline: Pipeline,
        format: ViewFormat,
        batch_size: usize,
        seed: u64,
        device: tch::Device,
        pool: &rayon::ThreadPool,
        byte_limit: usize,
    ) -> Result<DeviceData> {
        check_batch_size(dataset, batch_size)?;
        let Some(first) = dataset.samples.first() else {
            return Ok(DeviceData::Unsuitable("no images".to_owned()));
        };
        let (width, height) = first.image()?.dimensions();
        let bytes = dataset.len() * (width * height * 3) as usize;
        if bytes > byte_limit {
            return Ok(DeviceData::Unsuitable(format!(
                "{} images of {width}x{height} take {bytes} bytes, more than the {byte_limit} kept on the device",
                dataset.len()
            )));
        }
        let plane = (width * height * 3) as usize;
        let mut pixels = vec![0u8; bytes];
        // Each image is copied into place, or named when its size differs.
        let read: Vec<std::result::Result<usize, String>> = pool.install(|| {
            pixels
                .par_chunks_mut(plane)
                .enumerate()
                .map(|(index, out)| {
                    let read = dataset.training_image(index)?;
                    if read.image.dimensions() != (width, height) {
                        let (w, h) = read.image.dimensions();
                        return Ok(Err(format!(
                            "{} is {w}x{h}, {} is {width}x{height}",
                            dataset.samples[read.index].describe(read.index),
                            dataset.samples[0].describe(0)
                        )));
                    }
                    out.copy_from_slice(read.image.as_raw());
                    Ok(Ok(read.index))
                })
                .collect::<Result<_>>()
        })?;
        let sources = match read.into_iter().collect() {
            Ok(sources) => Arc::new(sources),
            Err(reason) => return Ok(DeviceData::Unsuitable(format!("the images differ in size: {reason}"))),
        };
        let images = crate::augment::uint8_batch(&pixels, dataset.len(), width, height).to_device(device);
        let together = pipeline.is_symmetric() && device.is_cuda();
        let normalization = Normalization::new(format, device);
        let renderer = Renderer { images, width, height, pipeline, normalization, seed, together };
        let (len, shard, ahead) = (dataset.len(), Shard::default(), device.is_cuda());
        Ok(DeviceData::Ready(Self { renderer, sources, len, batch_size, shard, ahead }))
    }

    /// Whether batches are made a step ahead on a thread of their own
    /// (default: on a GPU; see `DeviceBatches`); the batches are the same
    /// either way.
    pub fn ahead(mut self, ahead: bool) -> Self {
        self.ahead = ahead;
        self
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.len / self.batch_size
    }

    /// The batches of `epoch` from batch `first` on.
    fn epoch(&self, epoch: u64, first: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let plan = EpochPlan {
            order: epoch_order(self.len, self.renderer.seed, epoch),
            epoch,
            batch_size: self.batch_size,
            shard: self.shard,
            sources: self.sources.clone(),
        };
        let batches = first..self.batches_per_epoch();
        match self.ahead {
            false => Box::new(batches.map(move |batch| Ok(plan.make(&self.renderer, batch)))),
            true => {
                let plan = Some(plan);
                Box::new(DeviceBatches { renderer: &self.renderer, plan, batches, handed_first: false, thread: None })
            }
        }
    }
}

impl Renderer {
    /// Another handle on the same tensors, for another thread.
    fn handle(&self) -> Self {
        let normalization = Normalization {
            mean: self.normalization.mean.shallow_clone(),
            std: self.normalization.std.shallow_clone(),
        };
        Self { images: self.images.shallow_clone(), pipeline: self.pipeline.clone(), normalization, ..*self }
    }

    /// Rows 0..N the first view of each image, N..2N the second, normalised.
    fn two_views(&self, indices: &[usize], epoch: u64) -> Tensor {
        let [first, second] = [0, 1].map(|view| self.view_params(view, indices, epoch));
        let index: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let select =
            |rows: &[i64]| self.images.index_select(0, &crate::device::upload_slice(rows, self.images.device()));
        let views = if self.together {
            self.pipeline
                .render_batch(&select(&[index.as_slice(), index.as_slice()].concat()), &[first, second].concat())
        } else {
            let images = select(&index);
            Tensor::cat(&[first, second].map(|params| self.pipeline.render_batch(&images, &params)), 0)
        };
        self.normalization.apply(&views)
    }

    /// The parameters of `view` of each image, from the image's own stream.
    fn view_params(&self, view: usize, indices: &[usize], epoch: u64) -> Vec<ViewParams> {
        indices
            .iter()
            .map(|&i| {
                let mut rng = view_rng(self.seed, epoch, i as u64, view as u64);
                self.pipeline.sample(view, self.width, self.height, &mut rng)
            })
            .collect()
    }
}

/// Which images each of an epoch's batches holds on this process.
struct EpochPlan {
    order: Vec<usize>,
    epoch: u64,
    batch_size: usize,
    shard: Shard,
    sources: Arc<Vec<usize>>,
}

impl EpochPlan {
    fn make(&self, renderer: &Renderer, batch: usize) -> Batch {
        let indices = self.shard.of(&self.order[batch * self.batch_size..(batch + 1) * self.batch_size]);
        let images = indices.iter().map(|&index| self.sources[index]).collect();
        Batch { views: renderer.two_views(indices, self.epoch), images }
    }
}

/// The device path's batches, each made while the step before it is queued.
///
/// A device batch costs the host its parameters' draws and a few hundred
/// ATen calls, each queueing a kernel. Made on the training thread between
/// steps, the GPU waits for them: 27-30% of the `cifar10-fast` preset's
/// time on an H200 (`benchmarks/h200-2026-12-04`). Here a thread of its own
/// queues each batch's augmentation while the training thread queues the
/// step before, on the same stream (each thread's current one, the
/// default), so the kernels run in the order queued and a batch needs no
/// event to be ready when its step reads it. Batches are the same as made
/// inline, op for op.
///
/// The first batch is made on the caller's thread, and the thread starts at
/// the second: a run's first step may capture a CUDA graph
/// (`train.cuda_graph`), and while a capture runs no other thread may
/// allocate device memory. A panic in the thread (tch's failed ops) is
/// resumed on the caller's, as if the batch had been made there.
struct DeviceBatches<'a> {
    renderer: &'a Renderer,
    /// Until the thread takes it.
    plan: Option<EpochPlan>,
    /// The batches not yet handed over.
    batches: std::ops::Range<usize>,
    /// Whether the first has been (on the caller's thread).
    handed_first: bool,
    thread: Option<(Receiver<std::thread::Result<Batch>>, JoinHandle<()>)>,
}

impl Iterator for DeviceBatches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.batches.next()?;
        if !self.handed_first {
            self.handed_first = true;
            return Some(Ok(self.plan.as_ref().expect("not yet taken").make(self.renderer, batch)));
        }
        if let Some(plan) = self.plan.take() {
            if let Err(error) = self.start(plan, batch) {
                self.batches = 0..0;
                return Some(Err(error));
            }
        }
        let (receiver, _) = self.thread.as_ref().expect("started");
        match receiver.recv() {
            Ok(Ok(made)) => Some(Ok(made)),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Some(Err(Error::Workers("the device augmentation's thread stopped early".to_owned()))),
        }
    }
}

impl DeviceBatches<'_> {
    /// Starts the thread that makes batch `from` and the ones after it.
    fn start(&mut self, plan: EpochPlan, from: usize) -> Result<()> {
        let renderer = self.renderer.handle();
        let batches = from..self.batches.end;
        let (sender, receiver) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("simclr-device-views".to_owned())
            .spawn(move || {
                let made = batches.map(|batch| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.make(&renderer, batch)))
                });
                send_until_error(&sender, made);
            })
            .map_err(|e| Error::Workers(format!("cannot start the device augmentation's thread: {e}")))?;
        self.thread = Some((receiver, thread));
        Ok(())
    }
}

impl Drop for DeviceBatches<'_> {
    /// Stops the thread (closing the channel ends its next send) and waits
    /// for it, so that no batch is queued after the epoch.
    fn drop(&mut self) {
        if let Some((receiver, thread)) = self.thread.take() {
            drop(receiver);
            let _ = thread.join();
        }
    }
}

/// A pool of `workers` threads (0 = one per core).
pub fn worker_pool(workers: usize) -> Result<Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("simclr-data-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Workers(format!("cannot start {workers} threads: {e}")))
}

/// Yields, for each epoch, shuffled batches of 2N views: rows 0..N are the
/// first view of each image and rows N..2N the second, in the same order.
pub struct ViewLoader {
    dataset: Arc<Dataset>,
    pipeline: Arc<Pipeline>,
    format: ViewFormat,
    batch_size: usize,
    seed: u64,
    pool: Arc<rayon::ThreadPool>,
    device: tch::Device,
    shard: Shard,
    /// Decode JPEGs smaller where the views allow ([`Pipeline::reduction`]).
    reduced_decode: bool,
    /// Batches made ahead of the one training.
    prefetch: usize,
    /// The hybrid path: the pixel ops run on `device`, with this normalisation.
    hybrid: Option<Normalization>,
    /// Streaming shards through shuffle buffers of this many samples.
    stream: Option<Streaming>,
}

impl ViewLoader {
    /// Batches for `device`: for a GPU the workers write them into
    /// page-locked memory, sent without waiting for it (see [`Staged`]).
    pub fn new(
        dataset: Arc<Dataset>,
        pipeline: Pipeline,
        format: ViewFormat,
        batch_size: usize,
        seed: u64,
        pool: Arc<rayon::ThreadPool>,
        device: tch::Device,
    ) -> Result<Self> {
        check_batch_size(&dataset, batch_size)?;
        Ok(Self {
            dataset,
            pipeline: Arc::new(pipeline),
            format,
            batch_size,
            seed,
            pool,
            device,
            shard: Shard::default(),
            reduced_decode: true,
            prefetch: 2,
            hybrid: None,
            stream: None,
        })
    }

    /// Streams the dataset's shards as `streaming` says (see
    /// [`super::stream`]), instead of reading by index.
    pub fn streaming(mut self, streaming: Streaming) -> Self {
        self.stream = Some(streaming);
        self
    }

    /// The hybrid path: workers make 8-bit geometry, `device` the rest.
    pub fn hybrid(mut self) -> Self {
        self.hybrid = Some(Normalization::new(self.format, self.device));
        self
    }

    /// Whether JPEGs may be decoded at a reduced scale (default true).
    pub fn reduced_decode(mut self, reduced: bool) -> Self {
        self.reduced_decode = reduced;
        self
    }

    /// How many batches are made ahead (at least 1; default 2).
    pub fn prefetch(mut self, batches: usize) -> Self {
        self.prefetch = batches.max(1);
        self
    }

    /// Full batches per epoch; the remainder is dropped, as in the paper's
    /// code. Streaming, as many as the fewest images a deal of the shards
    /// can give one process allow (see [`super::stream`]).
    pub fn batches_per_epoch(&self) -> usize {
        match &self.stream {
            None => self.dataset.len() / self.batch_size,
            Some(streaming) => streaming.shards.least_share(self.shard.world) / (self.batch_size / self.shard.world),
        }
    }

    /// The epoch's image order: a permutation seeded by (seed, epoch).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        epoch_order(self.dataset.len(), self.seed, epoch)
    }

    /// The batches of `epoch` from batch `first` on (to resume mid-epoch).
    pub fn epoch(&self, epoch: u64, first: usize) -> Batches<'_> {
        let (sender, receiver) = sync_channel(self.prefetch);
        let (dataset, pipeline, pool) = (self.dataset.clone(), self.pipeline.clone(), self.pool.clone());
        let (format, batch_size, device, shard) = (self.format, self.batch_size, self.device, self.shard);
        let make = Make { seed: self.seed, epoch, reduced_decode: self.reduced_decode };
        let hybrid = self.hybrid.is_some();
        let batches = self.batches_per_epoch();
        let per_process = batch_size / shard.world;
        let mut inputs: Box<dyn Iterator<Item = Input> + Send> = match &self.stream {
            None => {
                let order = self.order(epoch);
                let parts: Vec<Input> = order
                    .chunks_exact(batch_size)
                    .take(batches)
                    .flat_map(|batch| shard.of(batch).iter().map(|&index| Input::Index(index)))
                    .collect();
                Box::new(parts.into_iter())
            }
            Some(streaming) => Box::new(streaming.epoch(shard, self.seed, epoch).map(Input::Streamed)),
        };
        let producer = std::thread::spawn(move || {
            // Resumed mid-epoch: the batches before `first` are passed over unread.
            inputs.by_ref().take(first * per_process).for_each(drop);
            let views = (first..batches).map(|_| {
                let batch: Vec<Input> = inputs.by_ref().take(per_process).collect();
                if batch.len() < per_process {
                    // Streams deliver what the shards' index counted when
                    // they opened; fewer means the shards changed since.
                    return Err(Error::Dataset {
                        path: dataset.origin.clone(),
                        message: "the shards hold fewer images than when the run opened them".to_owned(),
                    });
                }
                // The workers write each batch where it is uploaded from.
                let (views, side) = (2 * batch.len() as i64, i64::from(pipeline.size()));
                pool.install(|| {
                    if hybrid {
                        let mut pixels = Staged::new(&[views, side, side, 3], Kind::Uint8, device)?;
                        let (params, images) =
                            two_geometries(&dataset, &pipeline, make, &batch, pixels.as_mut_slice())?;
                        Ok((Prepared::Geometry(pixels.into_pinned(), params), images))
                    } else {
                        let mut data = Staged::new(&[views, 3, side, side], Kind::Float, device)?;
                        let images = two_views(&dataset, &pipeline, format, make, &batch, data.as_mut_slice())?;
                        Ok((Prepared::Views(data.into_pinned()), images))
                    }
                })
            });
            send_until_error(&sender, views);
        });
        Batches { receiver, producer: Some(producer), loader: self }
    }
}

/// Where a sample of a batch comes from.
enum Input {
    /// Read by its index in the dataset.
    Index(usize),
    /// Delivered by a shard stream.
    Streamed(Streamed),
}

/// What a batch's views are a function of, besides the image.
#[derive(Debug, Clone, Copy)]
struct Make {
    seed: u64,
    epoch: u64,
    reduced_decode: bool,
}

/// The two views of image `index` up to their geometry ([`Pipeline::geometry`]),
/// with their parameters; the image decoded as small as they allow. Also
/// the index of the sample read (see [`Batch::images`]).
fn geometries(
    dataset: &Dataset,
    pipeline: &Pipeline,
    make: Make,
    input: &Input,
) -> Result<(usize, [(RgbImage, ViewParams); 2])> {
    let index = match input {
        Input::Index(index) => *index,
        Input::Streamed(sample) => sample.index,
    };
    let draw = |width, height| {
        [0, 1].map(|view| {
            let mut rng = view_rng(make.seed, make.epoch, index as u64, view as u64);
            pipeline.sample(view, width, height, &mut rng)
        })
    };
    let reduction = |width, height| match make.reduced_decode {
        true => pipeline.reduction(&draw(width, height), width, height),
        false => 1,
    };
    let read = match input {
        Input::Index(index) => dataset.training_image_reduced(*index, &reduction)?,
        Input::Streamed(sample) => {
            let decoded = match &sample.bytes {
                Ok(bytes) => decode::decode_for(bytes, &sample.path, &reduction),
                Err(message) => Err(Error::Image { path: sample.path.clone(), message: message.clone() }),
            };
            match decoded {
                Ok((image, size)) => TrainingImage { index, image, size },
                Err(error) => dataset.instead_of(index, error, &reduction)?,
            }
        }
    };
    let (width, height) = read.size;
    let views = draw(width, height).map(|params| (pipeline.geometry(&read.image, &params, width, height), params));
    Ok((read.index, views))
}

/// A producer thread's loop: sends `items` in turn, and stops after the
/// first error (or panic caught), or when the channel is closed (the
/// consumer stopped early: nothing more to do).
fn send_until_error<T, E>(
    sender: &SyncSender<std::result::Result<T, E>>,
    items: impl Iterator<Item = std::result::Result<T, E>>,
) {
    for item in items {
        let failed = item.is_err();
        if sender.send(item).is_err() || failed {
            return;
        }
    }
}

/// Hands each of `items` to `consume`, in order, until either fails. With
/// `prefetch`, items are made on a thread of their own, one ahead of the one
/// consumed (a GPU then computes while the CPU prepares the next batch);
/// without, in turn on the caller's thread.
pub fn pipelined<T: Send>(
    prefetch: bool,
    items: impl Iterator<Item = Result<T>> + Send,
    mut consume: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    if !prefetch {
        let mut items = items;
        return items.try_for_each(|item| consume(item?));
    }
    std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel(1);
        scope.spawn(move || send_until_error(&sender, items));
        receiver.into_iter().try_for_each(|item| consume(item?))
    })
}

/// The CPU path's batch written into `data`: normalised CHW floats, first
/// views then second views; and the samples read.
fn two_views(
    dataset: &Dataset,
    pipeline: &Pipeline,
    format: ViewFormat,
    make: Make,
    inputs: &[Input],
    data: &mut [f32],
) -> Result<Vec<usize>> {
    let per_view = format.floats();
    assert_eq!(data.len(), 2 * inputs.len() * per_view, "two views per input");
    let (first, second) = data.split_at_mut(inputs.len() * per_view);
    let images = first
        .par_chunks_mut(per_view)
        .zip(second.par_chunks_mut(per_view))
        .zip(inputs.par_iter())
        .map(|((out_a, out_b), input)| -> Result<usize> {
            let (image, views) = geometries(dataset, pipeline, make, input)?;
            for ((geometry, params), out) in views.iter().zip([out_a, out_b]) {
                pipeline.finish(geometry, params).write_chw_normalized(format.mean, format.std, out);
            }
            Ok(image)
        })
        .collect::<Result<_>>()?;
    Ok(images)
}

/// The hybrid path's batch written into `pixels`: 8-bit HWC geometries,
/// first views then second views; the parameters that the device applies
/// to them, and the samples read.
fn two_geometries(
    dataset: &Dataset,
    pipeline: &Pipeline,
    make: Make,
    inputs: &[Input],
    pixels: &mut [u8],
) -> Result<(Vec<ViewParams>, Vec<usize>)> {
    let side = pipeline.size() as usize;
    let per_view = 3 * side * side;
    assert_eq!(pixels.len(), 2 * inputs.len() * per_view, "two views per input");
    let (first, second) = pixels.split_at_mut(inputs.len() * per_view);
    let read: Vec<(usize, [ViewParams; 2])> = first
        .par_chunks_mut(per_view)
        .zip(second.par_chunks_mut(per_view))
        .zip(inputs.par_iter())
        .map(|((out_a, out_b), input)| -> Result<(usize, [ViewParams; 2])> {
            let (image, [(a, params_a), (b, params_b)]) = geometries(dataset, pipeline, make, input)?;
            out_a.copy_from_slice(a.as_raw());
            out_b.copy_from_slice(b.as_raw());
            Ok((image, [params_a, params_b]))
        })
        .collect::<Result<_>>()?;
    let (images, params): (Vec<usize>, Vec<[ViewParams; 2]>) = read.into_iter().unzip();
    let (firsts, seconds): (Vec<ViewParams>, Vec<ViewParams>) = params.into_iter().map(|[a, b]| (a, b)).unzip();
    Ok(([firsts, seconds].concat(), images))
}

/// A batch as the producer hands it over.
enum Prepared {
    /// Finished views (the CPU path).
    Views(Pinned),
    /// Geometry and parameters, for the device to finish (the hybrid path).
    Geometry(Pinned, Vec<ViewParams>),
}

/// The batches of one epoch, their views `[2N, 3, size, size]` float
/// tensors on the loader's device.
pub struct Batches<'a> {
    receiver: Receiver<Result<(Prepared, Vec<usize>)>>,
    producer: Option<JoinHandle<()>>,
    loader: &'a ViewLoader,
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Ok(batch) => Some(batch.map(|(prepared, images)| {
                let views = match (prepared, &self.loader.hybrid) {
                    (Prepared::Views(views), _) => views.upload(),
                    (Prepared::Geometry(views, params), Some(normalization)) => {
                        normalization.apply(&self.loader.pipeline.render_pixels(&views.upload(), &params))
                    }
                    (Prepared::Geometry(..), None) => unreachable!("only the hybrid path sends geometry"),
                };
                Batch { views, images }
            })),
            Err(_) => {
                if let Some(producer) = self.producer.take() {
                    if producer.join().is_err() {
                        return Some(Err(Error::Workers("a worker thread panicked".to_owned())));
                    }
                }
                None
            }
        }
    }
}

/// One view per sample, made by `view(image, position in samples)` on the
/// pool, as one `[len, 3, size, size]` tensor bound for `device`; an
/// unreadable image's error (the first in order) ends it.
pub fn map_batch(
    samples: &[Sample],
    format: ViewFormat,
    pool: &rayon::ThreadPool,
    device: tch::Device,
    view: impl Fn(&image::RgbImage, usize) -> crate::augment::FloatImage + Sync,
) -> Result<Pinned> {
    let batch = map_readable(samples, format, pool, device, view)?;
    match batch.unreadable.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(batch.images),
    }
}

/// The views of the readable images among a batch's samples.
pub struct ReadableBatch {
    /// `[read.len(), 3, size, size]`, ready to go to the device.
    pub images: Pinned,
    /// The positions in the samples of the images read, in order.
    pub read: Vec<usize>,
    /// Why each of the others could not be read, in order.
    pub unreadable: Vec<Error>,
}

/// [`map_batch`] of the images of `samples` that can be read; the others
/// are left out and returned with their errors. The workers write the views
/// where they are uploaded from ([`Staged`]), as the training batches' are:
/// 154 MB of floats for 256 images at 224 px, twice the hybrid batch whose
/// copies into a new tensor and into page-locked memory took 52-67 ms and
/// 15 ms of one thread on the CPU machine.
pub fn map_readable(
    samples: &[Sample],
    format: ViewFormat,
    pool: &rayon::ThreadPool,
    device: tch::Device,
    view: impl Fn(&image::RgbImage, usize) -> crate::augment::FloatImage + Sync,
) -> Result<ReadableBatch> {
    let per_image = format.floats();
    let side = i64::from(format.size);
    let mut data = Staged::new(&[samples.len() as i64, 3, side, side], Kind::Float, device)?;
    let outcomes: Vec<Result<()>> = pool.install(|| {
        data.as_mut_slice::<f32>()
            .par_chunks_mut(per_image)
            .zip(samples.par_iter())
            .enumerate()
            .map(|(position, (out, sample))| {
                view(&*sample.image()?, position).write_chw_normalized(format.mean, format.std, out);
                Ok(())
            })
            .collect()
    });
    let (mut read, mut unreadable) = (Vec::new(), Vec::new());
    for (position, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(()) => read.push(position),
            Err(error) => unreadable.push(error),
        }
    }
    let images = match unreadable.is_empty() {
        true => data.into_pinned(),
        // The rows of the unreadable images were never written.
        false => data.rows(&read),
    };
    Ok(ReadableBatch { images, read, unreadable })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{center_view, AugmentConfig};

    fn format() -> ViewFormat {
        ViewFormat { size: 16, mean: [0.5; 3], std: [0.25; 3] }
    }

    /// The ImageNet preset: crop, flip, colour distortion, grayscale and blur.
    fn pipeline() -> Pipeline {
        Pipeline::new(&AugmentConfig::default(), 16)
    }

    fn loader(workers: usize) -> ViewLoader {
        let dataset = Arc::new(super::super::synthetic::generate(12, 3, 16, 0));
        ViewLoader::new(dataset, pipeline(), format(), 4, 9, worker_pool(workers).unwrap(), tch::Device::Cpu).unwrap()
    }

    /// `dataset` on the device path (on the CPU), seeded as [`loader`] is.
    fn on_device(dataset: &Dataset, batch_size: usize) -> DeviceViewLoader {
        let pool = worker_pool(1).unwrap();
        match DeviceViewLoader::load(dataset, pipeline(), format(), batch_size, 9, tch::Device::Cpu, &pool, usize::MAX)
            .unwrap()
        {
            DeviceData::Ready(loader) => loader,
            DeviceData::Unsuitable(reason) => panic!("{reason}"),
        }
    }

    #[test]
    fn pipelined_items_arrive_in_order_and_a_failure_on_either_side_stops_both() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for prefetch in [false, true] {
            let made = AtomicUsize::new(0);
            let items = || {
                (0..100).map(|item| {
                    made.fetch_add(1, Ordering::SeqCst);
                    match item {
                        50 => Err(Error::Workers("item 50".to_owned())),
                        item => Ok(item),
                    }
                })
            };
            // All of them, in order, up to the producer's error.
            let mut seen = Vec::new();
            let error = pipelined(prefetch, items(), |item| {
                seen.push(item);
                Ok(())
            });
            assert!(error.unwrap_err().to_string().contains("item 50"));
            assert_eq!(seen, (0..50).collect::<Vec<_>>(), "prefetch {prefetch}");
            // The consumer's error ends the producer too (no hang), at most
            // a couple of items ahead of it.
            made.store(0, Ordering::SeqCst);
            let error = pipelined(prefetch, items(), |item| match item {
                3 => Err(Error::Workers("consumer".to_owned())),
                _ => Ok(()),
            });
            assert!(error.unwrap_err().to_string().contains("consumer"));
            let made = made.load(Ordering::SeqCst);
            assert!((4..=6).contains(&made), "prefetch {prefetch}: {made} items made");
        }
    }

    #[test]
    fn batches_are_deterministic_whatever_the_worker_count() {
        let a: Vec<Tensor> = loader(1).epoch(3, 0).map(|b| b.unwrap().views).collect();
        let b: Vec<Tensor> = loader(2).epoch(3, 0).map(|b| b.unwrap().views).collect();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].size(), vec![8, 3, 16, 16]);
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y));
        }
        // Resuming at batch 1 gives the same batches 1 and 2.
        let resumed: Vec<Tensor> = loader(2).epoch(3, 1).map(|b| b.unwrap().views).collect();
        assert!(resumed[0].equal(&a[1]) && resumed[1].equal(&a[2]));
    }

    #[test]
    fn the_hybrid_path_makes_the_cpu_paths_batches() {
        // Same geometry, bit for bit; the pixel ops as tensor ops, which
        // match the CPU path's within float rounding (both within 1e-5 of
        // torchvision on [0, 1] pixels: 4e-5 after dividing by std 0.25).
        let hybrid = Views::Cpu(loader(2).hybrid());
        assert_eq!(hybrid.name(), "hybrid");
        let mut compared = 0;
        for (a, b) in loader(1).epoch(4, 0).zip(hybrid.epoch(4, 0)) {
            let (a, b) = (a.unwrap().views, b.unwrap().views);
            assert_eq!(a.size(), b.size());
            let worst = (&a - &b).abs().max().double_value(&[]);
            assert!(worst < 1e-4, "largest difference {worst}");
            compared += 1;
        }
        assert_eq!(compared, 3);
        // Negative control: another epoch's views are far off.
        let a = loader(1).epoch(4, 0).next().unwrap().unwrap().views;
        let b = hybrid.epoch(5, 0).next().unwrap().unwrap().views;
        assert!((a - b).abs().max().double_value(&[]) > 0.5);
    }

    #[test]
    fn the_device_backend_makes_nearly_the_same_batches() {
        // Same images, order and parameters; only interpolation differs
        // (8-bit resize and antialiasing on the CPU path).
        let host = loader(1);
        let device = Views::Device(on_device(&super::super::synthetic::generate(12, 3, 16, 0), 4));
        assert_eq!(device.batches_per_epoch(), 3);
        for (a, b) in host.epoch(2, 0).zip(device.epoch(2, 0)) {
            let (a, b) = (a.unwrap().views, b.unwrap().views);
            assert_eq!(a.size(), b.size());
            // On normalised values (std 0.25), measured over the 3 batches:
            // mean difference at most 0.0033, worst 0.057 (0.014 in pixels).
            let difference = (a - b).abs();
            let mean = difference.mean(Kind::Float).double_value(&[]);
            let worst = difference.max().double_value(&[]);
            assert!(mean < 0.006 && worst < 0.08, "mean difference {mean}, worst {worst}");
        }
    }

    #[test]
    fn device_batches_made_ahead_on_a_thread_are_the_ones_made_inline() {
        let dataset = super::super::synthetic::generate(24, 3, 16, 0);
        let views = |ahead: bool, world: usize| {
            let shard = Shard { rank: world - 1, world };
            Views::Device(on_device(&dataset, 4).ahead(ahead)).sharded(shard)
        };
        let batches =
            |views: &Views, epoch, first| -> Vec<Batch> { views.epoch(epoch, first).collect::<Result<_>>().unwrap() };
        for (world, first) in [(1, 0), (1, 2), (2, 0)] {
            let (inline, ahead) = (views(false, world), views(true, world));
            let (a, b) = (batches(&inline, 3, first), batches(&ahead, 3, first));
            assert_eq!(a.len(), 6 - first);
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(a.images, b.images);
                assert!(a.views.equal(&b.views), "world {world}, from batch {first}: the views differ");
            }
            // The control: another epoch's batches are not these.
            let other = batches(&ahead, 4, first);
            assert!(!other[0].views.equal(&b[0].views) && other[0].images != b[0].images);
        }
        // Left mid-epoch (an interrupted run), the thread stops.
        let ahead = views(true, 1);
        assert_eq!(ahead.epoch(0, 0).take(3).count(), 3);
    }

    #[test]
    fn a_panic_on_the_device_augmentation_thread_reaches_the_caller() {
        let loader = on_device(&super::super::synthetic::generate(12, 3, 16, 0), 4);
        // Image 40 of 12: batch 1, the thread's first, cannot be made.
        let mut order: Vec<usize> = (0..12).collect();
        order[5] = 40;
        let plan =
            EpochPlan { order, epoch: 0, batch_size: 4, shard: Shard::default(), sources: loader.sources.clone() };
        let mut batches = DeviceBatches {
            renderer: &loader.renderer,
            plan: Some(plan),
            batches: 0..3,
            handed_first: false,
            thread: None,
        };
        assert!(batches.next().unwrap().is_ok());
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batches.next()))
            .err()
            .expect("batch 1 cannot be made");
        let message = panic.downcast_ref::<String>().expect("tch's message");
        assert!(message.contains("index out of range") || message.contains("out of bounds"), "{message}");
        drop(batches);
    }

    #[test]
    fn both_views_render_in_one_batch_as_they_would_apart() {
        let mut renderer = on_device(&super::super::synthetic::generate(12, 3, 16, 0), 4).renderer;
        assert!(renderer.pipeline.is_symmetric());
        // On the CPU the views render apart; a GPU would render them together.
        assert!(!renderer.together);
        let indices = [5, 0, 7, 3, 11, 2];
        let apart = renderer.two_views(&indices, 2);
        renderer.together = true;
        let together = renderer.two_views(&indices, 2);
        assert_eq!(together.size(), vec![12, 3, 16, 16]);
        let difference = (&together - &apart).abs().max().double_value(&[]);
        assert!(difference < 1e-5, "largest difference {difference}");
        assert!(!together.narrow(0, 0, 6).equal(&together.narrow(0, 6, 6)), "the two views differ");
    }

    #[test]
    fn images_of_different_sizes_stay_on_the_host() {
        let image = |side| super::super::ImageSource::Memory(Arc::new(image::RgbImage::new(side, side)));
        let samples = [16, 16, 20].map(|side| Sample { source: image(side), label: None }).to_vec();
        let dataset = Dataset::new(std::path::Path::new("mixed"), samples, Vec::new());
        let pool = worker_pool(1).unwrap();
        match DeviceViewLoader::load(&dataset, pipeline(), format(), 2, 0, tch::Device::Cpu, &pool, usize::MAX).unwrap()
        {
            DeviceData::Unsuitable(reason) => assert!(reason.contains("20x20") && reason.contains("16x16"), "{reason}"),
            DeviceData::Ready(_) => panic!("mixed sizes cannot share one tensor"),
        }
    }

    #[test]
    fn each_batch_names_the_images_its_views_were_made_from() {
        // By index: this rank's part of each batch of the epoch's order,
        // on every path.
        let order = loader(1).order(3);
        let dataset = super::super::synthetic::generate(12, 3, 16, 0);
        let (format, pipeline) = (format(), pipeline());
        for world in [1, 2] {
            for rank in 0..world {
                let shard = Shard { rank, world };
                let expected: Vec<Vec<usize>> = order.chunks_exact(4).map(|batch| shard.of(batch).to_vec()).collect();
                let device = on_device(&dataset, 4);
                for views in [Views::Cpu(loader(2)), Views::Cpu(loader(2).hybrid()), Views::Device(device)] {
                    let name = views.name();
                    let images: Vec<Vec<usize>> =
                        views.sharded(shard).epoch(3, 0).map(|batch| batch.unwrap().images).collect();
                    assert_eq!(images, expected, "{name}, rank {rank} of {world}");
                }
            }
        }

        // Streamed: whatever order the buffers give, the views of each image
        // named are the views made for it by index.
        let dir = tempfile::tempdir().unwrap();
        super::super::shards::write_shards(&dataset, dir.path(), 5).unwrap();
        let shards = Arc::new(Dataset::open(dir.path(), &super::super::config::DataFormat::Auto).unwrap());
        let list = super::super::stream::ShardList::of(&shards).expect("every sample is a shard member");
        let pool = worker_pool(2).unwrap();
        let streamed = ViewLoader::new(shards.clone(), pipeline.clone(), format, 4, 9, pool, tch::Device::Cpu)
            .unwrap()
            .streaming(Streaming { shards: list, readers: 2, buffer: 4 });
        let make = Make { seed: 9, epoch: 3, reduced_decode: true };
        let mut seen = Vec::new();
        for batch in streamed.epoch(3, 0) {
            let batch = batch.unwrap();
            let inputs: Vec<Input> = batch.images.iter().map(|&index| Input::Index(index)).collect();
            let mut data = vec![0f32; 2 * inputs.len() * format.floats()];
            let images = two_views(&shards, &pipeline, format, make, &inputs, &mut data).unwrap();
            assert_eq!(images, batch.images);
            assert!(batch.views.equal(&format.tensor(&data, 2 * inputs.len())), "images {:?}", batch.images);
            seen.extend(batch.images);
        }
        // Negative control: the buffers' order is not the order by index.
        let by_index: Vec<usize> = order.chunks_exact(4).flatten().copied().collect();
        assert_eq!(seen.len(), 12);
        assert_ne!(seen, by_index);
    }

    #[test]
    fn an_image_read_in_place_of_an_unreadable_one_is_named() {
        // Sample 2 of 6 is not an image: under the skip policy sample 3
        // stands in for it, so batches name 3 where the order has 2, and a
        // supervised step would take sample 3's class for its views.
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("broken.jpg");
        std::fs::write(&broken, b"not a jpeg").unwrap();
        let mut samples = super::super::synthetic::generate(6, 3, 16, 0).samples;
        samples[2].source = super::super::ImageSource::File(broken);
        let dataset = Dataset::new(std::path::Path::new("mixed"), samples, vec!["a".into(), "b".into(), "c".into()])
            .with_policy(super::super::config::BadImagePolicy::Skip);
        let stand_in = |index: usize| if index == 2 { 3 } else { index };
        let expected: Vec<usize> = epoch_order(6, 9, 0).into_iter().map(stand_in).collect();
        let device = on_device(&dataset, 6);
        let dataset = Arc::new(dataset);
        let host =
            ViewLoader::new(dataset.clone(), pipeline(), format(), 6, 9, worker_pool(1).unwrap(), tch::Device::Cpu)
                .unwrap();
        for views in [Views::Cpu(host), Views::Device(device)] {
            let batch = views.epoch(0, 0).next().unwrap().unwrap();
            assert_eq!(batch.images, expected, "{}", views.name());
        }
        assert_eq!(dataset.skipped().len(), 1, "{:?}", dataset.skipped());
    }

    #[test]
    fn centre_views_leave_out_unreadable_images_and_keep_the_others_rows() {
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("broken.jpg");
        std::fs::write(&broken, b"not a jpeg").unwrap();
        let samples = super::super::synthetic::generate(5, 3, 16, 0).samples;
        let pool = worker_pool(2).unwrap();
        let center_batch = |samples: &[Sample]| {
            map_readable(samples, format(), &pool, tch::Device::Cpu, |image, _| center_view(image, 16)).unwrap()
        };
        let all = center_batch(&samples);
        assert_eq!((all.read.clone(), all.unreadable.len()), (vec![0, 1, 2, 3, 4], 0));
        let all = all.images.upload();
        let mut mixed = samples.clone();
        mixed[1].source = super::super::ImageSource::File(broken.clone());
        mixed[3].source = super::super::ImageSource::File(broken);
        let some = center_batch(&mixed);
        assert_eq!(some.read, vec![0, 2, 4]);
        assert!(some.unreadable.iter().all(|error| error.to_string().contains("broken.jpg")));
        let some = some.images.upload();
        assert_eq!(some.size(), vec![3, 3, 16, 16]);
        assert!(some.equal(&all.index_select(0, &Tensor::from_slice(&[0i64, 2, 4]))));
        // The control: the rows kept are not the first three.
        assert!(!some.equal(&all.narrow(0, 0, 3)));
        let batch = map_batch(&mixed, format(), &pool, tch::Device::Cpu, |image, _| center_view(image, 16));
        assert!(batch.err().expect("stops at the first").to_string().contains("broken.jpg"));
    }

    #[test]
    fn epochs_differ_and_views_differ() {
        let l = loader(1);
        assert_ne!(l.order(0), l.order(1));
        let batch = l.epoch(0, 0).next().unwrap().unwrap().views;
        assert!(!batch.narrow(0, 0, 4).equal(&batch.narrow(0, 4, 4)));
    }
}
