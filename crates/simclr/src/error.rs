//! The library's one error type. Messages are lowercase and name the value
//! or the file at fault, so the binary can print them as they are.
use std::path::PathBuf;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write found no room: the disk (or quota) is full, or the file size
    /// limit is reached.
    #[error("{}: {reason}: the disk is full (or the file size limit reached)", path.display())]
    DiskFull { path: PathBuf, reason: std::io::Error },
    /// Reading or writing a file failed. (The I/O error is in the message,
    /// not a source the binary's error chain would print a second time.)
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: std::io::Error },
    /// An image could not be decoded or is unusable.
    #[error("image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    /// A dataset (folder or file) is malformed or empty.
    #[error("dataset {}: {message}", path.display())]
    Dataset { path: PathBuf, message: String },
    /// One or more configuration fields are invalid; each entry names its field.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// A weights file does not match the model it is loaded into.
    #[error("weights {}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    /// A checkpoint is unreadable or does not match the run.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A collective, the store, or a peer rank of a multi-process run failed.
    #[error("distributed: {0}")]
    Distributed(String),
    /// Training met too many non-finite losses or gradients in a row.
    #[error("training stopped: {0}")]
    NonFinite(String),
    /// An allocation failed on the device (or in host memory for the CPU).
    #[error(
        "out of memory on {device} with a batch of {batch_size} images ({views} views): lower train.batch_size \
         (--batch-size) or data.image_size, compute the batch in chunks with a (lower) train.micro_batch_size \
         (--micro-batch-size), or use a smaller model; libtorch said: {message}"
    )]
    OutOfMemory { device: String, batch_size: usize, views: usize, message: String },
    /// A run was stopped (by a signal, say) before its end; its checkpoint
    /// is written.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// The device asked for is missing, or cannot do what was asked of it.
    #[error("{0}")]
    Device(String),
    /// The data worker threads failed (could not start, or one panicked).
    #[error("data workers: {0}")]
    Workers(String),
    /// An external program (a PyTorch reference) failed or printed no report.
    #[error("{0}")]
    Reference(String),
    /// A file of a run folder other than the checkpoint (the metrics log) is damaged.
    #[error("run file {}: {message}", path.display())]
    RunFile { path: PathBuf, message: String },
    /// An argument outside its valid range, named with its value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A tensor operation failed inside libtorch (its error in the message,
    /// as for [`Error::Io`]).
    #[error("libtorch: {0}")]
    Torch(tch::TchError),
}

impl From<tch::TchError> for Error {
    fn from(error: tch::TchError) -> Self {
        Error::Torch(error)
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed read or write of `path`; no room to write is [`Error::DiskFull`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let full = matches!(
            source.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::FileTooLarge
        );
        match full {
            true => Error::DiskFull { path: path.into(), reason: source },
            false => Error::Io { path: path.into(), reason: source },
        }
    }
}
