//! A PNG contact sheet of search results: one row per query, the query in
//! the first column behind a coloured frame, then its neighbours, best
//! first, each captioned with its rank and cosine similarity.
use std::path::Path;

use image::{Rgb, RgbImage};

use super::Neighbor;
use crate::augment::center_view;
use crate::data::Sample;
use crate::io::caption::caption;
use crate::Result;

const GAP: u32 = 6;
const FRAME: Rgb<u8> = Rgb([220, 40, 40]);
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);

fn thumbnail(image: &Sample, side: u32) -> Result<RgbImage> {
    Ok(center_view(&*image.image()?, side).to_rgb())
}

/// Writes the gallery for `queries` and their `hits` into `items`.
pub fn write_gallery(
    output: &Path,
    queries: &[Sample],
    hits: &[Vec<Neighbor>],
    items: &[Sample],
    side: u32,
) -> Result<()> {
    let columns = 1 + hits.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let cell = side + GAP;
    let mut sheet = RgbImage::from_pixel(GAP + columns * cell + GAP, GAP + queries.len() as u32 * cell, BACKGROUND);
    for (row, (query, neighbours)) in queries.iter().zip(hits).enumerate() {
        let y = GAP + row as u32 * cell;
        for x in 0..side + 4 {
            for dy in [0, side + 3] {
                sheet.put_pixel(GAP - 2 + x, y - 2 + dy, FRAME);
                sheet.put_pixel(GAP - 2 + dy, y - 2 + x, FRAME);
            }
        }
        image::imageops::replace(&mut sheet, &thumbnail(query, side)?, i64::from(GAP), i64::from(y));
        caption(&mut sheet, "query", GAP, y, side, side);
        for (column, hit) in neighbours.iter().enumerate() {
            let x = GAP + (column as u32 + 1) * cell + GAP;
            image::imageops::replace(&mut sheet, &thumbnail(&items[hit.index], side)?, i64::from(x), i64::from(y));
            caption(&mut sheet, &format!("#{} {:.3}", column + 1, hit.similarity), x, y, side, side);
        }
    }
    crate::io::write_png(output, &sheet)
}
