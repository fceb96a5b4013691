//! A float32 matrix written to NumPy's `.npy` (format 1.0) block by block,
//! so that `simclr embed` holds one batch of features, not millions of rows.
//!
//! Written here rather than with a crate: the row count is known only at
//! the end (unreadable images may be left out), so the header is written
//! first with room for any count and written again on [`NpyRows::finish`];
//! the writers of `npyz` and `ndarray-npy` take the shape up front. tch's
//! `write_npy` needs the whole matrix in memory.
//!
//! The file is `<path>.partial` until it is finished, then renamed to
//! `path`: an interrupted run leaves no half-written matrix under the name.
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Bytes of the header: magic, version, length, the dict padded with
/// spaces and a line break. The format asks for a multiple of 64; 128
/// holds the dict for any two 20-digit dimensions.
const HEADER_BYTES: usize = 128;

/// The header of a little-endian float32 `[rows, columns]` C-order matrix.
fn header(rows: usize, columns: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {columns}), }}");
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&((HEADER_BYTES - 10) as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.resize(HEADER_BYTES - 1, b' ');
    header.push(b'\n');
    header
}

/// A `.npy` float32 matrix of `columns` columns, written rows at a time.
/// Dropped unfinished (an error on the way), it removes its partial file.
pub struct NpyRows {
    path: PathBuf,
    partial: PathBuf,
    /// `None` once finished.
    file: Option<BufWriter<File>>,
    columns: usize,
    rows: usize,
}

impl NpyRows {
    /// Starts `path` (as `<path>.partial`, its folder made if missing).
    pub fn create(path: &Path, columns: usize) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            crate::io::create_dir(dir)?;
        }
        let partial = path.with_extension("npy.partial");
        let mut file = BufWriter::new(File::create(&partial).map_err(|e| Error::io(&partial, e))?);
        file.write_all(&header(0, columns)).map_err(|e| Error::io(&partial, e))?;
        Ok(Self { path: path.to_path_buf(), partial, file: Some(file), columns, rows: 0 })
    }

    /// Appends the rows of `block`, `[n, columns]` (any float kind and
    /// device; written as float32).
    pub fn append(&mut self, block: &Tensor) -> Result<()> {
        let size = block.size();
        if size.len() != 2 || size[1] as usize != self.columns {
            return Err(Error::InvalidArgument(format!(
                "{}: rows of {} columns expected, got a block of shape {size:?}",
                self.partial.display(),
                self.columns
            )));
        }
        let values =
            Vec::<f32>::try_from(block.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous().flatten(0, -1))?;
        let bytes: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
        let file = self.file.as_mut().expect("only finish() takes the file, and it consumes the writer");
        file.write_all(&bytes).map_err(|e| Error::io(&self.partial, e))?;
        self.rows += size[0] as usize;
        Ok(())
    }

    /// Appends the rows of `part`, a finished matrix of this one's columns
    /// (another process's share, written by [`NpyRows`]), copied as they
    /// are; returns its rows.
    pub fn append_npy(&mut self, part: &Path) -> Result<usize> {
        let mut file = File::open(part).map_err(|e| Error::io(part, e))?;
        let mut head = vec![0; HEADER_BYTES];
        std::io::Read::read_exact(&mut file, &mut head).map_err(|e| Error::io(part, e))?;
        let bytes = file.metadata().map_err(|e| Error::io(part, e))?.len() as usize - HEADER_BYTES;
        let row_bytes = 4 * self.columns;
        let rows = bytes / row_bytes.max(1);
        if head != header(rows, self.columns) || bytes != rows * row_bytes {
            return Err(Error::InvalidArgument(format!(
                "{}: not a float32 matrix of {} columns as this program writes them ({bytes} bytes after the header)",
                part.display(),
                self.columns
            )));
        }
        let out = self.file.as_mut().expect("only finish() takes the file, and it consumes the writer");
        std::io::copy(&mut file, out).map_err(|e| Error::io(&self.partial, e))?;
        self.rows += rows;
        Ok(rows)
    }

    /// Writes the row count into the header, flushes the file to disk and
    /// gives it its name; returns the rows written.
    pub fn finish(mut self) -> Result<usize> {
        let file = self.file.take().expect("only finish() takes the file, and it consumes the writer");
        let written = (|| {
            let mut file = file.into_inner().map_err(|e| e.into_error())?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&header(self.rows, self.columns))?;
            file.sync_all()
        })();
        let renamed = written
            .map_err(|e| Error::io(&self.partial, e))
            .and_then(|()| std::fs::rename(&self.partial, &self.path).map_err(|e| Error::io(&self.path, e)));
        if renamed.is_err() {
            let _ = std::fs::remove_file(&self.partial);
        }
        renamed.map(|()| self.rows)
    }
}

impl Drop for NpyRows {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Best effort: the error that dropped the writer is the one to report.
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_read_back_as_one_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/features.npy");
        let matrix = Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu));
        let mut writer = NpyRows::create(&path, 5).unwrap();
        assert!(!path.exists(), "the matrix keeps its name only once finished");
        for (start, length) in [(0, 3), (3, 0), (3, 4)] {
            writer.append(&matrix.narrow(0, start, length)).unwrap();
        }
        let wrong = writer.append(&Tensor::zeros([2, 4], (Kind::Float, tch::Device::Cpu))).unwrap_err();
        assert!(wrong.to_string().contains("rows of 5 columns expected"), "{wrong}");
        assert_eq!(writer.finish().unwrap(), 7);
        assert!(Tensor::read_npy(&path).unwrap().equal(&matrix));
        assert!(!path.with_extension("npy.partial").exists());
        let unfinished = NpyRows::create(&dir.path().join("left.npy"), 5).unwrap();
        assert!(dir.path().join("left.npy.partial").exists());
        drop(unfinished);
        assert!(!dir.path().join("left.npy.partial").exists(), "an unfinished matrix leaves nothing behind");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES + 7 * 5 * 4);
        assert_eq!(bytes[HEADER_BYTES - 1], b'\n');
    }

    #[test]
    fn finished_matrices_append_as_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let block = |rows: i64, start: f64| {
            Tensor::arange_start(start, start + rows as f64 * 3.0, (Kind::Float, tch::Device::Cpu)).view([rows, 3])
        };
        let write = |name: &str, rows: i64, start: f64| {
            let path = dir.path().join(name);
            let mut part = NpyRows::create(&path, 3).unwrap();
            part.append(&block(rows, start)).unwrap();
            part.finish().unwrap();
            path
        };
        let (first, empty, second) = (write("a.npy", 2, 0.0), write("b.npy", 0, 0.0), write("c.npy", 3, 6.0));
        let joined = dir.path().join("all.npy");
        let mut all = NpyRows::create(&joined, 3).unwrap();
        let rows: Vec<usize> = [&first, &empty, &second].map(|part| all.append_npy(part).unwrap()).to_vec();
        assert_eq!((rows, all.finish().unwrap()), (vec![2, 0, 3], 5));
        assert!(Tensor::read_npy(&joined).unwrap().equal(&block(5, 0.0)));
        // Another width, or a cut file, is refused by name.
        let narrow = dir.path().join("narrow.npy");
        let mut other = NpyRows::create(&narrow, 2).unwrap();
        other.append(&Tensor::zeros([1, 2], (Kind::Float, tch::Device::Cpu))).unwrap();
        other.finish().unwrap();
        let bytes = std::fs::read(&second).unwrap();
        let cut = dir.path().join("cut.npy");
        std::fs::write(&cut, &bytes[..bytes.len() - 2]).unwrap();
        let mut all = NpyRows::create(&dir.path().join("again.npy"), 3).unwrap();
        for bad in [narrow, cut] {
            let message = all.append_npy(&bad).unwrap_err().to_string();
            assert!(message.contains(&bad.display().to_string()) && message.contains("3 columns"), "{message}");
        }
    }

    #[test]
    fn the_largest_shape_fits_the_header() {
        let header = header(usize::MAX, usize::MAX);
        assert_eq!(header.len(), HEADER_BYTES);
        assert!(String::from_utf8_lossy(&header).contains(&format!("({}, {})", usize::MAX, usize::MAX)));
    }
}
