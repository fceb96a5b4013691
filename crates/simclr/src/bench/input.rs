//! `simclr bench input`: the input pipeline from files on disk to batches
//! of views ready for the model, decoding included, as a training run's
//! data workers make them; and where one image's time goes, stage by stage.
//! `tools/bench/bench_input.sh` runs it beside torchvision's DataLoader
//! (`tools/reference/bench_input.py`) on the same files.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::augment::{view_rng, AugmentConfig, AugmentPreset, Pipeline};
use crate::data::config::DataFormat;
use crate::data::loader::{worker_pool, ViewFormat, ViewLoader, Views};
use crate::data::{decode, Dataset};
use crate::normalization::{IMAGENET_MEAN, IMAGENET_STD};
use crate::{Error, Result};

/// Which views `simclr bench input` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputPath {
    /// Whole views on the workers.
    Cpu,
    /// Geometry on the workers, the pixel ops as tensor ops (here on CPU tensors).
    Hybrid,
}

/// What `simclr bench input` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct InputBenchOptions {
    /// Image files (an ImageFolder or a flat folder) or tar shards.
    #[arg(long)]
    pub data: PathBuf,
    /// simclr-imagenet or simclr-cifar.
    #[arg(long, default_value = "simclr-imagenet")]
    pub pipeline: AugmentPreset,
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Use the first this many images (in listing order: classes, then file names).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Data worker threads (libtorch gets as many for the hybrid path's tensor ops).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Images per batch (two views each).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Passes over the images, after a first batch that is not timed.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub path: InputPath,
    /// Always decode in full (no reduced-scale JPEG decoding).
    #[arg(long)]
    pub full_decode: bool,
}

/// Where one image's time goes, in milliseconds per image on one thread.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stages {
    pub read_ms: f64,
    /// Header, parameters and decoding (at a reduced scale where allowed).
    pub decode_ms: f64,
    /// Crop and resize of both views into 8-bit pixels.
    pub geometry_ms: f64,
    /// Pixel ops and normalisation of both views on the CPU (the CPU path's;
    /// the hybrid path runs these as tensor ops in the batch).
    pub pixels_ms: f64,
    /// Images decoded at 1/2, 1/4 or 1/8 of their size.
    pub reduced_share: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InputBenchReport {
    pub images: usize,
    pub image_size: u32,
    pub workers: usize,
    pub batch_size: usize,
    pub path: InputPath,
    pub reduced_decode: bool,
    /// Training images (two views each) per second, from files on disk to
    /// normalised `[2N, 3, size, size]` batches.
    pub images_per_second: f64,
    pub stages: Stages,
    /// The share of one image's time on one thread spent reading and decoding.
    pub decode_share: f64,
}

impl std::fmt::Display for InputBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stages;
        writeln!(
            f,
            "{} path, {} workers, {} images at {}x{}, batch {}: {:.1} images/s (two views each)",
            serde_json::to_value(self.path).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            self.workers,
            self.images,
            self.image_size,
            self.image_size,
            self.batch_size,
            self.images_per_second
        )?;
        write!(
            f,
            "per image on one thread: read {:.2} ms, decode {:.2} ms ({:.0}% at a reduced scale), \
             crop and resize {:.2} ms, pixel ops {:.2} ms; reading and decoding {:.0}% of it",
            s.read_ms,
            s.decode_ms,
            100.0 * s.reduced_share,
            s.geometry_ms,
            s.pixels_ms,
            100.0 * self.decode_share
        )
    }
}

/// Runs the benchmark: the training loader end to end on `workers` threads,
/// then each stage timed alone on one thread over the same images.
pub fn bench_input(options: &InputBenchOptions) -> Result<InputBenchReport> {
    let mut problems = Vec::new();
    let counts = [
        ("--workers", Some(options.workers)),
        ("--rounds", Some(options.rounds)),
        ("--batch-size", Some(options.batch_size)),
        ("--limit", options.limit),
    ];
    super::check_counts(&counts, &mut problems);
    super::check_image_size(options.image_size, &mut problems);
    if !problems.is_empty() {
        return Err(Error::Config(problems));
    }
    let mut dataset = Dataset::open(&options.data, &DataFormat::Auto)?;
    if let Some(limit) = options.limit {
        dataset.samples.truncate(limit);
    }
    let dataset = Arc::new(dataset);
    tch::set_num_threads(options.workers as i32);
    let config = AugmentConfig { preset: options.pipeline, ..Default::default() };
    let pipeline = Pipeline::new(&config, options.image_size);
    let format = ViewFormat { size: options.image_size, mean: IMAGENET_MEAN, std: IMAGENET_STD };
    let pool = worker_pool(options.workers)?;
    let loader =
        ViewLoader::new(dataset.clone(), pipeline.clone(), format, options.batch_size, 0, pool, tch::Device::Cpu)?
            .reduced_decode(!options.full_decode);
    let views = Views::Cpu(match options.path {
        InputPath::Cpu => loader,
        InputPath::Hybrid => loader.hybrid(),
    });
    let batches = views.batches_per_epoch();
    // The first batch starts the threads and fills the caches: not timed.
    views.epoch(u64::MAX, batches - 1).next().transpose()?;
    let started = Instant::now();
    for round in 0..options.rounds {
        for batch in views.epoch(round as u64, 0) {
            drop(batch?);
        }
    }
    let images_per_second = (options.rounds * batches * options.batch_size) as f64 / started.elapsed().as_secs_f64();
    let stages = stages(&dataset, &pipeline, !options.full_decode)?;
    let decode_share = (stages.read_ms + stages.decode_ms)
        / (stages.read_ms + stages.decode_ms + stages.geometry_ms + stages.pixels_ms);
    Ok(InputBenchReport {
        images: dataset.len(),
        image_size: options.image_size,
        workers: options.workers,
        batch_size: options.batch_size,
        path: options.path,
        reduced_decode: !options.full_decode,
        images_per_second,
        stages,
        decode_share,
    })
}

/// Each stage of both views of every image, timed on this thread.
fn stages(dataset: &Dataset, pipeline: &Pipeline, reduced_decode: bool) -> Result<Stages> {
    let mut time = [Duration::ZERO; 4];
    let mut reduced = 0;
    let mut out = vec![0f32; 3 * (pipeline.size() * pipeline.size()) as usize];
    for (index, sample) in dataset.samples.iter().enumerate() {
        let mut clock = Instant::now();
        let mut lap = |stage: usize| {
            time[stage] += clock.elapsed();
            clock = Instant::now();
        };
        let Some((bytes, path)) = sample.stored()? else {
            return Err(Error::InvalidArgument("bench input reads image files or shards".to_owned()));
        };
        let path = path.as_path();
        lap(0);
        let (width, height) = decode::dimensions(&bytes, path)?;
        let draw = |view| pipeline.sample(view, width, height, &mut view_rng(1, 0, index as u64, view as u64));
        let params = [draw(0), draw(1)];
        let reduction = if reduced_decode { pipeline.reduction(&params, width, height) } else { 1 };
        reduced += usize::from(reduction > 1);
        let image = decode::decode_reduced(&bytes, path, reduction)?;
        lap(1);
        let geometries = params.clone().map(|p| pipeline.geometry(&image, &p, width, height));
        lap(2);
        for (geometry, params) in geometries.iter().zip(&params) {
            pipeline.finish(geometry, params).write_chw_normalized(IMAGENET_MEAN, IMAGENET_STD, &mut out);
        }
        lap(3);
    }
    let per_image = |d: Duration| 1000.0 * d.as_secs_f64() / dataset.len().max(1) as f64;
    Ok(Stages {
        read_ms: per_image(time[0]),
        decode_ms: per_image(time[1]),
        geometry_ms: per_image(time[2]),
        pixels_ms: per_image(time[3]),
        reduced_share: reduced as f64 / dataset.len().max(1) as f64,
    })
}
