//! A low-shot evaluation's labelled images given as a list, in place of a
//! class-balanced fraction drawn with a seed: the paper's own ImageNet
//! subsets (google-research/simclr's `imagenet_subsets/1percent.txt` and
//! `10percent.txt`, one file name such as `n01440764_10026.JPEG` a line,
//! which VISSL reads too), so that a score is computed on the
//! images theirs were; or a list `--subset-file` wrote before.
use std::collections::HashMap;
use std::path::Path;

use crate::data::{Dataset, ImageSource};
use crate::{Error, Result};

/// How many entries that match no image an error shows.
const SHOWN: usize = 3;

/// The indices (sorted) of the images of `dataset` that `list` names, one
/// a line (blank lines and lines starting with `#` aside): each by its path
/// as a listing names it ([`crate::data::Sample::describe`], what
/// `--subset-file` writes), by its path under the dataset's folder (a
/// shard member by its name in the shard), or by its file name where no
/// other image has that name. An entry that names no image, or several, is
/// an error naming the list, its line and the entry; one named twice is
/// counted once.
pub fn listed_subset(dataset: &Dataset, list: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
    let mut exact: HashMap<String, usize> = HashMap::new();
    let (mut by_name, mut by_stem): (HashMap<String, Vec<usize>>, HashMap<String, Vec<usize>>) = Default::default();
    for (index, sample) in dataset.samples.iter().enumerate() {
        exact.insert(sample.describe(index), index);
        let under = match &sample.source {
            ImageSource::File(path) => path.strip_prefix(&dataset.origin).ok().map(|p| p.display().to_string()),
            ImageSource::Shard(member) => Some(member.name.clone()),
            ImageSource::Memory(_) => None,
        };
        if let Some(under) = under {
            let name = under.rsplit('/').next().unwrap_or(&under).to_owned();
            by_stem.entry(stem(&name).to_owned()).or_default().push(index);
            by_name.entry(name).or_default().push(index);
            exact.entry(under).or_insert(index);
        }
    }
    let problem = |message: String| Error::InvalidArgument(format!("{}: {message}", list.display()));
    let (mut chosen, mut unknown, mut entries) = (Vec::new(), Vec::new(), 0);
    for (number, line) in text.lines().enumerate().map(|(at, line)| (at + 1, line.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        entries += 1;
        // A file name alone names an image by it, else by its stem (a
        // WebDataset shard's key: `n01440764_10026.jpg` for the list's
        // `n01440764_10026.JPEG`).
        let named = match line.contains('/') {
            true => None,
            false => by_name.get(line).or_else(|| by_stem.get(stem(line))),
        };
        match (exact.get(line), named.map(Vec::as_slice)) {
            (Some(&index), _) | (None, Some(&[index])) => chosen.push(index),
            (None, Some(several)) => {
                let paths: Vec<String> = several.iter().take(2).map(|&i| dataset.samples[i].describe(i)).collect();
                return Err(problem(format!(
                    "line {number}: '{line}' is the file name of {} images of {} ({}, ...): give its path under {}",
                    several.len(),
                    dataset.origin.display(),
                    paths.join(", "),
                    dataset.origin.display()
                )));
            }
            (None, _) => unknown.push(format!("line {number}: '{line}'")),
        }
    }
    if !unknown.is_empty() {
        let more = unknown.len().saturating_sub(SHOWN);
        let shown = unknown[..unknown.len().min(SHOWN)].join(", ");
        return Err(problem(format!(
            "{} of its {entries} entries name no image of the {} of {} ({shown}{}){}: an entry is an image's \
             path, its path under that folder, or its file name",
            unknown.len(),
            crate::names::counted(dataset.len(), "image"),
            dataset.origin.display(),
            if more > 0 { format!(", {more} more") } else { String::new() },
            match dataset.skipped().len() {
                0 => String::new(),
                skipped => format!(", {} left out before", crate::names::counted(skipped, "unreadable image")),
            },
        )));
    }
    chosen.sort_unstable();
    let listed = chosen.len();
    chosen.dedup();
    if chosen.is_empty() {
        return Err(problem("it lists no images".to_owned()));
    }
    if chosen.len() < listed {
        tracing::warn!(
            "{}: {} images are listed more than once; each counted once",
            list.display(),
            listed - chosen.len()
        );
    }
    Ok(chosen)
}

/// A file name up to its first dot: `n01_1` of `n01_1.JPEG`, as a
/// WebDataset key ends.
fn stem(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ImageFolder of `names` (class/file) under a new temporary folder.
    fn folder(names: &[&str]) -> (tempfile::TempDir, Dataset) {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::RgbImage::new(16, 16).save(path).unwrap();
        }
        let dataset = Dataset::open(dir.path(), &crate::data::config::DataFormat::Auto).unwrap();
        (dir, dataset)
    }

    fn listed(dataset: &Dataset, lines: &str) -> Result<Vec<String>> {
        let list = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(list.path(), lines).unwrap();
        let chosen = listed_subset(dataset, list.path())?;
        Ok(chosen.iter().map(|&i| dataset.samples[i].describe(i)).collect())
    }

    #[test]
    fn entries_name_images_by_path_path_under_the_folder_or_file_name() {
        let names = ["n01/n01_1.JPEG", "n01/n01_2.JPEG", "n02/n02_1.JPEG", "n02/n02_2.JPEG", "n03/n01_1.JPEG"];
        let (dir, dataset) = folder(&names);
        let path = |name: &str| dir.path().join(name).display().to_string();
        // The paper's lists give file names; --subset-file writes paths.
        let lines = format!("# a comment\nn02_1.JPEG\n\n{}\n  n03/n01_1.JPEG \nn02_1.JPEG\n", path("n01/n01_2.JPEG"));
        let chosen = listed(&dataset, &lines).unwrap();
        assert_eq!(chosen, [path("n01/n01_2.JPEG"), path("n02/n02_1.JPEG"), path("n03/n01_1.JPEG")]);

        // A file name two images have, and entries that name none.
        let error = listed(&dataset, "n01_1.JPEG\n").unwrap_err().to_string();
        assert!(error.contains("line 1: 'n01_1.JPEG' is the file name of 2 images"), "{error}");
        assert!(error.contains("give its path under"), "{error}");
        let error = listed(&dataset, "n02_1.JPEG\nn09_1.JPEG\nn02_1.jpg\nn02/x.JPEG\nn09/n02_2.JPEG\nn01_7\n");
        let error = error.unwrap_err().to_string();
        assert!(error.contains("4 of its 6 entries name no image of the 5 images of"), "{error}");
        let shown = "(line 2: 'n09_1.JPEG', line 4: 'n02/x.JPEG', line 5: 'n09/n02_2.JPEG', 1 more)";
        assert!(error.contains(shown), "{error}");
        // By its key, as a WebDataset shard holds it: the stem of a name.
        let keyed = listed(&dataset, "n02_2.jpg\nn02_1\n").unwrap();
        assert_eq!(keyed, [path("n02/n02_1.JPEG"), path("n02/n02_2.JPEG")]);
        assert!(listed(&dataset, "# nothing\n\n").unwrap_err().to_string().contains("it lists no images"));
    }

    #[test]
    fn an_unreadable_image_listed_is_said_to_have_been_left_out() {
        let (dir, dataset) = folder(&["a/1.png", "a/2.png", "b/3.png"]);
        std::fs::write(dir.path().join("b/3.png"), b"not a png").unwrap();
        let pool = crate::data::loader::worker_pool(1).unwrap();
        let policy = crate::data::config::BadImagePolicy::Skip;
        let readable = dataset.with_policy(policy).without_unreadable_across(&pool, None).unwrap();
        let error = listed(&readable, "1.png\n3.png\n").unwrap_err().to_string();
        assert!(error.contains("1 of its 2 entries name no image of the 2 images of"), "{error}");
        assert!(error.contains("(line 2: '3.png'), 1 unreadable image left out before: "), "{error}");
    }

    #[test]
    fn a_shard_member_is_named_by_its_name_or_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(std::fs::File::create(dir.path().join("a.tar")).unwrap());
        for name in ["n01_5.jpg", "train/n02_9.jpg"] {
            let mut header = tar::Header::new_gnu();
            header.set_size(3);
            builder.append_data(&mut header, name, &b"abc"[..]).unwrap();
        }
        builder.finish().unwrap();
        let dataset = Dataset::open(dir.path(), &crate::data::config::DataFormat::Auto).unwrap();
        let chosen = listed(&dataset, "n02_9.JPEG\ntrain/n02_9.jpg\nn01_5.jpg\n").unwrap();
        assert_eq!(
            chosen.iter().map(|path| path.rsplit(':').next().unwrap()).collect::<Vec<_>>(),
            ["n01_5.jpg", "train/n02_9.jpg"]
        );
    }
}
