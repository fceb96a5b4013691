//! Folders of image files: `root/<class>/*.jpg` (torchvision's ImageFolder
//! layout; classes sorted by name) or a flat `root/*.jpg` without labels.
use std::path::{Path, PathBuf};

use super::listing::{self, Listing};
use super::{Dataset, ImageSource, Sample};
use crate::{Error, Result};

/// File endings read as images (case-insensitive); other files are ignored.
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"];

fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
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

/// Image files directly inside `dir`, sorted. The entry types come with the
/// directory read, so a folder of a million files costs no million `stat`s
/// (links are followed with one).
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if has_image_extension(&path) && (kind.is_file() || (kind.is_symlink() && path.is_file())) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `root/<class>/*.jpg`; the listing of a large folder is cached ([`listing`]).
pub fn open_labelled(root: &Path) -> Result<Dataset> {
    let listing = match listing::load(root, true) {
        Some(listing) => listing,
        None => {
            let (listing, dirs) = list_labelled(root)?;
            listing::store(root, true, &dirs, &listing);
            listing
        }
    };
    Ok(dataset(root, listing))
}

/// The listing of `root/<class>/*.jpg` and the folders it was made from:
/// the root and every folder in it, those without images too (no class,
/// but an image put in one later must list the folder afresh).
fn list_labelled(root: &Path) -> Result<(Listing, Vec<PathBuf>)> {
    let mut listing = Listing { classes: Vec::new(), files: Vec::new() };
    let mut dirs = vec![root.to_path_buf()];
    for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
        let files = image_files(&dir)?;
        if !files.is_empty() {
            let label = listing.classes.len();
            listing.classes.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            listing.files.extend(files.into_iter().map(|path| (path, Some(label))));
        }
        dirs.push(dir);
    }
    Ok((listing, dirs))
}

/// `root/*.jpg`, no labels; the listing of a large folder is cached.
pub fn open_flat(root: &Path) -> Result<Dataset> {
    let listing = match listing::load(root, false) {
        Some(listing) => listing,
        None => {
            let files = image_files(root)?.into_iter().map(|path| (path, None)).collect();
            let listing = Listing { classes: Vec::new(), files };
            listing::store(root, false, &[root.to_path_buf()], &listing);
            listing
        }
    };
    Ok(dataset(root, listing))
}

fn dataset(root: &Path, listing: Listing) -> Dataset {
    let samples =
        listing.files.into_iter().map(|(path, label)| Sample { source: ImageSource::File(path), label }).collect();
    Dataset::new(root, samples, listing.classes)
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

    #[test]
    fn an_image_put_in_a_folder_without_images_lists_the_folder_afresh() {
        let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for class in ["cat", "dog"] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
        }
        image::RgbImage::new(8, 8).save(dir.path().join("cat/a.png")).unwrap();
        let (listing, dirs) = list_labelled(dir.path()).unwrap();
        assert_eq!(listing.classes, ["cat"], "a folder without images is no class");
        listing::store_in(cache.path(), dir.path(), true, &dirs, &listing).unwrap();
        assert_eq!(listing::load_from(cache.path(), dir.path(), true), Some(listing));
        image::RgbImage::new(8, 8).save(dir.path().join("dog/b.png")).unwrap();
        assert_eq!(listing::load_from(cache.path(), dir.path(), true), None, "dog's new image is listed");
        assert_eq!(list_labelled(dir.path()).unwrap().0.classes, ["cat", "dog"]);
    }
}
