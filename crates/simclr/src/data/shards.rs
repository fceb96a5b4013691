//! WebDataset-style tar shards (Aizman et al., "High Performance I/O for
//! Large Scale Deep Learning", 2019): each shard a plain tar whose members
//! are grouped by key, the name up to the first dot of the file name
//! (`000123.jpg` with its label `000123.cls`, a decimal class number). The
//! usual format for datasets on shared or network storage: a few large
//! files read front to back instead of millions of small ones.
//!
//! Two ways to read them. By index: each shard's member headers are read
//! once when the dataset opens (their offsets and sizes; a header is 512
//! bytes, the data is skipped with a seek) and an image is then read with
//! one positioned read, so a run from shards is the run from the folder
//! they were written from, image for image. Streaming (`data.shuffle_buffer`
//! > 0, see [`super::stream`]): shards read front to back.
//!
//! `simclr shard` writes a dataset as shards ([`write_shards`]): members in
//! the dataset's order, the images' own bytes, and `classes.txt` beside the
//! shards naming the classes of the `.cls` numbers.
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::image_folder::{sorted_entries, EXTENSIONS};
use super::{Dataset, ImageSource, Sample};
use crate::names::counted;
use crate::{Error, Result};

/// The file naming the classes of a folder of shards, one per line, in the
/// order of their `.cls` numbers.
pub const CLASSES_FILE: &str = "classes.txt";

/// Where one image member's bytes are.
#[derive(Debug, Clone)]
pub struct Member {
    pub shard: Arc<PathBuf>,
    /// The member's name in the shard (`000123.jpg`).
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// Why the member cannot be read, when its shard is damaged before it.
    pub damage: Option<String>,
}

impl Member {
    /// "shard path:member name", the name errors and listings give.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("{}:{}", self.shard.display(), self.name))
    }

    /// The member's bytes, with one positioned read.
    pub fn read(&self) -> Result<Vec<u8>> {
        if let Some(damage) = &self.damage {
            return Err(Error::Image { path: self.path(), message: damage.clone() });
        }
        let file = File::open(&*self.shard).map_err(|e| Error::io(&*self.shard, e))?;
        let mut bytes = vec![0; self.len as usize];
        file.read_exact_at(&mut bytes, self.offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Image {
                path: self.path(),
                message: format!("truncated: the shard ends before this member's {} bytes", self.len),
            },
            _ => Error::io(self.path(), e),
        })?;
        Ok(bytes)
    }
}

/// A member name split into its key and its extension (lowercase).
pub(crate) fn key_and_extension(name: &str) -> (&str, String) {
    let file = name.rsplit('/').next().unwrap_or(name);
    let stem = name.len() - file.len() + file.find('.').unwrap_or(file.len());
    (&name[..stem], name[stem..].trim_start_matches('.').to_ascii_lowercase())
}

/// One sample of a shard: its image member and its label, if any.
#[derive(Debug, Clone)]
pub struct Entry {
    pub image: Member,
    pub label: Option<usize>,
}

/// Reads the member headers of the shard at `path`: every key with an
/// image member, in the order they appear. A shard cut short keeps the
/// members before the cut; the cut member itself is listed with its
/// declared size, so reading it fails with its name, under the run's
/// bad-image policy. A label that is not a number stops with both named.
pub fn index(path: &Path) -> Result<Vec<Entry>> {
    let shard = Arc::new(path.to_path_buf());
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| Error::io(path, e))?;
    let mut images: Vec<Entry> = Vec::new();
    let mut labels: std::collections::HashMap<String, usize> = Default::default();
    let mut last = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                // A header cut short or garbled: the shard ends here, and
                // what followed is one unreadable sample, named after the
                // last member read.
                let name = match &last {
                    Some(name) => format!("(after {name})"),
                    None => "(first member)".to_owned(),
                };
                let damage = Some(format!("damaged shard, no member header here: {error}"));
                let image = Member { shard: shard.clone(), name, offset: file_len, len: 0, damage };
                images.push(Entry { image, label: None });
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(|e| Error::io(path, e))?.to_string_lossy().into_owned();
        last = Some(name.clone());
        let (key, extension) = key_and_extension(&name);
        let key = key.to_owned();
        if extension == "cls" {
            let mut text = String::new();
            let read = std::io::Read::read_to_string(&mut entry, &mut text);
            let label = read.ok().and_then(|_| text.trim().parse::<usize>().ok()).ok_or_else(|| Error::Dataset {
                path: path.to_path_buf(),
                message: format!("member {name}: expected a class number, found {:?}", text.trim()),
            })?;
            labels.insert(key, label);
        } else if EXTENSIONS.contains(&extension.as_str()) {
            let offset = entry.raw_file_position();
            let image = Member { shard: shard.clone(), name, offset, len: entry.size(), damage: None };
            let cut = offset + image.len > file_len;
            images.push(Entry { image, label: None });
            if cut {
                break;
            }
        }
    }
    for entry in &mut images {
        entry.label = labels.get(key_and_extension(&entry.image.name).0).copied();
    }
    Ok(images)
}

/// The shards at `path`: one `.tar` file, or every `.tar` in a folder, sorted.
pub fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    Ok(sorted_entries(path)?.into_iter().filter(|p| p.is_file() && is_shard(p)).collect())
}

pub(crate) fn is_shard(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tar"))
}

/// Opens shards as a dataset read by index; labelled when every image has
/// a `.cls` (class names from `classes.txt` beside them, else the numbers).
pub fn open(path: &Path) -> Result<Dataset> {
    let mut samples = Vec::new();
    for shard in shard_files(path)? {
        let entries = index(&shard)?;
        samples.extend(
            entries.into_iter().map(|entry| Sample { source: ImageSource::Shard(entry.image), label: entry.label }),
        );
    }
    // A damaged shard's unreadable sample has no label of its own; it
    // borrows class 0 so that a labelled set stays labelled (it is never
    // used: reading it fails, under the run's bad-image policy).
    let damaged = |s: &Sample| matches!(&s.source, ImageSource::Shard(m) if m.damage.is_some());
    let labelled = samples.iter().any(|s| !damaged(s)) && samples.iter().all(|s| damaged(s) || s.label.is_some());
    let classes = match labelled {
        false => Vec::new(),
        true => class_names(path, samples.iter().filter_map(|s| s.label).max().unwrap_or(0) + 1)?,
    };
    for sample in &mut samples {
        sample.label = if labelled { sample.label.or(Some(0)) } else { None };
    }
    Ok(Dataset::new(path, samples, classes))
}

fn class_names(path: &Path, count: usize) -> Result<Vec<String>> {
    let folder = if path.is_file() { path.parent().unwrap_or(Path::new(".")) } else { path };
    let file = folder.join(CLASSES_FILE);
    if !file.is_file() {
        return Ok((0..count).map(|label| label.to_string()).collect());
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let names: Vec<String> = text.lines().map(str::to_owned).collect();
    if names.len() < count {
        return Err(Error::Dataset {
            path: file,
            message: format!("names {} classes, but the shards' labels go up to {}", names.len(), count - 1),
        });
    }
    Ok(names)
}

/// What `simclr shard` writes.
#[derive(Debug, Clone, clap::Args)]
pub struct ShardOptions {
    /// Images to write (an ImageFolder, a flat folder, CIFAR batches or shards).
    #[arg(long)]
    pub input: PathBuf,
    /// Folder for the shards (created if needed).
    #[arg(long)]
    pub output: PathBuf,
    /// Images per shard.
    #[arg(long, default_value_t = 1000)]
    pub per_shard: usize,
}

/// What [`shard`] wrote.
#[derive(Debug, Clone)]
pub struct ShardReport {
    pub images: usize,
    pub shards: Vec<PathBuf>,
    pub output: PathBuf,
}

impl std::fmt::Display for ShardReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (images, shards) = (counted(self.images, "image"), counted(self.shards.len(), "shard"));
        write!(f, "wrote {images} in {shards} to {}", self.output.display())
    }
}

/// `simclr shard`: opens `options.input` and writes it as shards.
pub fn shard(options: &ShardOptions) -> Result<ShardReport> {
    let dataset = Dataset::open(&options.input, &super::config::DataFormat::Auto)?;
    let shards = write_shards(&dataset, &options.output, options.per_shard)?;
    Ok(ShardReport { images: dataset.len(), shards, output: options.output.clone() })
}

/// Writes `dataset` as shards of at most `per_shard` images into `output`
/// (`shard-000000.tar`, ...), members keyed by position (`000000123.jpg`,
/// its label as `000000123.cls`), each image's own bytes (images held in
/// memory as PNG); `classes.txt` for a labelled dataset. Each shard is
/// written beside its final name and renamed when complete. Returns the
/// shards written. A folder that already holds shards is refused: fewer
/// new shards would leave old ones beside them, read as part of the set.
pub fn write_shards(dataset: &Dataset, output: &Path, per_shard: usize) -> Result<Vec<PathBuf>> {
    if per_shard == 0 {
        return Err(Error::InvalidArgument("--per-shard 0: must be at least 1".to_owned()));
    }
    if output.is_dir() {
        let held: Vec<PathBuf> = sorted_entries(output)?
            .into_iter()
            .filter(|path| is_shard(path) || path.file_name().is_some_and(|name| name == CLASSES_FILE))
            .collect();
        if let Some(first) = held.first() {
            return Err(Error::Dataset {
                path: output.to_path_buf(),
                message: format!(
                    "already holds shards ({} files, {} the first): new ones would be read with them as one \
                     set; remove them or give another --output",
                    held.len(),
                    first.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
    }
    crate::io::create_dir(output)?;
    let mut written = Vec::new();
    for (number, chunk) in dataset.samples.chunks(per_shard).enumerate() {
        let path = output.join(format!("shard-{number:06}.tar"));
        let partial = path.with_extension("tar.partial");
        let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        for (offset, sample) in chunk.iter().enumerate() {
            let position = number * per_shard + offset;
            let (bytes, extension) = member_bytes(sample, position)?;
            let key = format!("{position:09}");
            append(&mut builder, &format!("{key}.{extension}"), &bytes, &partial)?;
            if let Some(label) = sample.label.filter(|_| dataset.is_labelled()) {
                append(&mut builder, &format!("{key}.cls"), label.to_string().as_bytes(), &partial)?;
            }
        }
        let mut writer = builder.into_inner().map_err(|e| Error::io(&partial, e))?;
        writer.flush().map_err(|e| Error::io(&partial, e))?;
        drop(writer);
        std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }
    if dataset.is_labelled() {
        let file = output.join(CLASSES_FILE);
        std::fs::write(&file, dataset.classes.join("\n") + "\n").map_err(|e| Error::io(&file, e))?;
    }
    Ok(written)
}

/// A sample's bytes as stored and the extension to name them by.
fn member_bytes(sample: &Sample, position: usize) -> Result<(Vec<u8>, String)> {
    match &sample.source {
        ImageSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
            Ok((bytes, extension.unwrap_or_else(|| "jpg".to_owned())))
        }
        ImageSource::Shard(member) => Ok((member.read()?, key_and_extension(&member.name).1)),
        ImageSource::Memory(image) => {
            let mut bytes = std::io::Cursor::new(Vec::new());
            image.write_to(&mut bytes, image::ImageFormat::Png).map_err(|e| Error::Image {
                path: PathBuf::from(format!("#{position}")),
                message: format!("cannot encode as PNG: {e}"),
            })?;
            Ok((bytes.into_inner(), "png".to_owned()))
        }
    }
}

fn append(builder: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8], shard: &Path) -> Result<()> {
    // Fixed metadata, so the same dataset always makes the same shards.
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, bytes).map_err(|e| Error::io(shard, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_end_at_the_first_dot_of_the_file_name() {
        assert_eq!(key_and_extension("000001.jpg"), ("000001", "jpg".to_owned()));
        assert_eq!(key_and_extension("a.b/n01.seg.PNG"), ("a.b/n01", "seg.png".to_owned()));
        assert_eq!(key_and_extension("noext"), ("noext", String::new()));
    }

    #[test]
    fn a_folder_that_holds_shards_is_not_written_into() {
        let dir = tempfile::tempdir().unwrap();
        let dataset = super::super::synthetic::generate(6, 2, 16, 0);
        let output = dir.path().join("shards");
        assert_eq!(write_shards(&dataset, &output, 2).unwrap().len(), 3);
        let error = write_shards(&dataset, &output, 6).unwrap_err().to_string();
        assert!(error.contains("already holds shards (4 files, classes.txt the first)"), "{error}");
        assert_eq!(open(&output).unwrap().len(), 6, "the first set is as it was");
        // A folder of other files is written into.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "").unwrap();
        assert_eq!(write_shards(&dataset, &other, 6).unwrap().len(), 1);
    }
}
