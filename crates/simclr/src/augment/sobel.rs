//! Sobel filtering (one of the ablation ops of section 3, Figure 4(h)):
//! the gradient magnitude of the luma, sqrt(gx² + gy²) / 4 clipped to
//! [0, 1] (4 is the largest response to a unit step along one axis),
//! replicated to three channels. Borders repeat the edge pixel.
//! torchvision has no Sobel op; `tools/fixtures/make_augment_fixtures.py` checks this
//! definition against `torch.nn.functional.conv2d`.
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::grayscale::{luma, luma_batch};
use super::{Augmentation, FloatImage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SobelConfig {
    /// 0.5 by default (not in the paper's main pipeline).
    pub probability: f64,
}

impl Default for SobelConfig {
    fn default() -> Self {
        Self { probability: 0.5 }
    }
}

/// The horizontal-derivative kernel; its transpose is the vertical one.
const KERNEL: [[f32; 3]; 3] = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]];

impl Augmentation for SobelConfig {
    type Params = ();

    fn sample<R: Rng + ?Sized>(&self, _side: usize, rng: &mut R) -> Option<()> {
        super::applies(self.probability, rng).then_some(())
    }

    fn apply(image: &mut FloatImage, _: &()) {
        let (width, height) = (image.width, image.height);
        let gray: Vec<f32> = image.data.chunks_exact(3).map(luma).collect();
        let at = |y: isize, x: isize| {
            gray[y.clamp(0, height as isize - 1) as usize * width + x.clamp(0, width as isize - 1) as usize]
        };
        for y in 0..height as isize {
            for x in 0..width as isize {
                let (mut gx, mut gy) = (0f32, 0f32);
                for (dy, row) in KERNEL.iter().enumerate() {
                    for (dx, weight) in row.iter().enumerate() {
                        gx += weight * at(y + dy as isize - 1, x + dx as isize - 1);
                        gy += weight * at(y + dx as isize - 1, x + dy as isize - 1);
                    }
                }
                let magnitude = ((gx * gx + gy * gy).sqrt() / 4.0).min(1.0);
                image.data[(y as usize * width + x as usize) * 3..][..3].fill(magnitude);
            }
        }
    }

    fn apply_batch(images: Tensor, _: &[()]) -> Tensor {
        let gray = luma_batch(&images).pad([1, 1, 1, 1], "replicate", None);
        let horizontal = crate::device::upload_slice(KERNEL.as_flattened(), images.device()).view([1, 1, 3, 3]);
        let vertical = horizontal.transpose(2, 3);
        let gx = gray.conv2d(&horizontal, None::<Tensor>, [1], [0], [1], 1);
        let gy = gray.conv2d(&vertical, None::<Tensor>, [1], [0], [1], 1);
        let magnitude = (gx.square() + gy.square()).sqrt() / 4.0;
        magnitude.clamp_max(1.0).expand([-1, 3, -1, -1], false).contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vertical_edge_gives_a_bright_column() {
        let data = (0..16).flat_map(|i| if i % 4 < 2 { [0.0; 3] } else { [1.0; 3] }).collect();
        let mut image = FloatImage { width: 4, height: 4, data };
        SobelConfig::apply(&mut image, &());
        // White has luma 0.9999 with torchvision's weights.
        let row: Vec<f32> = image.data.chunks(3).take(4).map(|p| (p[0] * 1000.0).round() / 1000.0).collect();
        assert_eq!(row, vec![0.0, 1.0, 1.0, 0.0]);
    }
}
