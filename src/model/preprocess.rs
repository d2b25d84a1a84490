//! Image decoding (shared with ingestion) and CLIP preprocessing: bicubic shortest-side
//! resize, center crop, mean/std normalization.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};

/// CLIP's per-channel normalization mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel normalization standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Default largest accepted image, in pixels (width × height): 100 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Why an image was refused. Every message names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {name} is empty (0 bytes)")]
    Empty { name: String },
    #[error("image {name} is not a supported image (JPEG, PNG or TIFF expected)")]
    UnknownFormat { name: String },
    #[error("image {name} is a {format:?} file; only JPEG, PNG and TIFF are accepted")]
    UnsupportedFormat { name: String, format: ImageFormat },
    #[error("image {name} is {width}x{height} = {pixels} pixels, above the limit of {limit}")]
    TooLarge {
        name: String,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("image {name} could not be decoded (corrupt or truncated?): {reason}")]
    Decode { name: String, reason: String },
    #[error("image {name} has a zero dimension ({width}x{height})")]
    Degenerate {
        name: String,
        width: u32,
        height: u32,
    },
}

/// Decodes JPEG, PNG or TIFF bytes (8/16-bit, RGB, RGBA or gray) into 8-bit RGB.
///
/// The header is read first and anything above `max_pixels` is refused before any pixel
/// buffer is allocated (no decompression bombs). 16-bit images are scaled to 8 bits; gray is
/// replicated to three channels; alpha is dropped.
pub fn decode_image(bytes: &[u8], name: &str, max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { name: name.into() });
    }
    let reader = || -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|error| ImageError::Decode {
                name: name.into(),
                reason: error.to_string(),
            })?;
        match reader.format() {
            None => Err(ImageError::UnknownFormat { name: name.into() }),
            Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Tiff) => Ok(reader),
            Some(format) => Err(ImageError::UnsupportedFormat {
                name: name.into(),
                format,
            }),
        }
    };
    let decode_error = |error: image::ImageError| ImageError::Decode {
        name: name.into(),
        reason: error.to_string(),
    };
    let format = reader()?.format();
    if format == Some(ImageFormat::Jpeg) && !jpeg_has_end_marker(bytes) {
        // zune-jpeg fills a truncated scan with gray instead of failing.
        return Err(ImageError::Decode {
            name: name.into(),
            reason: "JPEG end-of-image marker missing: the file is truncated".into(),
        });
    }
    let (width, height) = reader()?.into_dimensions().map_err(decode_error)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            name: name.into(),
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Degenerate {
            name: name.into(),
            width,
            height,
        });
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 4 channels × 2 bytes per sample, twice over for the decoder's own buffers.
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    let mut reader = reader()?;
    reader.limits(limits);
    let image: DynamicImage = reader.decode().map_err(decode_error)?;
    Ok(image.to_rgb8())
}

/// Whether a JPEG ends with its EOI marker (`FF D9`), allowing up to 1 KiB of trailing
/// padding. Entropy-coded data never contains `FF D9` (0xFF is byte-stuffed), so a file cut
/// inside its scan lacks it.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|pair| pair == [0xFF, 0xD9])
}

/// CLIP preprocessing of a decoded image into a `[3, size, size]` row-major float buffer:
/// resize the shortest side to `size` (bicubic, antialiased when shrinking, as PIL), center
/// crop `size × size`, scale to [0, 1], normalize with [`CLIP_MEAN`]/[`CLIP_STD`].
pub fn preprocess(image: &RgbImage, size: usize) -> Vec<f32> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (new_width, new_height) = if width <= height {
        (size, size * height / width)
    } else {
        (size * width / height, size)
    };
    let resized;
    let source = if (new_width, new_height) == (width, height) {
        image
    } else {
        resized = image::imageops::resize(
            image,
            new_width as u32,
            new_height as u32,
            FilterType::CatmullRom,
        );
        &resized
    };
    let top = (new_height.saturating_sub(size)) / 2;
    let left = (new_width.saturating_sub(size)) / 2;
    let plane = size * size;
    let mut out = vec![0.0f32; 3 * plane];
    for y in 0..size.min(new_height) {
        for x in 0..size.min(new_width) {
            let pixel = source.get_pixel((left + x) as u32, (top + y) as u32);
            for channel in 0..3 {
                let value = f32::from(pixel[channel]) / 255.0;
                out[channel * plane + y * size + x] =
                    (value - CLIP_MEAN[channel]) / CLIP_STD[channel];
            }
        }
    }
    out
}

/// Cuts a preprocessed `[3, size, size]` image into `[patches, 3 * patch * patch]` rows in
/// row-major patch order, each row flattened as `(channel, y, x)`: the layout in which the
/// patch-embedding convolution becomes a matmul with its `[d, 3 * patch * patch]` weight.
pub fn patchify(pixels: &[f32], size: usize, patch: usize) -> Vec<f32> {
    let grid = size / patch;
    let row_len = 3 * patch * patch;
    let mut out = vec![0.0f32; grid * grid * row_len];
    for gy in 0..grid {
        for gx in 0..grid {
            let row = &mut out[(gy * grid + gx) * row_len..][..row_len];
            for channel in 0..3 {
                for y in 0..patch {
                    let source = channel * size * size + (gy * patch + y) * size + gx * patch;
                    let target = (channel * patch + y) * patch;
                    row[target..target + patch].copy_from_slice(&pixels[source..source + patch]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(image: &DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .expect("encode png");
        bytes
    }

    #[test]
    fn gray_and_16_bit_decode_to_rgb() {
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3, image::Luma([200])));
        let rgb = decode_image(&png_bytes(&gray), "gray.png", 100).unwrap();
        assert_eq!(rgb.dimensions(), (4, 3));
        assert_eq!(rgb.get_pixel(1, 1).0, [200, 200, 200]);

        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Rgb([65535u16, 0, 32896]),
        ));
        let rgb = decode_image(&png_bytes(&deep), "deep.png", 100).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 0, 128]);
    }

    #[test]
    fn refuses_bad_input_with_the_name() {
        let error = decode_image(b"", "zero.jpg", 100).unwrap_err();
        assert!(error.to_string().contains("zero.jpg"));
        let error = decode_image(b"hello, not an image", "text.jpg", 100).unwrap_err();
        assert!(matches!(error, ImageError::UnknownFormat { .. }), "{error}");
        let big = DynamicImage::ImageRgb8(RgbImage::new(20, 10));
        let error = decode_image(&png_bytes(&big), "big.png", 199).unwrap_err();
        assert!(
            matches!(error, ImageError::TooLarge { pixels: 200, .. }),
            "{error}"
        );
        let mut truncated = png_bytes(&big);
        truncated.truncate(truncated.len() / 2);
        let error = decode_image(&truncated, "cut.png", 1000).unwrap_err();
        assert!(matches!(error, ImageError::Decode { .. }), "{error}");
    }

    #[test]
    fn patchify_orders_patches_and_channels() {
        // 2 channels of interest: value = channel * 100 + y * 4 + x on a 4x4 image, patch 2.
        let size = 4;
        let pixels: Vec<f32> = (0..3 * size * size)
            .map(|i| ((i / 16) * 100 + i % 16) as f32)
            .collect();
        let patches = patchify(&pixels, size, 2);
        assert_eq!(patches.len(), 4 * 12);
        // Patch 1 (top right), channel 0: pixels (y0, x2), (y0, x3), (y1, x2), (y1, x3).
        assert_eq!(&patches[12..16], &[2.0, 3.0, 6.0, 7.0]);
        // Patch 2 (bottom left), channel 2 starts at offset 8 of the row.
        assert_eq!(&patches[24 + 8..24 + 12], &[208.0, 209.0, 212.0, 213.0]);
    }

    #[test]
    fn crop_keeps_the_center_and_normalizes() {
        // 6x4 image: the left and right column pairs are black, the middle 2 columns white.
        let mut image = RgbImage::new(6, 4);
        for y in 0..4 {
            for x in 0..6 {
                let value = if (1..5).contains(&x) { 255 } else { 0 };
                image.put_pixel(x, y, image::Rgb([value, value, value]));
            }
        }
        let pixels = preprocess(&image, 4);
        assert_eq!(pixels.len(), 3 * 16);
        let white_red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!(pixels[..16].iter().all(|&v| (v - white_red).abs() < 1e-6));
    }
}
