//! The bad-input corpus: every kind of damaged or unusual input the
//! library reads (images, CIFAR batches, safetensors, configs), each with
//! its expected outcome: it works, or it fails with an error naming the
//! file and the fault. Nothing may panic or allocate without bound. The
//! inputs are built here byte by byte, except the CMYK and progressive
//! JPEGs, which `tools/fixtures/make_image_fixtures.py` writes with PIL.
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
use simclr::config::RunConfig;
use simclr::data::{cifar_binary, decode};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn encoded(image: impl Into<image::DynamicImage>, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.into().write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
    bytes
}

fn gradient() -> image::RgbImage {
    image::RgbImage::from_fn(24, 16, |x, y| Rgb([(x * 10) as u8, (y * 15) as u8, 100]))
}

/// The error message, which must name `path` and say each of `needles`.
fn assert_error<T>(result: simclr::Result<T>, path: &Path, needles: &[&str]) {
    let Err(error) = result else { panic!("{}: bad input must be an error", path.display()) };
    let message = error.to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(message.contains(&*name), "the error should name {name}: {message}");
    for needle in needles {
        assert!(message.contains(needle), "the error should say '{needle}': {message}");
    }
}

/// A PNG with a valid signature and IHDR (CRC included) declaring `width` x `height`.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut chunk = b"IHDR".to_vec();
    chunk.extend(width.to_be_bytes());
    chunk.extend(height.to_be_bytes());
    chunk.extend([8, 2, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(13u32.to_be_bytes());
    bytes.extend(&chunk);
    bytes.extend(crc32fast::hash(&chunk).to_be_bytes());
    bytes
}

#[test]
fn images() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let jpeg = encoded(gradient(), image::ImageFormat::Jpeg);
    let png = encoded(gradient(), image::ImageFormat::Png);
    // Every case writes one file: the count is the number of files written.
    let mut cases = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| {
        cases.push(name.to_owned());
        write(dir, name, bytes)
    };

    // Errors, each naming the file.
    let mut bad_crc = png.clone();
    bad_crc[29] ^= 0xFF; // the IHDR chunk's CRC
    let errors: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec(), &["truncated"]),
        ("no_end_marker.jpg", jpeg[..jpeg.len() - 2].to_vec(), &["truncated"]),
        ("marker.jpg", jpeg[..4].to_vec(), &["truncated"]),
        ("empty.jpg", Vec::new(), &["not an image"]),
        ("notes.jpg", b"these are not pixels\n".to_vec(), &["not an image"]),
        ("bad_crc.png", bad_crc, &["cannot decode"]),
        ("tiny.png", encoded(image::RgbImage::new(1, 1), image::ImageFormat::Png), &["1x1 pixels", "smallest usable"]),
        // 100,000 x 100,000 and 2^20 x 2^20 pixels (30 GB and 3 TB decoded)
        // declared in a header: refused by the decoder's memory limit
        // before anything is allocated.
        ("huge.png", png_header(100_000, 100_000), &["cannot decode"]),
        ("huger.png", png_header(1 << 20, 1 << 20), &["cannot decode"]),
    ];
    for (name, bytes, needles) in &errors {
        let path = write(name, bytes);
        let started = std::time::Instant::now();
        assert_error(decode(&path), &path, needles);
        assert!(started.elapsed().as_secs() < 5, "{name}: refused only after {:?}", started.elapsed());
    }

    // Plain images decode as they are.
    for (name, bytes) in [("good.jpg", &jpeg), ("good.png", &png)] {
        assert_eq!(decode(&write(name, bytes)).unwrap().dimensions(), (24, 16), "{name}");
    }

    // Images that work, converted to 8-bit RGB.
    let wide = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(24, 16, |x, _| Rgb([x as u16 * 2000, 0, 65535]));
    let decoded = decode(&write("deep.png", &encoded(wide, image::ImageFormat::Png))).unwrap();
    // 16 bits to 8 by rounding v / 257.
    assert_eq!(decoded.get_pixel(10, 0), &Rgb([(20000.0f64 / 257.0).round() as u8, 0, 255]));
    let gray16 = ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(16, 16, Luma([32768]));
    assert_eq!(
        decode(&write("gray16.png", &encoded(gray16, image::ImageFormat::Png))).unwrap().get_pixel(3, 3),
        &Rgb([128; 3])
    );
    let gray = ImageBuffer::<Luma<u8>, Vec<u8>>::from_fn(16, 16, |x, _| Luma([x as u8 * 16]));
    for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg] {
        let name = format!("gray.{}", format.extensions_str()[0]);
        let rgb = decode(&write(&name, &encoded(gray.clone(), format))).unwrap();
        assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "{name}: gray stays gray");
    }
    let gray_alpha = ImageBuffer::<LumaA<u8>, Vec<u8>>::from_fn(9, 9, |x, _| LumaA([x as u8 * 20, 128]));
    let rgb = decode(&write("gray_alpha.png", &encoded(gray_alpha, image::ImageFormat::Png))).unwrap();
    assert_eq!(rgb.get_pixel(2, 0), &Rgb([40; 3]));
    let rgba = ImageBuffer::<Rgba<u8>, Vec<u8>>::from_pixel(16, 16, Rgba([10, 20, 30, 0]));
    assert_eq!(
        decode(&write("alpha.png", &encoded(rgba, image::ImageFormat::Png))).unwrap().get_pixel(0, 0),
        &Rgb([10, 20, 30])
    );
    let cmyk = decode(&write("cmyk.jpg", &std::fs::read(fixture("cmyk.jpg")).unwrap())).unwrap();
    let (red, blue) = (cmyk.get_pixel(3, 8), cmyk.get_pixel(20, 8));
    assert!(red[0] > 150 && red[2] < 90 && blue[2] > 150 && blue[0] < 90, "CMYK colours: {red:?} {blue:?}");
    let progressive = decode(&write("progressive.jpg", &std::fs::read(fixture("progressive.jpg")).unwrap())).unwrap();
    assert_eq!(progressive.dimensions(), (24, 16));
    for format in [image::ImageFormat::Bmp, image::ImageFormat::Gif, image::ImageFormat::Tiff] {
        let name = format!("picture.{}", format.extensions_str()[0]);
        assert_eq!(decode(&write(&name, &encoded(gradient(), format))).unwrap().dimensions(), (24, 16), "{name}");
    }
    // The format is sniffed from the bytes: a PNG named .jpg and a JPEG
    // named .png both work.
    assert_eq!(decode(&write("misnamed.jpg", &png)).unwrap(), gradient());
    assert_eq!(decode(&write("misnamed.png", &jpeg)).unwrap().dimensions(), (24, 16));
    let distinct: std::collections::BTreeSet<&String> = cases.iter().collect();
    assert_eq!(distinct.len(), cases.len(), "a case was written twice: {cases:?}");
    eprintln!("images: {} cases", cases.len());
}

#[test]
fn cifar_batches() {
    let dir = tempfile::tempdir().unwrap();
    let record = |label: u8, value: u8| {
        let mut bytes = vec![label];
        bytes.extend(std::iter::repeat_n(value, 1024)); // red plane
        bytes.extend(std::iter::repeat_n(0, 1024)); // green
        bytes.extend(std::iter::repeat_n(255 - value, 1024)); // blue
        bytes
    };
    let good: Vec<u8> = [record(3, 200), record(9, 10)].concat();
    let images = cifar_binary::read_batch(&write(dir.path(), "data_batch_1.bin", &good)).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].1, images[0].0.get_pixel(5, 5)), (3, &Rgb([200, 0, 55])));

    let errors: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("data_batch_2.bin", good[..1000].to_vec(), &["expected a multiple of 3073 bytes", "got 1000"]),
        ("data_batch_3.bin", [good.clone(), vec![0; 7]].concat(), &["got 6153"]),
        ("data_batch_4.bin", Vec::new(), &["got 0"]),
        ("data_batch_5.bin", [record(1, 0), record(200, 0)].concat(), &["record 1", "label 200 is out of range"]),
        // CIFAR-100 records (two label bytes) read as CIFAR-10 do not divide evenly.
        ("test.bin", good.clone(), &["3074"]),
    ];
    for (name, bytes, needles) in &errors {
        let path = write(dir.path(), name, bytes);
        assert_error(cifar_binary::read_batch(&path), &path, needles);
    }
    eprintln!("cifar: {} cases", errors.len() + 1);
}

/// A safetensors file from a header (JSON) and a data section.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

#[test]
fn safetensors_files() {
    let dir = tempfile::tempdir().unwrap();
    let floats: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let good = safetensors(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &floats);
    let loaded = simclr::io::load(&write(dir.path(), "good.safetensors", &good)).unwrap();
    assert_eq!(loaded.tensors["w"].size(), vec![2, 2]);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.safetensors", Vec::new(), "not a valid safetensors file"),
        ("huge_header.safetensors", u64::MAX.to_le_bytes().to_vec(), "not a valid safetensors file"),
        ("not_json.safetensors", safetensors("{this is not json", &floats), "not a valid safetensors file"),
        (
            "bad_dtype.safetensors",
            safetensors(r#"{"w":{"dtype":"F33","shape":[4],"data_offsets":[0,16]}}"#, &floats),
            "not a valid safetensors file",
        ),
        (
            "fp8.safetensors",
            safetensors(r#"{"w":{"dtype":"F8_E4M3","shape":[16],"data_offsets":[0,16]}}"#, &floats),
            "unsupported dtype",
        ),
        (
            "wrong_shape.safetensors",
            safetensors(r#"{"w":{"dtype":"F32","shape":[3,3],"data_offsets":[0,16]}}"#, &floats),
            "not a valid safetensors file",
        ),
        (
            "beyond_end.safetensors",
            safetensors(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &floats[..8]),
            "not a valid safetensors file",
        ),
        (
            "overlapping.safetensors",
            safetensors(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                &floats,
            ),
            "not a valid safetensors file",
        ),
        (
            "damaged.safetensors",
            safetensors(
                r#"{"__metadata__":{"simclr_crc32":"00000000"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
                &floats,
            ),
            "checksum mismatch",
        ),
    ];
    for (name, bytes, needle) in &cases {
        let path = write(dir.path(), name, bytes);
        assert_error(simclr::io::load(&path), &path, &[needle]);
    }
    eprintln!("safetensors: {} cases", cases.len() + 1);
}

#[test]
fn config_files() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, text: &str| {
        let path = write(dir.path(), name, text.as_bytes());
        (RunConfig::default().with_file(&path).and_then(|c| c.validate().map(|_| ())), path)
    };
    // Every field with a value out of range: one error lists them all.
    let (result, path) = load(
        "every_field.toml",
        r#"
        [data]
        image_size = 4
        limit = 0
        knn_limit = 0
        std = [0.2, 0.0, -1.0]
        synthetic_classes = 1
        synthetic_images = 0
        [augment]
        ops = [{ op = "random-resized-crop", min_scale = 2.0, max_ratio = 0.1 }, { op = "grayscale", probability = 7 },
               { op = "gaussian-blur", kernel_size = 8, min_sigma = -1 }, { op = "cutout", size_fraction = 0 },
               { op = "solarize", threshold = 2 }, { op = "color-jitter", strength = 3 }]
        [model]
        width_multiplier = -1.0
        [loss]
        temperature = 0
        [optim]
        learning_rate = -0.5
        weight_decay = -1
        momentum = 1.5
        warmup_epochs = -2
        [train]
        batch_size = 1
        epochs = 0
        checkpoint_every = 0
        checkpoint_every_minutes = -1
        knn_k = 0
        knn_temperature = 0
        max_nonfinite_steps = 0
        "#,
    );
    let message = result.expect_err("every field is wrong").to_string();
    let listed = message.lines().count() - 1;
    assert!(listed >= 25, "{listed} problems listed:\n{message}");
    for field in [
        "data.image_size",
        "data.std",
        "augment.ops[0]",
        "augment.ops[2]",
        "loss.temperature",
        "train.batch_size",
        "train.epochs",
        "train.checkpoint_every_minutes = -1",
    ] {
        assert!(message.contains(field), "{field} not named:\n{message}");
    }
    // Malformed files fail at the first fault, naming the file and the field.
    let malformed = [
        ("types.toml", "[train]\nbatch_size = \"many\"\n", "batch_size"),
        ("unknown_section.toml", "[trainer]\nepochs = 3\n", "unknown field `trainer`"),
        ("unknown_field.toml", "[train]\nepochz = 3\n", "unknown field `epochz`"),
        ("not_toml.toml", "this is = = not toml", "not_toml.toml"),
        ("binary.toml", "\u{0}\u{1}\u{2}", "binary.toml"),
        ("negative.toml", "[train]\nepochs = -3\n", "epochs"),
    ];
    for (name, text, needle) in malformed {
        let (result, path) = load(name, text);
        assert_error(result, &path, &[needle]);
    }
    let _ = path;
    eprintln!("configs: {} cases", malformed.len() + 1);
}

/// The fuzz targets' committed seeds (`fuzz/make_seeds.py`) are good
/// inputs, so that fuzzing starts from files that reach past the first
/// check of each parser.
#[test]
fn fuzz_seeds_are_valid_inputs() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let files = |target: &str| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(seeds.join(target)).unwrap().map(|entry| entry.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds for {target}");
        files
    };
    for path in files("image_decode") {
        decode(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for path in files("safetensors_load") {
        simclr::io::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for path in files("cifar_batch") {
        let bytes = std::fs::read(&path).unwrap();
        let label_bytes = if path.file_name().unwrap() == "cifar100.bin" { 2 } else { 1 };
        let records = cifar_binary::parse_batch(&bytes, label_bytes).unwrap();
        assert_eq!(records.len(), 2, "{}", path.display());
    }
    for path in files("run_config") {
        let text = std::fs::read_to_string(&path).unwrap();
        let config = RunConfig::default().with_toml(&text, &path).unwrap();
        config.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
