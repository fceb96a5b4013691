//! `simclr embed`: h for every image under a folder, as a `.npy` matrix with
//! the image paths listed beside it, in the same (sorted) order.
use std::path::{Path, PathBuf};

use tch::{nn, Device};

use crate::config::{IMAGENET_MEAN, IMAGENET_STD};
use crate::data::image_folder::{image_files, sorted_entries};
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::{ImageSource, Sample};
use crate::eval::extract_features;
use crate::model::{Arch, ResNet, Stem};
use crate::{Error, Result};

/// Which encoder, with which weights, and how images are prepared for it.
#[derive(Debug, Clone)]
pub struct EncoderSpec {
    /// torchvision-named safetensors, with or without an `encoder.` prefix.
    pub weights: PathBuf,
    pub arch: Arch,
    pub width_multiplier: f64,
    pub stem: Stem,
    pub image_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub batch_size: usize,
    pub device: Device,
}

impl EncoderSpec {
    pub fn new(weights: PathBuf) -> Self {
        Self {
            weights,
            arch: Arch::Resnet50,
            width_multiplier: 1.0,
            stem: Stem::Imagenet,
            image_size: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            batch_size: 128,
            device: Device::Cpu,
        }
    }

    /// Builds the encoder and loads its weights, checking every tensor.
    pub fn load(&self) -> Result<LoadedEncoder> {
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument("--batch-size 0: must be at least 1".to_owned()));
        }
        if self.image_size < crate::data::MIN_IMAGE_SIDE {
            return Err(Error::InvalidArgument(format!("--image-size {}: must be at least 8", self.image_size)));
        }
        let store = nn::VarStore::new(self.device);
        let encoder = ResNet::new(&store.root(), self.arch, self.width_multiplier, self.stem);
        crate::device::use_channels_last(&store);
        crate::io::torchvision::load_encoder(&store.variables(), &self.weights)?;
        Ok(LoadedEncoder { _store: store, encoder, spec: self.clone(), pool: worker_pool(0)? })
    }
}

/// An encoder ready to embed images.
pub struct LoadedEncoder {
    /// Owns the variables `encoder` computes with.
    _store: nn::VarStore,
    pub encoder: ResNet,
    spec: EncoderSpec,
    pool: std::sync::Arc<rayon::ThreadPool>,
}

impl LoadedEncoder {
    /// h for each file, in order, as a `[files, feature_dim]` CPU tensor.
    pub fn embed_files(&self, files: &[PathBuf]) -> Result<tch::Tensor> {
        let samples: Vec<Sample> =
            files.iter().map(|path| Sample { source: ImageSource::File(path.clone()), label: None }).collect();
        let spec = &self.spec;
        let format = ViewFormat { size: spec.image_size, mean: spec.mean, std: spec.std };
        Ok(extract_features(&self.encoder, &samples, format, spec.batch_size, spec.device, &self.pool)?
            .to_device(Device::Cpu))
    }
}

#[derive(Debug, Clone)]
pub struct EmbedOptions {
    pub encoder: EncoderSpec,
    pub input: PathBuf,
    pub output: PathBuf,
}

#[derive(Debug, Clone)]
pub struct EmbedReport {
    pub images: usize,
    pub feature_dim: i64,
    pub features_path: PathBuf,
    pub paths_path: PathBuf,
    /// Wall time of decoding and the forward passes (listing, loading the
    /// weights and writing the output excluded).
    pub embed_seconds: f64,
}

/// Every image file below `dir`, recursively, sorted by path.
pub fn image_files_recursive(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = image_files(dir)?;
    for entry in sorted_entries(dir)? {
        if entry.is_dir() {
            files.extend(image_files_recursive(&entry)?);
        }
    }
    files.sort();
    Ok(files)
}

/// Where the path list goes: `feats.npy` gives `feats.paths.txt`.
pub fn paths_file(output: &Path) -> PathBuf {
    output.with_extension("paths.txt")
}

/// The image files below `dir`; none is an error naming the folder.
pub fn images_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let files = image_files_recursive(dir)?;
    if files.is_empty() {
        return Err(Error::Dataset {
            path: dir.to_path_buf(),
            message: format!("no images found (looked for {})", crate::data::image_folder::EXTENSIONS.join(", ")),
        });
    }
    Ok(files)
}

pub fn embed(options: &EmbedOptions) -> Result<EmbedReport> {
    let files = images_below(&options.input)?;
    let loaded = options.encoder.load()?;
    let started = std::time::Instant::now();
    let features = loaded.embed_files(&files)?;
    let embed_seconds = started.elapsed().as_secs_f64();

    // Write beside the target, then rename, so a failure leaves no partial file.
    let temporary = options.output.with_extension("npy.partial");
    if let Some(dir) = options.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    features.write_npy(&temporary)?;
    std::fs::rename(&temporary, &options.output).map_err(|e| Error::io(&options.output, e))?;
    let paths_path = paths_file(&options.output);
    let listing: String = files.iter().map(|p| format!("{}\n", p.display())).collect();
    crate::io::write_atomic(&paths_path, listing.as_bytes())?;
    Ok(EmbedReport {
        images: files.len(),
        feature_dim: loaded.encoder.feature_dim(),
        features_path: options.output.clone(),
        paths_path,
        embed_seconds,
    })
}
