//! Nearest-neighbour search over representations h: the use data-curation
//! work makes of SSL features (find near-duplicates, similar images, or
//! outliers in a folder).
//!
//! Similarity is cosine on h. The search is exact: the index's features
//! stream past the queries' in batches, one matrix product each, and only
//! each query's best so far are kept. Only a search of very many queries
//! over a large index goes through HNSW (Malkov and Yashunin 2018, arXiv
//! 1603.09320) from the `instant-distance` crate (see [`EXACT_QUERY_LIMIT`]).
pub mod gallery;

use std::path::Path;

use instant_distance::{Builder, HnswMap, Search};
use tch::{Kind, Tensor};

use crate::data::{ImageSource, Sample};
use crate::dist::{agree, best_across, part_range, ProcessGroup};
use crate::loss::similarity::l2_normalize;
use crate::{Error, Result};

/// Under `Auto`, HNSW is built only for more queries than
/// [`EXACT_QUERY_LIMIT`] over more images than this.
pub const EXACT_LIMIT: usize = 50_000;

/// Under `Auto`, up to this many queries are searched exactly, over an
/// index of any size. `neighbors` embeds its index every time, so an HNSW
/// graph is built for one search, and building it is what costs: on
/// CIFAR-10 features (128-d, 2 cores), 10,000 queries over 40,000 images
/// took 1.6 s exactly, against 45 s to build the graph (1.1 ms an image) and
/// 6.0 s to search it (0.6 ms a query). The exact search costs about 4 ns a
/// (query, image) pair, so it is the faster below about 250,000 queries
/// whatever the index's size (both costs grow with the features' length),
/// and exact.
pub const EXACT_QUERY_LIMIT: usize = 200_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    Exact,
    Hnsw,
    /// Exact, unless more than [`EXACT_QUERY_LIMIT`] queries search more
    /// than [`EXACT_LIMIT`] images.
    Auto,
}

names!(IndexKind, "index", { Exact => "exact", Hnsw => "hnsw", Auto => "auto" });

impl IndexKind {
    /// Whether `queries` queries over `images` images go through HNSW.
    pub fn uses_hnsw(self, images: usize, queries: usize) -> bool {
        match self {
            IndexKind::Exact => false,
            IndexKind::Hnsw => true,
            IndexKind::Auto => images > EXACT_LIMIT && queries > EXACT_QUERY_LIMIT,
        }
    }
}

/// A unit-length feature vector; distance 1 − cosine similarity.
#[derive(Debug, Clone)]
struct UnitVector(Vec<f32>);

impl instant_distance::Point for UnitVector {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - self.0.iter().zip(&other.0).map(|(a, b)| a * b).sum::<f32>()
    }
}

/// One hit: the position of an indexed item and its cosine similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbor {
    pub index: usize,
    pub similarity: f32,
}

enum Backend {
    Exact(Tensor),
    Hnsw(HnswMap<UnitVector, usize>),
}

/// Each query's hits from `[Q, k]` cosine similarities and the items'
/// positions, best first.
fn hits_of(similarity: &Tensor, position: &Tensor) -> Result<Vec<Vec<Neighbor>>> {
    let similarity = Vec::<Vec<f32>>::try_from(&similarity.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
    let position = Vec::<Vec<i64>>::try_from(&position.to_device(tch::Device::Cpu))?;
    Ok(similarity
        .into_iter()
        .zip(position)
        .map(|(similarity, position)| {
            similarity
                .into_iter()
                .zip(position)
                .map(|(similarity, index)| Neighbor { index: index as usize, similarity })
                .collect()
        })
        .collect())
}

/// The items of `list` at `rows`, in order.
fn picked<T: Clone>(list: &[T], rows: &[usize]) -> Vec<T> {
    rows.iter().map(|&row| list[row].clone()).collect()
}

/// Features of the indexed items, searchable by cosine similarity.
pub struct Index {
    backend: Backend,
    len: usize,
}

fn rows(features: &Tensor) -> Result<Vec<Vec<f32>>> {
    let normalized = l2_normalize(features).to_kind(Kind::Float).to_device(tch::Device::Cpu);
    Ok(Vec::<Vec<f32>>::try_from(&normalized)?)
}

impl Index {
    /// Indexes `features` (`[M, d]`) for `queries` queries (which
    /// [`IndexKind::Auto`] weighs); `seed` makes HNSW construction
    /// reproducible.
    pub fn build(features: &Tensor, kind: IndexKind, queries: usize, seed: u64) -> Result<Self> {
        let len = features.size()[0] as usize;
        if len == 0 {
            return Err(Error::InvalidArgument("cannot index zero images".to_owned()));
        }
        let backend = if kind.uses_hnsw(len, queries) {
            let points = rows(features)?.into_iter().map(UnitVector).collect();
            Backend::Hnsw(Builder::default().seed(seed).build(points, (0..len).collect()))
        } else {
            Backend::Exact(l2_normalize(features))
        };
        Ok(Self { backend, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `k` most similar indexed items for each row of `queries`, best first.
    pub fn search(&self, queries: &Tensor, k: usize) -> Result<Vec<Vec<Neighbor>>> {
        let k = k.min(self.len);
        match &self.backend {
            Backend::Exact(bank) => {
                let queries = l2_normalize(queries).to_device(bank.device());
                let (similarity, position) = crate::eval::knn::nearest(bank, &queries, k as i64);
                hits_of(&similarity, &position)
            }
            Backend::Hnsw(map) => Ok(rows(queries)?
                .into_iter()
                .map(|query| {
                    let mut search = Search::default();
                    map.search(&UnitVector(query), &mut search)
                        .take(k)
                        .map(|item| Neighbor { index: *item.value, similarity: 1.0 - item.distance })
                        .collect()
                })
                .collect()),
        }
    }
}

/// What `simclr neighbors` searches, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct NeighborsOptions {
    /// Images to search: a folder (recursively), tar shards or CIFAR batches.
    #[arg(long)]
    pub index: std::path::PathBuf,
    /// A query image, or a folder of them (or shards, or CIFAR batches).
    #[arg(long = "query")]
    pub queries: std::path::PathBuf,
    /// Neighbours per query.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// exact, hnsw, or auto (exact, unless more than 200,000 queries search more than 50,000 images).
    #[arg(long = "index-kind", default_value = "auto")]
    pub kind: IndexKind,
    /// Write a gallery here: one row per query, its neighbours beside it;
    /// PNG, or the format its extension names (.jpg, .bmp, .tiff, .webp).
    #[arg(long)]
    pub gallery: Option<std::path::PathBuf>,
    /// Side of each gallery thumbnail in pixels.
    #[arg(long, default_value_t = 96)]
    pub thumbnail: u32,
    /// Leave a query that is among the images searched (the same file, however its path is
    /// spelled; the same shard member) out of its own neighbours, still finding --k: near
    /// duplicates of every image of a collection, with --query the --index itself.
    #[arg(long)]
    pub exclude_self: bool,
}

#[derive(Debug, Clone)]
pub struct NeighborsReport {
    /// The names of the images searched and of the queries (paths, or
    /// shard members; see [`crate::embed::images_in`]).
    pub items: Vec<String>,
    pub queries: Vec<String>,
    /// For each query, its neighbours among `items`, best first.
    pub hits: Vec<Vec<Neighbor>>,
    /// Images of either left out as unreadable, as "path: reason".
    pub skipped: Vec<String>,
}

/// Tab-separated: a header, then one line per (query, neighbour), best first.
impl std::fmt::Display for NeighborsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "query\trank\tsimilarity\tpath")?;
        for (query, hits) in self.queries.iter().zip(&self.hits) {
            for (rank, hit) in hits.iter().enumerate() {
                let item = &self.items[hit.index];
                writeln!(f, "{query}\t{}\t{:.4}\t{item}", rank + 1, hit.similarity)?;
            }
        }
        Ok(())
    }
}

/// Embeds the images searched and the queries, and finds each query's neighbours.
pub fn neighbors(encoder: &crate::embed::EncoderOptions, options: &NeighborsOptions) -> Result<NeighborsReport> {
    Ok(neighbors_in(encoder, options, None)?.expect("one process reports"))
}

/// [`neighbors`] as one rank of `group` (alone when `None`), every rank
/// calling it with the same options: each embeds its part of the queries,
/// which every rank then holds, and streams its part of the images searched
/// past them, keeping each query's k best of its part; rank 0 takes the k
/// best of all parts' and gets the report (and writes the gallery), the
/// others `None`. The hits are one process's, up to the rounding of
/// features computed in other batches. Several processes search exactly:
/// an HNSW graph is one process's (`--index-kind hnsw` is refused).
pub fn neighbors_in(
    encoder: &crate::embed::EncoderOptions,
    options: &NeighborsOptions,
    group: Option<&ProcessGroup>,
) -> Result<Option<NeighborsReport>> {
    let group = group.filter(|group| group.size() > 1);
    if options.k == 0 {
        return Err(Error::InvalidArgument("--k 0: must be at least 1".to_owned()));
    }
    if options.thumbnail < 8 {
        return Err(Error::InvalidArgument(format!("--thumbnail {}: must be at least 8 pixels", options.thumbnail)));
    }
    if let Some(path) = &options.gallery {
        crate::io::refuse_folder(path, "--gallery")?;
        crate::io::sheet_format(path)?;
    }
    if group.is_some() && options.kind == IndexKind::Hnsw {
        return Err(Error::InvalidArgument(
            "--index-kind hnsw builds its graph in one process; several processes search exactly".to_owned(),
        ));
    }
    let listed = (|| {
        let (items, queries) = (crate::embed::images_in(&options.index)?, crate::embed::images_in(&options.queries)?);
        if options.gallery.is_some() {
            gallery::check_size(queries.len(), options.k.min(items.len()), options.thumbnail)?;
        }
        Ok((items, queries, encoder.load()?))
    })();
    let (items, queries, loaded) = agree(group, listed)?;
    if let Some(group) = group {
        // Each rank has a device of its own; the rest must be the same.
        let shared = crate::embed::EncoderOptions { device: tch::Device::Cpu, ..encoder.clone() };
        group.check_same("neighbors settings", &format!("{shared:?} {options:?}"))?;
        // Each rank embeds its part of each list by position.
        let names = items.iter().chain(&queries).map(|(name, _)| name.as_str()).collect::<Vec<_>>().join("\n");
        group.check_same("images", &names)?;
    }
    let mut skipped = Vec::new();
    // The queries that could be read, their images, and their features.
    let (names, images): (Vec<String>, Vec<Sample>) = queries.into_iter().unzip();
    let embedded = loaded.embed_across(&images, &options.queries, group)?;
    let skipped_queries = embedded.skipped;
    let (queries, query_images) = (picked(&names, &embedded.rows), picked(&images, &embedded.rows));
    let query_features = embedded.features;

    // One more neighbour for a query to lose, itself.
    let k = options.k + usize::from(options.exclude_self);
    let (names, images): (Vec<String>, Vec<Sample>) = items.into_iter().unzip();
    let (read, mut hits) = match group.is_none() && options.kind.uses_hnsw(images.len(), queries.len()) {
        true => {
            let embedded = loaded.embed_images(&images, &options.index)?;
            skipped.extend(embedded.skipped);
            let index = Index::build(&embedded.features, IndexKind::Hnsw, queries.len(), 0)?;
            (embedded.rows, index.search(&query_features, k)?)
        }
        // The index's features stream past the queries, batch by batch,
        // each query keeping its k best so far: no more than a batch of
        // them is held, whatever the index's size. On the device that
        // computes them: a GPU's search multiplies every query by every
        // image, never on the host.
        false => {
            let (rank, world) = group.map_or((0, 1), |group| (group.rank(), group.size()));
            let mine = part_range(images.len(), rank, world);
            // A hit's index is its image's place among those this rank read.
            let mut best = Best::new(&query_features.to_device(loaded.device()), k);
            let mut read = Vec::new();
            let part = loaded.each_batch(&images[mine.clone()], &mut |features, rows| {
                best.meet(&features, read.len());
                read.extend(rows.into_iter().map(|row| mine.start + row));
                Ok(())
            });
            skipped.extend(agree(group, part)?);
            let (read, hits) = match group {
                None => (read, best.hits()?),
                Some(group) => {
                    skipped = group.all_gather_lines(&skipped)?;
                    best.merged(group, &read)?
                }
            };
            if read.is_empty() {
                return Err(crate::data::none_readable(&options.index, images.len()));
            }
            (read, hits)
        }
    };
    if group.is_some_and(|group| group.rank() != 0) {
        return Ok(None);
    }
    skipped.extend(skipped_queries);
    let (items, item_images) = (picked(&names, &read), picked(&images, &read));
    if options.exclude_self {
        let same_input = crate::io::same_file(&options.index, &options.queries);
        let items_are = identities(&item_images, &items, same_input);
        let queries_are = identities(&query_images, &queries, same_input);
        for (query, hits) in queries_are.iter().zip(&mut hits) {
            hits.retain(|hit| query.is_none() || items_are[hit.index] != *query);
            hits.truncate(options.k);
        }
    }
    if let Some(path) = &options.gallery {
        gallery::write_gallery(path, &query_images, &hits, &item_images, options.thumbnail)?;
    }
    Ok(Some(NeighborsReport { items, queries, hits, skipped }))
}

/// What makes each image the one it is, for `--exclude-self`: a file's
/// canonical path, a shard member's with its shard's; an image held in
/// memory (a CIFAR batch's) by its name (its position, `#12`), where the
/// queries and the images searched are one input (`same_input`), else
/// `None`.
fn identities(images: &[Sample], names: &[String], same_input: bool) -> Vec<Option<String>> {
    let canonical = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    images
        .iter()
        .zip(names)
        .map(|(sample, name)| match &sample.source {
            ImageSource::File(path) => Some(canonical(path)),
            ImageSource::Shard(member) => Some(format!("{}:{}", canonical(&member.shard), member.name)),
            ImageSource::Memory(_) => same_input.then(|| name.clone()),
        })
        .collect()
}

/// Each query's `k` most similar items among those met so far, for an
/// exact search that never holds the index.
struct Best {
    /// `[Q, d]`, unit length.
    queries: Tensor,
    k: i64,
    /// `[Q, <= k]` cosine similarities, best first, and the items' positions.
    similarity: Tensor,
    position: Tensor,
}

impl Best {
    fn new(queries: &Tensor, k: usize) -> Self {
        let rows = queries.size()[0];
        let empty = |kind| Tensor::zeros([rows, 0], (kind, queries.device()));
        Self {
            queries: l2_normalize(queries),
            k: k as i64,
            similarity: empty(Kind::Float),
            position: empty(Kind::Int64),
        }
    }

    /// Meets the items whose features are `features` (`[B, d]`), at
    /// positions `first` to `first + B - 1`.
    fn meet(&mut self, features: &Tensor, first: usize) {
        let first = first as i64;
        let positions = Tensor::arange_start(first, first + features.size()[0], (Kind::Int64, self.queries.device()));
        let similarity = self.queries.matmul(&l2_normalize(features).transpose(0, 1)).to_kind(Kind::Float);
        let similarity = Tensor::cat(&[&self.similarity, &similarity], 1);
        let position =
            Tensor::cat(&[self.position.shallow_clone(), positions.expand([similarity.size()[0], -1], false)], 1);
        let (best, chosen) = similarity.topk(self.k.min(similarity.size()[1]), 1, true, true);
        self.position = position.gather(1, &chosen, false);
        self.similarity = best;
    }

    /// Each query's hits, best first, indexed by the items' positions.
    fn hits(&self) -> Result<Vec<Vec<Neighbor>>> {
        hits_of(&self.similarity, &self.position)
    }

    /// Every rank's best, met over its part of the items, merged: each
    /// query's k best of all parts, best first, indexed by their place among
    /// the items all ranks read, and those items (their positions in the
    /// list, in order). `read` is this rank's, in the order met.
    fn merged(&self, group: &ProcessGroup, read: &[usize]) -> Result<(Vec<usize>, Vec<Vec<Neighbor>>)> {
        let cpu = |tensor: &Tensor| tensor.to_device(tch::Device::Cpu);
        // Each hit's place among this rank's items read, as a position in the list.
        let positions = Tensor::from_slice(&read.iter().map(|&item| item as i64).collect::<Vec<_>>());
        let position = positions.index_select(0, &cpu(&self.position).reshape([-1])).view_as(&self.position);
        let all_read = Vec::<i64>::try_from(&group.all_gather_rows(&positions)?)?;
        let all_read: Vec<usize> = all_read.into_iter().map(|item| item as usize).collect();
        let keep = self.k.min(all_read.len() as i64);
        let (best, position) = best_across(group, &cpu(&self.similarity), &position, self.k, keep)?;
        // A list position to its place among the items read (ascending).
        let hits = hits_of(&best, &position)?
            .into_iter()
            .map(|hits| {
                hits.into_iter()
                    .map(|hit| Neighbor { index: all_read.binary_search(&hit.index).expect("a hit was read"), ..hit })
                    .collect()
            })
            .collect();
        Ok((all_read, hits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn exact_and_hnsw_agree_on_clear_neighbours() {
        let features = Tensor::randn([300, 16], (Kind::Float, Device::Cpu));
        let queries = features.narrow(0, 0, 20) + Tensor::randn([20, 16], (Kind::Float, Device::Cpu)) * 0.01;
        for kind in [IndexKind::Exact, IndexKind::Hnsw] {
            let index = Index::build(&features, kind, 20, 0).unwrap();
            let hits = index.search(&queries, 3).unwrap();
            for (query, neighbours) in hits.iter().enumerate() {
                assert_eq!(neighbours.len(), 3);
                assert_eq!(neighbours[0].index, query, "{kind:?}");
                assert!(neighbours[0].similarity > 0.99 && neighbours[0].similarity >= neighbours[1].similarity);
            }
        }
    }

    #[test]
    fn the_index_streamed_in_batches_gives_the_exact_search() {
        let features = Tensor::randn([300, 16], (Kind::Float, Device::Cpu));
        let queries = Tensor::randn([20, 16], (Kind::Float, Device::Cpu));
        let whole = Index::build(&features, IndexKind::Exact, 20, 0).unwrap().search(&queries, 7).unwrap();
        let mut best = Best::new(&queries, 7);
        for start in (0..300).step_by(64) {
            best.meet(&features.narrow(0, start as i64, 64.min(300 - start) as i64), start);
        }
        let streamed = best.hits().unwrap();
        for (whole, streamed) in whole.iter().zip(&streamed) {
            assert_eq!(
                whole.iter().map(|hit| hit.index).collect::<Vec<_>>(),
                streamed.iter().map(|hit| hit.index).collect::<Vec<_>>()
            );
            for (a, b) in whole.iter().zip(streamed) {
                assert!((a.similarity - b.similarity).abs() < 1e-6, "{a:?} {b:?}");
            }
        }
        // Fewer items than neighbours asked: each of them, at its position.
        let mut few = Best::new(&queries, 7);
        few.meet(&features.narrow(0, 0, 3), 10);
        for hits in few.hits().unwrap() {
            let mut found: Vec<usize> = hits.iter().map(|hit| hit.index).collect();
            found.sort();
            assert_eq!(found, [10, 11, 12]);
        }
    }

    #[test]
    fn auto_builds_a_graph_only_for_many_queries_over_many_images() {
        let auto = |images, queries| IndexKind::Auto.uses_hnsw(images, queries);
        assert!(!auto(10_000_000, 1) && !auto(10_000_000, EXACT_QUERY_LIMIT) && !auto(EXACT_LIMIT, 10_000_000));
        assert!(auto(EXACT_LIMIT + 1, EXACT_QUERY_LIMIT + 1));
        assert!(IndexKind::Hnsw.uses_hnsw(1, 1) && !IndexKind::Exact.uses_hnsw(10_000_000, 10_000_000));
    }
}
