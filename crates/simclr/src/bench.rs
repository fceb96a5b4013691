//! `simclr bench`: throughput of a training step and of the encoder's
//! forward pass on random inputs, so data loading is left out and the
//! numbers compare directly with a PyTorch script on the same device.
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};

use crate::loss::LossConfig;
use crate::model::ModelConfig;
use crate::model::SimClr;
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: ModelConfig,
    /// Images per step (2x views go through the network).
    pub batch_size: usize,
    pub image_size: u32,
    pub steps: usize,
    pub warmup_steps: usize,
    pub device: Device,
    pub mixed_precision: bool,
    /// The update of each training step (LARS by default, as the paper's).
    pub optimizer: OptimizerKind,
    /// Also time the training step captured as a CUDA graph and replayed,
    /// through the shim library at this path (see [`crate::cuda_graph`]).
    pub cuda_graph: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub arch: String,
    pub batch_size: usize,
    pub image_size: u32,
    pub steps: usize,
    pub optimizer: &'static str,
    /// Training images per second (each image is two views through f, g,
    /// NT-Xent, backward and an optimiser step).
    pub train_images_per_second: f64,
    pub train_ms_per_step: f64,
    /// Median time the host takes to issue one training step, from an idle
    /// device until the step's last kernel is queued. On a GPU, a value
    /// close to `train_ms_per_step` means the step is bound by launching
    /// kernels (the host), a much smaller one that it is bound by running
    /// them (the device). On the CPU the step runs as it is issued, so the
    /// two agree.
    pub train_issue_ms: f64,
    /// Encoder forward images per second (eval mode, BatchNorm folded, no gradients).
    pub forward_images_per_second: f64,
    /// The training step captured as a CUDA graph and replayed, where asked
    /// for: the same kernels with no launch overhead, so the floor under
    /// `train_ms_per_step`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_ms_per_step: Option<f64>,
}

/// Steps issued one at a time, each from an idle device, for
/// [`BenchReport::train_issue_ms`] (tools/bench_pytorch.py takes as many).
const ISSUE_PROBES: usize = 5;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

pub fn bench(options: &BenchOptions) -> Result<BenchReport> {
    if options.batch_size < 2 || options.steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "bench needs --batch-size >= 2 and --steps >= 1, got {} and {}",
            options.batch_size, options.steps
        )));
    }
    let device = options.device;
    if options.cuda_graph.is_some() && !device.is_cuda() {
        return Err(Error::InvalidArgument(format!("--cuda-graph needs a CUDA device, not {device:?}")));
    }
    let precision = crate::device::Precision::on(device, options.mixed_precision);
    let store = nn::VarStore::new(device);
    let model = SimClr::new(&store.root(), &options.model);
    crate::device::use_channels_last(&store);
    let named = store.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let mut optimizer = Optimizer::new(&OptimConfig { optimizer: options.optimizer, ..OptimConfig::default() }, named);
    // tools/bench_pytorch.py steps at the same rates.
    let learning_rate = if options.optimizer == OptimizerKind::Adamw { 1e-3 } else { 0.1 };
    let loss_config = LossConfig::default();
    let side = i64::from(options.image_size);
    let views = Tensor::randn([2 * options.batch_size as i64, 3, side, side], (Kind::Float, device));

    let mut train_step = || -> Result<()> {
        let loss = crate::train::trainer::contrastive_loss(&model, &views, &loss_config, precision)?;
        optimizer.backward(&loss)?;
        optimizer.step(learning_rate);
        Ok(())
    };
    for _ in 0..options.warmup_steps {
        train_step()?;
    }
    synchronize(device);
    let started = Instant::now();
    for _ in 0..options.steps {
        train_step()?;
    }
    synchronize(device);
    let train_seconds = started.elapsed().as_secs_f64();
    let mut issue_seconds = Vec::with_capacity(ISSUE_PROBES);
    for _ in 0..ISSUE_PROBES {
        let started = Instant::now();
        train_step()?;
        issue_seconds.push(started.elapsed().as_secs_f64());
        synchronize(device);
    }

    let graph_seconds = match &options.cuda_graph {
        Some(library) => {
            // The same step from here on, replayed: every replay reads the
            // same views and updates the same weights, as the eager steps did.
            let graph = crate::cuda_graph::CudaGraph::capture(library, device, 3, &mut train_step)?;
            graph.replay()?;
            synchronize(device);
            let started = Instant::now();
            for _ in 0..options.steps {
                graph.replay()?;
            }
            synchronize(device);
            Some(started.elapsed().as_secs_f64())
        }
        None => None,
    };

    // The encoder as `simclr embed` and the evaluations run it.
    let images = views.narrow(0, 0, options.batch_size as i64);
    let encoder = model.encoder.fold();
    let forward = || tch::no_grad(|| precision.run(device, || encoder.forward(&images)));
    for _ in 0..options.warmup_steps {
        let _ = forward();
    }
    synchronize(device);
    let started = Instant::now();
    for _ in 0..options.steps {
        let _ = forward();
    }
    synchronize(device);
    let forward_seconds = started.elapsed().as_secs_f64();

    let images_done = (options.steps * options.batch_size) as f64;
    Ok(BenchReport {
        device: format!("{device:?}"),
        arch: options.model.arch.name().to_owned(),
        batch_size: options.batch_size,
        image_size: options.image_size,
        steps: options.steps,
        optimizer: options.optimizer.name(),
        train_images_per_second: images_done / train_seconds,
        train_ms_per_step: 1000.0 * train_seconds / options.steps as f64,
        train_issue_ms: 1000.0 * median(&mut issue_seconds),
        forward_images_per_second: images_done / forward_seconds,
        graph_ms_per_step: graph_seconds.map(|seconds| 1000.0 * seconds / options.steps as f64),
    })
}

/// What `simclr bench augment` measures.
#[derive(Debug, Clone)]
pub struct AugmentBenchOptions {
    pub pipeline: crate::augment::Pipeline,
    /// Worker threads of the CPU path.
    pub threads: usize,
    /// Passes over the images, after one untimed pass.
    pub rounds: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AugmentBenchReport {
    pub images: usize,
    pub image_size: u32,
    pub threads: usize,
    /// Views per second of the CPU path (sample, render, normalise into CHW),
    /// decoding excluded.
    pub cpu_views_per_second: f64,
    /// The same on the tensor path on CPU tensors, in batches of all
    /// images; absent when the images differ in size.
    pub tensor_views_per_second: Option<f64>,
}

/// Times the augmentation pipeline alone on decoded `images`, as the data
/// workers run it (one view per image per round, written as normalised CHW
/// floats, ready to batch).
pub fn bench_augment(images: &[image::RgbImage], options: &AugmentBenchOptions) -> Result<AugmentBenchReport> {
    use rayon::prelude::*;
    if images.is_empty() || options.rounds == 0 {
        return Err(Error::InvalidArgument("bench augment needs at least one image and one round".to_owned()));
    }
    let pool = crate::data::loader::worker_pool(options.threads)?;
    let pipeline = &options.pipeline;
    let side = pipeline.size() as usize;
    let mut out = vec![0f32; images.len() * 3 * side * side];
    let pass = |round: usize, out: &mut [f32]| {
        pool.install(|| {
            out.par_chunks_mut(3 * side * side).zip(images.par_iter()).enumerate().for_each(|(index, (out, image))| {
                let mut rng = crate::augment::view_rng(0, round as u64, index as u64, 0);
                pipeline.view(0, image, &mut rng).write_chw_normalized(options.mean, options.std, out);
            })
        })
    };
    pass(usize::MAX, &mut out);
    let started = Instant::now();
    for round in 0..options.rounds {
        pass(round, &mut out);
    }
    let cpu_seconds = started.elapsed().as_secs_f64();

    let uniform = images.iter().all(|image| image.dimensions() == images[0].dimensions());
    let tensor_views_per_second = uniform.then(|| {
        let (width, height) = images[0].dimensions();
        let pixels: Vec<u8> = images.iter().flat_map(|image| image.as_raw().iter().copied()).collect();
        let batch = crate::augment::uint8_batch(&pixels, images.len(), width, height);
        let run = |round: usize| {
            let params: Vec<_> = (0..images.len())
                .map(|index| {
                    let mut rng = crate::augment::view_rng(0, round as u64, index as u64, 0);
                    pipeline.sample(0, width, height, &mut rng)
                })
                .collect();
            pipeline.render_batch(&batch, &params)
        };
        let _ = run(usize::MAX);
        let started = Instant::now();
        for round in 0..options.rounds {
            let _ = run(round);
        }
        (options.rounds * images.len()) as f64 / started.elapsed().as_secs_f64()
    });
    Ok(AugmentBenchReport {
        images: images.len(),
        image_size: pipeline.size(),
        threads: options.threads,
        cpu_views_per_second: (options.rounds * images.len()) as f64 / cpu_seconds,
        tensor_views_per_second,
    })
}
