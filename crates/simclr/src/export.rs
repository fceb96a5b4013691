//! `simclr export`: an encoder as a TorchScript module, which
//! `torch.jit.load` (Python) and `torch::jit::load` (C++) run with no model
//! code of their own, whatever the width multiplier or stem that a
//! torchvision ResNet cannot build as it is.
//!
//! The network is traced on the CPU in fp32 (libtorch's tracer, through
//! tch), its weights held in the file. Its `forward` takes RGB images
//! `[N, 3, H, W]` as floats in [0, 1] and normalises them with the
//! encoder's recorded mean and deviation, so what is left to its user is
//! the resize and centre crop to the recorded size (`embed`'s); it returns
//! the features of the layer asked for, `[N, D]`, BatchNorm on its running
//! statistics, folded into the convolutions. The module written is loaded
//! back and checked against the network on other batch and image sizes than
//! those traced before it takes its name. Its tensors are on the CPU:
//! `torch.jit.load(path, map_location=...)` puts them elsewhere.
use std::path::{Path, PathBuf};

use tch::{CModule, Device, Kind, Tensor};

use crate::embed::{load_network, EncoderSource};
use crate::eval::features::FeatureNet;
use crate::model::{EncoderSpec, Layer};
use crate::{Error, Result};

/// The largest difference allowed between the module's features and the
/// network's, relative to the largest feature: both run the same libtorch
/// kernels on the CPU, so only a kernel picked for another shape differs.
const TOLERANCE: f64 = 1e-5;

/// What [`export_torchscript`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub path: PathBuf,
    pub layer: Layer,
    pub feature_dim: i64,
    pub spec: EncoderSpec,
    /// The largest difference found between the written module's features
    /// and the network's, relative to the largest feature.
    pub difference: f64,
}

impl std::fmt::Display for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spec = &self.spec;
        writeln!(f, "wrote {} ({}, TorchScript)", self.path.display(), spec.describe())?;
        writeln!(
            f,
            "forward(images) takes [N, 3, H, W] RGB floats in [0, 1] (resized and centre-cropped to {} px, \
             as embed does) and returns {} [N, {}]; normalised inside with mean {:?} and std {:?}",
            spec.image_size, self.layer, self.feature_dim, spec.mean, spec.std
        )?;
        writeln!(f, "read back: within {:.1e} of the network's features (relative)", self.difference)
    }
}

/// Writes the network in `weights`, read as `spec` and at `layer`, to
/// `output` as a TorchScript module (see the module's documentation).
pub fn export_torchscript(weights: &Path, spec: &EncoderSpec, layer: Layer, output: &Path) -> Result<Exported> {
    let mut network = load_network(&EncoderSource::Weights(weights.to_path_buf()), spec, layer, Device::Cpu)?;
    // The tracer takes the weights as constants, which must not require gradients.
    network.store.freeze();
    let net = FeatureNet::at(&network.model, layer)?;
    let options = (Kind::Float, Device::Cpu);
    let [mean, std] = [spec.mean, spec.std].map(|channels| Tensor::from_slice(&channels).view([1, 3, 1, 1]));
    // Folded as embed computes, which also keeps the trace to plain
    // convolutions (the unfolded CPU path copies some activations to NCHW
    // through a buffer of the batch's size, which a trace would fix).
    let forward = net.folded();
    let features = |images: &Tensor| forward(&((images - &mean) / &std));
    let side = i64::from(spec.image_size);
    let example = Tensor::rand([2, 3, side, side], options);
    let module = tch::no_grad(|| {
        CModule::create_by_tracing("SimclrEncoder", "forward", &[example], &mut |inputs| vec![features(&inputs[0])])
    })?;
    let mut difference = 0.0;
    crate::io::write_atomic_with(output, |temporary| {
        module.save(temporary)?;
        let loaded = CModule::load(temporary)?;
        // Shapes the trace did not see: a batch of 3, and larger images.
        for (batch, side) in [(3, side), (1, side + 8)] {
            let images = Tensor::rand([batch, 3, side, side], options);
            let (ours, theirs) = tch::no_grad(|| Ok::<_, Error>((features(&images), loaded.forward_ts(&[&images])?)))?;
            if theirs.size() != ours.size() {
                return Err(Error::InvalidArgument(format!(
                    "the traced module gave features of shape {:?} for {batch} images of {side} px, the network {:?}",
                    theirs.size(),
                    ours.size()
                )));
            }
            let scale = ours.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
            difference = f64::max(difference, (&theirs - &ours).abs().max().double_value(&[]) / scale);
        }
        match difference <= TOLERANCE {
            true => Ok(()),
            false => Err(Error::InvalidArgument(format!(
                "the traced module's features differ from the network's by {difference:.1e} of the largest \
                 (allowed {TOLERANCE:.0e}); nothing was written"
            ))),
        }
    })?;
    let feature_dim = net.dim();
    Ok(Exported { path: output.to_path_buf(), layer, feature_dim, spec: spec.clone(), difference })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig, SimClr, Stem};
    use tch::nn;

    /// A ResNet-18 (CIFAR stem, 0.125x) with BatchNorm statistics that
    /// matter, written as a run writes its encoder.
    fn encoder_file(dir: &Path) -> (PathBuf, EncoderSpec) {
        tch::manual_seed(5);
        let config =
            ModelConfig { arch: Arch::Resnet18, width_multiplier: 0.125, stem: Stem::Cifar, ..Default::default() };
        let store = nn::VarStore::new(Device::Cpu);
        SimClr::new(&store.root(), &config);
        tch::no_grad(|| {
            for (name, mut variable) in store.variables() {
                if name.ends_with("running_var") {
                    variable.copy_(&(variable.rand_like() + 0.5));
                } else if name.ends_with("running_mean") {
                    variable.copy_(&(variable.rand_like() - 0.5));
                }
            }
        });
        let spec = EncoderSpec {
            arch: Arch::Resnet18,
            width_multiplier: 0.125,
            stem: Stem::Cifar,
            image_size: 16,
            mean: [0.4, 0.5, 0.6],
            std: [0.2, 0.25, 0.3],
            head: None,
        };
        let path = dir.join("encoder.safetensors");
        crate::io::torchvision::export_encoder(&store, 1, &spec, &path).unwrap();
        (path, spec)
    }

    /// The module, loaded as a user loads it, gives `embed`'s network's
    /// features of the normalised images on batch and image sizes other
    /// than those traced; without the normalisation inside, it would not.
    #[test]
    fn the_module_written_gives_the_networks_features_of_normalised_images() {
        let dir = tempfile::tempdir().unwrap();
        let (weights, spec) = encoder_file(dir.path());
        let output = dir.path().join("out").join("encoder.pt");
        let exported = export_torchscript(&weights, &spec, Layer::H, &output).unwrap();
        assert_eq!(exported.feature_dim, 64);
        assert!(exported.difference <= TOLERANCE);
        let names: Vec<String> = std::fs::read_dir(output.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["encoder.pt"], "no temporary file is left");

        let module = CModule::load(&output).unwrap();
        let network = load_network(&EncoderSource::Weights(weights), &spec, Layer::H, Device::Cpu).unwrap();
        let net = FeatureNet::at(&network.model, Layer::H).unwrap();
        let images = Tensor::rand([5, 3, 20, 20], (Kind::Float, Device::Cpu));
        let mean = Tensor::from_slice(&spec.mean).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&spec.std).view([1, 3, 1, 1]);
        let (theirs, ours, unnormalised) = tch::no_grad(|| {
            let theirs = module.forward_ts(&[&images]).unwrap();
            (theirs, net.forward_t(&((&images - &mean) / &std), false), net.forward_t(&images, false))
        });
        assert_eq!(theirs.size(), [5, 64]);
        let relative = |a: &Tensor| (a - &theirs).abs().max().double_value(&[]) / ours.abs().max().double_value(&[]);
        assert!(relative(&ours) <= TOLERANCE, "{}", relative(&ours));
        // Negative control: the features of images not normalised differ.
        assert!(relative(&unnormalised) > 0.01, "{}", relative(&unnormalised));
    }

    /// A head layer needs a run's checkpoint, and says so; nothing is written.
    #[test]
    fn a_head_layer_of_an_encoder_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (weights, spec) = encoder_file(dir.path());
        let output = dir.path().join("z.pt");
        let error = export_torchscript(&weights, &spec, Layer::Z, &output).unwrap_err().to_string();
        assert!(error.contains("checkpoint"), "{error}");
        assert!(!output.exists());
    }
}
