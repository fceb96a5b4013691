//! Image decoding, in full or, for JPEG, at a reduced scale.
//!
//! A JPEG decoded at 1/2, 1/4 or 1/8 of its size in the DCT domain (the
//! inverse transform computed on fewer coefficients, as libjpeg-turbo's
//! `scale_denom`, DALI and PIL's draft mode do) skips most of the inverse
//! transform and colour conversion, and leaves fewer pixels to resize. The
//! training views ask for it only where every view's crop still has at
//! least as many pixels as the view at that scale ([`crate::augment::Pipeline::reduction`]),
//! so no view is upsampled that a full decode would have shrunk.
//!
//! Decoders, measured on 600 generated ImageNet-like JPEGs (200k pixels on
//! average, `tools/data/make_imagenet_like.py`), one core of this machine,
//! ms per image: zune-jpeg (through `image`) 1.40 in full; libjpeg-turbo
//! 2.1 (PIL 12) 1.55 in full, 1.29 at 1/2, 1.17 at 1/4, 1.02 at 1/8;
//! jpeg-decoder 2.2 in full, 1.8-2.0 at 1/2, 1.2-1.4 at 1/4, 1.2 at 1/8.
//! So full decodes go to zune-jpeg, the fastest, and reduced ones to
//! jpeg-decoder, the one pure-Rust decoder that scales (libjpeg-turbo would
//! need nasm and cmake to build with its SIMD, which this project's machines
//! lack). Entropy decoding, which no scale skips, is most of the cost at
//! these sizes; the gain grows with the image: see docs/input.md.
use std::path::Path;

use image::RgbImage;

use crate::checks::MIN_IMAGE_SIDE;
use crate::{Error, Result};

/// Decodes an image file of any format the `image` crate reads (the format
/// is sniffed from the bytes, not the extension) into 8-bit RGB.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes, path)
}

/// The error of an image that cannot be read. Some decoders end their
/// messages with a line break (the image crate's JPEG header error), which
/// left a blank line in reports and a "\n" in summary.json; it is trimmed.
fn bad(path: &Path, message: String) -> Error {
    Error::Image { path: path.to_path_buf(), message: message.trim_end().to_owned() }
}

fn format_of(bytes: &[u8], path: &Path) -> Result<image::ImageFormat> {
    // Sniff the contents, so a text file named .jpg is called what it is
    // rather than a JPEG with bad markers.
    image::guess_format(bytes).map_err(|_| bad(path, "not an image (unrecognised file contents)".to_owned()))
}

/// [`decode`] on bytes already read; `path` is only named in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let format = format_of(bytes, path)?;
    if format == image::ImageFormat::Jpeg {
        return decode_jpeg(bytes, path);
    }
    let image = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| bad(path, format!("cannot decode: {e}")))?
        .to_rgb8();
    check_size(image.width(), image.height()).map_err(|message| bad(path, message))?;
    Ok(image)
}

/// A JPEG decoded by zune-jpeg straight into RGB, with the options the
/// `image` crate gives it (lenient about damage past the headers, as
/// libjpeg is), but without its copy into a `DynamicImage` and the second
/// into `RgbImage`: 8% faster on 500 px images, 10-25% on 2000 px.
fn decode_jpeg(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    use zune_core::{colorspace::ColorSpace, options::DecoderOptions};
    let options = DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    check_whole(bytes, path)?;
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), options);
    let pixels = decoder.decode().map_err(|e| bad(path, format!("cannot decode: {e:?}")))?;
    let (width, height) = decoder.dimensions().expect("decoded, so the headers were read");
    let (width, height) = (width as u32, height as u32);
    check_size(width, height).map_err(|message| bad(path, message))?;
    RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| bad(path, format!("decoder returned a wrong buffer size for {width}x{height}")))
}

/// Width and height from the header alone, checked for size.
pub fn dimensions(bytes: &[u8], path: &Path) -> Result<(u32, u32)> {
    let format = format_of(bytes, path)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes));
    reader.set_format(format);
    let (width, height) = reader.into_dimensions().map_err(|e| bad(path, format!("cannot decode its header: {e}")))?;
    check_size(width, height).map_err(|message| bad(path, message))?;
    Ok((width, height))
}

/// The image in `bytes` decoded smaller by `reduction(width, height)`,
/// asked with the full size from the header, and that full size.
pub fn decode_for(
    bytes: &[u8],
    path: &Path,
    reduction: &dyn Fn(u32, u32) -> u32,
) -> Result<(std::sync::Arc<RgbImage>, (u32, u32))> {
    let (width, height) = dimensions(bytes, path)?;
    let image = decode_reduced(bytes, path, reduction(width, height))?;
    Ok((std::sync::Arc::new(image), (width, height)))
}

/// Decodes at 1/`reduction` of the full size (1, 2, 4 or 8) when the bytes
/// are a JPEG, in full otherwise: each side comes out as the full side
/// divided by `reduction`, rounded up. Callers map coordinates with the
/// returned image's own size.
pub fn decode_reduced(bytes: &[u8], path: &Path, reduction: u32) -> Result<RgbImage> {
    if reduction <= 1 || format_of(bytes, path)? != image::ImageFormat::Jpeg {
        return decode_bytes(bytes, path);
    }
    check_whole(bytes, path)?;
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    let failed = |e: jpeg_decoder::Error| bad(path, format!("cannot decode: {e}"));
    decoder.read_info().map_err(failed)?;
    let info = decoder.info().expect("read_info succeeded");
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    check_size(width, height).map_err(|message| bad(path, message))?;
    let request = |side: u32| side.div_ceil(reduction) as u16;
    let (out_width, out_height) = decoder.scale(request(width), request(height)).map_err(failed)?;
    let pixels = decoder.decode().map_err(failed)?;
    let (out_width, out_height) = (u32::from(out_width), u32::from(out_height));
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        // Rare in photographs: decode these in full as everything else.
        jpeg_decoder::PixelFormat::L16 | jpeg_decoder::PixelFormat::CMYK32 => return decode_bytes(bytes, path),
    };
    RgbImage::from_raw(out_width, out_height, rgb)
        .ok_or_else(|| bad(path, format!("decoder returned a wrong buffer size for {out_width}x{out_height}")))
}

/// An error unless the JPEG in `bytes` is whole: an end-of-image marker
/// (FF D9) after the start of its last scan (FF DA). Neither pair can occur
/// inside a scan's coded data, where every FF byte is followed by 00 or a
/// restart marker, so a thumbnail's end before the image's scans does not
/// count. Checked before decoding: zune-jpeg fills the rows of a file cut
/// short with grey, as browsers do, and jpeg-decoder fails without saying
/// why ("failed to fill whole buffer"), where PIL ("image file is truncated") and
/// torchvision.io ("Image is incomplete or truncated") refuse it, and
/// refuse one that lacks only its final marker: so does this, and the
/// file goes through `data.on_bad_image` as any unreadable image.
fn check_whole(bytes: &[u8], path: &Path) -> Result<()> {
    const END: [u8; 2] = [0xFF, 0xD9];
    // Nearly every file ends with its marker: no search.
    if bytes.ends_with(&END) {
        return Ok(());
    }
    match (memchr::memmem::rfind(bytes, &[0xFF, 0xDA]), memchr::memmem::rfind(bytes, &END)) {
        (Some(scan), Some(end)) if end > scan => Ok(()),
        _ => Err(bad(path, "truncated: the file ends before its image data does".to_owned())),
    }
}

pub(crate) fn check_size(width: u32, height: u32) -> std::result::Result<(), String> {
    if width < MIN_IMAGE_SIDE || height < MIN_IMAGE_SIDE {
        return Err(format!(
            "image is {width}x{height} pixels; the smallest usable image is {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{crop, CropBox, Interpolation};

    /// A 640x480 photograph-like JPEG (smooth shapes, edges and texture) at
    /// quality 90 with 4:2:0 chroma, as most photographs are stored.
    fn photograph() -> Vec<u8> {
        let image = RgbImage::from_fn(640, 480, |x, y| {
            let (u, v) = (x as f32 / 640.0, y as f32 / 480.0);
            let disc = ((u - 0.4).powi(2) + (v - 0.5).powi(2)) < 0.06;
            let texture = ((x as f32 * 0.31).sin() * (y as f32 * 0.23).cos() * 20.0) as i32;
            let channel = |base: f32| (base * 200.0 + 30.0 + texture as f32).clamp(0.0, 255.0) as u8;
            match disc {
                true => image::Rgb([channel(0.9), channel(0.3 * u), channel(0.2)]),
                false => image::Rgb([channel(u), channel(v), channel(1.0 - u * v)]),
            }
        });
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&image).unwrap();
        bytes
    }

    #[test]
    fn reduced_decodes_make_nearly_the_views_of_full_ones() {
        // The view of a box decoded at 1/2 and 1/4 against the same box
        // decoded in full and resized: the smaller decode averages pixels
        // in the DCT domain before the resize's antialiasing filter does.
        // Measured here (0-255): mean 0.25-0.75, worst 4-15. The box with its
        // left edge 24 pixels further in is the negative control.
        let bytes = photograph();
        let path = Path::new("photograph.jpg");
        let full = decode_bytes(&bytes, path).unwrap();
        assert_eq!(dimensions(&bytes, path).unwrap(), (640, 480));
        let size = 96;
        let view = |image: &RgbImage, crop: CropBox| {
            crop::crop_resize_reduced(image, crop, (640, 480), size, Interpolation::Bilinear)
        };
        let difference = |a: &RgbImage, b: &RgbImage| {
            let pairs = a.as_raw().iter().zip(b.as_raw());
            let worst = pairs.clone().map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            let mean = pairs.map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.as_raw().len() as f64;
            (mean, worst)
        };
        for (reduction, crop) in [
            (2, CropBox { top: 40, left: 100, height: 400, width: 420 }),
            (4, CropBox { top: 0, left: 0, height: 480, width: 640 }),
            (4, CropBox { top: 30, left: 200, height: 420, width: 400 }),
        ] {
            let reduced = decode_reduced(&bytes, path, reduction).unwrap();
            assert_eq!(reduced.dimensions(), (640 / reduction, 480 / reduction));
            let (mean, worst) = difference(&view(&reduced, crop), &view(&full, crop));
            assert!(mean < 1.5 && worst < 24, "1/{reduction} of {crop:?}: mean {mean:.2}, worst {worst}");
            let shifted = CropBox { left: crop.left + 24, width: crop.width - 24, ..crop };
            let (mean, _) = difference(&view(&reduced, crop), &view(&full, shifted));
            assert!(mean > 3.0, "1/{reduction}: a box shifted by 24 pixels passed, mean {mean:.2}");
        }
    }

    #[test]
    fn a_cut_jpeg_is_named_in_one_line() {
        let jpeg = photograph();
        let path = Path::new("cut.jpg");
        // Cut inside its headers.
        for cut in [100, 300] {
            let Err(error) = decode_for(&jpeg[..cut], path, &|_, _| 1) else { panic!("{cut} bytes decoded") };
            let error = error.to_string();
            assert!(error.starts_with("image cut.jpg: cannot decode"), "{error}");
            assert_eq!(error.trim_end(), error, "no trailing line break");
        }
    }

    #[test]
    fn a_jpeg_cut_in_its_scan_is_truncated_and_one_with_bytes_after_its_end_is_whole() {
        let jpeg = photograph();
        let path = Path::new("cut.jpg");
        assert!(jpeg.ends_with(&[0xFF, 0xD9]));
        // Half its scan, or all but its end marker (PIL and torchvision.io
        // refuse both), in full and at 1/2 (the two decoders).
        for cut in [jpeg.len() / 2, jpeg.len() - 2] {
            let bytes = &jpeg[..cut];
            // The control: the decoder itself reads them, greyed.
            let options = zune_core::options::DecoderOptions::default().set_strict_mode(false);
            let mut lenient =
                zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), options);
            assert!(lenient.decode().is_ok(), "zune-jpeg refused {cut} bytes itself");
            for reduction in [1, 2] {
                let Err(error) = decode_reduced(bytes, path, reduction) else { panic!("{cut} bytes decoded") };
                assert_eq!(error.to_string(), "image cut.jpg: truncated: the file ends before its image data does");
            }
        }
        // Bytes after the end marker (padding, appended data): read as PIL reads them.
        let mut padded = jpeg.clone();
        padded.extend_from_slice(b"\0\0trailing bytes");
        for reduction in [1, 2] {
            let expected = decode_reduced(&jpeg, path, reduction).unwrap();
            assert_eq!(decode_reduced(&padded, path, reduction).unwrap(), expected);
        }
    }

    #[test]
    fn non_jpeg_images_are_decoded_in_full() {
        let image = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let decoded = decode_reduced(bytes.get_ref(), Path::new("a.png"), 4).unwrap();
        assert_eq!(decoded, image);
        let error = decode_reduced(b"not an image", Path::new("notes.jpg"), 2).unwrap_err().to_string();
        assert!(error.contains("notes.jpg") && error.contains("not an image"), "{error}");
    }
}
