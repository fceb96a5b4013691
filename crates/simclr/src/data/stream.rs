//! Streaming shards (`data.shuffle_buffer` > 0): each epoch every process
//! reads its own shards front to back, never seeking, as one would from
//! network storage, and shuffles through a bounded buffer, as WebDataset
//! does. What the order lacks against a full shuffle (neighbours in a shard
//! tend to stay close) the buffer's size decides.
//!
//! The order is a pure function of (seed, epoch, process, number of
//! processes, `data.stream_readers`), never of the machine: each epoch the
//! shards are put in an order seeded by (seed, epoch) and dealt to the w
//! processes in turn, so that a process reads other shards each epoch (as
//! WebDataset's `detshuffle` before `split_by_node`, and DALI's readers
//! moving to the next shard, do); a process deals its shards round-robin to
//! its reader threads; each reader passes its samples through its own
//! seeded shuffle buffer; and batches take samples from the readers in
//! turn. Every process trains as many batches as the fewest images any deal
//! can give one process allow ([`ShardList::least_share`]), so epochs have
//! one length, and what a process's shards hold beyond that is left unread
//! in that epoch, a different part each epoch. Samples keep their index in
//! the shards' listing, so their views are drawn as in every other mode. A
//! run stopped part-way through an epoch resumes on the same number of
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

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shards process `part` reads in `epoch`: all of them in an order
    /// seeded by (seed, epoch), the same on every process, then every w-th
    /// from its rank on.
    fn dealt(&self, part: Shard, seed: u64, epoch: u64) -> Vec<(PathBuf, usize, usize)> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        order.shuffle(&mut seeded_rng(seed, &[epoch, 0x4445_414C]));
        order.into_iter().skip(part.rank).step_by(part.world).map(|shard| self.shards[shard].clone()).collect()
    }

    /// The fewest samples a deal to `world` processes can give one of them:
    /// each gets ⌊n/w⌋ or ⌈n/w⌉ of the n shards, so the ⌊n/w⌋ smallest.
    pub fn least_share(&self, world: usize) -> usize {
        let mut counts: Vec<usize> = self.shards.iter().map(|(_, _, count)| *count).collect();
        counts.sort_unstable();
        counts.iter().take(counts.len() / world.max(1)).sum()
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
        let shards = self.shards.dealt(part, seed, epoch);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::data::config::DataFormat;
    use crate::data::shards::write_shards;
    use crate::data::synthetic::generate;

    /// 24 images in shards of 5 (5, 5, 5, 5, 4), read back as shards.
    fn shards(dir: &std::path::Path) -> ShardList {
        write_shards(&generate(24, 3, 16, 0), dir, 5).unwrap();
        ShardList::of(&Dataset::open(dir, &DataFormat::Auto).unwrap()).expect("every sample is a shard member")
    }

    #[test]
    fn each_epoch_deals_every_shard_once_and_another_deal_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let list = shards(dir.path());
        let world = 2;
        assert_eq!(list.least_share(world), 9, "the two smallest shards: 4 + 5");
        let mut dealt_to = vec![BTreeSet::new(); world];
        let mut shares = BTreeSet::new();
        for epoch in 0..12 {
            let mut firsts = Vec::new();
            for (rank, dealt_to_rank) in dealt_to.iter_mut().enumerate() {
                let dealt = list.dealt(Shard { rank, world }, 7, epoch);
                let share: usize = dealt.iter().map(|(_, _, count)| count).sum();
                assert!(share >= list.least_share(world), "epoch {epoch}, rank {rank}: {share}");
                shares.insert(share);
                dealt_to_rank.extend(dealt.iter().map(|(_, first, _)| *first));
                firsts.extend(dealt.iter().map(|(_, first, _)| *first));
            }
            firsts.sort_unstable();
            assert_eq!(firsts, [0, 5, 10, 15, 20], "epoch {epoch}: each shard to one process");
        }
        // Over epochs every process reads every shard, and the least share is met.
        assert!(dealt_to.iter().all(|shards| shards.len() == 5), "{dealt_to:?}");
        assert!(shares.contains(&9), "{shares:?}");
        // Control: one epoch's deal alone leaves each process shards it never reads.
        let one = (0..world).map(|rank| list.dealt(Shard { rank, world }, 7, 0).len()).collect::<Vec<_>>();
        assert!(one.iter().all(|&count| count < 5), "{one:?}");
    }

    #[test]
    fn over_epochs_every_image_is_trained_on() {
        // Two processes each train 8 images an epoch (the least share, 9, in
        // parts of 2) of the 12 or so their shards hold: what is left unread
        // differs between epochs, so a few epochs reach every image.
        let dir = tempfile::tempdir().unwrap();
        let streaming = Streaming { shards: shards(dir.path()), readers: 2, buffer: 2 };
        let (world, per_epoch) = (2, 8);
        let seen_in = |epochs: std::ops::Range<u64>| {
            let mut seen = BTreeSet::new();
            for epoch in epochs {
                for rank in 0..world {
                    let samples = streaming.epoch(Shard { rank, world }, 7, epoch).take(per_epoch);
                    seen.extend(samples.map(|sample| sample.index));
                }
            }
            seen
        };
        assert_eq!(seen_in(0..16).len(), 24);
        // Control: one epoch leaves images out.
        assert!(seen_in(0..1).len() <= 16);
    }
}
