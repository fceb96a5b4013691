//! Folders of image files: `root/<class>/*.jpg` (torchvision's ImageFolder
//! layout: classes sorted by name, each class folder's images found in its
//! sub-folders too) or a flat `root/*.jpg` without labels.
use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
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
    Ok(read_folder(dir)?.0)
}

/// The image files directly inside `dir` (sorted) and its folders, from
/// one directory read.
fn read_folder(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let (mut files, mut folders) = (Vec::new(), Vec::new());
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        // A link is followed with one `stat`; a broken one is neither.
        let (is_dir, is_file) = match kind.is_symlink() {
            true => std::fs::metadata(&path).map_or((false, false), |target| (target.is_dir(), target.is_file())),
            false => (kind.is_dir(), kind.is_file()),
        };
        if is_dir {
            folders.push(path);
        } else if is_file && has_image_extension(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok((files, folders))
}

/// Every image file below `dir`, in the order torchvision's ImageFolder
/// lists a class folder (`os.walk` with links followed, sorted): folder by
/// folder in the order of their paths as text, each folder's files by
/// name; and the folders walked, `dir` first. A link back to a folder
/// already walked is not walked again.
pub fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut pending, mut seen, mut walked) = (vec![dir.to_path_buf()], HashSet::new(), Vec::new());
    while let Some(folder) = pending.pop() {
        if !seen.insert(folder.canonicalize().map_err(|e| Error::io(&folder, e))?) {
            continue;
        }
        let (files, folders) = read_folder(&folder)?;
        pending.extend(folders);
        walked.push((folder, files));
    }
    walked.sort_by(|(a, _), (b, _)| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    let folders = walked.iter().map(|(folder, _)| folder.clone()).collect();
    Ok((walked.into_iter().flat_map(|(_, files)| files).collect(), folders))
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
    if let Some(warning) = outside_warning(root, &listing.outside) {
        tracing::warn!("{warning}");
    }
    Ok(dataset(root, listing))
}

/// What a run is told of images beside the class folders, whether the
/// folder was listed now or earlier.
fn outside_warning(root: &Path, outside: &[PathBuf]) -> Option<String> {
    Some(format!(
        "{}: {} outside the class folders not used (the first: {}); an image folder's images are those of its \
         class folders, as in torchvision's ImageFolder",
        root.display(),
        crate::names::counted(outside.len(), "image"),
        outside.first()?.display()
    ))
}

/// The listing of `root/<class>/**/*.jpg` (each class folder walked as
/// [`walk`] does) and the folders it was made from: the root and every
/// folder below it, those without images too (no class, but an image put
/// in one later must list the folder afresh).
fn list_labelled(root: &Path) -> Result<(Listing, Vec<PathBuf>)> {
    let (outside, mut classes) = read_folder(root)?;
    let mut listing = Listing { outside, ..Default::default() };
    let mut dirs = vec![root.to_path_buf()];
    classes.sort();
    for dir in classes {
        let (files, folders) = walk(&dir)?;
        if !files.is_empty() {
            let label = listing.classes.len();
            listing.classes.push(dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            listing.files.extend(files.into_iter().map(|path| (path, Some(label))));
        }
        dirs.extend(folders);
    }
    Ok((listing, dirs))
}

/// `root/*.jpg`, no labels; the listing of a large folder is cached.
pub fn open_flat(root: &Path) -> Result<Dataset> {
    let listing = match listing::load(root, false) {
        Some(listing) => listing,
        None => {
            let files = image_files(root)?.into_iter().map(|path| (path, None)).collect();
            let listing = Listing { files, ..Default::default() };
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
    fn images_in_a_class_folders_sub_folders_are_listed_in_torchvisions_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // loose.png is in no class folder: not listed (and warned of).
        let names = ["cat/b.png", "cat/sub/a.png", "cat/sub-a/c.png", "cat/sub/x/d.png", "dog/e.png", "loose.png"];
        for name in names {
            std::fs::create_dir_all(root.join(name).parent().unwrap()).unwrap();
            image::RgbImage::new(8, 8).save(root.join(name)).unwrap();
        }
        // A link back up is walked once, not forever.
        std::os::unix::fs::symlink(root.join("cat"), root.join("cat/sub/x/up")).unwrap();
        let dataset = open_labelled(root).unwrap();
        let listed: Vec<(String, Option<usize>)> = dataset
            .samples
            .iter()
            .map(|sample| match &sample.source {
                ImageSource::File(path) => (path.strip_prefix(root).unwrap().display().to_string(), sample.label),
                _ => unreachable!("a folder lists files"),
            })
            .collect();
        // As torchvision 0.26's ImageFolder lists this tree (checked by
        // hand): folders by their path as text, so sub-a before sub/x;
        // sorting whole paths by component would put sub/x/d.png third.
        let expected =
            [("cat/b.png", 0), ("cat/sub/a.png", 0), ("cat/sub-a/c.png", 0), ("cat/sub/x/d.png", 0), ("dog/e.png", 1)];
        let expected: Vec<(String, Option<usize>)> =
            expected.iter().map(|(name, label)| (name.to_string(), Some(*label))).collect();
        assert_eq!(listed, expected);
        // Every folder walked is kept with a listing: an image added deep down lists afresh.
        let (_, dirs) = list_labelled(root).unwrap();
        assert!(dirs.contains(&root.join("cat/sub/x")) && dirs.len() == 6, "{dirs:?}");
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

    #[test]
    fn images_beside_the_class_folders_are_warned_of_from_a_kept_listing_too() {
        let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(dir.path().join("cat")).unwrap();
        for name in ["cat/a.png", "stray.png"] {
            image::RgbImage::new(8, 8).save(dir.path().join(name)).unwrap();
        }
        let (listing, dirs) = list_labelled(dir.path()).unwrap();
        assert_eq!(listing.outside, [dir.path().join("stray.png")]);
        listing::store_in(cache.path(), dir.path(), true, &dirs, &listing).unwrap();
        let kept = listing::load_from(cache.path(), dir.path(), true).unwrap();
        let warning = outside_warning(dir.path(), &kept.outside).expect("the kept listing has the stray image");
        assert!(warning.contains(": 1 image outside the class folders not used (the first: "), "{warning}");
        assert!(warning.ends_with("as in torchvision's ImageFolder") && warning.contains("stray.png"));
        assert_eq!(outside_warning(dir.path(), &[]), None);
    }
}
