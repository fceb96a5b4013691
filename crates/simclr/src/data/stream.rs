//! Streaming shards (`data.shuffle_buffer` > 0): each epoch every process
//! reads its own shards front to back, never seeking, as one would from
//! network storage, and shuffles through a bounded buffer, as WebDataset
//! does. What the order lacks against a full shuffle (neighbours in a shard
//! tend to stay close) the buffer's size decides.
//!
//! The order is a pure function of (seed, epoch, process, number of
//! processes, `data.stream_readers`), never of the machine: shard i belongs
//! to process i mod w; each epoch a process deals its shards, in an order
//! seeded by (seed, epoch), round-robin to its reader threads; each reader
//! passes its samples through its own seeded shuffle buffer; and batches
//! take samples from the readers in turn. Samples keep their index in the
//! shards' listing, so their views are drawn as in every other mode. A run
//! stopped part-way through an epoch resumes on the same number of
//! processes (the trainer checks), since another number deals the shards
//! otherwise.
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::image_folder::EXTENSIONS;
use super::loader::Shard;
use super::shards::key_and_extension;
use super::{Dataset, ImageSource};
use crate::augment::seeded_rng;

/// A sample as a reader delivers it: its index in the dataset, the name
/// errors give it, and its bytes or why they could not be read.
#[derive(Debug)]
pub struct Streamed {
    pub index: usize,
    pub path: PathBuf,
    pub bytes: std::result::Result<Vec<u8>, String>,
}

/// A dataset's shards in listing order, each with the index of its first sample.
#[derive(Debug, Clone)]
pub struct ShardList {
    shards: Vec<(PathBuf, usize, usize)>,
}

impl ShardList {
    /// The shards of a dataset read from shards; `None` when any sample is
    /// not a shard member.
    pub fn of(dataset: &Dataset) -> Option<Self> {
        let mut shards: Vec<(PathBuf, usize, usize)> = Vec::new();
        for (index, sample) in dataset.samples.iter().enumerate() {
            let ImageSource::Shard(member) = &sample.source else { return None };
            match shards.last_mut() {
                Some((path, _, count)) if *path == *member.shard => *count += 1,
                _ => shards.push(((*member.shard).clone(), index, 1)),
            }
        }
        Some(Self { shards })
    }

    /// The shards process `part` reads: every w-th, from its rank on.
    fn of_part(&self, part: Shard) -> Vec<(PathBuf, usize, usize)> {
        self.shards.iter().skip(part.rank).step_by(part.world).cloned().collect()
    }

    /// The samples process `part` reads in an epoch.
    pub fn samples_of(&self, part: Shard) -> usize {
        self.of_part(part).iter().map(|(_, _, count)| count).sum()
    }
}

/// How a dataset's shards are streamed (`data.shuffle_buffer`,
/// `data.stream_readers`).
#[derive(Debug, Clone)]
pub struct Streaming {
    pub shards: ShardList,
    /// Threads that read a process's shards, each through its own buffer.
    pub readers: usize,
    /// Samples in each reader's shuffle buffer.
    pub buffer: usize,
}

impl Streaming {
    /// The samples process `part` streams in `epoch`, taken from the
    /// readers in turn.
    pub fn epoch(&self, part: Shard, seed: u64, epoch: u64) -> Samples {
        let mut shards = self.shards.of_part(part);
        shards.shuffle(&mut seeded_rng(seed, &[epoch, part.rank as u64]));
        let (readers, buffer) = (self.readers.max(1), self.buffer.max(1));
        let receivers = (0..readers)
            .map(|reader| {
                let mine: Vec<(PathBuf, usize)> = shards
                    .iter()
                    .skip(reader)
                    .step_by(readers)
                    .map(|(path, first, _)| (path.clone(), *first))
                    .collect();
                let rng = seeded_rng(seed, &[epoch, part.rank as u64, reader as u64, 0x5348_5546]);
                let (sender, receiver) = sync_channel(buffer.min(256));
                std::thread::Builder::new()
                    .name(format!("simclr-shards-{reader}"))
                    .spawn(move || read_shards(mine, buffer, rng, sender))
                    .expect("a thread starts");
                Some(receiver)
            })
            .collect();
        Samples { receivers, next: 0 }
    }
}

/// Samples from the readers in turn; a reader that has finished is passed over.
pub struct Samples {
    receivers: Vec<Option<Receiver<Streamed>>>,
    next: usize,
}

impl Iterator for Samples {
    type Item = Streamed;

    fn next(&mut self) -> Option<Streamed> {
        for _ in 0..self.receivers.len() {
            let reader = self.next;
            self.next = (self.next + 1) % self.receivers.len();
            if let Some(receiver) = &self.receivers[reader] {
                match receiver.recv() {
                    Ok(sample) => return Some(sample),
                    Err(_) => self.receivers[reader] = None,
                }
            }
        }
        None
    }
}

/// One reader: its shards front to back, each image member through the
/// shuffle buffer. Stops early when the receiver is gone.
fn read_shards(shards: Vec<(PathBuf, usize)>, buffer: usize, mut rng: ChaCha8Rng, sender: SyncSender<Streamed>) {
    let mut pending: Vec<Streamed> = Vec::with_capacity(buffer);
    let mut add = |sample: Streamed, pending: &mut Vec<Streamed>| -> bool {
        pending.push(sample);
        if pending.len() < buffer {
            return true;
        }
        let pick = rng.random_range(0..pending.len());
        sender.send(pending.swap_remove(pick)).is_ok()
    };
    for (path, first) in shards {
        let member_path = |name: &str| PathBuf::from(format!("{}:{name}", path.display()));
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) => {
                let sample = Streamed { index: first, path: path.clone(), bytes: Err(format!("cannot open: {error}")) };
                if !add(sample, &mut pending) {
                    return;
                }
                continue;
            }
        };
        let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
        let Ok(entries) = archive.entries() else { continue };
        let (mut ordinal, mut last) = (0, None::<String>);
        for entry in entries {
            let index = first + ordinal;
            let (name, bytes) = match entry {
                Err(error) => {
                    let name = last.as_ref().map_or("(first member)".to_owned(), |name| format!("(after {name})"));
                    (name, Err(format!("damaged shard, no member header here: {error}")))
                }
                Ok(mut entry) => {
                    if !entry.header().entry_type().is_file() {
                        continue;
                    }
                    let name = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                    last = Some(name.clone());
                    if !EXTENSIONS.contains(&key_and_extension(&name).1.as_str()) {
                        continue;
                    }
                    let size = entry.size();
                    let mut bytes = Vec::with_capacity(size as usize);
                    let read = entry.read_to_end(&mut bytes);
                    match read {
                        Ok(_) if bytes.len() as u64 == size => (name, Ok(bytes)),
                        _ => (name, Err(format!("truncated: the shard ends before this member's {size} bytes"))),
                    }
                }
            };
            let damaged = bytes.is_err();
            if !add(Streamed { index, path: member_path(&name), bytes }, &mut pending) {
                return;
            }
            ordinal += 1;
            if damaged {
                break;
            }
        }
    }
    pending.shuffle(&mut rng);
    for sample in pending {
        if sender.send(sample).is_err() {
            return;
        }
    }
}
