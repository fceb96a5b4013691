//! `simclr embed`: h (or a projection-head layer) for every image under a folder (or of tar shards, or
//! CIFAR batches), as a `.npy` matrix with the images' names listed beside it, in the same order.
use std::path::{Path, PathBuf};

use tch::{nn, Device};

use crate::data::config::DataFormat;
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::{Dataset, ImageSource, Sample};
use crate::eval::features::FeatureNet;
use crate::eval::{extract_features, Network};
use crate::model::{EncoderSpec, Layer, ResNet, SimClr, SpecOverrides};
use crate::{Error, Result};

/// Which encoder, with which weights, how images are prepared for it, and
/// where its features are read.
#[derive(Debug, Clone)]
pub struct EncoderOptions {
    /// torchvision-named safetensors, with or without an `encoder.` prefix,
    /// or a run's checkpoint (which a projection-head `layer` needs).
    pub weights: PathBuf,
    pub spec: EncoderSpec,
    pub batch_size: usize,
    pub device: Device,
    pub layer: Layer,
}

impl EncoderOptions {
    /// The encoder in `weights` as its file records it (see
    /// [`crate::io::torchvision::resolve_spec`]; for a head `layer`, the
    /// run's checkpoint), with `overrides` laid over.
    pub fn new(
        weights: PathBuf,
        overrides: &SpecOverrides,
        batch_size: usize,
        device: Device,
        layer: Layer,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument("--batch-size 0: must be at least 1".to_owned()));
        }
        let spec = resolve_spec(&weights, overrides, layer)?;
        Ok(Self { weights, spec, batch_size, device, layer })
    }

    /// Builds the network and loads its weights, checking every tensor.
    pub fn load(&self) -> Result<LoadedEncoder> {
        let source = EncoderSource::Weights(self.weights.clone());
        let network = load_network(&source, &self.spec, self.layer, self.device)?;
        Ok(LoadedEncoder { network, options: self.clone(), pool: worker_pool(0)? })
    }
}

/// Where a network's variables come from.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderSource {
    /// torchvision-named safetensors, or a run's checkpoint (prefixes
    /// `encoder.` and `model.encoder.` are understood).
    Weights(PathBuf),
    /// Untrained weights drawn with this seed: the baseline every
    /// self-supervised result is compared with.
    RandomInit(u64),
}

/// The network `spec` describes with `source`'s variables, on `device`,
/// ready to be read at `layer`: the encoder alone for h, the whole network
/// of a run's checkpoint for a projection-head layer.
pub fn load_network(source: &EncoderSource, spec: &EncoderSpec, layer: Layer, device: Device) -> Result<Network> {
    let network = match source {
        EncoderSource::Weights(path) if layer != Layer::H => {
            let (store, model, _) = crate::train::checkpoint::load_model(path, device)
                .map_err(|error| head_needs_checkpoint(layer, error))?;
            Network { store, model, name: path.display().to_string() }
        }
        EncoderSource::RandomInit(_) if layer != Layer::H => {
            let why = Error::InvalidArgument("a random-init encoder has none; give --checkpoint".to_owned());
            return Err(head_needs_checkpoint(layer, why));
        }
        source => {
            if let EncoderSource::RandomInit(seed) = source {
                tch::manual_seed(*seed as i64);
            }
            let store = nn::VarStore::new(device);
            let encoder = ResNet::new(&store.root(), spec.arch, spec.width_multiplier, spec.stem);
            crate::device::use_channels_last(&store);
            let name = match source {
                EncoderSource::Weights(path) => {
                    crate::io::torchvision::load_encoder(&store.variables(), path)?;
                    path.display().to_string()
                }
                EncoderSource::RandomInit(seed) => format!("random init (seed {seed})"),
            };
            Network { store, model: SimClr::headless(encoder), name }
        }
    };
    FeatureNet::at(&network.model, layer)?;
    Ok(network)
}

/// The network `weights` hold, with `overrides` laid over: a run's
/// checkpoint as its configuration says, other weights as their file
/// records (see [`crate::io::torchvision::resolve_spec`]); a head `layer`
/// needs a checkpoint.
pub fn resolve_spec(weights: &Path, overrides: &SpecOverrides, layer: Layer) -> Result<EncoderSpec> {
    match (crate::train::checkpoint::encoder_spec(weights), layer) {
        (Ok(spec), _) => spec.with(overrides),
        (Err(_), Layer::H) => crate::io::torchvision::resolve_spec(weights, overrides),
        (Err(error), layer) => Err(head_needs_checkpoint(layer, error)),
    }
}

/// A head layer asked of weights that are not a run's checkpoint.
pub fn head_needs_checkpoint(layer: Layer, error: Error) -> Error {
    Error::InvalidArgument(format!(
        "--layer {layer} reads the projection head, which only a run's checkpoint holds: {error}"
    ))
}

/// A network ready to embed images.
pub struct LoadedEncoder {
    network: Network,
    options: EncoderOptions,
    pool: std::sync::Arc<rayon::ThreadPool>,
}

impl LoadedEncoder {
    /// The features (at the options' layer) of each image, in order, as a
    /// `[images, dim]` CPU tensor.
    pub fn embed_images(&self, images: &[Sample]) -> Result<tch::Tensor> {
        let (spec, options) = (&self.options.spec, &self.options);
        let format = ViewFormat { size: spec.image_size, mean: spec.mean, std: spec.std };
        Ok(extract_features(self.net()?, images, format, options.batch_size, options.device, &self.pool)?
            .to_device(Device::Cpu))
    }

    /// The size of a feature vector.
    pub fn dim(&self) -> Result<i64> {
        Ok(self.net()?.dim())
    }

    fn net(&self) -> Result<FeatureNet<'_>> {
        FeatureNet::at(&self.network.model, self.options.layer)
    }
}

#[derive(Debug, Clone)]
pub struct EmbedOptions {
    pub encoder: EncoderOptions,
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

impl std::fmt::Display for EmbedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "embedded {} images ({} features each) into {}; paths in {}; {:.1} s, {:.1} images/s",
            self.images,
            self.feature_dim,
            self.features_path.display(),
            self.paths_path.display(),
            self.embed_seconds,
            self.images as f64 / self.embed_seconds.max(1e-9),
        )
    }
}

/// Where the path list goes: `feats.npy` gives `feats.paths.txt`.
pub fn paths_file(output: &Path) -> PathBuf {
    output.with_extension("paths.txt")
}

/// The images `input` holds, each with the name it is listed under: tar
/// shards (a `.tar`, or a folder of them) and CIFAR binary batches as their
/// dataset lists them (a member as `shard.tar:key.jpg`, a CIFAR image as
/// `#` and its position); one image file; or every image file below a
/// folder, in the order of [`crate::data::image_folder::walk`]. None is an error naming `input`.
pub fn images_in(input: &Path) -> Result<Vec<(String, Sample)>> {
    // A file that is neither a shard nor a CIFAR batch is one image.
    let format = match input.is_file() {
        true => crate::data::detect_format(input).ok(),
        false => Some(crate::data::detect_format(input)?),
    };
    let held_as_dataset = matches!(format, Some(DataFormat::Shards | DataFormat::CifarBinary));
    let samples = if held_as_dataset {
        Dataset::open(input, &DataFormat::Auto)?.samples
    } else {
        let files = if input.is_file() { vec![input.to_path_buf()] } else { crate::data::image_folder::walk(input)?.0 };
        files.into_iter().map(|path| Sample { source: ImageSource::File(path), label: None }).collect()
    };
    if samples.is_empty() {
        return Err(Error::Dataset {
            path: input.to_path_buf(),
            message: format!("no images found (looked for {})", crate::data::image_folder::EXTENSIONS.join(", ")),
        });
    }
    Ok(samples.into_iter().enumerate().map(|(index, sample)| (sample.describe(index), sample)).collect())
}

pub fn embed(options: &EmbedOptions) -> Result<EmbedReport> {
    let (names, images): (Vec<String>, Vec<Sample>) = images_in(&options.input)?.into_iter().unzip();
    let loaded = options.encoder.load()?;
    let started = std::time::Instant::now();
    let features = loaded.embed_images(&images)?;
    let embed_seconds = started.elapsed().as_secs_f64();

    // Write beside the target, then rename, so a failure leaves no partial file.
    let temporary = options.output.with_extension("npy.partial");
    if let Some(dir) = options.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    features.write_npy(&temporary)?;
    std::fs::rename(&temporary, &options.output).map_err(|e| Error::io(&options.output, e))?;
    let paths_path = paths_file(&options.output);
    let listing: String = names.iter().map(|name| format!("{name}\n")).collect();
    crate::io::write_atomic(&paths_path, listing.as_bytes())?;
    Ok(EmbedReport {
        images: names.len(),
        feature_dim: loaded.dim()?,
        features_path: options.output.clone(),
        paths_path,
        embed_seconds,
    })
}
