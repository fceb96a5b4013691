//! The built-in labelled dataset used when no data is given: procedurally
//! drawn images whose class is a shape or texture (disc, square, triangle,
//! ring, cross, horizontal/vertical/diagonal stripes, checkerboard, dots),
//! with random colours, position, size and pixel noise. Colour carries no
//! class information, so, as on natural images, an encoder must learn shape
//! to separate classes once colour distortion is applied.
use std::sync::Arc;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, ImageSource, Sample};

/// The shapes, one per class; more classes than this reuse them with a
/// different scale range.
pub const SHAPES: [&str; 10] =
    ["disc", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "d-stripes", "checkers", "dots"];

/// `count` images of `size` x `size` pixels, labels cycling through `classes`.
pub fn generate(count: usize, classes: usize, size: u32, seed: u64) -> Dataset {
    let samples = (0..count)
        .map(|index| {
            let label = index % classes;
            let mut rng = crate::augment::view_rng(seed, u64::MAX, index as u64, 0);
            let image = draw(label, classes, size, &mut rng);
            Sample { source: ImageSource::Memory(Arc::new(image)), label: Some(label) }
        })
        .collect();
    let class_names = (0..classes).map(|c| format!("{}-{}", SHAPES[c % SHAPES.len()], c / SHAPES.len())).collect();
    Dataset::new(std::path::Path::new("synthetic"), samples, class_names)
}

fn random_color(rng: &mut ChaCha8Rng) -> [f32; 3] {
    [rng.random(), rng.random(), rng.random()]
}

fn draw(label: usize, classes: usize, size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let background = random_color(rng);
    let mut foreground = random_color(rng);
    // Keep the shape visible: push the foreground's brightness away from the background's.
    let brightness = |c: [f32; 3]| (c[0] + c[1] + c[2]) / 3.0;
    let shift = if brightness(background) > 0.5 { -0.45 } else { 0.45 };
    foreground.iter_mut().for_each(|v| *v = (*v * 0.5 + brightness(background) + shift).clamp(0.0, 1.0));
    let shape = label % SHAPES.len();
    let variant = (label / SHAPES.len()) as f32 / (classes.div_ceil(SHAPES.len())) as f32;
    let s = size as f32;
    let radius = s * rng.random_range(0.22..0.36) * (1.0 - 0.3 * variant);
    let cx = s * rng.random_range(0.35..0.65);
    let cy = s * rng.random_range(0.35..0.65);
    let period = s * rng.random_range(0.16..0.26);
    let phase = rng.random_range(0.0..period);
    let noise = 0.08;
    let mut noise_rng = ChaCha8Rng::seed_from_u64(rng.random());
    RgbImage::from_fn(size, size, |x, y| {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        let (dx, dy) = (px - cx, py - cy);
        let inside = match shape {
            0 => dx * dx + dy * dy < radius * radius,
            1 => dx.abs() < radius * 0.85 && dy.abs() < radius * 0.85,
            2 => dy < radius * 0.8 && dy > -radius && dx.abs() < (dy + radius) * 0.6,
            3 => {
                let d = (dx * dx + dy * dy).sqrt();
                d < radius && d > radius * 0.55
            }
            4 => (dx.abs() < radius * 0.3 && dy.abs() < radius) || (dy.abs() < radius * 0.3 && dx.abs() < radius),
            5 => ((py + phase) / period).floor() as i32 % 2 == 0,
            6 => ((px + phase) / period).floor() as i32 % 2 == 0,
            7 => ((px + py + phase) / (period * 1.4)).floor() as i32 % 2 == 0,
            8 => {
                let (a, b) = (((px + phase) / period).floor() as i32, ((py + phase) / period).floor() as i32);
                (a + b) % 2 == 0
            }
            _ => {
                let (fx, fy) = (((px + phase) / period).fract() - 0.5, ((py + phase) / period).fract() - 0.5);
                fx * fx + fy * fy < 0.09
            }
        };
        let color = if inside { foreground } else { background };
        Rgb(color.map(|c| ((c + noise_rng.random_range(-noise..noise)).clamp(0.0, 1.0) * 255.0) as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_labelled() {
        let a = generate(20, 10, 16, 1);
        let b = generate(20, 10, 16, 1);
        assert!(a.is_labelled());
        assert_eq!(a.classes.len(), 10);
        for (x, y) in a.samples.iter().zip(&b.samples) {
            assert_eq!(*x.image().unwrap(), *y.image().unwrap());
        }
        assert_ne!(*a.samples[0].image().unwrap(), *generate(20, 10, 16, 2).samples[0].image().unwrap());
    }
}
