//! Each augmentation op against torchvision 0.26 for given parameters, on
//! fixtures written by `tools/fixtures/make_augment_fixtures.py` (run by hand), for
//! both implementations: the CPU path and the device path (run here on CPU
//! tensors; on a GPU it runs the same ops).
//!
//! Tolerances (largest absolute difference on [0, 1] pixels):
//! - pixel ops on float images (flip, jitter parts, grayscale, blur,
//!   rotation, solarize, Sobel, cutout, crop with padding): 1e-5;
//! - AutoAugment's transforms on float images: 1e-5, but the geometric
//!   ones (nearest sampling), where a source coordinate within rounding of
//!   a half may pick the neighbouring pixel: at most 0.5% of the values
//!   (none did on 2026-12-05);
//! - Gaussian noise, whose generator is not torch's: its residuals as a
//!   distribution, by a two-sample Kolmogorov-Smirnov test;
//! - resized crops on the CPU, the `image` crate's filters against PIL's on
//!   8-bit pixels: mean below 1/255, largest 4/255 (enlarging) and 8/255
//!   (shrinking, where the antialiasing filters' supports differ by a pixel);
//! - the device path's crop (bilinear `grid_sample`) against PIL when
//!   enlarging: mean below 1/255, largest 2/255 bilinear (PIL rounds to 8
//!   bits) and 6/255 bicubic (`grid_sample`'s cubic is Keys' a = -0.75, PIL's
//!   a = -0.5).
use std::collections::HashMap;
use std::path::PathBuf;

use simclr::augment::{
    crop, pad_crop, AugmentConfig, Augmentation, AutoAugmentConfig, AutoAugmentParams, AutoAugmentStep,
    AutoAugmentTransform, BlurConfig, BlurParams, ColorJitterConfig, CropBox, CutoutConfig, FlipConfig, FloatImage,
    GrayscaleConfig, Interpolation, JitterParams, NoiseConfig, NoiseParams, OpParams, PadOffset, Pipeline,
    RotationConfig, RotationParams, Sizing, SobelConfig, SolarizeConfig, SolarizeParams, VerticalFlipConfig,
    ViewParams,
};
use simclr::tch::{Kind, Tensor};

fn fixtures() -> HashMap<String, Tensor> {
    fixture_file("augment")
}

fn fixture_file(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.safetensors"));
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn input(f: &HashMap<String, Tensor>) -> image::RgbImage {
    let hwc = &f["input"];
    let (height, width, _) = hwc.size3().unwrap();
    image::RgbImage::from_raw(width as u32, height as u32, Vec::<u8>::try_from(&hwc.flatten(0, -1)).unwrap()).unwrap()
}

/// Largest and mean absolute difference between two CHW images.
fn difference(ours: &Tensor, reference: &Tensor) -> (f64, f64) {
    assert_eq!(ours.size(), reference.size());
    let diff = (ours.to_kind(Kind::Double) - reference.to_kind(Kind::Double)).abs();
    (diff.max().double_value(&[]), diff.mean(Kind::Double).double_value(&[]))
}

fn assert_close(case: &str, ours: &Tensor, reference: &Tensor, worst: f64, mean: f64) {
    let (largest, average) = difference(ours, reference);
    assert!(
        largest <= worst && average <= mean,
        "{case}: largest {largest:.2e} (limit {worst:.1e}), mean {average:.2e} (limit {mean:.1e})"
    );
}

/// Runs a CPU op on the float image of `source` and a tensor op on the same
/// pixels as a batch of one, and checks both against the fixture `case`.
fn check_pixel_op(
    f: &HashMap<String, Tensor>,
    case: &str,
    source: &Tensor,
    cpu: impl Fn(&mut FloatImage),
    batch: impl Fn(Tensor) -> Tensor,
) {
    let mut image = FloatImage::from_tensor(source);
    cpu(&mut image);
    assert_close(&format!("{case} (cpu)"), &image.to_tensor(), &f[case], 1e-5, 1e-5);
    let tensor = batch(source.unsqueeze(0)).squeeze_dim(0);
    assert_close(&format!("{case} (tensor)"), &tensor, &f[case], 1e-5, 1e-5);
}

/// The colour-jitter fixtures: (case, part of the jitter, its factor).
const JITTER_CASES: [(&str, u8, f32); 5] = [
    ("brightness", 0, 1.3),
    ("contrast", 1, 0.6),
    ("saturation", 2, 1.7),
    ("hue", 3, 0.17),
    ("hue_negative", 3, -0.31),
];

fn jitter(part: u8, factor: f32) -> JitterParams {
    let mut params = JitterParams { brightness: 1.0, contrast: 1.0, saturation: 1.0, hue: 0.0, order: [0, 1, 2, 3] };
    params.order.swap(0, part as usize);
    match part {
        0 => params.brightness = factor,
        1 => params.contrast = factor,
        2 => params.saturation = factor,
        _ => params.hue = factor,
    }
    params
}

#[test]
fn pixel_ops_match_torchvision() {
    let f = fixtures();
    let whole = FloatImage::from_rgb(&input(&f)).to_tensor();
    let square = f["square"].shallow_clone();
    assert_close("square", &square, &whole.narrow(1, 0, 40).narrow(2, 4, 40), 0.0, 0.0);

    check_op::<FlipConfig>(&f, "flip", &whole, &());
    for (case, part, factor) in JITTER_CASES {
        check_op::<ColorJitterConfig>(&f, case, &whole, &jitter(part, factor));
    }
    check_op::<GrayscaleConfig>(&f, "grayscale", &whole, &());
    for (case, sigma, kernel_size) in [("blur", 1.3, 5), ("blur_wide", 0.4, 9)] {
        check_op::<BlurConfig>(&f, case, &whole, &BlurParams { sigma, kernel_size });
    }
    check_op::<SolarizeConfig>(&f, "solarize", &whole, &SolarizeParams { threshold: 0.5 });
    for turns in 1..=3u8 {
        check_op::<RotationConfig>(&f, &format!("rotate_{turns}"), &square, &RotationParams { quarter_turns: turns });
    }
    let offset = PadOffset { down: 3, right: -2 };
    check_pixel_op(
        &f,
        "pad_crop",
        &square,
        |image| *image = pad_crop::apply(image, offset),
        |x| pad_crop::apply_batch(x, &[offset]),
    );
    let cut = CropBox { top: 10, left: 25, height: 16, width: 15 };
    check_op::<CutoutConfig>(&f, "cutout", &square, &cut);
    check_op::<SobelConfig>(&f, "sobel", &square, &());
}

/// The hybrid path's two stages on the fixtures: 8-bit geometry made on the
/// CPU ([`Pipeline::geometry`]), then the padded crop's offset and the pixel
/// ops on tensors ([`Pipeline::render_pixels`], which a GPU runs in a real
/// hybrid run). The pixel-op fixtures start from the uncropped input, so
/// their geometry is the input itself.
#[test]
fn the_hybrid_path_matches_torchvision() {
    let f = fixtures();
    let whole = input(&f);
    let square = image::imageops::crop_imm(&whole, 4, 0, 40, 40).to_image();
    // The pixel stage on an 8-bit image as the workers send it.
    let render = |image: &image::RgbImage, sizing: Sizing, op: Option<OpParams>| {
        let (width, height) = image.dimensions();
        let pipeline = Pipeline::new(&AugmentConfig::default(), width.min(height));
        let batch = Tensor::from_slice(image.as_raw()).view([1, i64::from(height), i64::from(width), 3]);
        pipeline.render_pixels(&batch, &[ViewParams { sizing, ops: vec![op] }]).squeeze_dim(0)
    };
    // Both stages for a shrinking crop (tolerance as for the CPU path's crop).
    let shrink = CropBox { top: 0, left: 4, height: 40, width: 40 };
    let pipeline = Pipeline::new(&AugmentConfig::default(), 24);
    let params = ViewParams {
        sizing: Sizing::RandomResizedCrop { crop: shrink, interpolation: Interpolation::Bilinear },
        ops: vec![],
    };
    let geometry = pipeline.geometry(&whole, &params, 48, 40);
    let batch = Tensor::from_slice(geometry.as_raw()).view([1, 24, 24, 3]);
    let view = pipeline.render_pixels(&batch, &[params]).squeeze_dim(0);
    assert_close("crop_shrink_bilinear (hybrid)", &view, &f["crop_shrink_bilinear"], 8.0 / 255.0, 1.0 / 255.0);
    let crop = Sizing::CenterResize;
    let mut cases: Vec<(String, &image::RgbImage, Sizing, Option<OpParams>)> = vec![
        ("flip".into(), &whole, crop, Some(OpParams::HorizontalFlip(()))),
        ("grayscale".into(), &whole, crop, Some(OpParams::Grayscale(()))),
        ("blur".into(), &whole, crop, Some(OpParams::GaussianBlur(BlurParams { sigma: 1.3, kernel_size: 5 }))),
        ("blur_wide".into(), &whole, crop, Some(OpParams::GaussianBlur(BlurParams { sigma: 0.4, kernel_size: 9 }))),
        ("solarize".into(), &whole, crop, Some(OpParams::Solarize(SolarizeParams { threshold: 0.5 }))),
        ("pad_crop".into(), &square, Sizing::RandomCrop { offset: PadOffset { down: 3, right: -2 } }, None),
        ("cutout".into(), &square, crop, Some(OpParams::Cutout(CropBox { top: 10, left: 25, height: 16, width: 15 }))),
        ("sobel".into(), &square, crop, Some(OpParams::Sobel(()))),
    ];
    for (case, part, factor) in JITTER_CASES {
        cases.push((case.into(), &whole, crop, Some(OpParams::ColorJitter(jitter(part, factor)))));
    }
    for turns in 1..=3u8 {
        cases.push((
            format!("rotate_{turns}"),
            &square,
            crop,
            Some(OpParams::Rotation(RotationParams { quarter_turns: turns })),
        ));
    }
    for (case, image, sizing, op) in &cases {
        assert_close(&format!("{case} (hybrid)"), &render(image, *sizing, *op), &f[case.as_str()], 1e-5, 1e-5);
    }
    // Negative control: the flip case without its flip is far off.
    let (largest, _) = difference(&render(&whole, crop, None), &f["flip"]);
    assert!(largest > 0.1, "an unflipped view matched the flip fixture: {largest}");
}

/// [`check_pixel_op`] for an op's [`Augmentation`] implementation.
fn check_op<A: Augmentation>(f: &HashMap<String, Tensor>, case: &str, source: &Tensor, params: &A::Params) {
    check_pixel_op(
        f,
        case,
        source,
        |image| A::apply(image, params),
        |x| A::apply_batch(x, std::slice::from_ref(params)),
    );
}

#[test]
fn vertical_flip_matches_torchvision() {
    let f = fixture_file("augment_vertical_flip");
    let whole = FloatImage::from_rgb(&input(&f)).to_tensor();
    check_op::<VerticalFlipConfig>(&f, "vertical_flip", &whole, &());
    // Negative control: the other flip is far from this fixture.
    let mut mirrored = FloatImage::from_tensor(&whole);
    FlipConfig::apply(&mut mirrored, &());
    let (largest, _) = difference(&mirrored.to_tensor(), &f["vertical_flip"]);
    assert!(largest > 0.1, "a horizontal flip matched the vertical-flip fixture: {largest}");
}

/// AutoAugment's transforms as `make_augment_fixtures.py`'s
/// AUTO_AUGMENT_CASES give them: (case, transform, magnitude).
const AUTO_AUGMENT_CASES: [(&str, AutoAugmentTransform, f32); 21] = {
    use AutoAugmentTransform::*;
    [
        ("shear_x", ShearX, 0.2),
        ("shear_x_negative", ShearX, -0.3),
        ("shear_y", ShearY, 0.2333),
        ("translate_x", TranslateX, 13.0),
        ("translate_y_negative", TranslateY, -9.0),
        ("rotate", Rotate, 26.7),
        ("rotate_negative", Rotate, -10.0),
        ("brightness", Brightness, 0.4),
        ("brightness_negative", Brightness, -0.6),
        ("color", Color, 0.5),
        ("color_negative", Color, -0.9),
        ("contrast", Contrast, 0.7),
        ("contrast_negative", Contrast, -0.5),
        ("sharpness", Sharpness, 0.8),
        ("sharpness_negative", Sharpness, -0.6),
        ("posterize_4", Posterize, 4.0),
        ("posterize_8", Posterize, 8.0),
        ("solarize", Solarize, 0.3333),
        ("auto_contrast", AutoContrast, 0.0),
        ("equalize", Equalize, 0.0),
        ("invert", Invert, 0.0),
    ]
};

/// The share of values of two CHW images further apart than 1e-5.
fn share_differing(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size());
    let apart = (ours - reference).abs().gt(1e-5).to_kind(Kind::Double).mean(Kind::Double);
    apart.double_value(&[])
}

/// `step` on the CPU path and the device path (as the first of a
/// sub-policy's two).
fn auto_augment(source: &Tensor, step: AutoAugmentStep) -> [Tensor; 2] {
    let mut image = FloatImage::from_tensor(source);
    step.apply(&mut image);
    let params = AutoAugmentParams { sub_policy: 0, steps: [Some(step), None] };
    let batch = AutoAugmentConfig::apply_batch(source.unsqueeze(0), &[params]).squeeze_dim(0);
    [image.to_tensor(), batch]
}

#[test]
fn auto_augment_transforms_match_torchvision() {
    let f = fixture_file("augment_auto_augment");
    let whole = FloatImage::from_rgb(&input(&f)).to_tensor();
    for (case, transform, magnitude) in AUTO_AUGMENT_CASES {
        let [cpu, tensor] = auto_augment(&whole, AutoAugmentStep { transform, magnitude });
        for (path, ours) in [("cpu", cpu), ("tensor", tensor)] {
            if transform.is_geometric() {
                let share = share_differing(&ours, &f[case]);
                assert!(share <= 0.005, "{case} ({path}): {:.2}% of the values differ", 100.0 * share);
            } else {
                assert_close(&format!("{case} ({path})"), &ours, &f[case], 1e-5, 1e-5);
            }
        }
    }
    // Equalize leaves a channel with one value as it is (as 8-bit values).
    let flat = &f["flat_green"];
    for ours in auto_augment(flat, AutoAugmentStep { transform: AutoAugmentTransform::Equalize, magnitude: 0.0 }) {
        assert_close("equalize_flat_green", &ours, &f["equalize_flat_green"], 1e-5, 1e-5);
    }
    // Negative controls: the other direction of each geometric transform,
    // and the neighbouring magnitude bin of the others, are far off.
    for (case, transform, magnitude) in AUTO_AUGMENT_CASES {
        let other = match transform {
            transform if transform.is_geometric() => -magnitude,
            AutoAugmentTransform::Posterize => magnitude - 1.0,
            AutoAugmentTransform::Solarize => magnitude + 0.111,
            AutoAugmentTransform::AutoContrast | AutoAugmentTransform::Equalize | AutoAugmentTransform::Invert => {
                continue
            }
            _ => magnitude + 0.1,
        };
        let [cpu, _] = auto_augment(&whole, AutoAugmentStep { transform, magnitude: other });
        assert!(share_differing(&cpu, &f[case]) > 0.05, "{case} at {other} matched the fixture");
    }
}

#[test]
fn gaussian_noise_follows_torchvisions_distribution() {
    // torchvision's GaussianNoise drew one output per case on the fixture
    // image; the generators differ, so the residuals (output - input, with
    // the clipping at 0 and 1) are compared as distributions, ours from the
    // CPU path, the device path and the hybrid path's pixel stage (the
    // same noise: their outputs agree to 1e-6). 5,760 residuals a side:
    // a KS statistic above 0.0363 has probability 1e-3 if the distributions
    // are equal. Measured: 0.017 and 0.022 with these keys, at most 0.029
    // over 50 keys; a sigma 30% too large gave at least 0.049 over 50.
    let f = fixture_file("augment_gaussian_noise");
    let rgb = input(&f);
    let whole = FloatImage::from_rgb(&rgb).to_tensor();
    let residuals =
        |output: &Tensor| Vec::<f64>::try_from((output - &whole).to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let (height, width) = (rgb.height() as i64, rgb.width() as i64);
    for (key, (case, mean, sigma)) in [("default", 0.0f32, 0.1f32), ("shifted", 0.1, 0.3)].into_iter().enumerate() {
        let mut theirs = residuals(&f[case]);
        let params = NoiseParams { key: key as u64, mean, sigma };
        let mut cpu = FloatImage::from_tensor(&whole);
        NoiseConfig::apply(&mut cpu, &params);
        let cpu = cpu.to_tensor();
        let tensor = NoiseConfig::apply_batch(whole.unsqueeze(0), &[params]).squeeze_dim(0);
        assert_close(&format!("gaussian noise {case} (tensor against cpu)"), &tensor, &cpu, 1e-6, 1e-7);
        let pipeline = Pipeline::new(&AugmentConfig::default(), width.min(height) as u32);
        let batch = Tensor::from_slice(rgb.as_raw()).view([1, height, width, 3]);
        let view = ViewParams { sizing: Sizing::CenterResize, ops: vec![Some(OpParams::GaussianNoise(params))] };
        let hybrid = pipeline.render_pixels(&batch, &[view]).squeeze_dim(0);
        assert_close(&format!("gaussian noise {case} (hybrid against cpu)"), &hybrid, &cpu, 1e-6, 1e-7);
        let distance = kolmogorov_smirnov(&mut residuals(&cpu), &mut theirs);
        assert!(distance < 0.0363, "gaussian noise {case}: KS statistic {distance:.4}");
        // Negative control: a sigma 30% too large is told apart.
        let mut louder = FloatImage::from_tensor(&whole);
        NoiseConfig::apply(&mut louder, &NoiseParams { sigma: sigma * 1.3, ..params });
        let distance = kolmogorov_smirnov(&mut residuals(&louder.to_tensor()), &mut theirs);
        assert!(distance > 0.0363, "gaussian noise {case}: sigma x 1.3 passed, KS statistic {distance:.4}");
    }
}

#[test]
fn resized_crops_match_torchvision() {
    let f = fixtures();
    let image = input(&f);
    let enlarge = CropBox { top: 5, left: 9, height: 16, width: 20 };
    let shrink = CropBox { top: 0, left: 4, height: 40, width: 40 };
    let cases = [
        ("crop_enlarge_bilinear", enlarge, 32, Interpolation::Bilinear, 4.0),
        ("crop_shrink_bilinear", shrink, 24, Interpolation::Bilinear, 8.0),
        ("crop_enlarge_bicubic", enlarge, 32, Interpolation::Bicubic, 4.0),
    ];
    for (case, crop_box, size, interpolation, worst) in cases {
        let ours = crop::crop_resize(&image, crop_box, size, size, interpolation).to_tensor();
        assert_close(&format!("{case} (cpu)"), &ours, &f[case], worst / 255.0, 1.0 / 255.0);
    }
    // The device path does not antialias, so only enlarging crops are compared.
    let batch = simclr::augment::uint8_batch(image.as_raw(), 1, 48, 40).to_kind(Kind::Float) / 255.0;
    for (case, interpolation, worst) in
        [("crop_enlarge_bilinear", Interpolation::Bilinear, 2.0), ("crop_enlarge_bicubic", Interpolation::Bicubic, 6.0)]
    {
        let ours = crop::crop_resize_batch(&batch, &[(enlarge, interpolation)], 32).squeeze_dim(0);
        assert_close(&format!("{case} (tensor)"), &ours, &f[case], worst / 255.0, 1.0 / 255.0);
    }
}

/// A number describing a crop box in an image of the given width and height.
type BoxStatistic = fn(&CropBox, u32, u32) -> f64;

/// Largest distance between the empirical distribution functions of two
/// samples: the two-sample Kolmogorov-Smirnov statistic.
fn kolmogorov_smirnov(a: &mut [f64], b: &mut [f64]) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut largest) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let value = a[i].min(b[j]);
        while i < a.len() && a[i] <= value {
            i += 1;
        }
        while j < b.len() && b[j] <= value {
            j += 1;
        }
        largest = largest.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    largest
}

#[test]
fn crop_boxes_follow_torchvisions_distribution() {
    // torchvision's RandomResizedCrop.get_params drew 4,000 boxes per image
    // size; ours draws as many. Their generators differ, so the boxes are
    // compared as distributions: area fraction, log aspect ratio, top and
    // left. For two samples of 4,000, a KS statistic above 0.0436 has
    // probability 1e-3 if the distributions are equal. Measured: 0.020 at
    // most; drawing the ratio uniformly instead of log-uniformly gives 0.061.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crop_boxes.safetensors");
    let reference: HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    let config = crop::CropConfig::default();
    for (width, height) in [(200u32, 100u32), (100, 100), (32, 32), (500, 60)] {
        let drawn = reference[&format!("{width}x{height}")].to_kind(Kind::Int64);
        let theirs: Vec<CropBox> = (0..drawn.size()[0])
            .map(|row| {
                let value = |column| drawn.int64_value(&[row, column]) as u32;
                CropBox { top: value(0), left: value(1), height: value(2), width: value(3) }
            })
            .collect();
        let ours: Vec<CropBox> = (0..theirs.len() as u64)
            .map(|i| config.sample_box(width, height, &mut simclr::augment::view_rng(11, 0, i, 0)))
            .collect();
        let fallback = {
            // Ten misses: a centre crop with the ratio clamped into range.
            let w = ((f64::from(height) * 4.0 / 3.0).round() as u32).min(width);
            let h = ((f64::from(width) * 3.0 / 4.0).round() as u32).min(height);
            CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
        };
        for crop in &ours {
            assert!(crop.left + crop.width <= width && crop.top + crop.height <= height, "{crop:?}");
            // Width and height are rounded from reals that meet the bounds.
            let (w, h) = (f64::from(crop.width), f64::from(crop.height));
            let scale = (w + 0.5) * (h + 0.5) / f64::from(width * height);
            let (low_ratio, high_ratio) = ((w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5));
            let in_range = scale >= 0.08 && low_ratio <= 4.0 / 3.0 && high_ratio >= 3.0 / 4.0;
            assert!(in_range || *crop == fallback, "{width}x{height}: {crop:?} is neither in range nor the fallback");
        }
        let statistics: [(&str, BoxStatistic); 4] = [
            ("area fraction", |c, w, h| f64::from(c.width * c.height) / f64::from(w * h)),
            ("log ratio", |c, _, _| (f64::from(c.width) / f64::from(c.height)).ln()),
            ("top", |c, _, _| f64::from(c.top)),
            ("left", |c, _, _| f64::from(c.left)),
        ];
        for (name, statistic) in statistics {
            let mut a: Vec<f64> = ours.iter().map(|c| statistic(c, width, height)).collect();
            let mut b: Vec<f64> = theirs.iter().map(|c| statistic(c, width, height)).collect();
            let distance = kolmogorov_smirnov(&mut a, &mut b);
            assert!(distance < 0.0436, "{width}x{height} {name}: KS statistic {distance:.4}");
        }
    }
}
