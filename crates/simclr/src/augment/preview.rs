//! `simclr augment-preview`: a PNG contact sheet of what a pipeline does,
//! so a user sees the views before training on them. One row per image:
//! the evaluation view (centre crop), then several pairs of training views
//! (view 1, then view 2 beside it), enlarged, each captioned ("original",
//! "1a" and "1b" for the two views of pair 1).
use image::{imageops, Rgb, RgbImage};

use crate::io::caption::caption;
use crate::io::MAX_SHEET_PIXELS;

use super::{center_view, uint8_batch, view_rng, FloatImage, Pipeline, ViewParams};

const GAP: u32 = 4;
const PAIR_GAP: u32 = 14;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);

/// Which implementation renders the preview's views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renderer {
    /// The CPU path.
    Cpu,
    /// The device path, on CPU tensors.
    Device,
}

names!(Renderer, "renderer", { Cpu => "cpu", Device => "device" });

/// The drawn parameters of every view in a preview, for logging.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PreviewViews {
    pub image: usize,
    pub pair: usize,
    pub view: usize,
    pub params: ViewParams,
}

/// How a preview is drawn.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PreviewOptions {
    /// Draws the images shown, and seeds the views as training seeds them (pair `p` is epoch `p`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pairs of views per image.
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// Enlargement of each view; by default views are shown about 96 px wide.
    #[arg(long)]
    pub scale: Option<u32>,
    /// cpu or device: which path renders the views (the device path on CPU tensors).
    #[arg(long, default_value = "cpu")]
    pub renderer: Renderer,
}

/// [`preview`] written out: the sheet at `png` (in the format its extension
/// names: [`crate::io::sheet_format`]), and every view's drawn parameters
/// as JSON lines at `params`.
pub fn write_preview(
    images: &[RgbImage],
    pipeline: &Pipeline,
    options: PreviewOptions,
    png: &std::path::Path,
    params: Option<&std::path::Path>,
) -> crate::Result<()> {
    let scale = options.scale.unwrap_or((96 / pipeline.size()).max(1));
    let (sheet, log) = preview(images, pipeline, options.seed, options.pairs, scale, options.renderer)?;
    crate::io::write_sheet(png, &sheet)?;
    if let Some(path) = params {
        let lines: Vec<String> =
            log.iter().map(|entry| serde_json::to_string(entry).expect("parameters serialise") + "\n").collect();
        crate::io::write_atomic(path, lines.concat().as_bytes())?;
    }
    Ok(())
}

/// Draws `pairs` pairs of views of each image (seeded like training views
/// of epoch `pair`), each view shown `scale` times its size.
pub fn preview(
    images: &[RgbImage],
    pipeline: &Pipeline,
    seed: u64,
    pairs: usize,
    scale: u32,
    renderer: Renderer,
) -> crate::Result<(RgbImage, Vec<PreviewViews>)> {
    let mut problems = Vec::new();
    for (flag, count) in [("--images", images.len() as u64), ("--pairs", pairs as u64), ("--scale", u64::from(scale))] {
        if count == 0 {
            problems.push(format!("{flag} 0: must be at least 1"));
        }
    }
    // In u64, saturating, where a large --scale or --pairs would overflow.
    let side = u64::from(pipeline.size()) * u64::from(scale);
    let pair_width = side.saturating_mul(2).saturating_add(u64::from(GAP + PAIR_GAP));
    let width =
        side.saturating_add(u64::from(GAP + PAIR_GAP)).saturating_add((pairs as u64).saturating_mul(pair_width));
    let height =
        (images.len() as u64).saturating_mul(side.saturating_add(u64::from(GAP))).saturating_add(u64::from(GAP));
    if width.saturating_mul(height) > MAX_SHEET_PIXELS {
        problems.push(format!(
            "--scale {scale} with {pairs} pairs of {}x{} views of {} makes a sheet of {width}x{height} pixels, \
             more than the {MAX_SHEET_PIXELS} a preview may have: lower --scale, --pairs or --images",
            pipeline.size(),
            pipeline.size(),
            crate::names::counted(images.len(), "image"),
        ));
    }
    if !problems.is_empty() {
        return Err(crate::Error::Config(problems));
    }
    let (side, width, height) = (side as u32, width as u32, height as u32);
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    let mut log = Vec::new();
    let enlarge = |view: &FloatImage| imageops::resize(&view.to_rgb(), side, side, imageops::FilterType::Nearest);
    for (row, image) in images.iter().enumerate() {
        let y = i64::from(GAP + row as u32 * (side + GAP));
        imageops::replace(&mut sheet, &enlarge(&center_view(image, pipeline.size())), i64::from(GAP), y);
        caption(&mut sheet, "original", GAP, y as u32, side, side);
        for pair in 0..pairs {
            let x = GAP + side + PAIR_GAP + pair as u32 * (2 * side + GAP + PAIR_GAP);
            for view in 0..2 {
                let mut rng = view_rng(seed, pair as u64, row as u64, view as u64);
                let params = pipeline.sample(view, image.width(), image.height(), &mut rng);
                let rendered = match renderer {
                    Renderer::Cpu => pipeline.render(image, &params),
                    Renderer::Device => {
                        let batch = uint8_batch(image.as_raw(), 1, image.width(), image.height());
                        FloatImage::from_tensor(&pipeline.render_batch(&batch, std::slice::from_ref(&params)).get(0))
                    }
                };
                let left = x + view as u32 * (side + GAP);
                imageops::replace(&mut sheet, &enlarge(&rendered), i64::from(left), y);
                caption(&mut sheet, &format!("{}{}", pair + 1, ["a", "b"][view]), left, y as u32, side, side);
                log.push(PreviewViews { image: row, pair, view, params });
            }
        }
    }
    Ok((sheet, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::AugmentConfig;

    #[test]
    fn the_sheet_holds_every_view_and_logs_its_parameters() {
        let images: Vec<RgbImage> =
            (0..3).map(|i| RgbImage::from_fn(40, 30, |x, y| Rgb([(x * 6) as u8, (y * 8) as u8, i * 80]))).collect();
        let pipeline = Pipeline::new(&AugmentConfig::default(), 16);
        for renderer in [Renderer::Cpu, Renderer::Device] {
            let (sheet, log) = preview(&images, &pipeline, 0, 2, 3, renderer).unwrap();
            assert_eq!(sheet.dimensions(), (GAP + 48 + PAIR_GAP + 2 * (96 + GAP + PAIR_GAP), GAP + 3 * (48 + GAP)));
            assert_eq!(log.len(), 3 * 2 * 2);
            // The two views of a pair differ.
            // (Above the captions, which differ anyway.)
            let crop = |x| imageops::crop_imm(&sheet, x, GAP, 48, 48 - 14).to_image();
            let first = GAP + 48 + PAIR_GAP;
            assert_ne!(crop(first), crop(first + 48 + GAP));
        }
        let refused =
            |pairs, scale| preview(&images, &pipeline, 0, pairs, scale, Renderer::Cpu).unwrap_err().to_string();
        let none = refused(0, 0);
        assert!(none.contains("--pairs 0: must be at least 1") && none.contains("--scale 0"), "{none}");
        let huge = refused(2, 2000);
        assert!(huge.contains("--scale 2000 with 2 pairs of 16x16 views of 3 images makes a sheet of"), "{huge}");
        assert!(refused(2_000_000, 1).contains("lower --scale, --pairs or --images"));
        assert!(refused(usize::MAX, u32::MAX).contains("makes a sheet of"), "saturates, not overflows");
    }
}
