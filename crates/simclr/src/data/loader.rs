//! Batches of views, made on worker threads while the previous batch trains.
//!
//! A producer thread asks a rayon pool for each batch (decode, then two
//! augmented views per image) and hands it over a channel two batches deep,
//! so decoding and augmentation overlap the training step. A view depends
//! only on (seed, epoch, image index, view), never on thread timing.
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::{Dataset, Sample};
use crate::augment::{center_view, view_rng, Pipeline};
use crate::{Error, Result};

/// How a batch of views is laid out and normalised.
#[derive(Debug, Clone, Copy)]
pub struct ViewFormat {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ViewFormat {
    fn floats(&self) -> usize {
        3 * (self.size * self.size) as usize
    }

    /// Packs `count` normalised CHW images into a `[count, 3, size, size]` tensor.
    fn tensor(&self, data: &[f32], count: usize) -> Tensor {
        let side = i64::from(self.size);
        Tensor::from_slice(data).view([count as i64, 3, side, side])
    }
}

/// A pool of `workers` threads (0 = one per core).
pub fn worker_pool(workers: usize) -> Result<Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("simclr-data-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::InvalidArgument(format!("cannot start {workers} data workers: {e}")))
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
}

impl ViewLoader {
    pub fn new(
        dataset: Arc<Dataset>,
        pipeline: Pipeline,
        format: ViewFormat,
        batch_size: usize,
        seed: u64,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        if dataset.len() < batch_size {
            return Err(Error::InvalidArgument(format!(
                "train.batch_size = {batch_size} is larger than the {} training images of {}",
                dataset.len(),
                dataset.origin.display()
            )));
        }
        Ok(Self { dataset, pipeline: Arc::new(pipeline), format, batch_size, seed, pool })
    }

    /// Full batches per epoch; the remainder is dropped, as in the paper's code.
    pub fn batches_per_epoch(&self) -> usize {
        self.dataset.len() / self.batch_size
    }

    /// The epoch's image order: a permutation seeded by (seed, epoch).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        let seed = crate::augment::splitmix64(self.seed ^ crate::augment::splitmix64(epoch));
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        order
    }

    /// The batches of `epoch` from batch `first` on (to resume mid-epoch).
    pub fn epoch(&self, epoch: u64, first: usize) -> Batches {
        let order = self.order(epoch);
        let (sender, receiver) = sync_channel(2);
        let (dataset, pipeline, pool) = (self.dataset.clone(), self.pipeline.clone(), self.pool.clone());
        let (format, batch_size, seed) = (self.format, self.batch_size, self.seed);
        let batches = self.batches_per_epoch();
        let producer = std::thread::spawn(move || {
            for batch in first..batches {
                let indices = &order[batch * batch_size..(batch + 1) * batch_size];
                let views = pool.install(|| two_views(&dataset, &pipeline, format, indices, seed, epoch));
                let failed = views.is_err();
                // A closed channel means the consumer stopped early: nothing to do.
                if sender.send(views).is_err() || failed {
                    return;
                }
            }
        });
        Batches { receiver, producer: Some(producer), format, images: batch_size }
    }
}

fn two_views(
    dataset: &Dataset,
    pipeline: &Pipeline,
    format: ViewFormat,
    indices: &[usize],
    seed: u64,
    epoch: u64,
) -> Result<Vec<f32>> {
    let per_view = format.floats();
    let mut data = vec![0f32; 2 * indices.len() * per_view];
    let (first, second) = data.split_at_mut(indices.len() * per_view);
    first.par_chunks_mut(per_view).zip(second.par_chunks_mut(per_view)).zip(indices.par_iter()).try_for_each(
        |((out_a, out_b), &index)| -> Result<()> {
            let image = dataset.training_image(index)?;
            for (view, out) in [(0, out_a), (1, out_b)] {
                let mut rng = view_rng(seed, epoch, index as u64, view);
                pipeline.view(&image, &mut rng).write_chw_normalized(format.mean, format.std, out);
            }
            Ok(())
        },
    )?;
    Ok(data)
}

/// The batches of one epoch, as `[2N, 3, size, size]` float tensors on the CPU.
pub struct Batches {
    receiver: Receiver<Result<Vec<f32>>>,
    producer: Option<JoinHandle<()>>,
    format: ViewFormat,
    images: usize,
}

impl Iterator for Batches {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Ok(batch) => Some(batch.map(|data| self.format.tensor(&data, 2 * self.images))),
            Err(_) => {
                if let Some(producer) = self.producer.take() {
                    if producer.join().is_err() {
                        return Some(Err(Error::InvalidArgument("a data worker panicked".to_owned())));
                    }
                }
                None
            }
        }
    }
}

/// One view per sample, made by `view(image, position in samples)` on the
/// pool, as one `[len, 3, size, size]` tensor.
pub fn map_batch(
    samples: &[Sample],
    format: ViewFormat,
    pool: &rayon::ThreadPool,
    view: impl Fn(&image::RgbImage, usize) -> crate::augment::FloatImage + Sync,
) -> Result<Tensor> {
    let per_image = format.floats();
    let mut data = vec![0f32; samples.len() * per_image];
    pool.install(|| {
        data.par_chunks_mut(per_image).zip(samples.par_iter()).enumerate().try_for_each(
            |(position, (out, sample))| -> Result<()> {
                view(&*sample.image()?, position).write_chw_normalized(format.mean, format.std, out);
                Ok(())
            },
        )
    })?;
    Ok(format.tensor(&data, samples.len()).to_kind(Kind::Float))
}

/// Centre views of `samples` (see [`center_view`]), as one tensor.
pub fn center_batch(samples: &[Sample], format: ViewFormat, pool: &rayon::ThreadPool) -> Result<Tensor> {
    map_batch(samples, format, pool, |image, _| center_view(image, format.size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::AugmentConfig;

    fn loader(workers: usize) -> ViewLoader {
        let dataset = Arc::new(super::super::synthetic::generate(12, 3, 16, 0));
        let format = ViewFormat { size: 16, mean: [0.5; 3], std: [0.25; 3] };
        let pipeline = Pipeline::new(AugmentConfig::default(), 16);
        ViewLoader::new(dataset, pipeline, format, 4, 9, worker_pool(workers).unwrap()).unwrap()
    }

    #[test]
    fn batches_are_deterministic_whatever_the_worker_count() {
        let a: Vec<Tensor> = loader(1).epoch(3, 0).map(|b| b.unwrap()).collect();
        let b: Vec<Tensor> = loader(2).epoch(3, 0).map(|b| b.unwrap()).collect();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].size(), vec![8, 3, 16, 16]);
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y));
        }
        // Resuming at batch 1 gives the same batches 1 and 2.
        let resumed: Vec<Tensor> = loader(2).epoch(3, 1).map(|b| b.unwrap()).collect();
        assert!(resumed[0].equal(&a[1]) && resumed[1].equal(&a[2]));
    }

    #[test]
    fn epochs_differ_and_views_differ() {
        let l = loader(1);
        assert_ne!(l.order(0), l.order(1));
        let batch = l.epoch(0, 0).next().unwrap().unwrap();
        assert!(!batch.narrow(0, 0, 4).equal(&batch.narrow(0, 4, 4)));
    }
}
