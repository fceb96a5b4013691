//! A PNG contact sheet of search results: one row per query, the query in
//! the first column behind a coloured frame, then its neighbours, best
//! first, each captioned with its rank and cosine similarity.
use std::path::Path;

use image::{Rgb, RgbImage};

use super::Neighbor;
use crate::augment::center_view;
use crate::data::Sample;
use crate::io::caption::caption;
use crate::io::MAX_SHEET_PIXELS;
use crate::{Error, Result};

const GAP: u32 = 6;
const FRAME: Rgb<u8> = Rgb([220, 40, 40]);
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);

fn thumbnail(image: &Sample, side: u32) -> Result<RgbImage> {
    Ok(center_view(&*image.image()?, side).to_rgb())
}

/// Width and height of the gallery of `queries` rows of `neighbours`
/// thumbnails of `side` pixels, beside the query's (in u64, saturating: a
/// large `--thumbnail` would overflow).
fn sheet_size(queries: usize, neighbours: usize, side: u32) -> (u64, u64) {
    let cell = u64::from(side) + u64::from(GAP);
    let columns = (neighbours as u64).saturating_add(1);
    let width = columns.saturating_mul(cell).saturating_add(2 * u64::from(GAP));
    (width, (queries as u64).saturating_mul(cell).saturating_add(u64::from(GAP)))
}

/// Refuses, before anything is embedded, a gallery too large to hold (see
/// [`MAX_SHEET_PIXELS`]), naming what sizes it.
pub fn check_size(queries: usize, neighbours: usize, side: u32) -> Result<()> {
    let (width, height) = sheet_size(queries, neighbours, side);
    if width.saturating_mul(height) > MAX_SHEET_PIXELS {
        return Err(Error::InvalidArgument(format!(
            "--gallery: {} of {neighbours} neighbours at --thumbnail {side} make a sheet of {width}x{height} \
             pixels, more than the {MAX_SHEET_PIXELS} a gallery may have: lower --thumbnail or --k, or query fewer \
             images",
            crate::names::counted(queries, "query image"),
        )));
    }
    Ok(())
}

/// Writes the gallery for `queries` and their `hits` into `items`.
pub fn write_gallery(
    output: &Path,
    queries: &[Sample],
    hits: &[Vec<Neighbor>],
    items: &[Sample],
    side: u32,
) -> Result<()> {
    let neighbours = hits.iter().map(Vec::len).max().unwrap_or(0);
    check_size(queries.len(), neighbours, side)?;
    let (width, height) = sheet_size(queries.len(), neighbours, side);
    let cell = side + GAP;
    let mut sheet = RgbImage::from_pixel(width as u32, height as u32, BACKGROUND);
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
    crate::io::write_sheet(output, &sheet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gallery_too_large_to_hold_is_refused_naming_what_sizes_it() {
        let (width, height) = (2 * GAP + 4 * (10 + GAP), GAP + 2 * (10 + GAP));
        assert_eq!(sheet_size(2, 3, 10), (u64::from(width), u64::from(height)));
        check_size(240, 5, 96).unwrap();
        let error = check_size(10_000, 5, 96).unwrap_err().to_string();
        assert!(error.contains("10000 query images of 5 neighbours at --thumbnail 96 make a sheet of 624x1020006"));
        assert!(check_size(1, 1, u32::MAX).unwrap_err().to_string().contains("lower --thumbnail"));
        assert!(check_size(usize::MAX, usize::MAX, u32::MAX).is_err(), "saturates, not overflows");
    }
}
