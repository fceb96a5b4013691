//! The images the augmentation works on: decoded 8-bit RGB in, float views
//! out, and the uint8 batches the device path takes.
use image::RgbImage;
use tch::{Kind, Tensor};

/// An RGB image with interleaved f32 channels in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` values, row-major, RGB interleaved.
    pub data: Vec<f32>,
}

impl FloatImage {
    pub fn from_rgb(image: &RgbImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            data: image.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    /// Writes the image as a normalised CHW slice: (x - mean) / std per channel.
    pub fn write_chw_normalized(&self, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
        let plane = self.width * self.height;
        assert_eq!(out.len(), plane * 3, "output slice must hold the whole image");
        for (pixel, rgb) in self.data.chunks_exact(3).enumerate() {
            for channel in 0..3 {
                out[channel * plane + pixel] = (rgb[channel] - mean[channel]) / std[channel];
            }
        }
    }

    /// The image as 8-bit RGB (rounded), for previews.
    pub fn to_rgb(&self) -> RgbImage {
        let bytes = self.data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
        RgbImage::from_raw(self.width as u32, self.height as u32, bytes).expect("data holds width * height * 3 values")
    }

    /// `[3, height, width]` float tensor (CHW, values in [0, 1]).
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.data).view([self.height as i64, self.width as i64, 3]).permute([2, 0, 1]).contiguous()
    }

    /// The inverse of [`FloatImage::to_tensor`].
    pub fn from_tensor(tensor: &Tensor) -> Self {
        let (_, height, width) = tensor.size3().expect("a [3, height, width] tensor");
        let hwc = tensor.permute([1, 2, 0]).contiguous().to_kind(Kind::Float).flatten(0, -1);
        Self { width: width as usize, height: height as usize, data: Vec::<f32>::try_from(&hwc).expect("float data") }
    }
}

/// `count` same-sized 8-bit RGB images stored back to back as `RgbImage`
/// stores one (rows of interleaved RGB), as the `[count, 3, height, width]`
/// uint8 batch that [`Pipeline::render_batch`](super::Pipeline::render_batch) takes.
pub fn uint8_batch(pixels: &[u8], count: usize, width: u32, height: u32) -> Tensor {
    Tensor::from_slice(pixels)
        .view([count as i64, i64::from(height), i64::from(width), 3])
        .permute([0, 3, 1, 2])
        .contiguous()
}

/// The evaluation view: shorter side resized to `size`, then centre-cropped.
/// An image already `size` x `size` is used as it is.
pub fn center_view(image: &RgbImage, size: u32) -> FloatImage {
    super::crop::resize_shorter_center_crop(image, size)
}
