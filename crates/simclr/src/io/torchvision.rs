//! The encoder as torchvision names it, so `resnet50().load_state_dict(...)`
//! (with `strict=False` for the absent `fc`) takes our weights and we take
//! theirs. Files may also carry an `encoder.` prefix (a SimCLR store) or
//! `model.encoder.` (a run's checkpoint), and `fc.*`, `num_batches_tracked`
//! or head entries, which are ignored on load.
//!
//! An exported encoder records its [`EncoderSpec`] as JSON in the file's
//! metadata (key `simclr_encoder`), which torchvision's loader ignores, so
//! using it takes no architecture flags.
use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::model::simclr::ENCODER_PREFIX;
use crate::model::{EncoderSpec, ModelConfig, SpecOverrides};
use crate::{Error, Result};

const COUNTER: &str = "num_batches_tracked";

/// The encoder's tensors from a SimCLR store, prefix removed, with a
/// `num_batches_tracked` beside every BatchNorm as torchvision expects.
pub fn encoder_tensors(store: &nn::VarStore, batches_tracked: i64) -> Vec<(String, Tensor)> {
    let mut tensors: Vec<(String, Tensor)> = encoder_variables(store).collect();
    let counters: Vec<(String, Tensor)> = tensors
        .iter()
        .filter_map(|(name, _)| name.strip_suffix("running_mean"))
        .map(|bn| (format!("{bn}{COUNTER}"), Tensor::from(batches_tracked)))
        .collect();
    tensors.extend(counters);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The variables of a SimCLR store's encoder, under torchvision's names
/// (the store's prefix removed).
fn encoder_variables(store: &nn::VarStore) -> impl Iterator<Item = (String, Tensor)> {
    let prefix = format!("{ENCODER_PREFIX}.");
    store
        .variables()
        .into_iter()
        .filter_map(move |(name, tensor)| name.strip_prefix(&prefix).map(|n| (n.to_owned(), tensor)))
}

const SPEC_KEY: &str = "simclr_encoder";

/// Writes the encoder of a SimCLR store as torchvision-named safetensors,
/// with `spec` in its metadata.
pub fn export_encoder(store: &nn::VarStore, batches_tracked: i64, spec: &EncoderSpec, path: &Path) -> Result<()> {
    let spec = serde_json::to_string(spec).expect("an encoder spec is representable in JSON");
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned()), (SPEC_KEY.to_owned(), spec)]);
    super::save(path, &encoder_tensors(store, batches_tracked), Some(metadata))
}

/// The spec an encoder file records, if it records one (torchvision's files
/// and those of older runs do not). Reads the header only.
pub fn recorded_spec(path: &Path) -> Result<Option<EncoderSpec>> {
    let bad = |message: String| Error::Weights { path: path.to_path_buf(), message };
    let header = super::read_metadata(path)?;
    let Some(json) = header.get(SPEC_KEY) else { return Ok(None) };
    serde_json::from_str(json).map(Some).map_err(|e| bad(format!("metadata {SPEC_KEY} is unreadable: {e}")))
}

/// The spec to build for `path`: the one it records (else torchvision's
/// ResNet-50 defaults) with the user's overrides laid over it.
pub fn resolve_spec(path: &Path, overrides: &SpecOverrides) -> Result<EncoderSpec> {
    recorded_spec(path)?.unwrap_or_default().with(overrides)
}

/// Copies weights from `path` into `variables` (torchvision names), checking
/// that every variable is present with its shape.
pub fn load_encoder(variables: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    copy_weights(variables, path).map_err(|error| match (error, recorded_spec(path)) {
        (Error::Weights { path, message }, Ok(Some(spec))) => {
            Error::Weights { path, message: format!("{message}; the file records {}", spec.describe()) }
        }
        (error, _) => error,
    })
}

/// Copies the encoder weights in `path` into the encoder of the SimCLR
/// network in `store` (built as `model` says), whose network the file must
/// hold: a file recording another is refused, naming both.
pub fn load_simclr_encoder(store: &nn::VarStore, model: &ModelConfig, path: &Path) -> Result<()> {
    check_encoder_file(model, path)?;
    load_encoder(&encoder_variables(store).collect(), path)
}

/// Refuses an encoder file (read to its header) that records a network
/// other than `model`'s; one that records none is checked tensor by tensor
/// when it is loaded.
pub fn check_encoder_file(model: &ModelConfig, path: &Path) -> Result<()> {
    let Some(spec) = recorded_spec(path)? else { return Ok(()) };
    if (spec.arch, spec.width_multiplier, spec.stem) == (model.arch, model.width_multiplier, model.stem) {
        return Ok(());
    }
    let recorded = spec.describe();
    let wanted = EncoderSpec { arch: model.arch, width_multiplier: model.width_multiplier, stem: model.stem, ..spec };
    Err(Error::Weights {
        path: path.to_path_buf(),
        message: format!(
            "the file records {recorded}, and the run builds {} (model.arch, model.width_multiplier, model.stem)",
            wanted.describe()
        ),
    })
}

fn copy_weights(variables: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let loaded = super::load(path)?;
    let prefix = format!("{ENCODER_PREFIX}.");
    let checkpoint_prefix = format!("model.{ENCODER_PREFIX}.");
    let bare = |name: &'_ str| -> String {
        let stripped = name.strip_prefix(&checkpoint_prefix).or_else(|| name.strip_prefix(&prefix));
        stripped.unwrap_or(name).to_owned()
    };
    let file: HashMap<String, &Tensor> = loaded.tensors.iter().map(|(name, tensor)| (bare(name), tensor)).collect();
    let bad = |message: String| Error::Weights { path: path.to_path_buf(), message };
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let missing: Vec<&str> = names.iter().filter(|n| !file.contains_key(n.as_str())).map(|n| n.as_str()).collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        return Err(bad(format!(
            "{} tensor(s) missing, e.g. {shown} (is --arch/--width/--stem that of the weights?)",
            missing.len()
        )));
    }
    for name in names {
        let source = file[name];
        let target = &variables[name];
        if source.size() != target.size() {
            return Err(bad(format!(
                "tensor '{name}' has shape {:?}, the model expects {:?} (is --arch/--width/--stem that of the weights?)",
                source.size(),
                target.size()
            )));
        }
        if !source.is_floating_point() {
            return Err(bad(format!("tensor '{name}' has type {:?}, expected a float type", source.kind())));
        }
        let mut target = target.shallow_clone();
        tch::no_grad(|| target.copy_(&source.to_kind(Kind::Float).to_device(target.device())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig, ResNet, SimClr, Stem};
    use tch::Device;

    #[test]
    fn export_then_load_with_and_without_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            ModelConfig { arch: Arch::Resnet18, width_multiplier: 0.125, stem: Stem::Cifar, ..Default::default() };
        let trained = nn::VarStore::new(Device::Cpu);
        SimClr::new(&trained.root(), &config);
        let plain = dir.path().join("encoder.safetensors");
        let spec =
            EncoderSpec { arch: Arch::Resnet18, width_multiplier: 0.125, stem: Stem::Cifar, ..Default::default() };
        export_encoder(&trained, 7, &spec, &plain).unwrap();
        assert_eq!(recorded_spec(&plain).unwrap(), Some(spec));

        let written = crate::io::load(&plain).unwrap();
        assert_eq!(written.tensors["layer1.0.bn1.num_batches_tracked"].int64_value(&[]), 7);
        assert!(!written.tensors.keys().any(|k| k.starts_with("encoder.") || k.starts_with("projection_head")));

        // The same tensors under an `encoder.` prefix, plus torchvision's fc.
        let mut prefixed: Vec<(String, Tensor)> =
            written.tensors.iter().map(|(k, v)| (format!("encoder.{k}"), v.shallow_clone())).collect();
        prefixed.push(("fc.weight".to_owned(), Tensor::zeros([10, 64], (Kind::Float, Device::Cpu))));
        let with_prefix = dir.path().join("prefixed.safetensors");
        crate::io::save(&with_prefix, &prefixed, None).unwrap();
        assert_eq!(recorded_spec(&with_prefix).unwrap(), None, "a file from elsewhere records nothing");

        for path in [&plain, &with_prefix] {
            let fresh = nn::VarStore::new(Device::Cpu);
            ResNet::new(&fresh.root(), Arch::Resnet18, 0.125, Stem::Cifar);
            load_encoder(&fresh.variables(), path).unwrap();
            let expected = trained.variables();
            for (name, tensor) in fresh.variables() {
                assert!(tensor.equal(&expected[&format!("encoder.{name}")]), "{name} differs after loading {path:?}");
            }
        }
    }
}
