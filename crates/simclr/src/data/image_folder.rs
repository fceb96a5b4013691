//! Folders of image files: `root/<class>/*.jpg` (torchvision's ImageFolder
//! layout; classes sorted by name) or a flat `root/*.jpg` without labels.
use std::path::{Path, PathBuf};

use super::{Dataset, ImageSource, Sample};
use crate::{Error, Result};

/// File endings read as images (case-insensitive); other files are ignored.
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"];

fn is_image_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A folder's entries, sorted by name so every listing is reproducible.
pub fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut entries = read
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort();
    Ok(entries)
}

/// Image files directly inside `dir`, sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?.into_iter().filter(|p| is_image_file(p)).collect())
}

pub fn open_labelled(root: &Path) -> Result<Dataset> {
    let mut classes = Vec::new();
    let mut samples = Vec::new();
    for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
        let files = image_files(&dir)?;
        if files.is_empty() {
            continue;
        }
        let label = classes.len();
        classes.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        samples.extend(files.into_iter().map(|path| Sample { source: ImageSource::File(path), label: Some(label) }));
    }
    Ok(Dataset::new(root, samples, classes))
}

pub fn open_flat(root: &Path) -> Result<Dataset> {
    let samples =
        image_files(root)?.into_iter().map(|path| Sample { source: ImageSource::File(path), label: None }).collect();
    Ok(Dataset::new(root, samples, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_sorted_and_non_images_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for (class, name) in [("dog", "b.png"), ("cat", "a.png"), ("cat", "c.png")] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            image::RgbImage::new(8, 8).save(dir.path().join(class).join(name)).unwrap();
        }
        std::fs::write(dir.path().join("cat/notes.txt"), "not an image").unwrap();
        let dataset = open_labelled(dir.path()).unwrap();
        assert_eq!(dataset.classes, vec!["cat", "dog"]);
        let labels: Vec<_> = dataset.samples.iter().map(|s| s.label.unwrap()).collect();
        assert_eq!(labels, vec![0, 0, 1]);
    }
}
