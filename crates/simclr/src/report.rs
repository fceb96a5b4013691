//! `simclr report`: PNG figures of a run, written into its folder.
//!
//! - `curves.png`: loss, learning rate and kNN top-1 over epochs, from
//!   `metrics.jsonl`;
//! - `embedding.png`: the test split's h projected on its first two principal
//!   components, coloured by class;
//! - `tsne.png`: the same points embedded by t-SNE (at most [`TSNE_POINTS`]);
//! - `confusion.png`: the kNN classifier's confusion matrix on the test split.
//!
//! The labelled splits are the run's kNN monitor splits (for the synthetic
//! data, regenerated from the run's seed).
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use tch::{nn, Device, Kind, Tensor};

use crate::config::RunConfig;
use crate::data::loader::worker_pool;
use crate::data::open_splits;
use crate::eval::features::{Frozen, FEATURE_BATCH};
use crate::eval::knn::knn_predict;
use crate::eval::KnnConfig;
use crate::model::ResNet;
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::metrics::{EpochMetrics, MetricsLog};
use crate::{Error, Result};

const WIDTH: u32 = 1200;

/// A white PNG canvas at `path`, with the built-in font registered as the
/// "sans-serif" every figure uses.
fn canvas(path: &Path, size: (u32, u32)) -> Result<DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>> {
    if !crate::io::caption::register_font() {
        return Err(drawing_error(path, "the built-in font could not be read"));
    }
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| drawing_error(path, e))?;
    Ok(root)
}

fn drawing_error(path: &Path, error: impl std::fmt::Display) -> Error {
    Error::Image { path: path.to_path_buf(), message: format!("cannot draw: {error}") }
}

/// Loss, learning rate and kNN top-1 against epoch, side by side; the kNN
/// monitor's score before training (at random init, or with the encoder the
/// run started from), where there is one, at epoch 0.
pub fn training_curves(metrics: &[EpochMetrics], initial_knn_top1: Option<f64>, path: &Path) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| drawing_error(path, e);
    let root = canvas(path, (WIDTH, 400))?;
    let panels = root.split_evenly((1, 3));
    let last_epoch = metrics.iter().map(|m| m.epoch).max().unwrap_or(1) as f64;
    let series: [(&str, Vec<(f64, f64)>); 3] = [
        ("training loss", metrics.iter().map(|m| (m.epoch as f64, m.loss)).collect()),
        ("learning rate (last step of epoch)", metrics.iter().map(|m| (m.epoch as f64, m.learning_rate)).collect()),
        (
            if initial_knn_top1.is_some() { "kNN top-1 (%; epoch 0: before training)" } else { "kNN top-1 (%)" },
            initial_knn_top1
                .map(|a| (0, a))
                .into_iter()
                .chain(metrics.iter().filter_map(|m| m.knn_top1.map(|a| (m.epoch, a))))
                .map(|(epoch, a)| (epoch as f64, 100.0 * a))
                .collect(),
        ),
    ];
    for (panel, (title, points)) in panels.iter().zip(series) {
        let low = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let high = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (low, high) = if points.is_empty() { (0.0, 1.0) } else { (low, high) };
        // One point, or a flat series, still gets a readable axis around it.
        let margin = if high - low > 1e-9 { (high - low) * 0.1 } else { high.abs().max(1.0) * 0.05 };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..last_epoch.max(1.0), (low - margin)..(high + margin))
            .map_err(|e| fail(&e))?;
        chart.configure_mesh().x_desc("epoch").draw().map_err(|e| fail(&e))?;
        chart.draw_series(LineSeries::new(points.clone(), &BLUE)).map_err(|e| fail(&e))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled()))).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

/// `features` projected on their first two principal components, `[M, 2]`.
pub fn principal_components(features: &Tensor) -> Tensor {
    let x = features.to_kind(Kind::Double);
    let centred = &x - x.mean_dim([0i64].as_slice(), true, Kind::Double);
    // torch.svd's V (not Vᴴ): its first columns are the principal axes.
    let (_, _, v) = centred.svd(true, true);
    centred.matmul(&v.narrow(1, 0, 2))
}

/// Points the t-SNE figure shows at most: Barnes–Hut t-SNE costs
/// O(N log N) per iteration, about 10 s for 2,000 points on 2 cores.
pub const TSNE_POINTS: usize = 2000;

/// `features` (`[M, D]`, M >= 4) embedded in 2-D by Barnes–Hut t-SNE (van der
/// Maaten 2014, the `bhtsne` crate), `[M, 2]`.
///
/// Rows are L2-normalised first, so Euclidean distance orders pairs as cosine
/// similarity does, the geometry NT-Xent trains. Perplexity 30 (less for
/// small M), θ = 0.5, 1,000 iterations. The start is the PCA projection
/// scaled to a deviation of 1e-4, as openTSNE does: global structure is kept
/// better than from a random start, and the result does not depend on a
/// random generator.
pub fn tsne(features: &Tensor) -> Result<Tensor> {
    let rows = features.size()[0];
    if rows < 4 {
        return Err(Error::InvalidArgument(format!("t-SNE needs at least 4 points, got {rows}")));
    }
    let x = features.to_kind(Kind::Float).to_device(Device::Cpu);
    let x = &x / x.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    let start = principal_components(&x);
    let start = (&start / start.select(1, 0).std(true).clamp_min(1e-12) * 1e-4).to_kind(Kind::Float);
    let start = Vec::<f32>::try_from(&start.reshape([-1]))?;
    let dim = x.size()[1] as usize;
    let flat = Vec::<f32>::try_from(&x.reshape([-1]))?;
    let points: Vec<&[f32]> = flat.chunks(dim).collect();
    // bhtsne requires 3 × perplexity < M.
    let perplexity = 30f32.min((rows - 2) as f32 / 3.0);
    let distance = |a: &&[f32], b: &&[f32]| a.iter().zip(*b).map(|(p, q)| (p - q) * (p - q)).sum::<f32>().sqrt();
    let embedding = bhtsne::tSNE::<f32, &[f32], 2>::new(&points)
        .perplexity(perplexity)
        .epochs(1000)
        .initial_embedding(start)
        .barnes_hut(0.5, distance)
        .embedding();
    Ok(Tensor::from_slice(&embedding).reshape([rows, 2]))
}

/// How 2-D points of a scatter plot were made, for its title and axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Pca,
    Tsne,
}

impl Projection {
    fn caption(self) -> &'static str {
        match self {
            Projection::Pca => "test-split representations h: first two principal components",
            Projection::Tsne => "test-split representations h: t-SNE (cosine, perplexity 30)",
        }
    }

    fn axes(self) -> [&'static str; 2] {
        match self {
            Projection::Pca => ["PC 1", "PC 2"],
            Projection::Tsne => ["t-SNE 1", "t-SNE 2"],
        }
    }
}

/// A scatter plot of 2-D points coloured by class, with a legend.
pub fn embedding_scatter(
    points: &Tensor,
    projection: Projection,
    classes: &[usize],
    names: &[String],
    path: &Path,
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| drawing_error(path, e);
    let xy = Vec::<Vec<f64>>::try_from(&points.to_kind(Kind::Double).to_device(Device::Cpu))?;
    let range = |axis: usize| {
        let values = xy.iter().map(|p| p[axis]);
        let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
        let margin = ((high - low) * 0.05).max(1e-6);
        (low - margin)..(high + margin)
    };
    let root = canvas(path, (900, 800))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(projection.caption(), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(range(0), range(1))
        .map_err(|e| fail(&e))?;
    let [x_desc, y_desc] = projection.axes();
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| fail(&e))?;
    for (class, name) in names.iter().enumerate() {
        let color = Palette99::pick(class).to_rgba();
        let members = xy.iter().zip(classes).filter(|(_, &c)| c == class).map(|(p, _)| (p[0], p[1]));
        chart
            .draw_series(members.map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| fail(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| Circle::new((x, y), 4, color.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::MiddleRight, path)?;
    root.present().map_err(|e| fail(&e))
}

/// A chart's legend at `position`, on a light background, framed.
fn draw_legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| drawing_error(path, e))
}

/// Row-normalised confusion matrix: rows are true classes, columns predictions.
pub fn confusion_matrix(predicted: &[usize], actual: &[usize], names: &[String], path: &Path) -> Result<()> {
    let n = names.len().max(1);
    let mut counts = vec![vec![0usize; n]; n];
    for (&p, &a) in predicted.iter().zip(actual) {
        counts[a][p] += 1;
    }
    let shares: Vec<Vec<Option<f64>>> = counts
        .iter()
        .map(|row| {
            let total = row.iter().sum::<usize>().max(1) as f64;
            row.iter().map(|&count| Some(count as f64 / total)).collect()
        })
        .collect();
    let heatmap = Heatmap {
        caption: "kNN confusion matrix on the test split (row-normalised)",
        rows: names,
        columns: names,
        x_desc: "predicted",
        y_desc: "true",
        annotate: false,
        floor: None,
        missing: "",
    };
    heatmap.draw(&shares, path)
}

/// One line of [`spectra`].
pub struct Spectrum {
    pub name: String,
    pub values: Vec<f64>,
    /// Drawn grey: a baseline the coloured lines are read against.
    pub baseline: bool,
}

/// Spectra as lines on a log scale: each line its values in descending
/// order against their rank (appendix B.4's Figure B.2 draws a linear
/// head's this way), the baselines grey, the others in a colour each.
pub fn spectra(caption: &str, y_desc: &str, lines: &[Spectrum], path: &Path) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| drawing_error(path, e);
    let positive = || lines.iter().flat_map(|line| line.values.iter().copied()).filter(|v| *v > 0.0);
    let (low, high) = (positive().fold(f64::INFINITY, f64::min), positive().fold(0.0, f64::max));
    let (low, high) = if high > 0.0 { (low / 2.0, high * 2.0) } else { (1e-6, 1.0) };
    let count = lines.iter().map(|line| line.values.len()).max().unwrap_or(1);
    let root = canvas(path, (900, 600))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", caption_size(caption, 870)))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..count as f64, (low..high).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("rank, largest first")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()
        .map_err(|e| fail(&e))?;
    let mut colours = 0;
    for line in lines {
        let colour = match line.baseline {
            true => RGBColor(170, 170, 170).to_rgba(),
            false => {
                colours += 1;
                Palette99::pick(colours - 1).to_rgba()
            }
        };
        let mut sorted: Vec<f64> = line.values.iter().copied().filter(|v| *v > 0.0).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let points = sorted.into_iter().enumerate().map(|(rank, value)| (rank as f64 + 0.5, value));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(line.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight, path)?;
    root.present().map_err(|e| fail(&e))
}

/// Figure 6's picture: panels side by side, each titled, holding one line
/// per histogram (`values` over `x_desc`'s bins), the lines of image `i`
/// in colour `i`, named `images[i]` in the legend.
pub struct HistogramPanels<'a> {
    pub images: &'a [String],
    pub x_desc: &'a str,
    pub y_desc: &'a str,
}

impl HistogramPanels<'_> {
    /// `panels[p]` is `(title, lines)`, `lines[i]` the histograms of image `i`.
    pub fn draw(&self, panels: &[(String, Vec<Vec<Vec<f32>>>)], path: &Path) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| drawing_error(path, e);
        let root = canvas(path, (WIDTH, 450))?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        let all = || panels.iter().flat_map(|(_, lines)| lines.iter().flatten().flatten().copied());
        let bins = panels.iter().flat_map(|(_, lines)| lines.iter().flatten()).map(Vec::len).max().unwrap_or(1);
        let high = f64::from(all().fold(0.0f32, f32::max)).max(1e-6) * 1.05;
        for (area, (title, lines)) in areas.iter().zip(panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", caption_size(title, WIDTH / panels.len().max(1) as u32)))
                .margin(12)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(0.0..bins as f64, 0.0..high)
                .map_err(|e| fail(&e))?;
            chart.configure_mesh().x_desc(self.x_desc).y_desc(self.y_desc).draw().map_err(|e| fail(&e))?;
            for (image, histograms) in lines.iter().enumerate() {
                let colour = Palette99::pick(image).to_rgba();
                for (crop, histogram) in histograms.iter().enumerate() {
                    let points = histogram.iter().enumerate().map(|(bin, &v)| (bin as f64 + 0.5, f64::from(v)));
                    let series =
                        chart.draw_series(LineSeries::new(points, colour.stroke_width(2))).map_err(|e| fail(&e))?;
                    if crop == 0 {
                        let name = self.images.get(image).cloned().unwrap_or_default();
                        series.label(name).legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
                    }
                }
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight, path)?;
        }
        root.present().map_err(|e| fail(&e))
    }
}

/// The font size (at most 22) that fits `caption` in `width` pixels, at
/// about 0.55 of the size per character.
fn caption_size(caption: &str, width: u32) -> u32 {
    let fitting = f64::from(width) / (0.55 * caption.chars().count().max(1) as f64);
    (fitting as u32).clamp(12, 22)
}

/// The colour of a heatmap's cell without a value.
const MISSING_GREY: RGBColor = RGBColor(200, 200, 200);

/// A grid of shaded cells, darker for larger values; `None` cells are grey
/// (marked [`Heatmap::missing`] when annotated).
pub struct Heatmap<'a> {
    pub caption: &'a str,
    pub rows: &'a [String],
    pub columns: &'a [String],
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// Write each value (as a percentage) in its cell.
    pub annotate: bool,
    /// A baseline (a study's random-init score): cells at or above it are
    /// blue, darker the higher; cells below it red, darker the lower.
    pub floor: Option<f64>,
    /// What a `None` cell means, written in it when annotated ("diverged").
    pub missing: &'a str,
}

impl Heatmap<'_> {
    /// `values[row][column]`, shaded from the smallest value to the largest.
    pub fn draw(&self, values: &[Vec<Option<f64>>], path: &Path) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| drawing_error(path, e);
        let (rows, columns) = (self.rows.len().max(1), self.columns.len().max(1));
        let known = || values.iter().flatten().flatten().copied();
        let (low, high) = (known().fold(f64::INFINITY, f64::min), known().fold(f64::NEG_INFINITY, f64::max));
        let root = canvas(path, (900, 850))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.caption, ("sans-serif", caption_size(self.caption, 870)))
            .margin(15)
            .x_label_area_size(60)
            .y_label_area_size(170)
            // A segmented 0..k has k + 1 cells.
            .build_cartesian_2d((0..columns - 1).into_segmented(), (0..rows - 1).into_segmented())
            .map_err(|e| fail(&e))?;
        // Segmented axes put each label at the centre of its cell. Row 0 is
        // drawn at the top, as matrices are read, so rows count down the axis.
        let top = rows - 1;
        let label = |names: &[String], v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let row_label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) if *i <= top => label(self.rows, &SegmentValue::CenterOf(top - i)),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(columns)
            .y_labels(rows)
            .x_label_formatter(&|v| label(self.columns, v))
            .y_label_formatter(&row_label)
            .label_style(("sans-serif", 15))
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .draw()
            .map_err(|e| fail(&e))?;
        let (mut cells, mut missing) = (Vec::new(), Vec::new());
        for (row, line) in values.iter().enumerate() {
            for (column, value) in line.iter().enumerate() {
                match value {
                    Some(value) => cells.push((row, column, *value)),
                    None => missing.push((row, column)),
                }
            }
        }
        let corner = |x: usize, y: usize| (SegmentValue::Exact(x), SegmentValue::Exact(y));
        let rectangle = |row: usize, column: usize, colour: RGBColor| {
            let y = top - row;
            Rectangle::new([corner(column, y), corner(column + 1, y + 1)], colour.filled())
        };
        let centre = |row: usize, column: usize| (SegmentValue::CenterOf(column), SegmentValue::CenterOf(top - row));
        chart
            .draw_series(
                cells.iter().map(|&(row, column, value)| rectangle(row, column, self.colour(value, low, high))),
            )
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(missing.iter().map(|&(row, column)| rectangle(row, column, MISSING_GREY)))
            .map_err(|e| fail(&e))?;
        if self.annotate {
            chart
                .draw_series(cells.iter().map(|&(row, column, value)| {
                    let RGBColor(red, green, _) = self.colour(value, low, high);
                    let colour = if u16::from(red) + u16::from(green) < 200 { WHITE } else { BLACK };
                    let font = ("sans-serif", 20).into_font().color(&colour);
                    Text::new(format!("{:.1}", 100.0 * value), centre(row, column), font)
                }))
                .map_err(|e| fail(&e))?;
            chart
                .draw_series(missing.iter().map(|&(row, column)| {
                    Text::new(
                        self.missing.to_owned(),
                        centre(row, column),
                        ("sans-serif", 16).into_font().color(&BLACK),
                    )
                }))
                .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))
    }

    /// A cell's colour: white to blue from the lowest value (or the floor)
    /// to the highest; below the floor, light red to red down to the lowest.
    fn colour(&self, value: f64, low: f64, high: f64) -> RGBColor {
        // How far `value` is from `from` towards `to`, in 0..=1.
        let share = |from: f64, to: f64| if from != to { ((value - from) / (to - from)).clamp(0.0, 1.0) } else { 1.0 };
        let light = |strength: f64| (255.0 * (1.0 - strength)) as u8;
        match self.floor {
            Some(floor) if value < floor => {
                let strength = 0.2 + 0.6 * share(floor, low);
                RGBColor(255, light(strength), light(strength))
            }
            floor => {
                let strength = share(floor.map_or(low, |floor| floor.max(low)), high);
                RGBColor(light(strength), light(strength), 255)
            }
        }
    }
}

/// Writes every figure of the run in `run_dir` there, the features of its
/// monitor's splits computed on `device`; returns their paths.
pub fn write_report(run_dir: &Path, device: Device) -> Result<Vec<PathBuf>> {
    let log = MetricsLog::new(run_dir);
    if !log.path().exists() {
        let what = if run_dir.is_dir() { "holds no metrics.jsonl" } else { "is not a folder" };
        return Err(Error::InvalidArgument(format!(
            "{}: not a run's folder: it {what} (report takes the --output of train, which writes metrics.jsonl \
             at each epoch's end)",
            run_dir.display()
        )));
    }
    let metrics = log.read()?;
    let checkpoint_path = run_dir.join(checkpoint::FILE_NAME);
    let checkpoint = Checkpoint::read_latest(&checkpoint_path);
    let initial_knn_top1 = checkpoint.as_ref().ok().and_then(|saved| saved.initial_knn_top1);
    let mut written = Vec::new();
    let curves = run_dir.join("curves.png");
    training_curves(&metrics, initial_knn_top1, &curves)?;
    written.push(curves);

    let config: RunConfig = checkpoint?.config;
    let Some((bank, queries)) = open_splits(&config.data, config.train.seed)?.knn else {
        tracing::warn!("the run has no labelled monitor splits: only the curves are drawn");
        return Ok(written);
    };
    let store = nn::VarStore::new(device);
    let encoder = ResNet::new(&store.root(), config.model.arch, config.model.width_multiplier, config.model.stem);
    crate::device::use_channels_last(&store);
    crate::io::torchvision::load_encoder(&store.variables(), &checkpoint_path)?;
    let format = config.image_format();
    let pool = worker_pool(config.data.workers)?;
    let f = Frozen::compute(&encoder, &bank.samples, &queries.samples, format, FEATURE_BATCH, device, &pool)?;
    let names = if queries.classes.len() >= bank.classes.len() { &queries.classes } else { &bank.classes };
    let knn = KnnConfig { k: config.train.knn_k, temperature: config.train.knn_temperature };
    let predicted = knn_predict(&f.train, &f.train_labels, &f.test, names.len() as i64, knn);
    let predicted: Vec<usize> =
        Vec::<i64>::try_from(&predicted.to_device(Device::Cpu))?.into_iter().map(|p| p as usize).collect();
    let actual: Vec<usize> = queries.samples.iter().map(|s| s.label.unwrap_or(0)).collect();

    let embedding = run_dir.join("embedding.png");
    embedding_scatter(&principal_components(&f.test), Projection::Pca, &actual, names, &embedding)?;
    written.push(embedding);
    // The first TSNE_POINTS queries: the monitor's test split is drawn at
    // random already, so these are a random sample too.
    let shown = f.test.size()[0].min(TSNE_POINTS as i64);
    if shown >= 4 {
        let tsne_path = run_dir.join("tsne.png");
        let points = tsne(&f.test.narrow(0, 0, shown))?;
        embedding_scatter(&points, Projection::Tsne, &actual[..shown as usize], names, &tsne_path)?;
        written.push(tsne_path);
    }
    let confusion = run_dir.join("confusion.png");
    confusion_matrix(&predicted, &actual, names, &confusion)?;
    written.push(confusion);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmap_cells_below_the_floor_are_red_and_the_rest_blue() {
        let names = ["a".to_owned(), "b".to_owned()];
        let heatmap = |floor| Heatmap {
            caption: "",
            rows: &names,
            columns: &names,
            x_desc: "",
            y_desc: "",
            annotate: true,
            floor,
            missing: "diverged",
        };
        let (low, high) = (0.1, 0.5);
        let with_floor = heatmap(Some(0.3));
        // The lowest value is the darkest red, one just below the floor a light red.
        let RGBColor(red, green, blue) = with_floor.colour(low, low, high);
        assert!(red == 255 && green == blue && green < 60, "{:?}", (red, green, blue));
        let RGBColor(red, green, _) = with_floor.colour(0.29, low, high);
        assert!(red == 255 && green > 190, "{green}");
        // At the floor white, the highest value the darkest blue.
        assert_eq!(with_floor.colour(0.3, low, high), RGBColor(255, 255, 255));
        assert_eq!(with_floor.colour(high, low, high), RGBColor(0, 0, 255));
        // Negative control: without a floor no cell is red, the lowest is white.
        assert_eq!(heatmap(None).colour(low, low, high), RGBColor(255, 255, 255));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heatmap.png");
        with_floor.draw(&[vec![Some(low), None], vec![Some(0.3), Some(high)]], &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        let count = |wanted: [u8; 3]| image.pixels().filter(|p| p.0 == wanted).count();
        assert!(count([200, 200, 200]) > 1000, "the diverged cell is grey");
        assert!(count([255, 0, 0]) == 0 && count([0, 0, 255]) > 1000);
    }

    #[test]
    fn principal_components_find_the_widest_direction() {
        // Points spread along (1, 1, 0) much more than along anything else.
        let t = Tensor::linspace(-5.0, 5.0, 50, (Kind::Double, Device::Cpu)).unsqueeze(1);
        let noise = Tensor::randn([50, 3], (Kind::Double, Device::Cpu)) * 0.01;
        let points = t.matmul(&Tensor::from_slice2(&[[1.0f64, 1.0, 0.0]])) + noise;
        let projected = principal_components(&points);
        assert_eq!(projected.size(), vec![50, 2]);
        let first = projected.select(1, 0).abs().max().double_value(&[]);
        let second = projected.select(1, 1).abs().max().double_value(&[]);
        assert!(first > 7.0 && second < 0.1, "{first} {second}");
    }

    #[test]
    fn tsne_keeps_clusters_apart() {
        // Three tight clusters in 16-D, along different directions: in the
        // 2-D embedding, every point's nearest neighbour is in its own cluster.
        let options = (Kind::Float, Device::Cpu);
        let classes = Tensor::arange(3, (Kind::Int64, Device::Cpu)).repeat([40]);
        let centres = Tensor::eye(16, options).narrow(0, 0, 3) * 4.0;
        let points = centres.index_select(0, &classes) + Tensor::randn([120, 16], options) * 0.3;
        let embedded = tsne(&points).unwrap();
        assert_eq!(embedded.size(), vec![120, 2]);
        let distances = Tensor::cdist(&embedded, &embedded, 2.0, None::<i64>) + Tensor::eye(120, options) * 1e9;
        let nearest = distances.argmin(1, false);
        let same = classes.index_select(0, &nearest).eq_tensor(&classes).to_kind(Kind::Float).mean(Kind::Float);
        assert!(same.double_value(&[]) > 0.97, "{same}");
        assert!(tsne(&points.narrow(0, 0, 3)).is_err());
    }

    #[test]
    fn figures_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let metrics: Vec<EpochMetrics> = (1..=3)
            .map(|epoch| EpochMetrics {
                epoch,
                step: epoch * 10,
                loss: 5.0 - epoch as f64,
                learning_rate: 0.1,
                images_per_second: 100.0,
                seconds: 1.0,
                data_wait_seconds: 0.1,
                knn_top1: (epoch != 2).then_some(0.2 * epoch as f64),
                wall_time: None,
            })
            .collect();
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let curves = dir.path().join("curves.png");
        training_curves(&metrics, Some(0.1), &curves).unwrap();
        let scatter = dir.path().join("scatter.png");
        let points = Tensor::randn([30, 2], (Kind::Float, Device::Cpu));
        embedding_scatter(&points, Projection::Tsne, &[0, 1, 2].repeat(10), &names, &scatter).unwrap();
        let confusion = dir.path().join("confusion.png");
        confusion_matrix(&[0, 1, 1, 2], &[0, 1, 2, 2], &names, &confusion).unwrap();
        for (path, size) in [(curves, (WIDTH, 400)), (scatter, (900, 800)), (confusion, (900, 850))] {
            assert_eq!(image::image_dimensions(&path).unwrap(), size, "{}", path.display());
        }
    }
}
