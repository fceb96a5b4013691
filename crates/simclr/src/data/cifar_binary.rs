//! The CIFAR-10 and CIFAR-100 binary formats (Krizhevsky 2009): records of
//! label byte(s) followed by 3072 bytes, a 32x32 red plane, then green, then
//! blue. CIFAR-10 records have one label byte (`data_batch_N.bin`,
//! `test_batch.bin`); CIFAR-100 records have two, coarse then fine
//! (`train.bin`, `test.bin`), and the fine label is used.
use std::path::Path;
use std::sync::Arc;

use image::RgbImage;

use super::{Dataset, ImageSource, Sample};
use crate::{Error, Result};

const PIXELS: usize = 32 * 32;
const IMAGE_BYTES: usize = 3 * PIXELS;

/// Which variant a batch file is, from its name.
fn label_bytes(path: &Path) -> usize {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name == "train.bin" || name == "test.bin" {
        2
    } else {
        1
    }
}

/// Parses one batch file. The length must be a whole number of records.
pub fn read_batch(path: &Path) -> Result<Vec<(RgbImage, usize)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_batch(&bytes, label_bytes(path)).map_err(|message| Error::Dataset { path: path.to_path_buf(), message })
}

/// Parses records with `label_bytes` label bytes each; the message of the
/// error says what length was expected.
pub fn parse_batch(bytes: &[u8], label_bytes: usize) -> std::result::Result<Vec<(RgbImage, usize)>, String> {
    let record = label_bytes + IMAGE_BYTES;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(format!(
            "expected a multiple of {record} bytes ({label_bytes} label byte(s) + {IMAGE_BYTES} pixels per image, \
             30730000 for a CIFAR-10 batch), got {}",
            bytes.len()
        ));
    }
    // CIFAR-10 has 10 classes, CIFAR-100 100 fine ones: a larger label is damage.
    let classes = if label_bytes == 1 { 10 } else { 100 };
    if let Some((index, chunk)) =
        bytes.chunks_exact(record).enumerate().find(|(_, chunk)| usize::from(chunk[label_bytes - 1]) >= classes)
    {
        return Err(format!(
            "record {index}: label {} is out of range (the format has {classes} classes, 0 to {})",
            chunk[label_bytes - 1],
            classes - 1
        ));
    }
    Ok(bytes
        .chunks_exact(record)
        .map(|chunk| {
            let label = usize::from(chunk[label_bytes - 1]);
            let planes = &chunk[label_bytes..];
            let image = RgbImage::from_fn(32, 32, |x, y| {
                let i = y as usize * 32 + x as usize;
                image::Rgb([planes[i], planes[PIXELS + i], planes[2 * PIXELS + i]])
            });
            (image, label)
        })
        .collect())
}

/// Opens one `.bin` file, or the training batches of a CIFAR folder
/// (`data_batch_*.bin` or `train.bin`).
pub fn open(path: &Path) -> Result<Dataset> {
    let files = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        let entries = super::image_folder::sorted_entries(path)?;
        let is_train = |p: &&std::path::PathBuf| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("data_batch_") && name.ends_with(".bin") || name == "train.bin"
        };
        entries.iter().filter(is_train).cloned().collect()
    };
    if files.is_empty() {
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            message: "no CIFAR training batches (data_batch_*.bin or train.bin)".to_owned(),
        });
    }
    let mut samples = Vec::new();
    let mut max_label = 0;
    for file in &files {
        for (image, label) in read_batch(file)? {
            max_label = max_label.max(label);
            samples.push(Sample { source: ImageSource::Memory(Arc::new(image)), label: Some(label) });
        }
    }
    let folder = if path.is_file() { path.parent().unwrap_or(Path::new(".")) } else { path };
    let classes = class_names(folder, label_bytes(&files[0]), max_label)?;
    Ok(Dataset::new(path, samples, classes))
}

/// The class names the batches' folder lists (`batches.meta.txt` for
/// CIFAR-10, `fine_label_names.txt` for CIFAR-100, one per line, as the
/// archives ship them), so that a class has the same name here as in an
/// image folder of the same data; without that file, the labels' numbers.
fn class_names(folder: &Path, label_bytes: usize, max_label: usize) -> Result<Vec<String>> {
    let file = folder.join(if label_bytes == 1 { "batches.meta.txt" } else { "fine_label_names.txt" });
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok((0..=max_label).map(|c| c.to_string()).collect());
        }
        Err(error) => return Err(Error::io(&file, error)),
    };
    let names: Vec<String> = text.lines().map(str::trim).filter(|name| !name.is_empty()).map(String::from).collect();
    if names.len() <= max_label {
        return Err(Error::Dataset {
            path: file,
            message: format!("names {} classes, but the batches hold labels up to {max_label}", names.len()),
        });
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_planes_into_pixels() {
        let mut record = vec![7u8];
        record.extend(std::iter::repeat_n(10u8, PIXELS));
        record.extend(std::iter::repeat_n(20u8, PIXELS));
        record.extend(std::iter::repeat_n(30u8, PIXELS));
        let parsed = parse_batch(&record, 1).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].1, 7);
        assert_eq!(parsed[0].0.get_pixel(5, 9).0, [10, 20, 30]);
    }

    #[test]
    fn classes_are_named_as_the_archive_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let record = |label: u8| std::iter::once(label).chain(std::iter::repeat_n(0, IMAGE_BYTES));
        let batch: Vec<u8> = record(2).chain(record(0)).collect();
        std::fs::write(dir.path().join("data_batch_1.bin"), &batch).unwrap();
        assert_eq!(open(dir.path()).unwrap().classes, ["0", "1", "2"], "no names listed: the numbers");
        std::fs::write(dir.path().join("batches.meta.txt"), "airplane\nautomobile\nbird\ncat\n\n").unwrap();
        for path in [dir.path().to_path_buf(), dir.path().join("data_batch_1.bin")] {
            let dataset = open(&path).unwrap();
            assert_eq!(dataset.classes, ["airplane", "automobile", "bird", "cat"]);
            let labels: Vec<_> = dataset.samples.iter().map(|sample| sample.label).collect();
            assert_eq!(labels, [Some(2), Some(0)]);
        }
        std::fs::write(dir.path().join("batches.meta.txt"), "airplane\nautomobile\n").unwrap();
        let error = open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("batches.meta.txt") && error.contains("names 2 classes"), "{error}");
    }

    #[test]
    fn wrong_length_names_the_expected_size() {
        let message = parse_batch(&[0u8; 1024], 1).unwrap_err();
        assert!(message.contains("30730000") && message.contains("got 1024"), "{message}");
        assert!(parse_batch(&[], 1).is_err());
    }
}
