//! `simclr ablate`: the paper's experiments as grids of short trainings,
//! each run (a cell) scored by the kNN monitor, in a folder of its own under
//! the study's, so that a killed study continues where it stopped: a
//! finished cell is read back, a cell with a checkpoint is resumed, the
//! rest are trained (see [`run_cell`]).
//!
//! `ablate augment`, Figure 5: for every ordered pair of ops (first,
//! second), and each op alone on the diagonal, a model is trained briefly
//! with the base run's settings. As in section 3, the ops act on one branch
//! only: view 1 is the image resized to the training size (the identity
//! for same-sized data such as CIFAR), view 2 applies the first op and then
//! the second, each with probability 1. A sizing op (crop) always runs
//! first, so (crop, x) and (x, crop) are one experiment, trained once.
//! Writes `results.csv` and the heatmap `results.png`.
//!
//! `ablate histogram`, Figure 6: the same pairs, trained not at all:
//! how often colour histograms alone find a view's positive in its batch.
//! Writes `results.csv`, the heatmap `results.png`, the base's own
//! augmentation by colour strength `strengths.csv`, and Figure 6 itself,
//! `histograms.png` (crops' histograms without and with colour distortion).
//!
//! `ablate loss`, Tables 2 and 5: each objective with and without ℓ2
//! normalisation (cosine or dot-product similarity) at each temperature
//! (the margin triplet loss has a margin instead, so one run per
//! similarity). Writes `results.csv` and the heatmap `results.png`.
//!
//! `ablate head`, Figure 8 and section 4.2: one run per projection head
//! (none, linear, MLPs of 2 or more layers) and output dimension of z, each
//! scored on h and on z = g(h). Writes `results.csv` and `results.png`,
//! and for linear heads their W's spectrum, `linear-head-spectrum.png`.
//!
//! `ablate model`, Figure 7: for each architecture and width, a SimCLR run
//! and a supervised one (labels, cross-entropy, the same encoder and
//! augmentation), both scored on h. Writes `results.csv` and `results.png`.
//!
//! `ablate color`, Table 1: each colour-distortion strength, then the
//! last with Gaussian blur, then AutoAugment in place of the colour
//! distortion, trained with SimCLR and supervised. Writes `results.csv`
//! and `results.png`.
//!
//! `ablate transform`, section 4.2 and Table 3: for each transformation
//! (grayscale, rotation, noise, Sobel) a run with it in the augmentation,
//! then an MLP on h and one on z = g(h) trained to predict it (and one on
//! the random-init encoder's h, the baseline). Writes
//! `results.csv` and `results.png`.
//!
//! `ablate batch`, Figure 9: each batch size trained for each number of
//! epochs (a schedule of its own per length, as in the paper), the learning
//! rate scaled with the batch. Writes `results.csv` and `results.png`.
//!
//! `ablate bn`, section 2.2's global BN: BatchNorm over the whole batch,
//! and over each device's images for each number of devices (trained in
//! one process, a device's images a chunk of the step), scored by kNN with
//! the training loss beside it. Writes `results.csv` and `results.png`.
//!
//! With several seeds ([`Study::new`]) each cell is trained once per
//! seed and scored by the mean of its runs, with their standard deviation
//! beside it in the table and the CSV: one run per cell cannot tell a
//! difference between cells from the spread between seeds.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::augment::{
    AugmentConfig, Augmentation, AutoAugmentConfig, AutoAugmentPolicy, BlurConfig, ColorJitterConfig, OpConfig,
};
use crate::config::RunConfig;
use crate::embed::EncoderSource;
use crate::eval::features::FeatureNet;
use crate::eval::{effective_rank, effective_rank_of, histogram_shortcut, singular_values, Probe, Transformation};
use crate::loss::{Negatives, Objective, Similarity};
use crate::model::{Arch, HeadKind, Layer};
use crate::report::{Heatmap, HistogramPanels, Spectrum};
use crate::train::trainer::{supervised, CONFIG_FILE, SUMMARY_FILE};
use crate::train::FinishedRun;
use crate::train::{checkpoint, train, Observer};
use crate::{Error, Result};

/// The ops of view 2 for the pair (first, second): each applied always,
/// a sizing op moved to the front.
fn view_ops(first: &OpConfig, second: Option<&OpConfig>) -> Vec<OpConfig> {
    let mut ops: Vec<OpConfig> =
        std::iter::once(first).chain(second).map(|op| op.clone().with_probability(1.0)).collect();
    ops.sort_by_key(|op| !op.is_sizing());
    ops
}

/// The fields `ablate augment` sets in each of its runs, each with the flag that
/// gives its values.
pub const AUGMENT_VARIED: &[(&str, &str)] = &[("augment.ops", "--ops"), ("augment.second_view", "--ops")];

/// Figure 5's grid over `ops`: `score` of each ordered pair (first,
/// second), and of each op alone on the diagonal, given the base's
/// augmentation with view 1 unaugmented and view 2 the pair's ops
/// ([`view_ops`]), and the pair's key (its ops' names joined by `+`).
/// Pairs with one key are one experiment, scored once.
fn pairs_grid(
    base: &AugmentConfig,
    ops: &[OpConfig],
    mut score: impl FnMut(AugmentConfig, &str) -> Result<Option<Score>>,
) -> Result<Vec<Vec<Option<Score>>>> {
    let mut done: HashMap<String, Option<Score>> = HashMap::new();
    let mut scores = vec![vec![None; ops.len()]; ops.len()];
    for (i, first) in ops.iter().enumerate() {
        for (j, second) in ops.iter().enumerate() {
            let second_view = view_ops(first, (i != j).then_some(second));
            let key = second_view.iter().map(OpConfig::name).collect::<Vec<_>>().join("+");
            if let Some(known) = done.get(&key) {
                scores[i][j] = *known;
                continue;
            }
            let augment = AugmentConfig { ops: Some(Vec::new()), second_view: Some(second_view), ..base.clone() };
            scores[i][j] = score(augment, &key)?;
            done.insert(key, scores[i][j]);
        }
    }
    Ok(scores)
}

/// The CSV of a [`pairs_grid`]: a line per ordered pair, `columns(score)`
/// after the two ops' names.
fn pairs_csv(names: &[String], scores: &[Vec<Option<Score>>], columns: impl Fn(Option<Score>) -> String) -> String {
    let mut csv = String::new();
    for (i, row) in scores.iter().enumerate() {
        for (j, score) in row.iter().enumerate() {
            csv.push_str(&format!("{},{},{}\n", names[i], names[j], columns(*score)));
        }
    }
    csv
}

/// Trains one cell per distinct pair, then writes the table and the heatmap.
pub fn augment_pairs(base: &RunConfig, ops: &[OpConfig], study: &mut Study) -> Result<Grid> {
    if ops.is_empty() {
        return Err(Error::InvalidArgument("ablate augment needs at least one op".to_owned()));
    }
    study.create_folder()?;
    let names: Vec<String> = ops.iter().map(|op| op.name().to_owned()).collect();
    let mut initial_top1 = None;
    let top1 = pairs_grid(&base.augment, ops, |augment, key| {
        let config = RunConfig { augment, ..base.clone() };
        let cell = study.cell(config, key, &format!("view 2 = {key}"))?;
        initial_top1 = initial_top1.or(cell.initial_top1());
        Ok(cell.score())
    })?;
    let csv = format!(
        "first,second,{}\n{}",
        study.score_columns(&["knn_top1"]),
        pairs_csv(&names, &top1, |score| study.csv_score(score))
    );
    let chart = Chart {
        caption: "kNN top-1 (%) with view 2 = 1st op, then 2nd op (view 1 unaugmented)",
        x_desc: "2nd transformation",
        y_desc: "1st transformation",
    };
    study.write_grid("1st \\ 2nd", (names.clone(), names), top1, initial_top1, &csv, chart)
}

/// Where `ablate histogram` writes the base's shortcut by colour strength.
pub const STRENGTHS_FILE: &str = "strengths.csv";

/// Where `ablate histogram` draws its Figure 6.
pub const HISTOGRAMS_FILE: &str = "histograms.png";

/// Figure 6 at `path`: the colour histograms of four crops of each of the
/// first two images of `train`'s epoch 0, drawn by the base's view 1 without
/// its colour distortion (colour jitter and random grayscale) and with it.
fn histogram_figure(base: &RunConfig, train: &crate::data::Dataset, seed: u64, path: &Path) -> Result<PathBuf> {
    let [own, _] = base.augment.view_ops();
    let plain: Vec<OpConfig> =
        own.iter().filter(|op| !matches!(op, OpConfig::ColorJitter(_) | OpConfig::Grayscale(_))).cloned().collect();
    let order = crate::data::loader::epoch_order(train.len(), seed, 0);
    let first = &order[..2.min(order.len())];
    let panels = [("(a) without colour distortion", plain), ("(b) with colour distortion", own)]
        .into_iter()
        .map(|(title, ops)| {
            let pipeline = crate::augment::Pipeline::new(&AugmentConfig::with_ops(ops), base.view_size());
            let title = format!("{title}: {}", pipeline.describe(0));
            Ok((title, crate::eval::histogram::crop_histograms(train, &pipeline, seed, first, 4)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let images: Vec<String> = first
        .iter()
        .map(|&index| {
            let name = train.samples[index].describe(index);
            let file = Path::new(&name).file_name().map(|file| file.to_string_lossy().into_owned());
            format!("crops of {}", file.unwrap_or(name))
        })
        .collect();
    let bins = crate::eval::histogram::BINS;
    let x_desc =
        format!("bin: red 0-{}, green {}-{}, blue {}-{}", bins - 1, bins, 2 * bins - 1, 2 * bins, 3 * bins - 1);
    HistogramPanels { images: &images, x_desc: &x_desc, y_desc: "share of the channel's pixels" }
        .draw(&panels, path)?;
    Ok(path.to_path_buf())
}

/// The fields `ablate histogram` sets in each of its cells, each with the
/// flag that gives its values (it trains none).
pub const HISTOGRAM_VARIED: &[(&str, &str)] = AUGMENT_VARIED;

/// `ablate histogram`, section 3 and Figure 6: for each pair of
/// `ablate augment`'s grid, how often colour histograms alone find a
/// view's positive among the other 2N - 1 views of its batch, over epoch 0
/// of the base run (its data, batch size and seed, or each of the study's
/// seeds), with no training ([`crate::eval::histogram`]). Below the table,
/// the same for the base's own augmentation (both views), then with its
/// colour jitter at each of `strengths` (Table 1's), and a guess. The
/// paper conjectures that crops alone leave this shortcut open and colour
/// distortion closes it: read beside `ablate augment`'s grid, a pair that
/// scores high here is one the network can solve by colour alone.
pub fn histogram_pairs(base: &RunConfig, ops: &[OpConfig], strengths: &[f64], study: &mut Study) -> Result<Grid> {
    if ops.is_empty() {
        return Err(Error::InvalidArgument("ablate histogram needs at least one op".to_owned()));
    }
    let views = base.augment.view_ops();
    if !strengths.is_empty() {
        check_strengths(&views, strengths, "histogram --strengths")?;
    }
    // Each seed's training set, as its run would draw a `data.limit` subset.
    let trains = study
        .seeds_of(base)
        .into_iter()
        .map(|seed| Ok((seed, crate::data::open_splits(&base.data, seed)?.train.with_policy(base.data.on_bad_image))))
        .collect::<Result<Vec<_>>>()?;
    let pool = crate::data::loader::worker_pool(base.data.workers)?;
    let mut guess = 0.0;
    let mut shortcut = |augment: AugmentConfig| -> Result<Option<Score>> {
        // Each pair's views checked as a run would check them.
        RunConfig { augment: augment.clone(), ..base.clone() }.validate()?;
        let pipeline = crate::augment::Pipeline::new(&augment, base.view_size());
        let mut top1 = Vec::with_capacity(trains.len());
        for (seed, train) in &trains {
            let found = histogram_shortcut(train, &pipeline, *seed, base.train.batch_size, &pool)?;
            top1.push(found.top1);
            guess = found.guess;
        }
        Ok(Some(Score::of(&top1)))
    };
    let found = pairs_grid(&base.augment, ops, |augment, key| {
        tracing::info!("study: colour histograms, view 2 = {key}");
        shortcut(augment)
    })?;
    let own = shortcut(base.augment.clone())?;
    let by_strength = strengths
        .iter()
        .map(|&strength| {
            let [first, second] = views.clone().map(|ops| at_strength(ops, strength));
            let augment = AugmentConfig { ops: Some(first), second_view: Some(second), ..base.augment.clone() };
            Ok((strength, shortcut(augment)?))
        })
        .collect::<Result<Vec<_>>>()?;
    study.create_folder()?;
    if !by_strength.is_empty() {
        let mut csv = format!("strength,{}\n", study.score_columns(&["histogram_top1"]));
        for (strength, score) in &by_strength {
            csv.push_str(&format!("{strength},{}\n", study.csv_score(*score)));
        }
        crate::io::write_atomic(&study.output_dir.join(STRENGTHS_FILE), csv.as_bytes())?;
    }
    let names: Vec<String> = ops.iter().map(|op| op.name().to_owned()).collect();
    let csv = format!(
        "first,second,random_guess,{}\n{}",
        study.score_columns(&["histogram_top1"]),
        pairs_csv(&names, &found, |score| format!("{guess:.6},{}", study.csv_score(score)))
    );
    let chart = Chart {
        caption: "views (%) whose positive colour histograms find in the batch, view 2 = 1st op, then 2nd op \
                  (view 1 unaugmented)",
        x_desc: "2nd transformation",
        y_desc: "1st transformation",
    };
    let mut grid = study.write_grid("1st \\ 2nd", (names.clone(), names), found, None, &csv, chart)?;
    let (seed, train) = &trains[0];
    let figure = histogram_figure(base, train, *seed, &study.output_dir.join(HISTOGRAMS_FILE))?;
    grid.notes = format!(
        "the base run's own augmentation (both views): {}; a guess: {:.2}% (one of the {} other views)\n",
        percent(own),
        100.0 * guess,
        2 * base.train.batch_size - 1
    );
    if !by_strength.is_empty() {
        let scores: Vec<String> =
            by_strength.iter().map(|(strength, score)| format!("{strength}: {}", percent(*score))).collect();
        grid.notes.push_str(&format!(
            "the same with its colour jitter at strength {} ({})\n",
            scores.join(", "),
            study.output_dir.join(STRENGTHS_FILE).display()
        ));
    }
    grid.notes.push_str(&format!("histograms of crops of two images, as Figure 6: {}\n", figure.display()));
    Ok(grid)
}

/// What a table, the CSV and the chart say of a run that diverged.
const DIVERGED: &str = "diverged";

/// A score as a table or a note shows it: the mean as `mean` writes it,
/// then the spread over seeds as `deviation` does.
fn score_text(score: Option<Score>, mean: impl Fn(f64) -> String, deviation: impl Fn(f64) -> String) -> String {
    match score {
        None => DIVERGED.to_owned(),
        Some(Score { mean: m, deviation: None }) => mean(m),
        Some(Score { mean: m, deviation: Some(d) }) => format!("{} ± {}", mean(m), deviation(d)),
    }
}

/// A top-1 score as a table shows it, in percent.
fn percent(score: Option<Score>) -> String {
    score_text(score, |mean| format!("{:.2}%", 100.0 * mean), |deviation| format!("{:.2}", 100.0 * deviation))
}

/// A chart's caption with the random-init encoder's score, the baseline
/// every cell is read against (the heatmap draws cells below it red).
fn with_initial(caption: &str, initial_top1: Option<f64>) -> String {
    match initial_top1 {
        Some(initial) => format!("{caption}; random init {:.1}% (red: below it)", 100.0 * initial),
        None => caption.to_owned(),
    }
}

fn write_initial(f: &mut std::fmt::Formatter<'_>, initial_top1: Option<f64>) -> std::fmt::Result {
    match initial_top1 {
        Some(initial) => writeln!(f, "random-init encoder: {:.2}%", 100.0 * initial),
        None => Ok(()),
    }
}

/// Written into a cell's folder when its training diverged.
pub const DIVERGED_FILE: &str = "diverged.txt";

/// What one finished run of a cell scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub dir: PathBuf,
    /// kNN top-1 at the end of the run; `None` when training diverged
    /// (`train.max_nonfinite_steps` non-finite steps in a row), which a
    /// study records and goes on from, as the paper's grids have such cells.
    pub top1: Option<f64>,
    /// kNN top-1 of the random-init encoder (absent for a run resumed
    /// from a checkpoint, which did not measure it).
    pub initial_top1: Option<f64>,
    /// The training loss of the last epoch; `None` where training diverged.
    pub final_loss: Option<f64>,
}

/// A cell's kNN top-1 over its runs, one per seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub mean: f64,
    /// The sample standard deviation (n - 1) where there are several runs.
    pub deviation: Option<f64>,
}

impl Score {
    fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let deviation =
            (values.len() > 1).then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        Self { mean, deviation }
    }
}

/// A cell's runs: one per seed of the study.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub runs: Vec<Run>,
}

impl Cell {
    /// The runs' kNN top-1; `None` (diverged) if any run diverged: a
    /// setting that diverges at one seed is unstable, whatever the others
    /// reached (their scores stay in their folders).
    pub fn score(&self) -> Option<Score> {
        let scores: Option<Vec<f64>> = self.runs.iter().map(|run| run.top1).collect();
        scores.map(|scores| Score::of(&scores))
    }

    /// Another score of each run (such as kNN top-1 on z), `None` where a
    /// run diverged.
    pub fn score_with(&self, score: impl Fn(&Run) -> Result<f64>) -> Result<Option<Score>> {
        let [score] = self.scores_with(|run| Ok([score(run)?]))?;
        Ok(score)
    }

    /// [`Cell::score_with`] for `N` scores that each run gives at once
    /// (such as several probes of one opened checkpoint); all `None` where
    /// a run diverged.
    pub fn scores_with<const N: usize>(&self, scores: impl Fn(&Run) -> Result<[f64; N]>) -> Result<[Option<Score>; N]> {
        if self.runs.iter().any(|run| run.top1.is_none()) {
            return Ok([None; N]);
        }
        let runs = self.runs.iter().map(scores).collect::<Result<Vec<[f64; N]>>>()?;
        Ok(std::array::from_fn(|i| Some(Score::of(&runs.iter().map(|run| run[i]).collect::<Vec<f64>>()))))
    }

    /// The random-init encoder's score, from the first run that measured it.
    pub fn initial_top1(&self) -> Option<f64> {
        self.runs.iter().find_map(|run| run.initial_top1)
    }
}

/// Where a study trains and how often: the folder of its cells, the seeds
/// each cell is trained with, and the observer of every run.
pub struct Study<'a> {
    output_dir: PathBuf,
    seeds: Vec<u64>,
    observer: &'a mut dyn Observer,
}

impl<'a> Study<'a> {
    /// A study whose cells live in `output_dir`. `seeds` are the
    /// `train.seed` of each run of a cell: none or one, a run per cell in
    /// the cell's folder (with the base run's seed when none is given);
    /// several, a run per seed in the cell's `seed-<S>` folders. A seed
    /// given twice is refused: it would be one run counted twice.
    pub fn new(output_dir: PathBuf, seeds: Vec<u64>, observer: &'a mut dyn Observer) -> Result<Self> {
        if let Some(seed) = seeds.iter().enumerate().find_map(|(i, seed)| seeds[..i].contains(seed).then_some(seed)) {
            return Err(Error::InvalidArgument(format!(
                "seeds {seeds:?}: seed {seed} is given twice, which would count one run twice"
            )));
        }
        Ok(Self { output_dir, seeds, observer })
    }

    fn create_folder(&self) -> Result<()> {
        crate::io::create_dir(&self.output_dir)
    }

    fn seeded(&self) -> bool {
        self.seeds.len() > 1
    }

    /// The seed of each run of a cell of `base`: the study's seeds, or the
    /// base run's own where none is given.
    fn seeds_of(&self, base: &RunConfig) -> Vec<u64> {
        if self.seeds.is_empty() {
            vec![base.train.seed]
        } else {
            self.seeds.clone()
        }
    }

    /// The runs of the cell `key` with `config`, each trained, resumed or
    /// read back by [`run_cell`].
    fn cell(&mut self, mut config: RunConfig, key: &str, label: &str) -> Result<Cell> {
        let dir = self.output_dir.join(key);
        if !self.seeded() {
            if let Some(&seed) = self.seeds.first() {
                config.train.seed = seed;
            }
            return Ok(Cell { runs: vec![run_cell(config, &dir, label, self.observer)?] });
        }
        let mut runs = Vec::with_capacity(self.seeds.len());
        for &seed in &self.seeds {
            config.train.seed = seed;
            let label = format!("{label}, seed {seed}");
            runs.push(run_cell(config.clone(), &dir.join(format!("seed-{seed}")), &label, self.observer)?);
        }
        Ok(Cell { runs })
    }

    /// The CSV columns of scores named `names`, each followed by its
    /// standard deviation over seeds when there are several.
    fn score_columns(&self, names: &[&str]) -> String {
        let columns: Vec<String> = names
            .iter()
            .map(|name| if self.seeded() { format!("{name},{name}_sd") } else { (*name).to_owned() })
            .collect();
        columns.join(",")
    }

    /// A score as `results.csv` holds it, in the columns of [`Study::score_columns`].
    fn csv_score(&self, score: Option<Score>) -> String {
        let mean = score.map_or_else(|| DIVERGED.to_owned(), |score| format!("{:.4}", score.mean));
        if !self.seeded() {
            return mean;
        }
        let deviation = score.and_then(|score| score.deviation).map_or_else(String::new, |d| format!("{d:.4}"));
        format!("{mean},{deviation}")
    }

    /// Writes `csv` (its lines, one per cell) and the heatmap of the cells'
    /// mean scores into the study's folder.
    fn write_grid(
        &self,
        corner: &str,
        (rows, columns): (Vec<String>, Vec<String>),
        top1: Vec<Vec<Option<Score>>>,
        initial_top1: Option<f64>,
        csv: &str,
        chart: Chart,
    ) -> Result<Grid> {
        let csv_path = self.output_dir.join("results.csv");
        crate::io::write_atomic(&csv_path, csv.as_bytes())?;
        let png_path = self.output_dir.join("results.png");
        let mut caption = with_initial(chart.caption, initial_top1);
        if self.seeded() {
            caption.push_str(&format!("; mean of {} seeds", self.seeds.len()));
        }
        let means: Vec<Vec<Option<f64>>> =
            top1.iter().map(|row| row.iter().map(|score| score.map(|score| score.mean)).collect()).collect();
        Heatmap {
            caption: &caption,
            rows: &rows,
            columns: &columns,
            x_desc: chart.x_desc,
            y_desc: chart.y_desc,
            annotate: true,
            floor: initial_top1,
            missing: DIVERGED,
        }
        .draw(&means, &png_path)?;
        let notes = String::new();
        Ok(Grid { corner: corner.to_owned(), rows, columns, top1, initial_top1, csv_path, png_path, notes })
    }
}

/// The run `config` in `dir`, scored by the kNN monitor. A killed study
/// continues: a finished run there (its summary written) is read back
/// instead of trained, as is one that diverged (its `diverged.txt`
/// written), a run with a checkpoint is resumed, and a run of another
/// configuration is an error naming the folder.
pub fn run_cell(mut config: RunConfig, dir: &Path, label: &str, observer: &mut dyn Observer) -> Result<Run> {
    config.train.output_dir = dir.to_path_buf();
    let config = config.validate()?;
    let no_score = || {
        Error::InvalidArgument(format!(
            "{}: a study scores each run with the kNN monitor: give labelled splits (data.knn_train_path and \
             data.knn_test_path) or use the synthetic data, and train.knn_every > 0",
            dir.display()
        ))
    };
    // Known before training: a run that the monitor does not score would
    // be trained in full, and the study then stop without its score.
    let monitored = config.data.path.is_none() || config.data.knn_train_path.is_some();
    if !monitored || config.train.knn_every == 0 {
        return Err(no_score());
    }
    let config_path = dir.join(CONFIG_FILE);
    if let Ok(saved) = std::fs::read_to_string(&config_path) {
        // Read as a config, so that a field added since the run was written
        // (absent there, at its default here) does not count as a change.
        let same = toml::from_str::<RunConfig>(&saved).is_ok_and(|saved| saved.to_toml() == config.to_toml());
        if !same {
            return Err(Error::InvalidArgument(format!(
                "{}: a run with another configuration is there; remove it or give the study another --output",
                dir.display()
            )));
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(SUMMARY_FILE)) {
            let summary: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::InvalidArgument(format!("{}: {e}", dir.display())))?;
            tracing::info!("study: {label} is done, its score read from {}", dir.display());
            let top1 = summary["final_knn_top1"].as_f64().ok_or_else(no_score)?;
            return Ok(Run {
                dir: dir.to_path_buf(),
                top1: Some(top1),
                initial_top1: summary["initial_knn_top1"].as_f64(),
                final_loss: summary["final_loss"].as_f64(),
            });
        }
        if dir.join(DIVERGED_FILE).exists() {
            tracing::info!("study: {label} diverged before, as {} says", dir.join(DIVERGED_FILE).display());
            return Ok(Run { dir: dir.to_path_buf(), top1: None, initial_top1: None, final_loss: None });
        }
    }
    let resume = checkpoint::exists(&dir.join(checkpoint::FILE_NAME));
    tracing::info!("study: {} {label}", if resume { "resuming" } else { "training" });
    let report = match train(config, resume, observer) {
        Err(Error::NonFinite(message)) => {
            tracing::warn!(
                "study: {label} diverged; recorded in {}, the study goes on",
                dir.join(DIVERGED_FILE).display()
            );
            crate::io::write_atomic(&dir.join(DIVERGED_FILE), format!("{message}\n").as_bytes())?;
            return Ok(Run { dir: dir.to_path_buf(), top1: None, initial_top1: None, final_loss: None });
        }
        outcome => outcome?,
    };
    if report.interrupted_at.is_some() {
        return Err(Error::Interrupted(format!("study run {label} in {}", dir.display())));
    }
    let top1 = Some(report.final_knn_top1().ok_or_else(no_score)?);
    let final_loss = report.epochs.last().map(|epoch| epoch.loss);
    Ok(Run { dir: dir.to_path_buf(), top1, initial_top1: report.initial_knn_top1, final_loss })
}

/// A study's result: kNN top-1 in a table of named rows and columns, as
/// written to `results.csv` (one line per run) and drawn in `results.png`.
#[derive(Debug, Clone)]
pub struct Grid {
    /// What the rows and the columns are, as "rows \\ columns".
    pub corner: String,
    pub rows: Vec<String>,
    pub columns: Vec<String>,
    /// `top1[row][column]`; `None` where training diverged (a blank cell).
    pub top1: Vec<Vec<Option<Score>>>,
    /// The random-init encoder's kNN top-1 (the first cell that measured it).
    pub initial_top1: Option<f64>,
    pub csv_path: PathBuf,
    pub png_path: PathBuf,
    /// Lines printed below the table (a study's other measurements).
    pub notes: String,
}

/// The table of top-1 accuracies, each column as wide as its name.
impl std::fmt::Display for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.rows.iter().chain([&self.corner]).map(|name| name.chars().count()).max().unwrap_or(0);
        let cell_width =
            |column: usize| self.top1.iter().map(|row| percent(row[column]).chars().count()).max().unwrap_or(0);
        let widths: Vec<usize> =
            self.columns.iter().enumerate().map(|(j, name)| name.chars().count().max(cell_width(j)).max(9)).collect();
        write!(f, "{:>first$}", self.corner)?;
        for (column, width) in self.columns.iter().zip(&widths) {
            write!(f, "  {column:>width$}")?;
        }
        writeln!(f)?;
        for (name, row) in self.rows.iter().zip(&self.top1) {
            write!(f, "{name:>first$}")?;
            for (score, width) in row.iter().zip(&widths) {
                write!(f, "  {:>width$}", percent(*score))?;
            }
            writeln!(f)?;
        }
        write_initial(f, self.initial_top1)?;
        write!(f, "{}", self.notes)
    }
}

/// The labels of a study's chart.
struct Chart<'a> {
    caption: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
}

fn row_name(objective: Objective, similarity: Similarity, negatives: Negatives) -> String {
    let normalised = match similarity {
        Similarity::Cosine => "l2 norm",
        Similarity::Dot => "no l2 norm",
    };
    match negatives {
        Negatives::All => format!("{}, {normalised}", objective.name()),
        Negatives::SemiHard => format!("{}, {normalised}, semi-hard", objective.name()),
    }
}

/// The fields `ablate loss` sets in each of its runs, each with the flag that
/// gives its values.
pub const LOSS_VARIED: &[(&str, &str)] = &[
    ("loss.objective", "--losses"),
    ("loss.similarity", "--similarities"),
    ("loss.temperature", "--temperatures"),
    ("loss.negatives", "--negatives"),
];

/// What `ablate loss` crosses: its rows are the objectives by similarity by
/// negatives (semi-hard mining only for the losses that take it), its
/// columns the temperatures.
pub struct LossAxes<'a> {
    pub objectives: &'a [Objective],
    pub similarities: &'a [Similarity],
    pub temperatures: &'a [f64],
    pub negatives: &'a [Negatives],
}

impl LossAxes<'_> {
    /// The rows, in order: each objective's similarities, each with the
    /// negatives it takes.
    fn rows(&self) -> Vec<(Objective, Similarity, Negatives)> {
        let mut rows = Vec::new();
        for &objective in self.objectives {
            for &similarity in self.similarities {
                for &negatives in self.negatives {
                    if negatives == Negatives::All || objective.mines_negatives() {
                        rows.push((objective, similarity, negatives));
                    }
                }
            }
        }
        rows
    }

    /// The runs of a row: the margin triplet loss has no temperature.
    fn runs_per_row(&self, objective: Objective) -> usize {
        if objective == Objective::MarginTriplet {
            1
        } else {
            self.temperatures.len()
        }
    }
}

/// `ablate loss`: one cell per (objective, similarity, negatives) row and
/// temperature column. Table 2's "sh" rows come from `--negatives
/// all,semi-hard`.
pub fn loss_grid(base: &RunConfig, axes: &LossAxes, study: &mut Study) -> Result<Grid> {
    if axes.objectives.is_empty() || axes.similarities.is_empty() || axes.temperatures.is_empty() {
        return Err(Error::InvalidArgument(
            "ablate loss needs at least one objective, one similarity and one temperature".to_owned(),
        ));
    }
    let rows = axes.rows();
    if rows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "ablate loss --negatives semi-hard with --losses {}: semi-hard negative mining is for nt-logistic \
             and margin-triplet; add one of them, or --negatives all",
            axes.objectives.iter().map(|o| o.name()).collect::<Vec<_>>().join(",")
        )));
    }
    study.create_folder()?;
    let mut row_names = Vec::new();
    let mut top1 = Vec::new();
    let mut initial_top1 = None;
    let mut csv = format!("objective,similarity,negatives,temperature,margin,{}\n", study.score_columns(&["knn_top1"]));
    let total: usize = rows.iter().map(|&(objective, ..)| axes.runs_per_row(objective)).sum();
    let mut done = 0;
    for (objective, similarity, negatives) in rows {
        // The margin triplet loss has no temperature: one run, its score across the row.
        let mut row = Vec::new();
        for &temperature in &axes.temperatures[..axes.runs_per_row(objective)] {
            let mut config = base.clone();
            config.loss.objective = objective;
            config.loss.similarity = similarity;
            config.loss.negatives = negatives;
            let mut key = if objective == Objective::MarginTriplet {
                format!("{}-{}-m{}", objective.name(), similarity.name(), config.loss.margin)
            } else {
                config.loss.temperature = temperature;
                format!("{}-{}-t{temperature}", objective.name(), similarity.name())
            };
            if negatives == Negatives::SemiHard {
                key.push_str("-semi-hard");
            }
            done += 1;
            let label = format!("{key} ({done} of {total})");
            let cell = study.cell(config.clone(), &key, &label)?;
            initial_top1 = initial_top1.or(cell.initial_top1());
            let (t, m) = match objective {
                Objective::MarginTriplet => (String::new(), config.loss.margin.to_string()),
                _ => (temperature.to_string(), String::new()),
            };
            let score = cell.score();
            let names = [objective.name(), similarity.name(), negatives.name()].join(",");
            csv.push_str(&format!("{names},{t},{m},{}\n", study.csv_score(score)));
            row.push(score);
        }
        row.resize(axes.temperatures.len(), row[0]);
        row_names.push(row_name(objective, similarity, negatives));
        top1.push(row);
    }
    let columns = axes.temperatures.iter().map(|t| format!("τ = {t}")).collect();
    let x_desc = if axes.objectives.contains(&Objective::MarginTriplet) {
        "temperature (margin triplet: one run, margin m, across its row)"
    } else {
        "temperature"
    };
    let chart = Chart { caption: "kNN top-1 (%) by loss and temperature", x_desc, y_desc: "loss" };
    study.write_grid("loss \\ temperature", (row_names, columns), top1, initial_top1, &csv, chart)
}

/// The fields `ablate batch` sets in each of its runs, each with the flag that
/// gives its values.
pub const BATCH_VARIED: &[(&str, &str)] =
    &[("train.batch_size", "--batch-sizes"), ("train.epochs", "--lengths"), ("train.time_budget_seconds", "--lengths")];

/// `ablate batch`, Figure 9: one run per batch size (rows) and training
/// length in epochs (columns); the learning rate follows the batch as
/// `optim.lr_scaling` says (the paper's linear N/256 by default).
pub fn batch_grid(base: &RunConfig, batch_sizes: &[usize], lengths: &[usize], study: &mut Study) -> Result<Grid> {
    if batch_sizes.is_empty() || lengths.is_empty() {
        return Err(Error::InvalidArgument("ablate batch needs at least one batch size and one length".to_owned()));
    }
    study.create_folder()?;
    let mut top1 = Vec::new();
    let mut initial_top1 = None;
    let mut csv = format!("batch_size,epochs,peak_learning_rate,{}\n", study.score_columns(&["knn_top1"]));
    let total = batch_sizes.len() * lengths.len();
    for (i, &batch_size) in batch_sizes.iter().enumerate() {
        let mut row = Vec::new();
        for (j, &epochs) in lengths.iter().enumerate() {
            let mut config = base.clone();
            config.train.batch_size = batch_size;
            config.train.epochs = epochs;
            config.train.time_budget_seconds = None;
            let key = format!("batch{batch_size}-epochs{epochs}");
            let label = format!("{key} ({} of {total})", i * lengths.len() + j + 1);
            let cell = study.cell(config.clone(), &key, &label)?;
            initial_top1 = initial_top1.or(cell.initial_top1());
            let peak = config.optim.peak_learning_rate(batch_size);
            let score = cell.score();
            csv.push_str(&format!("{batch_size},{epochs},{peak},{}\n", study.csv_score(score)));
            row.push(score);
        }
        top1.push(row);
    }
    let rows = batch_sizes.iter().map(|b| format!("batch {b}")).collect();
    let columns = lengths.iter().map(|e| format!("{e} epochs")).collect();
    let chart =
        Chart { caption: "kNN top-1 (%) by batch size and training length", x_desc: "epochs", y_desc: "batch size" };
    study.write_grid("batch \\ epochs", (rows, columns), top1, initial_top1, &csv, chart)
}

/// A projection head a study trains: none, linear, or an MLP of `layers`
/// linear layers (named `mlp-2`, `mlp-3`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadChoice {
    pub kind: HeadKind,
    pub layers: usize,
}

impl std::fmt::Display for HeadChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            HeadKind::None => write!(f, "none"),
            HeadKind::Linear => write!(f, "linear"),
            HeadKind::Mlp => write!(f, "mlp-{}", self.layers),
        }
    }
}

impl std::str::FromStr for HeadChoice {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("head '{text}': expected none, linear or mlp-K with K >= 2"));
        match text {
            "none" => Ok(Self { kind: HeadKind::None, layers: 0 }),
            "linear" => Ok(Self { kind: HeadKind::Linear, layers: 1 }),
            _ => match text.strip_prefix("mlp-").map(str::parse::<usize>) {
                Some(Ok(layers)) if layers >= 2 => Ok(Self { kind: HeadKind::Mlp, layers }),
                _ => Err(bad()),
            },
        }
    }
}

/// The fields `ablate head` sets in each of its runs, each with the flag that
/// gives its values.
pub const HEAD_VARIED: &[(&str, &str)] = &[("model.head.kind", "--heads"), ("model.head.layers", "--heads")];

/// What `ablate head` also sets when given `--dims`.
pub const HEAD_DIMS_VARIED: (&str, &str) = ("model.head.projection_dim", "--dims");

/// `ablate head`, Figure 8 and section 4.2: one run per projection head
/// (rows), each scored by the kNN monitor on h, the encoder's output, and
/// on z = g(h), the head's (z = h without a head). With at most one output
/// dimension in `dims` (none: the base's), the columns are h and z; with
/// several, Figure 8's grid: a column per dimension of z, scored on h (z in
/// the CSV), the run without a head (which has no z of its own) across its
/// row. The paper finds a non-linear head best at every dimension, the
/// dimension mattering little, and h better than z by more than 10%. Each
/// cell also gets the effective rank of the kNN bank's features at h and
/// at z, trained and at random init (in the CSV and below the table), and
/// each linear head its W's squared singular values, trained and at random
/// init ([`SPECTRUM_FILE`]): appendix B.4 finds z of lower rank than h and
/// W with few large eigenvalues.
pub fn head_grid(base: &RunConfig, heads: &[HeadChoice], dims: &[usize], study: &mut Study) -> Result<Grid> {
    if heads.is_empty() {
        return Err(Error::InvalidArgument("ablate head needs at least one head".to_owned()));
    }
    if let Some(zero) = dims.iter().find(|&&dim| dim == 0) {
        return Err(Error::InvalidArgument(format!("--dims: {zero}: a projection dimension must be at least 1")));
    }
    let by_dimension = dims.len() > 1;
    let dims = if dims.is_empty() { vec![base.model.head.projection_dim] } else { dims.to_vec() };
    study.create_folder()?;
    let (mut top1, mut initial_top1) = (Vec::new(), None);
    let columns = [
        "knn_top1_h",
        "knn_top1_z",
        "effective_rank_h",
        "effective_rank_z",
        "effective_rank_h_random_init",
        "effective_rank_z_random_init",
    ];
    let mut csv = format!("head,projection_dim,{}\n", study.score_columns(&columns));
    let (mut ranks, mut spectra) = (Vec::new(), Vec::new());
    let runs: usize = heads.iter().map(|head| if head.kind == HeadKind::None { 1 } else { dims.len() }).sum();
    let mut done = 0;
    for head in heads {
        let mut row = Vec::new();
        // Without a head the output dimension is h's: one run.
        let head_dims = if head.kind == HeadKind::None { &dims[..1] } else { &dims[..] };
        for &dim in head_dims {
            let mut config = base.clone();
            config.model.head.kind = head.kind;
            config.model.head.projection_dim = dim;
            if head.kind == HeadKind::Mlp {
                config.model.head.layers = head.layers;
            }
            let key = match by_dimension && head.kind != HeadKind::None {
                true => format!("head-{head}-dim{dim}"),
                false => format!("head-{head}"),
            };
            done += 1;
            let cell = study.cell(config, &key, &format!("{key} ({done} of {runs})"))?;
            initial_top1 = initial_top1.or(cell.initial_top1());
            let (h, [z, rank_h, rank_z, initial_h, initial_z]) = (cell.score(), cell.scores_with(head_measures)?);
            let width = if head.kind == HeadKind::None { String::new() } else { dim.to_string() };
            let scores = [h, z, rank_h, rank_z, initial_h, initial_z].map(|score| study.csv_score(score)).join(",");
            csv.push_str(&format!("{head},{width},{scores}\n"));
            ranks.push(format!(
                "{key} {} / {} (random init {} / {})",
                rank_text(rank_h),
                rank_text(rank_z),
                rank_text(initial_h),
                rank_text(initial_z)
            ));
            if head.kind == HeadKind::Linear {
                spectra.extend(linear_head_weights(&cell, &key)?);
            }
            row.extend(if by_dimension { vec![h] } else { vec![h, z] });
        }
        if by_dimension {
            row.resize(dims.len(), row[0]);
        }
        top1.push(row);
    }
    let rows = heads.iter().map(HeadChoice::to_string).collect();
    let (columns, chart) = if by_dimension {
        let chart = Chart {
            caption: "kNN top-1 (%) of h by projection head and output dimension of z",
            x_desc: "output dimension of z = g(h) (no head: one run, across its row)",
            y_desc: "projection head g",
        };
        (dims.iter().map(|dim| format!("z: {dim}")).collect(), chart)
    } else {
        let chart = Chart {
            caption: "kNN top-1 (%) of h and of z = g(h) by projection head",
            x_desc: "representation evaluated",
            y_desc: "projection head g",
        };
        (vec!["h".to_owned(), "z = g(h)".to_owned()], chart)
    };
    let corner = if by_dimension { "head \\ dimension" } else { "head \\ layer" };
    let mut grid = study.write_grid(corner, (rows, columns), top1, initial_top1, &csv, chart)?;
    grid.notes = format!("effective rank of the kNN bank's features, h / z: {}\n", ranks.join("; "));
    if !spectra.is_empty() {
        grid.notes.push_str(&spectrum_figure(&spectra, &study.output_dir.join(SPECTRUM_FILE))?);
    }
    Ok(grid)
}

/// What `ablate head` reads of a finished run besides the monitor's score
/// of h: the kNN top-1 of z = g(h), and the effective ranks of the kNN
/// bank's features at h and at z (appendix B.4). The run is opened once,
/// and z's bank features serve both the kNN and the rank.
fn head_measures(run: &Run) -> Result<[f64; 5]> {
    let run = FinishedRun::open(&run.dir)?;
    let (z_top1, z_bank) = run.knn_scored(Layer::Z)?;
    let (_store, initial) = run.initial()?;
    let initial_rank = |layer| Ok::<_, Error>(effective_rank(&run.bank_features_of(&initial, layer)?));
    Ok([
        z_top1,
        effective_rank(&run.bank_features(Layer::H)?),
        effective_rank(&z_bank),
        initial_rank(Layer::H)?,
        initial_rank(Layer::Z)?,
    ])
}

/// Where `ablate head` draws the spectra of its linear heads' W.
pub const SPECTRUM_FILE: &str = "linear-head-spectrum.png";

/// A linear head's W (z = Wh) of one run, trained and as initialised.
struct HeadWeights {
    /// The cell's key and the run's seed, for the legend.
    name: String,
    /// WᵀW's eigenvalues (W's squared singular values), trained and initial.
    squared: [Vec<f64>; 2],
    /// W's effective rank, trained and initial.
    rank: [f64; 2],
    /// How far training moved W: ‖W - W₀‖ / ‖W₀‖ (Frobenius norms).
    moved: f64,
}

/// Appendix B.4's Figure B.2 at `path`: the squared singular values of
/// each linear head's W, trained and as initialised; returns the note
/// saying where, with W's effective ranks.
fn spectrum_figure(heads: &[HeadWeights], path: &Path) -> Result<String> {
    let mut lines = Vec::new();
    for head in heads {
        for (state, (squared, baseline)) in
            ["trained", "random init"].iter().zip(head.squared.iter().zip([false, true]))
        {
            lines.push(Spectrum { name: format!("{}, {state}", head.name), values: squared.clone(), baseline });
        }
    }
    crate::report::spectra(
        "squared singular values of the linear head's W (z = Wh), trained and at random init",
        "squared singular value",
        &lines,
        path,
    )?;
    let ranks: Vec<String> = heads
        .iter()
        .map(|head| {
            let moved = 100.0 * head.moved;
            format!(
                "{} {:.1} (random init {:.1}; W moved {moved:.1}% of its norm)",
                head.name, head.rank[0], head.rank[1]
            )
        })
        .collect();
    Ok(format!("effective rank of W: {}; spectra: {}\n", ranks.join("; "), path.display()))
}

/// The variable of a linear head's W (z = Wh).
const LINEAR_HEAD_WEIGHT: &str = "projection_head.layers.0.weight";

/// The linear head's W of each run of the cell `key`.
fn linear_head_weights(cell: &Cell, key: &str) -> Result<Vec<HeadWeights>> {
    // One SVD of each W serves its spectrum and its effective rank.
    let spectrum = |w: &tch::Tensor| -> Result<(Vec<f64>, f64)> {
        let singular = singular_values(w);
        Ok((Vec::<f64>::try_from(&singular.square().to_device(tch::Device::Cpu))?, effective_rank_of(&singular)))
    };
    cell.runs
        .iter()
        .filter(|run| run.top1.is_some())
        .map(|run| {
            let missing = || {
                Error::InvalidArgument(format!("{}: the linear head has no {LINEAR_HEAD_WEIGHT}", run.dir.display()))
            };
            let finished = FinishedRun::open(&run.dir)?;
            let trained = finished.variable(LINEAR_HEAD_WEIGHT).ok_or_else(missing)?;
            let (store, _) = finished.initial()?;
            let initial = store.variables().remove(LINEAR_HEAD_WEIGHT).ok_or_else(missing)?;
            let [(trained_squared, trained_rank), (initial_squared, initial_rank)] =
                [spectrum(&trained)?, spectrum(&initial)?];
            Ok(HeadWeights {
                name: format!("{key}, seed {}", finished.config.train.seed),
                squared: [trained_squared, initial_squared],
                rank: [trained_rank, initial_rank],
                moved: ((&trained - &initial).norm().double_value(&[]) / initial.norm().double_value(&[])),
            })
        })
        .collect()
}

/// An effective rank as a note shows it.
fn rank_text(rank: Option<Score>) -> String {
    let one_place = |value: f64| format!("{value:.1}");
    score_text(rank, one_place, one_place)
}

/// The fields `ablate model` sets in each of its runs, each with the flag that
/// gives its values.
pub const MODEL_VARIED: &[(&str, &str)] =
    &[("model.arch", "--archs"), ("model.width_multiplier", "--widths"), ("train.supervised", "its two columns")];

/// `ablate model`, Figure 7: for each architecture and width, a SimCLR run
/// and the supervised baseline (`train.supervised`: the same encoder, the
/// same augmentation and schedule, cross-entropy on the labels), both
/// scored by the kNN monitor on h. The paper finds the gap between the two
/// closing as the model grows (its numbers are linear evaluation).
pub fn model_grid(base: &RunConfig, archs: &[Arch], widths: &[f64], study: &mut Study) -> Result<Grid> {
    if archs.is_empty() || widths.is_empty() {
        return Err(Error::InvalidArgument("ablate model needs at least one architecture and one width".to_owned()));
    }
    study.create_folder()?;
    let (mut rows, mut top1) = (Vec::new(), Vec::new());
    // Each model has a random-init score of its own: a column, not the caption.
    let scores = study.score_columns(&["knn_top1_simclr", "knn_top1_supervised"]);
    let mut csv = format!("arch,width,{scores},knn_top1_random_init\n");
    let total = 2 * archs.len() * widths.len();
    let mut done = 0;
    for &arch in archs {
        for &width in widths {
            let mut config = base.clone();
            (config.model.arch, config.model.width_multiplier) = (arch, width);
            let model = format!("{}-{width}x", arch.name());
            let (row, initial) = with_and_without_labels(study, config, &model, (&mut done, total))?;
            let initial = initial.map_or_else(String::new, |top1| format!("{top1:.4}"));
            let (simclr, supervised) = (study.csv_score(row[0]), study.csv_score(row[1]));
            csv.push_str(&format!("{},{width},{simclr},{supervised},{initial}\n", arch.name()));
            rows.push(format!("{} {width}x", arch.name()));
            top1.push(row.to_vec());
        }
    }
    let columns = vec!["SimCLR".to_owned(), "supervised".to_owned()];
    let chart = Chart {
        caption: "kNN top-1 (%) of h, SimCLR against supervised, by model",
        x_desc: "training",
        y_desc: "encoder",
    };
    study.write_grid("model \\ training", (rows, columns), top1, None, &csv, chart)
}

/// The fields `ablate color` sets in each of its runs, each with the flag that
/// gives its values. (It changes the colour jitter's strength and the blur
/// in the base's own ops, which stay the base's otherwise.)
pub const COLOR_VARIED: &[(&str, &str)] = &[("train.supervised", "its two rows")];

/// The ops of one view of an `ablate color` column: `ops` with every
/// colour jitter at `strength`, and without Gaussian blur unless `blur`,
/// where the base's blur stays, or, if it has none, the default one
/// (appendix A's) comes last.
fn color_view(ops: &[OpConfig], strength: f64, blur: bool) -> Vec<OpConfig> {
    let kept = ops.iter().filter(|op| blur || !matches!(op, OpConfig::GaussianBlur(_)));
    let mut view = at_strength(kept.cloned(), strength);
    if blur && !view.iter().any(|op| matches!(op, OpConfig::GaussianBlur(_))) {
        view.push(OpConfig::GaussianBlur(BlurConfig::default()));
    }
    view
}

/// `ops` with every colour jitter at `strength`.
fn at_strength(ops: impl IntoIterator<Item = OpConfig>, strength: f64) -> Vec<OpConfig> {
    ops.into_iter()
        .map(|op| match op {
            OpConfig::ColorJitter(jitter) => OpConfig::ColorJitter(ColorJitterConfig { strength, ..jitter }),
            other => other,
        })
        .collect()
}

/// Refuses, before anything runs, a strength the colour jitter refuses,
/// and a base augmentation (`views`) without a colour jitter to vary.
fn check_strengths(views: &[Vec<OpConfig>; 2], strengths: &[f64], study: &str) -> Result<()> {
    let mut problems = Vec::new();
    for &strength in strengths {
        ColorJitterConfig { strength, ..Default::default() }.check("--strengths", 0, &mut problems);
    }
    if !problems.is_empty() {
        return Err(Error::InvalidArgument(problems.join("; ")));
    }
    if !views.iter().flatten().any(|op| matches!(op, OpConfig::ColorJitter(_))) {
        return Err(Error::InvalidArgument(format!(
            "ablate {study} varies the colour jitter's strength, but the base run's augmentation has no color-jitter \
             op (augment.ops, augment.second_view or its preset)"
        )));
    }
    Ok(())
}

/// The ops of one view of an `ablate color` AutoAugment column: `ops` with
/// the colour distortion (colour jitter, random grayscale, Gaussian blur)
/// replaced by AutoAugment's `policy`, where the first colour jitter was.
fn auto_augment_view(ops: &[OpConfig], policy: AutoAugmentPolicy) -> Vec<OpConfig> {
    let mut view = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            OpConfig::ColorJitter(_) if !view.iter().any(|op| matches!(op, OpConfig::AutoAugment(_))) => {
                view.push(OpConfig::AutoAugment(AutoAugmentConfig { policy, ..Default::default() }));
            }
            OpConfig::ColorJitter(_) | OpConfig::Grayscale(_) | OpConfig::GaussianBlur(_) => {}
            other => view.push(other.clone()),
        }
    }
    view
}

/// A column of `ablate color`: a colour-distortion strength, with or
/// without blur, or AutoAugment with a policy.
#[derive(Clone, Copy)]
enum ColorColumn {
    Strength { strength: f64, blur: bool },
    AutoAugment(AutoAugmentPolicy),
}

impl ColorColumn {
    fn name(self) -> String {
        match self {
            ColorColumn::Strength { strength, blur: false } => strength.to_string(),
            ColorColumn::Strength { strength, blur: true } => format!("{strength} + blur"),
            // Short, as the chart's column is narrow.
            ColorColumn::AutoAugment(policy) => format!("AA {}", policy.name()),
        }
    }

    /// The prefix of its cells' folders.
    fn key(self) -> String {
        match self {
            ColorColumn::Strength { strength, blur } => format!("s{strength}{}", if blur { "+blur" } else { "" }),
            ColorColumn::AutoAugment(policy) => format!("autoaugment-{}", policy.name()),
        }
    }

    fn view(self, ops: &[OpConfig]) -> Vec<OpConfig> {
        match self {
            ColorColumn::Strength { strength, blur } => color_view(ops, strength, blur),
            ColorColumn::AutoAugment(policy) => auto_augment_view(ops, policy),
        }
    }

    /// Its fields of the CSV: strength, blur, AutoAugment policy.
    fn csv(self) -> String {
        match self {
            ColorColumn::Strength { strength, blur } => format!("{strength},{blur},"),
            ColorColumn::AutoAugment(policy) => format!(",false,{}", policy.name()),
        }
    }
}

/// `ablate color`, Table 1: a column per colour-distortion strength s (the
/// base's colour jitter at strength s, its random grayscale and other ops
/// kept, Gaussian blur taken out), then the last strength with blur (the
/// paper's "1 (+Blur)", its default policy), then one per AutoAugment
/// policy in `auto_augment` in place of the colour distortion (the paper's
/// "AutoAug", ImageNet's policy), each trained with SimCLR and supervised
/// (`train.supervised`, as `ablate model`), scored by the kNN monitor on h.
/// The paper finds stronger colour distortion helping SimCLR and not
/// supervised training, and AutoAugment, learned with labels, the other
/// way round: contrastive learning needs stronger augmentation.
pub fn color_grid(
    base: &RunConfig,
    strengths: &[f64],
    auto_augment: &[AutoAugmentPolicy],
    study: &mut Study,
) -> Result<Grid> {
    let Some(&last) = strengths.last() else {
        return Err(Error::InvalidArgument("ablate color needs at least one strength".to_owned()));
    };
    let views = base.augment.view_ops();
    check_strengths(&views, strengths, "color")?;
    study.create_folder()?;
    let columns: Vec<ColorColumn> = strengths
        .iter()
        .map(|&strength| ColorColumn::Strength { strength, blur: false })
        .chain([ColorColumn::Strength { strength: last, blur: true }])
        .chain(auto_augment.iter().map(|&policy| ColorColumn::AutoAugment(policy)))
        .collect();
    let names: Vec<String> = columns.iter().map(|column| column.name()).collect();
    let mut top1 = vec![vec![None; columns.len()]; 2];
    let mut initial_top1 = None;
    let mut csv =
        format!("strength,blur,auto_augment,{}\n", study.score_columns(&["knn_top1_simclr", "knn_top1_supervised"]));
    let (total, mut done) = (2 * columns.len(), 0);
    for (j, &column) in columns.iter().enumerate() {
        let mut config = base.clone();
        let [first, second] = views.clone().map(|ops| column.view(&ops));
        config.augment = AugmentConfig { ops: Some(first), second_view: Some(second), ..base.augment.clone() };
        let (scores, initial) = with_and_without_labels(study, config, &column.key(), (&mut done, total))?;
        initial_top1 = initial_top1.or(initial);
        (top1[0][j], top1[1][j]) = (scores[0], scores[1]);
        let scores = (study.csv_score(scores[0]), study.csv_score(scores[1]));
        csv.push_str(&format!("{},{},{}\n", column.csv(), scores.0, scores.1));
    }
    let rows = vec!["SimCLR".to_owned(), "supervised".to_owned()];
    let chart = Chart {
        caption: "kNN top-1 (%) of h by colour distortion, SimCLR against supervised",
        x_desc: "colour distortion strength, or AutoAugment (AA) and its policy",
        y_desc: "training",
    };
    study.write_grid("training \\ strength", (rows, names), top1, initial_top1, &csv, chart)
}

/// The fields `ablate transform` sets in each of its runs: none (it adds
/// an op to the base's own).
pub const TRANSFORM_VARIED: &[(&str, &str)] = &[];

/// The ops of one view of an `ablate transform` row: `ops`, with
/// `transformation`'s op (its defaults) last unless `ops` have one.
fn transform_view(ops: &[OpConfig], transformation: Transformation) -> Vec<OpConfig> {
    let op = transformation.op();
    let mut view = ops.to_vec();
    if !ops.iter().any(|existing| existing.name() == op.name()) {
        view.push(op);
    }
    view
}

/// How well an MLP predicts `transformation` from the random-init
/// encoder's h (of the run's configuration and seed: what the features
/// show before any training), from h and from z of the run in `run_dir`
/// (its latest checkpoint), each trained on the kNN monitor's bank and
/// scored on its queries, each image transformed as drawn from the run's
/// seed ([`Probe`]). The run is opened once for the three.
///
/// The scores are kept in the run's folder ([`PROBES_FILE`]) and read
/// back while what they depend on is unchanged (a study read back again
/// would otherwise train every probe again: minutes a cell on a CPU).
fn transform_accuracies_at(run_dir: &Path, transformation: Transformation) -> Result<[f64; 3]> {
    let run = FinishedRun::open(run_dir)?;
    let key = probes_key(run_dir, transformation, run.device)?;
    let kept_path = run_dir.join(PROBES_FILE);
    let mut kept: HashMap<String, [f64; 3]> = match std::fs::read_to_string(&kept_path) {
        // Unreadable kept scores are computed again, and the file rewritten.
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => HashMap::new(),
    };
    if let Some(&scores) = kept.get(&key) {
        return Ok(scores);
    }
    let seed = run.config.train.seed;
    let probe = Probe::new(transformation, run.config.image_format(), run.device, seed);
    let (bank, queries) = &run.splits;
    let accuracy =
        |model, layer| probe.accuracy(FeatureNet::at(model, layer)?, &bank.samples, &queries.samples, &run.pool);
    let spec = run.config.encoder_spec();
    let initial = crate::embed::load_network(&EncoderSource::RandomInit(seed), &spec, Layer::H, run.device)?;
    let scores =
        [accuracy(&initial.model, Layer::H)?, accuracy(&run.model, Layer::H)?, accuracy(&run.model, Layer::Z)?];
    // One entry per transformation: scores of an older key are stale.
    let prefix = format!("{} ", transformation.name());
    kept.retain(|other, _| !other.starts_with(&prefix));
    kept.insert(key, scores);
    let json = serde_json::to_string_pretty(&kept).expect("scores are plain numbers");
    crate::io::write_atomic(&kept_path, json.as_bytes())?;
    Ok(scores)
}

/// Where a run of `ablate transform` keeps its probes' scores.
const PROBES_FILE: &str = "transform-probes.json";

/// What the probes' scores of the run in `run_dir` depend on beyond the
/// transformation: the program that computes them (its executable's bytes,
/// which change with any change to the probes' code), the checkpoint's
/// bytes and the device.
fn probes_key(run_dir: &Path, transformation: Transformation, device: tch::Device) -> Result<String> {
    let fingerprint = |path: &Path| -> std::io::Result<String> {
        let bytes = std::fs::read(path)?;
        Ok(format!("{:08x}-{}", crc32fast::hash(&bytes), bytes.len()))
    };
    // On Linux the running program's own file, even where a build has
    // since replaced the one at its path; read once a process (a dev build
    // is 140 MB). A failure is kept as what builds the error again, so
    // that it stays an I/O error naming the file.
    type Failure = (PathBuf, std::io::ErrorKind, String);
    static PROGRAM: std::sync::OnceLock<std::result::Result<String, Failure>> = std::sync::OnceLock::new();
    let program = PROGRAM.get_or_init(|| {
        let executable = match Path::new("/proc/self/exe") {
            linux if linux.exists() => linux.to_path_buf(),
            _ => std::env::current_exe()
                .map_err(|e| (PathBuf::from("the running executable"), e.kind(), e.to_string()))?,
        };
        fingerprint(&executable).map_err(|e| (executable, e.kind(), e.to_string()))
    });
    let program =
        program.clone().map_err(|(path, kind, message)| Error::io(path, std::io::Error::new(kind, message)))?;
    let checkpoint = run_dir.join(checkpoint::FILE_NAME);
    Ok(format!(
        "{} program {program} checkpoint {} device {device:?}",
        transformation.name(),
        fingerprint(&checkpoint).map_err(|e| Error::io(&checkpoint, e))?
    ))
}

/// `ablate transform`, section 4.2 and Table 3: for each transformation a
/// run with the base's augmentation and, "additionally and independently",
/// the transformation's op where the base lacks it (grayscale is in the
/// paper's colour distortion), then an MLP trained on h and one on z = g(h)
/// to predict whether (or, for rotation, how) an image was transformed
/// ([`crate::eval::transform`]). Rows: the transformations; columns: a
/// random guess, the random-init encoder's h (of each run's configuration
/// and seed: what the features show before training), h, z (the run's kNN
/// top-1 on h in the CSV too). The paper
/// finds h keeping what the augmentations change and z losing much of it,
/// its explanation of why h is the better representation.
pub fn transform_grid(base: &RunConfig, transformations: &[Transformation], study: &mut Study) -> Result<Grid> {
    if transformations.is_empty() {
        return Err(Error::InvalidArgument("ablate transform needs at least one transformation".to_owned()));
    }
    study.create_folder()?;
    let views = base.augment.view_ops();
    let scores = ["probe_h_random_init", "probe_h", "probe_z", "knn_top1_h"];
    let mut csv = format!("transformation,classes,random_guess,{}\n", study.score_columns(&scores));
    let mut top1 = Vec::new();
    for (done, &transformation) in transformations.iter().enumerate() {
        let mut config = base.clone();
        let [first, second] = views.clone().map(|ops| transform_view(&ops, transformation));
        config.augment = AugmentConfig { ops: Some(first), second_view: Some(second), ..base.augment.clone() };
        let key = format!("transform-{}", transformation.name());
        let cell = study.cell(config, &key, &format!("{key} ({} of {})", done + 1, transformations.len()))?;
        let [initial, h, z] = cell.scores_with(|run| transform_accuracies_at(&run.dir, transformation))?;
        let guess = Some(Score { mean: transformation.guess(), deviation: None });
        csv.push_str(&format!(
            "{},{},{:.4},{},{},{},{}\n",
            transformation.name(),
            transformation.classes(),
            transformation.guess(),
            study.csv_score(initial),
            study.csv_score(h),
            study.csv_score(z),
            study.csv_score(cell.score()),
        ));
        top1.push(vec![guess, initial, h, z]);
    }
    let rows = transformations.iter().map(|transformation| transformation.task().to_owned()).collect();
    let columns = ["random guess", "random init: h", "h", "z = g(h)"].map(String::from).to_vec();
    let chart = Chart {
        caption: "accuracy (%) of an MLP predicting the transformation, by representation",
        x_desc: "representation the MLP is trained on",
        y_desc: "what it predicts",
    };
    study.write_grid("prediction \\ layer", (rows, columns), top1, None, &csv, chart)
}

/// The fields `ablate bn` sets in each of its runs, each with the flag that
/// gives its values (a captured CUDA graph does not compute chunks, so no
/// cell replays one).
pub const BN_VARIED: &[(&str, &str)] = &[("train.micro_batch_size", "--devices"), ("train.cuda_graph", "--devices")];

/// `ablate bn`, section 2.2's global BN: the base trained with BatchNorm
/// over the whole batch of N images (global BN: what W devices compute
/// with `train.sync_batch_norm`, as one device does), and, for each number
/// of devices W in `devices`, with BatchNorm over each device's N/W images
/// (per-device BN). One process trains the W devices as chunks of N/W
/// images (`train.micro_batch_size`: the chunk is BatchNorm's unit, and
/// every anchor still meets the projections of all N images, as the
/// gathered negatives of W devices do); `tests/distributed.rs` shows it
/// the computation of W processes. Rows: W; columns: global and per-device
/// BN, scored by kNN top-1; the last epoch's training loss below the table
/// and in the CSV. The paper argues that with per-device BN the model can
/// lower the loss through the statistics a device's positives share (they
/// are always on one device) without improving the representation.
pub fn bn_grid(base: &RunConfig, devices: &[usize], study: &mut Study) -> Result<Grid> {
    if devices.is_empty() {
        return Err(Error::InvalidArgument("ablate bn needs at least one number of devices".to_owned()));
    }
    let batch = base.train.batch_size;
    if let Some(&w) = devices.iter().find(|&&w| w == 0 || !batch.is_multiple_of(w)) {
        return Err(Error::InvalidArgument(format!(
            "--devices {w}: the batch of {batch} images does not split into {w} devices of equal size"
        )));
    }
    if let Some(w) = devices.iter().enumerate().find_map(|(i, w)| devices[..i].contains(w).then_some(w)) {
        return Err(Error::InvalidArgument(format!("--devices {devices:?}: {w} is given twice")));
    }
    study.create_folder()?;
    let total = 1 + devices.iter().filter(|&&w| w > 1).count();
    let cell = |study: &mut Study, w: usize, done: usize| {
        let mut config = base.clone();
        config.train.cuda_graph = false;
        config.train.micro_batch_size = (w > 1).then_some(batch / w);
        let key = if w > 1 { format!("per-device-{w}") } else { "global".to_owned() };
        let cell = study.cell(config, &key, &format!("{key} ({done} of {total})"))?;
        let loss = cell.score_with(|run| {
            run.final_loss.ok_or_else(|| Error::InvalidArgument(format!("{}: no final_loss", run.dir.display())))
        })?;
        Ok::<_, Error>((cell.score(), loss, cell.initial_top1()))
    };
    let (global, global_loss, initial_top1) = cell(study, 1, 1)?;
    let scores = study.score_columns(&["knn_top1", "final_loss"]);
    let mut csv = format!("devices,images_per_device,batch_norm,{scores}\n");
    let line = |study: &Study, w: usize, norm: &str, top1, loss| {
        format!("{w},{},{norm},{},{}\n", batch / w, study.csv_score(top1), study.csv_score(loss))
    };
    csv.push_str(&line(study, 1, "global", global, global_loss));
    let (mut top1, mut losses) = (Vec::new(), Vec::new());
    let mut done = 1;
    for &w in devices {
        let (top1_w, loss_w) = match w {
            1 => (global, global_loss),
            _ => {
                done += 1;
                let (top1_w, loss_w, _) = cell(study, w, done)?;
                csv.push_str(&line(study, w, "per-device", top1_w, loss_w));
                (top1_w, loss_w)
            }
        };
        top1.push(vec![global, top1_w]);
        losses.push(format!("{w}: {}", loss_text(loss_w)));
    }
    let rows = devices.iter().map(|&w| format!("{w} x {} images", batch / w)).collect();
    let columns = vec!["global BN".to_owned(), "per-device BN".to_owned()];
    let chart = Chart {
        caption: "kNN top-1 (%) with BatchNorm over the batch or over each device's images",
        x_desc: "BatchNorm's statistics",
        y_desc: "devices x images per device",
    };
    let mut grid = study.write_grid("devices \\ BN", (rows, columns), top1, initial_top1, &csv, chart)?;
    grid.notes = format!(
        "training loss of the last epoch: global BN {}; per-device BN by devices {}\n",
        loss_text(global_loss),
        losses.join(", ")
    );
    Ok(grid)
}

/// A loss as a note shows it.
fn loss_text(loss: Option<Score>) -> String {
    let four_places = |value: f64| format!("{value:.4}");
    score_text(loss, four_places, four_places)
}

/// The cells `{prefix}-simclr` and `{prefix}-supervised`: `config` trained
/// with SimCLR and as the supervised baseline (`train.supervised`: the same
/// encoder, augmentation and schedule, cross-entropy on the labels). Their
/// scores, and the random-init score of the first that measured it;
/// `done` of `total` counts the cells for the log.
fn with_and_without_labels(
    study: &mut Study,
    config: RunConfig,
    prefix: &str,
    (done, total): (&mut usize, usize),
) -> Result<([Option<Score>; 2], Option<f64>)> {
    let (mut scores, mut initial) = ([None; 2], None);
    for (score, (method, config)) in
        scores.iter_mut().zip([("simclr", config.clone()), ("supervised", supervised(config)?)])
    {
        *done += 1;
        let key = format!("{prefix}-{method}");
        let cell = study.cell(config, &key, &format!("{key} ({done} of {total})"))?;
        initial = initial.or(cell.initial_top1());
        *score = cell.score();
    }
    Ok((scores, initial))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{AugmentPreset, CropConfig, CutoutConfig};

    #[test]
    fn a_colour_column_sets_every_jitter_and_takes_blur_out_or_keeps_it() {
        let imagenet = AugmentPreset::SimclrImagenet.ops();
        let names = |ops: &[OpConfig]| ops.iter().map(OpConfig::name).collect::<Vec<_>>();
        let weak = color_view(&imagenet, 0.125, false);
        assert_eq!(names(&weak), ["random-resized-crop", "horizontal-flip", "color-jitter", "grayscale"]);
        assert_eq!(weak[2], OpConfig::ColorJitter(ColorJitterConfig { strength: 0.125, probability: 0.8 }));
        // The base's own blur stays where it was...
        assert_eq!(color_view(&imagenet, 1.0, true), imagenet);
        // ...and a base without one gets the default, last.
        let cifar = AugmentPreset::SimclrCifar.ops();
        let blurred = color_view(&cifar, 1.0, true);
        assert_eq!(blurred.last(), Some(&OpConfig::GaussianBlur(BlurConfig::default())));
        assert_eq!(blurred.len(), cifar.len() + 1);
    }

    #[test]
    fn an_auto_augment_column_replaces_the_colour_distortion_where_it_was() {
        let names = |ops: &[OpConfig]| ops.iter().map(OpConfig::name).collect::<Vec<_>>();
        let mut imagenet = AugmentPreset::SimclrImagenet.ops();
        imagenet.push(OpConfig::Cutout(CutoutConfig::default()));
        let view = auto_augment_view(&imagenet, AutoAugmentPolicy::Cifar10);
        assert_eq!(names(&view), ["random-resized-crop", "horizontal-flip", "auto-augment", "cutout"]);
        let policy = AutoAugmentConfig { policy: AutoAugmentPolicy::Cifar10, ..Default::default() };
        assert_eq!(view[2], OpConfig::AutoAugment(policy));
        // Two jitters give one AutoAugment.
        let twice = [imagenet.clone(), imagenet].concat();
        let view = auto_augment_view(&twice, AutoAugmentPolicy::Imagenet);
        assert_eq!(view.iter().filter(|op| matches!(op, OpConfig::AutoAugment(_))).count(), 1);
        let keys: Vec<String> = [
            ColorColumn::Strength { strength: 0.5, blur: false },
            ColorColumn::Strength { strength: 1.0, blur: true },
            ColorColumn::AutoAugment(AutoAugmentPolicy::Imagenet),
        ]
        .iter()
        .map(|column| column.key())
        .collect();
        assert_eq!(keys, ["s0.5", "s1+blur", "autoaugment-imagenet"]);
    }

    #[test]
    fn a_transform_row_adds_its_op_last_unless_the_view_has_one() {
        let names = |ops: &[OpConfig]| ops.iter().map(OpConfig::name).collect::<Vec<_>>();
        let cifar = AugmentPreset::SimclrCifar.ops();
        // The colour distortion's grayscale is the paper's own.
        assert_eq!(transform_view(&cifar, Transformation::Grayscale), cifar);
        let rotated = transform_view(&cifar, Transformation::Rotation);
        assert_eq!(
            names(&rotated),
            ["random-resized-crop", "horizontal-flip", "color-jitter", "grayscale", "rotation"]
        );
        assert_eq!(rotated.last(), Some(&Transformation::Rotation.op()));
        let noisy = transform_view(&rotated, Transformation::Noise);
        assert_eq!(noisy.len(), rotated.len() + 1);
        assert_eq!(transform_view(&noisy, Transformation::Rotation), noisy);
        assert_eq!(names(&transform_view(&[], Transformation::Sobel)), ["sobel"]);
    }

    #[test]
    fn pairs_apply_both_ops_always_and_crop_first() {
        let crop = OpConfig::RandomResizedCrop(CropConfig::default());
        let cutout = OpConfig::Cutout(CutoutConfig::default());
        let ops = view_ops(&cutout, Some(&crop));
        assert_eq!(ops.iter().map(OpConfig::name).collect::<Vec<_>>(), ["random-resized-crop", "cutout"]);
        assert_eq!(ops[1], OpConfig::Cutout(CutoutConfig { probability: 1.0, ..Default::default() }));
        assert_eq!(view_ops(&cutout, None).len(), 1);
    }

    #[test]
    fn a_cell_scores_the_mean_of_its_runs_and_diverges_with_any() {
        let run = |top1| Run { dir: PathBuf::new(), top1, initial_top1: None, final_loss: None };
        let cell = Cell { runs: vec![run(Some(0.40)), run(Some(0.44)), run(Some(0.42))] };
        let score = cell.score().expect("every run finished");
        // The sample standard deviation of 0.40, 0.42 and 0.44.
        assert!((score.mean - 0.42).abs() < 1e-12 && (score.deviation.unwrap() - 0.02).abs() < 1e-12, "{score:?}");
        assert_eq!(percent(Some(score)), "42.00% ± 2.00");
        let single = Cell { runs: vec![run(Some(0.4))] }.score();
        assert_eq!(single, Some(Score { mean: 0.4, deviation: None }));
        assert_eq!(percent(single), "40.00%");
        let unstable = Cell { runs: vec![run(Some(0.4)), run(None)] };
        assert_eq!(unstable.score(), None);
        assert_eq!(unstable.score_with(|_| panic!("a diverged cell has no other score")).unwrap(), None);
        assert_eq!(percent(None), DIVERGED);
    }

    #[test]
    fn a_finished_cell_written_before_a_field_existed_is_read_back_and_a_changed_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::default();
        config.train.output_dir = dir.path().to_path_buf();
        let summary = r#"{"final_knn_top1": 0.4, "final_loss": 3.5}"#;
        std::fs::write(dir.path().join(SUMMARY_FILE), summary).unwrap();
        // The config as a binary before `loss.negatives` wrote it.
        let written = config.to_toml();
        let before = written.replace("negatives = \"all\"\n", "");
        assert_ne!(before, written, "the field is in the config");
        std::fs::write(dir.path().join(CONFIG_FILE), &before).unwrap();
        let run = run_cell(config.clone(), dir.path(), "cell", &mut ()).unwrap();
        assert_eq!((run.top1, run.final_loss), (Some(0.4), Some(3.5)));
        // Negative control: a value that differs is another configuration.
        let mut other = config.clone();
        other.loss.negatives = crate::loss::Negatives::SemiHard;
        other.loss.objective = Objective::NtLogistic;
        std::fs::write(dir.path().join(CONFIG_FILE), other.to_toml()).unwrap();
        let error = run_cell(config, dir.path(), "cell", &mut ()).expect_err("another configuration");
        assert!(error.to_string().contains("another configuration"), "{error}");
    }

    #[test]
    fn a_seed_given_twice_is_refused_by_value() {
        let error = Study::new(PathBuf::from("study"), vec![3, 5, 3], &mut ()).err().expect("3 is given twice");
        assert!(error.to_string().contains("seed 3 is given twice"), "{error}");
        assert!(Study::new(PathBuf::from("study"), vec![3, 5], &mut ()).is_ok());
    }
}
