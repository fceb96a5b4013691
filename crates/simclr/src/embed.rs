//! `simclr embed`: h (or a projection-head layer) for every image under a folder (or of tar shards, or
//! CIFAR batches), as a `.npy` matrix with the images' names listed beside it, in the same order.
use std::path::{Path, PathBuf};

use tch::{nn, Device};

use crate::data::config::{BadImagePolicy, DataFormat};
use crate::data::loader::{worker_pool, ViewFormat};
use crate::data::{Dataset, ImageSource, Sample};
use crate::device::Precision;
use crate::dist::{agree, part_range, ProcessGroup};
use crate::eval::features::{Batches, FeatureNet};
use crate::eval::Network;
use crate::io::npy::NpyRows;
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
    /// An unreadable image stops the command, or is left out (named in a
    /// warning and in the report).
    pub on_bad_image: BadImagePolicy,
    /// The forward pass's arithmetic (fp32 unless asked; the features are
    /// written as fp32 either way).
    pub precision: Precision,
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
        let weights = crate::train::checkpoint::weights_file(&weights)?;
        let spec = resolve_spec(&weights, overrides, layer)?;
        Ok(Self {
            weights,
            spec,
            batch_size,
            device,
            layer,
            on_bad_image: BadImagePolicy::Stop,
            precision: Precision::Fp32,
        })
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

/// The weights files (`*.safetensors`) in `folder`, not searched further
/// down: the encoders a run kept (`encoders/`, see
/// [`crate::train::trainer::encoder_snapshot`]) in the order of their
/// epochs, then any others by name.
pub fn weights_in(folder: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(folder, e))?.path();
        if path.extension().is_some_and(|extension| extension == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    let epoch = |path: &PathBuf| path.file_name()?.to_str().and_then(crate::train::trainer::snapshot_epoch);
    files.sort_by_cached_key(|path| (epoch(path).is_none(), epoch(path), path.clone()));
    if files.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: a folder of weights, but it holds no .safetensors files (a run keeps its encoders in encoders/ \
             with train.encoder_every)",
            folder.display()
        )));
    }
    Ok(files)
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
    /// The features (at the options' layer) of `images`, batch by batch in
    /// order, as [`Batches::each`] gives them (fp32, on the device); returns
    /// the images left out as unreadable, as "path: reason".
    pub fn each_batch(
        &self,
        images: &[Sample],
        sink: &mut dyn FnMut(tch::Tensor, Vec<usize>) -> Result<()>,
    ) -> Result<Vec<String>> {
        let (spec, options) = (&self.options.spec, &self.options);
        let batches = Batches {
            format: ViewFormat::of_encoder(spec),
            batch_size: options.batch_size,
            device: options.device,
            policy: options.on_bad_image,
            precision: options.precision,
        };
        // Millions of images take a while: a bar on a terminal (indicatif
        // draws nothing where stderr is not one).
        let style = indicatif::ProgressStyle::with_template("embedding [{bar:30}] {pos}/{len} images, ETA {eta}")
            .expect("the template is valid")
            .progress_chars("=> ");
        let bar = indicatif::ProgressBar::new(images.len() as u64).with_style(style);
        let skipped = batches.each(self.net()?, images, &self.pool, &mut |features, rows| {
            bar.inc(rows.len() as u64);
            sink(features, rows)
        });
        bar.finish_and_clear();
        skipped
    }

    /// The features of the readable ones of `images` as an `[rows, dim]` CPU
    /// tensor, the positions in `images` of its rows, and the images left
    /// out; an error if none could be read.
    pub fn embed_images(&self, images: &[Sample], input: &Path) -> Result<Embedded> {
        self.embed_across(images, input, None)
    }

    /// [`LoadedEncoder::embed_images`] shared among `group`'s ranks: each
    /// embeds its [`part_range`] of `images`, and every rank gets the rows,
    /// positions and images left out of all parts, in order, as one process
    /// would compute them (up to the rounding of other batches); an error
    /// on any rank stops every rank, naming it.
    pub fn embed_across(&self, images: &[Sample], input: &Path, group: Option<&ProcessGroup>) -> Result<Embedded> {
        let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.size()));
        let mine = part_range(images.len(), rank, world);
        let (mut chunks, mut rows) = (Vec::new(), Vec::new());
        let part = self.each_batch(&images[mine.clone()], &mut |features, read| {
            chunks.push(features.to_device(Device::Cpu));
            rows.extend(read.into_iter().map(|row| mine.start + row));
            Ok(())
        });
        let mut skipped = agree(group, part)?;
        let mut features = match chunks.is_empty() {
            true => tch::Tensor::zeros([0, self.dim()?], (tch::Kind::Float, Device::Cpu)),
            false => tch::Tensor::cat(&chunks, 0),
        };
        if let Some(group) = group {
            features = group.all_gather_rows(&features)?;
            let positions: Vec<i64> = rows.iter().map(|&row| row as i64).collect();
            let gathered = group.all_gather_rows(&tch::Tensor::from_slice(&positions))?;
            rows = Vec::<i64>::try_from(&gathered)?.into_iter().map(|row| row as usize).collect();
            skipped = group.all_gather_lines(&skipped)?;
        }
        if rows.is_empty() {
            return Err(crate::data::none_readable(input, images.len()));
        }
        Ok(Embedded { features, rows, skipped })
    }

    /// The device the network computes on.
    pub fn device(&self) -> Device {
        self.options.device
    }

    /// The size of a feature vector.
    pub fn dim(&self) -> Result<i64> {
        Ok(self.net()?.dim())
    }

    fn net(&self) -> Result<FeatureNet<'_>> {
        FeatureNet::at(&self.network.model, self.options.layer)
    }
}

/// Features of a list of images, the unreadable ones left out.
pub struct Embedded {
    /// `[rows.len(), dim]`, on the CPU.
    pub features: tch::Tensor,
    /// The position in the list of each row's image.
    pub rows: Vec<usize>,
    /// The images left out, as "path: reason".
    pub skipped: Vec<String>,
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
    /// Images left out as unreadable, as "path: reason".
    pub skipped: Vec<String>,
    /// The forward pass's arithmetic.
    pub precision: Precision,
}

impl std::fmt::Display for EmbedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "embedded {} ({} features each) into {}; paths in {}; {:.1} s, {:.1} images/s{}",
            crate::names::counted(self.images, "image"),
            self.feature_dim,
            self.features_path.display(),
            self.paths_path.display(),
            self.embed_seconds,
            self.images as f64 / self.embed_seconds.max(1e-9),
            self.precision.in_words(),
        )?;
        write!(f, "{}", crate::data::Skipped(&self.skipped))
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

/// `simclr embed`: the features are written as they are computed, so a run
/// over millions of images holds one batch of them at a time.
pub fn embed(options: &EmbedOptions) -> Result<EmbedReport> {
    Ok(embed_in(options, None)?.expect("one process reports"))
}

/// [`embed`] as one rank of `group` (alone when `None`), every rank calling
/// it with the same options: each writes the features of its part of the
/// images (contiguous, in order) to a file of its own beside the output
/// (`feats.rank1.npy`), which every rank must reach (one machine, or a
/// shared file system, as a run folder); rank 0 then joins the parts in
/// order into the output, removes them, and gets the report, the others
/// `None`. The output is one process's, up to the rounding of features
/// computed in other batches.
pub fn embed_in(options: &EmbedOptions, group: Option<&ProcessGroup>) -> Result<Option<EmbedReport>> {
    let group = group.filter(|group| group.size() > 1);
    let listed = crate::io::refuse_folder(&options.output, "--output")
        .and_then(|()| crate::io::refuse_folder(&paths_file(&options.output), "--output's path list"))
        .and_then(|()| images_in(&options.input))
        .and_then(|images| Ok((images, options.encoder.load()?)));
    let (images, loaded) = agree(group, listed)?;
    let (names, images): (Vec<String>, Vec<Sample>) = images.into_iter().unzip();
    let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.size()));
    if let Some(group) = group {
        // Each rank has a device of its own; the rest must be the same.
        let encoder = EncoderOptions { device: Device::Cpu, ..options.encoder.clone() };
        let settings = format!("{encoder:?} {:?} {:?}", options.input, options.output);
        group.check_same("embed settings", &settings)?;
        // Each rank embeds its part of the images by position in the listing.
        group.check_same("images", &names.join("\n"))?;
    }
    let started = std::time::Instant::now();
    let feature_dim = loaded.dim()?;
    let mine = part_range(images.len(), rank, world);
    let part = part_path(&options.output, rank, world);
    let written = write_features(&loaded, &images[mine.clone()], &names[mine], &part, feature_dim);
    let Written { features, listing, skipped, writing } = agree(group, written)?;
    let embed_seconds = (started.elapsed() - writing).as_secs_f64();
    let report = |listing: Vec<String>, skipped: Vec<String>| {
        let paths_path = paths_file(&options.output);
        let lines: String = listing.iter().flat_map(|name| [name.as_str(), "\n"]).collect();
        crate::io::write_atomic(&paths_path, lines.as_bytes())?;
        let features_path = options.output.clone();
        let precision = options.encoder.precision;
        Ok(EmbedReport {
            images: listing.len(),
            feature_dim,
            features_path,
            paths_path,
            embed_seconds,
            skipped,
            precision,
        })
    };
    let Some(group) = group else {
        // Unfinished, the matrix is removed: nothing replaces an earlier output.
        if skipped.len() == images.len() {
            return Err(crate::data::none_readable(&options.input, images.len()));
        }
        features.finish()?;
        return report(listing, skipped).map(Some);
    };
    // The parts go once rank 0 has joined them, or on the way out of an error.
    let _part = Temporary(part);
    group.agree(features.finish())?;
    let (listing, skipped) = (group.all_gather_lines(&listing)?, group.all_gather_lines(&skipped)?);
    let joined = match rank {
        0 if skipped.len() == images.len() => Err(crate::data::none_readable(&options.input, images.len())),
        0 => join_parts(&options.output, world, feature_dim).and_then(|()| report(listing, skipped)).map(Some),
        _ => Ok(None),
    };
    group.agree(joined)
}

/// A file removed when this is dropped.
struct Temporary(PathBuf);

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where rank `rank` of `world` writes its part of `output`: `output` itself
/// for one process.
fn part_path(output: &Path, rank: usize, world: usize) -> PathBuf {
    match world {
        1 => output.to_path_buf(),
        _ => output.with_extension(format!("rank{rank}.npy")),
    }
}

/// What [`write_features`] leaves: the matrix (to be finished), the names
/// of its rows, the images left out, and the time spent writing.
struct Written {
    features: NpyRows,
    listing: Vec<String>,
    skipped: Vec<String>,
    writing: std::time::Duration,
}

/// The features of `images` (named `names`) written to `path` as they are
/// computed.
fn write_features(
    loaded: &LoadedEncoder,
    images: &[Sample],
    names: &[String],
    path: &Path,
    feature_dim: i64,
) -> Result<Written> {
    let mut features = NpyRows::create(path, feature_dim as usize)?;
    let (mut listing, mut writing) = (Vec::new(), std::time::Duration::ZERO);
    let skipped = loaded.each_batch(images, &mut |batch, rows| {
        let began = std::time::Instant::now();
        features.append(&batch)?;
        listing.extend(rows.into_iter().map(|row| names[row].clone()));
        writing += began.elapsed();
        Ok(())
    })?;
    Ok(Written { features, listing, skipped, writing })
}

/// Joins the `world` parts of `output` into it, in rank order.
fn join_parts(output: &Path, world: usize, feature_dim: i64) -> Result<()> {
    let mut features = NpyRows::create(output, feature_dim as usize)?;
    for rank in 0..world {
        features.append_npy(&part_path(output, rank, world))?;
    }
    features.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_of_weights_lists_kept_encoders_by_epoch_then_the_others_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["zebra.safetensors", "epoch-12000.safetensors", "epoch-0002.safetensors", "a.safetensors"];
        let left_out = ["epoch-0003.safetensors.tmp77", "notes.txt", "epoch-0004.npy"];
        for name in names.iter().chain(&left_out) {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("nested.safetensors")).unwrap();
        let listed = weights_in(dir.path()).unwrap();
        let listed: Vec<_> = listed.iter().map(|path| path.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(listed, ["epoch-0002.safetensors", "epoch-12000.safetensors", "a.safetensors", "zebra.safetensors"]);

        let empty = tempfile::tempdir().unwrap();
        let error = weights_in(empty.path()).unwrap_err().to_string();
        assert!(error.contains(&empty.path().display().to_string()) && error.contains("no .safetensors"), "{error}");
    }
}
