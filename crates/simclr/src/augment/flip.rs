//! Random horizontal flip (appendix A: applied with p = 0.5 after the crop).
use serde::{Deserialize, Serialize};

use super::FloatImage;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlipConfig {
    /// Chance of mirroring left-right; the paper's 0.5.
    pub probability: f64,
}

impl Default for FlipConfig {
    fn default() -> Self {
        Self { probability: 0.5 }
    }
}

pub fn flip_horizontal(image: &mut FloatImage) {
    let width = image.width;
    for row in image.data.chunks_exact_mut(width * 3) {
        for x in 0..width / 2 {
            for channel in 0..3 {
                row.swap(x * 3 + channel, (width - 1 - x) * 3 + channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_each_row() {
        let mut image = FloatImage { width: 3, height: 1, data: vec![0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3] };
        flip_horizontal(&mut image);
        assert_eq!(image.data, vec![0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1]);
    }
}
