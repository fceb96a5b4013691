//! Listings of large image folders, kept across runs: listing a folder of a
//! million files (a directory read per class, entries sorted) takes seconds
//! on a local disk and minutes on network storage, for every run and every
//! evaluation. A folder of at least [`CACHED_FROM`] images is listed once;
//! the listing is written under `$SIMCLR_CACHE/listings` (default
//! `~/.cache/simclr`) with the modification time of the root and of every
//! class folder, and used while none of those times has changed (adding,
//! removing or renaming a file changes its folder's). A cache that cannot
//! be read or written is passed over: the folder is listed as usual.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// The smallest folder whose listing is cached.
pub const CACHED_FROM: usize = 10_000;

/// The format and the rules of listing; a listing made under other ones is
/// listed afresh (2: class folders walked into their sub-folders; 3: the
/// images outside the class folders kept, to be warned of on every run).
const HEADER: &str = "simclr listing 3";

/// A folder's listing: class names, and each image with its class.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Listing {
    pub classes: Vec<String>,
    pub files: Vec<(PathBuf, Option<usize>)>,
    /// Images in an image folder's root, beside its class folders: not
    /// used, as in torchvision's ImageFolder, but said so.
    pub outside: Vec<PathBuf>,
}

/// The project cache: `$SIMCLR_CACHE`, else `~/.cache/simclr`.
fn cache_base() -> Option<PathBuf> {
    match std::env::var_os("SIMCLR_CACHE") {
        Some(cache) => Some(PathBuf::from(cache)),
        None => Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/simclr")),
    }
}

fn cache_file(base: &Path, root: &Path, labelled: bool) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let key = crc32fast::hash(root.to_string_lossy().as_bytes());
    Some(base.join("listings").join(format!("{key:08x}-{}.txt", if labelled { "classes" } else { "flat" })))
}

/// Modification time in nanoseconds since the epoch.
fn modified(path: &Path) -> Option<u128> {
    Some(std::fs::metadata(path).ok()?.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos())
}

/// The cached listing of `root`, if there is one and its folders are unchanged.
pub fn load(root: &Path, labelled: bool) -> Option<Listing> {
    load_from(&cache_base()?, root, labelled)
}

pub(super) fn load_from(base: &Path, root: &Path, labelled: bool) -> Option<Listing> {
    let text = std::fs::read_to_string(cache_file(base, root, labelled)?).ok()?;
    let mut lines = text.lines();
    if lines.next()? != HEADER || Path::new(lines.next()?) != root.canonicalize().ok()? {
        return None;
    }
    let mut listing = Listing::default();
    for line in lines {
        let (kind, rest) = line.split_once(' ')?;
        match kind {
            "dir" => {
                let (time, dir) = rest.split_once(' ')?;
                if modified(&root.join(dir))? != time.parse::<u128>().ok()? {
                    return None;
                }
            }
            "class" => listing.classes.push(rest.to_owned()),
            "file" => {
                let (label, file) = rest.split_once(' ')?;
                let label = if label == "-" { None } else { Some(label.parse().ok()?) };
                listing.files.push((root.join(file), label));
            }
            "outside" => listing.outside.push(root.join(rest)),
            _ => return None,
        }
    }
    Some(listing)
}

/// Writes the listing of `root`, made from the folders `dirs` (the root
/// and its class folders), when it is large enough to be worth keeping.
pub fn store(root: &Path, labelled: bool, dirs: &[PathBuf], listing: &Listing) {
    if listing.files.len() < CACHED_FROM {
        return;
    }
    let stored = cache_base()
        .ok_or_else(|| std::io::Error::other("no cache folder"))
        .and_then(|base| store_in(&base, root, labelled, dirs, listing));
    if let Err(error) = stored {
        tracing::debug!("listing of {} not cached: {error}", root.display());
    }
}

pub(super) fn store_in(
    base: &Path,
    root: &Path,
    labelled: bool,
    dirs: &[PathBuf],
    listing: &Listing,
) -> std::io::Result<()> {
    let unavailable = || std::io::Error::other("unreadable path or modification time");
    let file = cache_file(base, root, labelled).ok_or_else(unavailable)?;
    // A name is written as text, one per line: one that is not UTF-8, or
    // holds a line break, would not read back as the same path.
    let relative = |path: &Path| {
        let relative = path.strip_prefix(root).unwrap_or(path).to_str().filter(|name| !name.contains('\n'));
        relative
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other(format!("{} is not a name of one line of UTF-8", path.display())))
    };
    let mut text = format!("{HEADER}\n{}\n", root.canonicalize()?.display());
    for dir in dirs {
        text += &format!("dir {} {}\n", modified(dir).ok_or_else(unavailable)?, relative(dir)?);
    }
    for class in &listing.classes {
        text += &format!("class {class}\n");
    }
    for (path, label) in &listing.files {
        let label = label.map_or("-".to_owned(), |label| label.to_string());
        text += &format!("file {label} {}\n", relative(path)?);
    }
    for path in &listing.outside {
        text += &format!("outside {}\n", relative(path)?);
    }
    std::fs::create_dir_all(file.parent().ok_or_else(unavailable)?)?;
    let partial = file.with_extension("partial");
    std::fs::File::create(&partial)?.write_all(text.as_bytes())?;
    std::fs::rename(partial, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_used_until_a_folder_changes() {
        let (cache, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (root, base) = (root.path(), cache.path());
        let dirs: Vec<PathBuf> = ["a", "b"].iter().map(|class| root.join(class)).collect();
        let outside = vec![root.join("beside the classes.jpg")];
        let mut listing = Listing { classes: vec!["a".into(), "b".into()], outside, ..Default::default() };
        for (label, dir) in dirs.iter().enumerate() {
            std::fs::create_dir(dir).unwrap();
            for name in ["1.jpg", "2 with space.jpg"] {
                std::fs::write(dir.join(name), "").unwrap();
                listing.files.push((dir.join(name), Some(label)));
            }
        }
        assert_eq!(load_from(base, root, true), None);
        let all: Vec<PathBuf> = std::iter::once(root.to_path_buf()).chain(dirs.iter().cloned()).collect();
        store_in(base, root, true, &all, &listing).unwrap();
        assert_eq!(load_from(base, root, true), Some(listing.clone()));
        assert_eq!(load_from(base, root, false), None, "flat and labelled listings are apart");
        // A file added to a class folder changes its time: listed afresh.
        std::fs::write(dirs[1].join("3.jpg"), "").unwrap();
        assert_eq!(load_from(base, root, true), None);
    }

    #[test]
    fn a_name_that_would_not_read_back_is_not_cached() {
        use std::os::unix::ffi::OsStrExt;
        let (cache, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (root, base) = (root.path(), cache.path());
        for name in [std::ffi::OsStr::new("two\nlines.jpg"), std::ffi::OsStr::from_bytes(b"latin-1 \xe9t\xe9.jpg")] {
            std::fs::write(root.join(name), "").unwrap();
            let listing = Listing { files: vec![(root.join(name), None)], ..Default::default() };
            let error = store_in(base, root, false, &[root.to_path_buf()], &listing).unwrap_err();
            assert!(error.to_string().contains("one line of UTF-8"), "{error}");
            assert_eq!(load_from(base, root, false), None);
            std::fs::remove_file(root.join(name)).unwrap();
        }
        // Control: a plain name is cached.
        let listing = Listing { files: vec![(root.join("plain.jpg"), None)], ..Default::default() };
        store_in(base, root, false, &[root.to_path_buf()], &listing).unwrap();
        assert_eq!(load_from(base, root, false), Some(listing));
    }
}
