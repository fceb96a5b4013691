//! Tensors on disk: safetensors files, written atomically, the encoder in
//! torchvision's state-dict names ([`torchvision`]), and features as `.npy`
//! ([`npy`]).
pub mod caption;
pub mod npy;
pub mod torchvision;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The most pixels a figure sheet (an augmentation preview, a neighbours
/// gallery) may have: 16384 x 16384, 768 MiB of RGB. A mistyped
/// `augment-preview --scale 100` asked for 27 GB and aborted on the allocation.
pub const MAX_SHEET_PIXELS: u64 = 1 << 28;

/// Whether `a` and `b` are one file or folder, however spelled (both
/// must exist).
pub fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Refuses a file to write that is a folder, named with `flag`, the
/// option that gave it: checked before the work, where the write at its
/// end (features of millions of images, hours of fine-tuning) failed with
/// "Is a directory".
pub fn refuse_folder(path: &Path, flag: &str) -> Result<()> {
    match path.is_dir() {
        true => Err(Error::InvalidArgument(format!(
            "{flag} {}: a folder, where the file to write is asked for",
            path.display()
        ))),
        false => Ok(()),
    }
}

/// The formats a figure sheet is written in, by its path's extension.
const SHEET_FORMATS: [(&str, image::ImageFormat); 6] = [
    ("png", image::ImageFormat::Png),
    ("jpg", image::ImageFormat::Jpeg),
    ("jpeg", image::ImageFormat::Jpeg),
    ("bmp", image::ImageFormat::Bmp),
    ("tiff", image::ImageFormat::Tiff),
    ("webp", image::ImageFormat::WebP),
];

/// The format a figure sheet at `path` is written in: the one its extension
/// names (any case), PNG where it has none; another extension is refused,
/// named, where a PNG under it (a `.jpg` holding PNG bytes) would mislead
/// whatever opens it by its name.
pub fn sheet_format(path: &Path) -> Result<image::ImageFormat> {
    let Some(extension) = path.extension() else {
        return Ok(image::ImageFormat::Png);
    };
    let extension = extension.to_string_lossy().to_lowercase();
    match SHEET_FORMATS.iter().find(|(name, _)| *name == extension) {
        Some(&(_, format)) => Ok(format),
        None => Err(Error::InvalidArgument(format!(
            "{}: an image is written as .png, .jpg, .bmp, .tiff or .webp (by its extension), not .{extension}",
            path.display()
        ))),
    }
}

/// Encodes `image` in the format its path names ([`sheet_format`]) and
/// writes it atomically.
pub fn write_sheet(path: &Path, image: &image::RgbImage) -> Result<()> {
    let format = sheet_format(path)?;
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), format).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot encode {}: {e}", format.extensions_str()[0]),
    })?;
    write_atomic(path, &bytes)
}

/// Fault injection: milliseconds to pause halfway through writing each
/// file's bytes (0: none), so a test can kill the process in the middle of
/// a checkpoint write.
#[cfg(feature = "fault-injection")]
static WRITE_PAUSE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(feature = "fault-injection")]
pub fn set_write_pause(milliseconds: u64) {
    WRITE_PAUSE_MS.store(milliseconds, std::sync::atomic::Ordering::Relaxed);
}

/// Makes the folder `dir` and those above it that are missing. Where one of
/// them is a file, the error names it (the OS says only "File exists" or
/// "Not a directory", with `dir`).
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|error| match dir.ancestors().find(|above| above.is_file()) {
        Some(file) => {
            let what = match file == dir {
                true => "a file, where a folder is needed".to_owned(),
                false => format!("a file, where {} needs a folder", dir.display()),
            };
            Error::io(file, std::io::Error::other(what))
        }
        None => Error::io(dir, error),
    })
}

/// Writes `path` so that it is either the old file or the whole new one:
/// the bytes go to a temporary file beside it, are flushed to disk, and the
/// temporary file is renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |temporary| {
        let write = || {
            let mut file = std::fs::File::create(temporary)?;
            #[cfg(feature = "fault-injection")]
            let pause = WRITE_PAUSE_MS.load(std::sync::atomic::Ordering::Relaxed);
            #[cfg(not(feature = "fault-injection"))]
            let pause = 0;
            if pause > 0 {
                let (first, second) = bytes.split_at(bytes.len() / 2);
                file.write_all(first)?;
                file.sync_data()?;
                std::thread::sleep(std::time::Duration::from_millis(pause));
                file.write_all(second)
            } else {
                file.write_all(bytes)
            }
        };
        write().map_err(|e| Error::io(path, e))
    })
}

/// [`write_atomic`] for a file that a library writes to a path of its own
/// (`write` is given the temporary file's): flushed to disk and renamed
/// over `path` once `write` succeeds, removed if it fails.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_dir(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TEMPORARY}{}", std::process::id()));
    let temporary = dir.join(name);
    let result = write(&temporary).and_then(|()| {
        let finish = || {
            std::fs::File::open(&temporary)?.sync_all()?;
            std::fs::rename(&temporary, path)?;
            // Make the rename itself durable.
            std::fs::File::open(dir)?.sync_all()
        };
        finish().map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// What [`write_atomic`]'s temporary file adds to its file's name, before
/// the writing process's id.
const TEMPORARY: &str = ".tmp";

/// The name of the file that `name`, a temporary file of [`write_atomic`]
/// (one a killed process left behind, say), was to become.
pub fn temporary_target(name: &str) -> Option<&str> {
    let (target, process) = name.rsplit_once(TEMPORARY)?;
    let digits = !process.is_empty() && process.bytes().all(|b| b.is_ascii_digit());
    (digits && !target.is_empty()).then_some(target)
}

/// Saves named tensors (moved to the CPU, made contiguous) with string metadata.
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(tensor.kind()).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            message: format!("tensor '{name}' has unsupported type {:?}", tensor.kind()),
        })?;
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    // A checksum of every tensor's name and bytes, so a damaged file is
    // recognised on load (safetensors itself checks only the header's shape).
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    let checksum = checksum(buffers.iter().map(|(name, _, _, bytes)| (name.as_str(), bytes.as_slice())));
    let mut metadata = metadata.unwrap_or_default();
    metadata.insert(CHECKSUM_KEY.to_owned(), checksum);
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view =
                TensorView::new(*dtype, shape.clone(), bytes).expect("shape and byte count come from the same tensor");
            (name.clone(), view)
        })
        .collect::<Vec<_>>();
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Weights { path: path.to_path_buf(), message: format!("cannot serialise: {e}") })?;
    write_atomic(path, &bytes)
}

const CHECKSUM_KEY: &str = "simclr_crc32";

/// CRC-32 of (name, bytes) pairs in the order given, as hex.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = crc32fast::Hasher::new();
    for (name, bytes) in tensors {
        hasher.update(name.as_bytes());
        hasher.update(bytes);
    }
    format!("{:08x}", hasher.finalize())
}

/// A safetensors file read into memory: named CPU tensors and metadata.
pub struct Loaded {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file; malformed headers, unknown dtypes and
/// out-of-range offsets are errors naming the file.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_bytes(&bytes, path)
}

/// [`load`] on bytes already read; `path` is only named in errors.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<Loaded> {
    let bad = |message: String| Error::Weights { path: path.to_path_buf(), message };
    let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let metadata = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?
        .1
        .metadata()
        .clone()
        .unwrap_or_default();
    if let Some(expected) = metadata.get(CHECKSUM_KEY) {
        let mut views = file.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        let actual = checksum(views.iter().map(|(name, view)| (name.as_str(), view.data())));
        if &actual != expected {
            return Err(bad(format!("checksum mismatch (stored {expected}, computed {actual}): the file is damaged")));
        }
    }
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| bad(format!("tensor '{name}' has unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    Ok(Loaded { path: path.to_path_buf(), tensors, metadata })
}

/// The string metadata of a safetensors file, reading its header only.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let bad = |message: String| Error::Weights { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    // safetensors' own limit on a header.
    let length = u64::from_le_bytes(length);
    if length > 100_000_000 {
        return Err(bad(format!("not a valid safetensors file: a header of {length} bytes")));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header =
        serde_json::from_slice(&header).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    Ok(header.metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_way_of_a_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runs");
        std::fs::write(&file, b"").unwrap();
        let itself = create_dir(&file).unwrap_err().to_string();
        assert_eq!(itself, format!("{}: a file, where a folder is needed", file.display()));
        let below = create_dir(&file.join("mine/deeper")).unwrap_err().to_string();
        assert!(below.starts_with(&format!("{}: a file, where ", file.display())), "{below}");
        assert!(below.ends_with("runs/mine/deeper needs a folder"), "{below}");
        // Folders are made, and kept where they exist.
        let fine = dir.path().join("a/b");
        create_dir(&fine).unwrap();
        assert!(fine.is_dir());
        create_dir(&fine).unwrap();
    }

    /// A file written by a library to a path of its own: whole under its
    /// name once written, and on a failed write neither it (an old one
    /// stays as it was) nor the temporary file is left.
    #[test]
    fn a_file_written_to_a_path_of_its_own_takes_its_name_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("module.pt");
        write_atomic_with(&path, |temporary| std::fs::write(temporary, b"first").map_err(|e| Error::io(temporary, e)))
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let failed = write_atomic_with(&path, |temporary| {
            std::fs::write(temporary, b"half").unwrap();
            Err(Error::InvalidArgument("the check failed".to_owned()))
        });
        assert!(failed.unwrap_err().to_string().contains("the check failed"));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["module.pt"]);
    }

    #[test]
    fn a_temporary_file_names_the_file_it_was_to_become() {
        // What write_atomic names its temporary file, read back.
        let mut name = std::ffi::OsString::from("checkpoint.safetensors.new");
        name.push(format!("{TEMPORARY}{}", std::process::id()));
        assert_eq!(temporary_target(name.to_str().unwrap()), Some("checkpoint.safetensors.new"));
        assert_eq!(temporary_target("metrics.jsonl.tmp7"), Some("metrics.jsonl"));
        for other in ["metrics.jsonl", "notes.tmp", "a.tmpx1", ".tmp12", "x.tmp12.png", "a.tmp-3"] {
            assert_eq!(temporary_target(other), None, "{other}");
        }
    }

    #[test]
    fn round_trip_keeps_tensors_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let weights = Tensor::from_slice(&[1.0f32, -2.0, 3.5]);
        let metadata = HashMap::from([("note".to_owned(), "kept".to_owned())]);
        save(&path, &[("w".to_owned(), weights.shallow_clone()), ("n".to_owned(), Tensor::from(7i64))], Some(metadata))
            .unwrap();
        let loaded = load(&path).unwrap();
        assert!(loaded.tensors["w"].equal(&weights));
        assert_eq!(loaded.tensors["n"].int64_value(&[]), 7);
        assert_eq!(loaded.metadata["note"], "kept");

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let message = load(&path).err().expect("damage is detected").to_string();
        assert!(message.contains("t.safetensors") && message.contains("checksum mismatch"), "{message}");
    }
}
