//! Text on images: the built-in font, and captions over thumbnails (the
//! neighbour gallery, the augmentation preview).
use image::RgbImage;
use plotters::prelude::*;

/// DejaVu Sans, cut to Latin, Greek, Cyrillic, punctuation, arrows and
/// mathematical operators (tools: fontTools' pyftsubset; licence beside it
/// in assets/). Built in, so that figures need no system fonts: with
/// plotters' `ttf` feature the binary linked fontconfig and FreeType, and
/// would not even start on a machine without them.
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");

/// Registers the built-in font as the "sans-serif" every figure and caption
/// uses; false if it could not be read.
pub fn register_font() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok())
}

/// Cells shorter than this get no caption: the band would hide the picture.
const MIN_CELL: u32 = 32;
const BAND: u32 = 14;

/// Writes `text` over the bottom of the `width` x `height` cell at (`x`, `y`)
/// of `image`, white on a darkened band, so that it reads on any picture and
/// the sheet keeps its size. Cells under 32 pixels high are left as they are.
pub fn caption(image: &mut RgbImage, text: &str, x: u32, y: u32, width: u32, height: u32) {
    if height < MIN_CELL || !register_font() {
        return;
    }
    let top = y + height - BAND;
    for row in top..(y + height).min(image.height()) {
        for column in x..(x + width).min(image.width()) {
            let pixel = image.get_pixel_mut(column, row);
            pixel.0 = pixel.0.map(|v| v / 4);
        }
    }
    let (sheet_width, sheet_height) = image.dimensions();
    let root = BitMapBackend::with_buffer(image, (sheet_width, sheet_height)).into_drawing_area();
    let style = ("sans-serif", BAND - 3).into_font().color(&WHITE);
    // Drawing fails only for a font that cannot render, which register_font rules out.
    let _ = root.draw_text(text, &style, (x as i32 + 2, top as i32 + 1));
    let _ = root.present();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caption_writes_inside_its_band_only() {
        let mut image = RgbImage::from_pixel(100, 60, image::Rgb([200, 200, 200]));
        caption(&mut image, "#1 0.987", 10, 5, 50, 50);
        let band = image::imageops::crop_imm(&image, 10, 41, 50, 14).to_image();
        assert!(band.pixels().any(|p| p.0.iter().all(|&v| v > 200)), "white text in the band");
        assert!(band.pixels().any(|p| p.0 == [50, 50, 50]), "the band is darkened");
        let above = image::imageops::crop_imm(&image, 0, 0, 100, 41).to_image();
        assert!(above.pixels().all(|p| p.0 == [200, 200, 200]), "nothing outside the band");
        let mut small = RgbImage::from_pixel(20, 20, image::Rgb([9, 9, 9]));
        caption(&mut small, "x", 0, 0, 20, 20);
        assert!(small.pixels().all(|p| p.0 == [9, 9, 9]), "a small cell is left alone");
    }
}
