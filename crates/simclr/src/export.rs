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
//! statistics, folded into the convolutions. Its tensors are the module's
//! buffers (`tensor_0`, `tensor_1`, ..., in the order the graph lists them;
//! equal ones, as the zero biases of untrained BatchNorm, may be pooled into
//! one by libtorch's serialiser), not constants of its graph as a trace
//! leaves them (see `jit.cpp`), so
//! `module.to(device)`, `.cuda()`, `.half()` and `state_dict()` reach them as
//! they reach a Python module's; `torch.jit.load(path, map_location=...)`
//! puts them on a device too. The module written is loaded back and checked
//! against the network on other batch and image sizes than those traced,
//! and converted to fp64 as `.to()` converts, before it takes its name.
use std::ffi::{c_char, CStr, CString};
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

extern "C" {
    fn simclr_jit_last_error() -> *const c_char;
    fn simclr_jit_lift_constants(
        input: *const c_char,
        output: *const c_char,
        method: *const c_char,
        prefix: *const c_char,
        lifted: *mut i64,
    ) -> std::ffi::c_int;
}

/// What the module's buffers are named, before their index.
const BUFFER_PREFIX: &str = "tensor_";

/// Rewrites the traced module at `input` to `output` with the tensors its
/// `forward` holds as constants made its buffers (`jit.cpp`); returns how
/// many.
fn lift_constants(input: &Path, output: &Path) -> Result<i64> {
    let c_path = |path: &Path| {
        CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::InvalidArgument(format!("the path {} holds a NUL byte", path.display())))
    };
    let (input_c, output_c) = (c_path(input)?, c_path(output)?);
    let mut lifted = 0;
    // SAFETY: NUL-terminated strings that outlive the call, and a pointer to
    // a live i64; the shim catches every C++ exception.
    let code = unsafe {
        simclr_jit_lift_constants(
            input_c.as_ptr(),
            output_c.as_ptr(),
            c"forward".as_ptr(),
            CString::new(BUFFER_PREFIX).expect("no NUL").as_ptr(),
            &mut lifted,
        )
    };
    if code != 0 {
        // SAFETY: the shim returns a NUL-terminated string owned by this thread.
        let message = unsafe { CStr::from_ptr(simclr_jit_last_error()) }.to_string_lossy().into_owned();
        return Err(Error::InvalidArgument(format!(
            "making the traced module's weights its buffers ({}): {message}",
            input.display()
        )));
    }
    Ok(lifted)
}

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
        let mut traced = temporary.as_os_str().to_os_string();
        traced.push(".traced");
        let traced = PathBuf::from(traced);
        let lifted = module.save(&traced).map_err(Error::from).and_then(|()| lift_constants(&traced, temporary));
        let _ = std::fs::remove_file(&traced);
        lifted?;
        let mut loaded = CModule::load(temporary)?;
        // Shapes the trace did not see (a batch of 3, larger images), then
        // every tensor converted as `.to()` converts a module's (to fp64,
        // which the CPU runs): a weight left a constant of the graph would
        // make its convolution refuse the fp64 input.
        for (batch, side, kind) in [(3, side, Kind::Float), (1, side + 8, Kind::Float), (2, side, Kind::Double)] {
            if kind == Kind::Double {
                loaded.to(Device::Cpu, kind, false);
            }
            let images = Tensor::rand([batch, 3, side, side], options);
            let (ours, theirs) =
                tch::no_grad(|| Ok::<_, Error>((features(&images), loaded.forward_ts(&[&images.to_kind(kind)])?)))
                    .map_err(|e| match kind {
                        Kind::Double => Error::InvalidArgument(format!(
                            "the module converted to fp64 as .to() converts does not run: {e}"
                        )),
                        _ => e,
                    })?;
            if theirs.size() != ours.size() {
                return Err(Error::InvalidArgument(format!(
                    "the traced module gave features of shape {:?} for {batch} images of {side} px, the network {:?}",
                    theirs.size(),
                    ours.size()
                )));
            }
            let scale = ours.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
            difference =
                f64::max(difference, (theirs.to_kind(Kind::Float) - &ours).abs().max().double_value(&[]) / scale);
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

    /// A trace holds the tensors it closed over as constants, which `.to()`
    /// does not convert (the control: the fp64 call fails); made buffers,
    /// they are converted and the module runs in fp64 with the same result.
    #[test]
    fn a_traced_modules_weights_made_buffers_follow_its_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let weight = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let shift = Tensor::from_slice(&[0.5f32, -0.25, 1.0]).view([1, 3, 1, 1]);
        let example = Tensor::rand([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let module = tch::no_grad(|| {
            CModule::create_by_tracing("Tiny", "forward", &[example.shallow_clone()], &mut |inputs| {
                vec![(&inputs[0] - &shift).conv2d::<&Tensor>(&weight, None, [1], [1], [1], 1).relu()]
            })
        })
        .unwrap();
        let (traced, lifted) = (dir.path().join("traced.pt"), dir.path().join("lifted.pt"));
        module.save(&traced).unwrap();
        let expected = tch::no_grad(|| module.forward_ts(&[&example]).unwrap());
        let double = example.to_kind(Kind::Double);

        let mut constants = CModule::load(&traced).unwrap();
        constants.to(Device::Cpu, Kind::Double, false);
        let error = tch::no_grad(|| constants.forward_ts(&[&double])).unwrap_err().to_string();
        assert!(error.contains("Double") || error.contains("double"), "{error}");

        assert_eq!(lift_constants(&traced, &lifted).unwrap(), 2, "the weight and the shift");
        let mut buffers = CModule::load(&lifted).unwrap();
        let fp32 = tch::no_grad(|| buffers.forward_ts(&[&example]).unwrap());
        assert_eq!(f64::try_from((&fp32 - &expected).abs().max()).unwrap(), 0.0);
        buffers.to(Device::Cpu, Kind::Double, false);
        let fp64 = tch::no_grad(|| buffers.forward_ts(&[&double]).unwrap());
        assert_eq!(fp64.kind(), Kind::Double);
        let difference = f64::try_from((fp64 - expected.to_kind(Kind::Double)).abs().max()).unwrap();
        assert!(difference < 1e-5, "{difference}");

        let missing = lift_constants(&dir.path().join("none.pt"), &lifted).unwrap_err().to_string();
        assert!(missing.contains("none.pt"), "{missing}");
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
