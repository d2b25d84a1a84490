//! Image decoding (shared with ingestion) and CLIP preprocessing: bicubic shortest-side
//! resize, center crop, mean/std normalization.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageFormat, ImageReader, Limits, RgbImage};

/// CLIP's per-channel normalization mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel normalization standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Default largest accepted image, in pixels (width × height): 100 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Default largest accepted ratio of the long side to the short side. CLIP keeps only the
/// centre square, so a 20:1 strip already loses 95 % of its pixels; beyond that an image is
/// more likely a mistake (or an attack on the resize) than a scene.
pub const DEFAULT_MAX_ASPECT_RATIO: u32 = 20;

/// What an image may be: the one set of limits that ingestion, stored samples, the HTTP API
/// and the CLI all check, through [`decode_image`], before any pixel buffer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest width × height.
    pub max_pixels: u64,
    /// Largest long side / short side (≥ 1).
    pub max_aspect_ratio: u32,
}

impl ImageLimits {
    pub fn new(max_pixels: u64, max_aspect_ratio: u32) -> Self {
        Self {
            max_pixels,
            max_aspect_ratio: max_aspect_ratio.max(1),
        }
    }

    /// `max_pixels` with the default aspect-ratio limit.
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        Self::new(max_pixels, DEFAULT_MAX_ASPECT_RATIO)
    }

    /// Checks dimensions read from a header, before anything is allocated for them.
    pub fn check(&self, name: &str, width: u32, height: u32) -> Result<(), ImageError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(ImageError::TooLarge {
                name: name.into(),
                width,
                height,
                pixels,
                limit: self.max_pixels,
            });
        }
        if width == 0 || height == 0 {
            return Err(ImageError::Degenerate {
                name: name.into(),
                width,
                height,
            });
        }
        let (long, short) = (width.max(height), width.min(height));
        // long / short > max  ⇔  long > max · short (exact in u64).
        if u64::from(long) > u64::from(self.max_aspect_ratio) * u64::from(short) {
            return Err(ImageError::AspectRatio {
                name: name.into(),
                width,
                height,
                limit: self.max_aspect_ratio,
            });
        }
        Ok(())
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self::with_max_pixels(DEFAULT_MAX_PIXELS)
    }
}

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
    #[error(
        "image {name} is {width}x{height}: its long side is more than {limit} times its short side (model.max_aspect_ratio)"
    )]
    AspectRatio {
        name: String,
        width: u32,
        height: u32,
        limit: u32,
    },
    #[error("image {name} could not be decoded (corrupt or truncated?): {reason}")]
    Decode { name: String, reason: String },
    #[error("image {name} has a zero dimension ({width}x{height})")]
    Degenerate {
        name: String,
        width: u32,
        height: u32,
    },
    #[error("image {name}: preprocessing to {size}x{size} overflows ({width}x{height})")]
    Overflow {
        name: String,
        width: u32,
        height: u32,
        size: usize,
    },
}

/// Decodes JPEG, PNG or TIFF bytes (8/16-bit or float, RGB, RGBA, gray, palette or CMYK)
/// into 8-bit RGB.
///
/// The header is read first and anything outside `limits` (pixels, aspect ratio, a zero side)
/// is refused before any pixel buffer is allocated (no decompression bombs, no resize that
/// explodes). 16-bit and float images are scaled to 8 bits; gray is replicated to three
/// channels; alpha is dropped. EXIF orientation is not applied (as CLIP's own preprocessing,
/// which reads the pixels as stored).
pub fn decode_image(
    bytes: &[u8],
    name: &str,
    limits: &ImageLimits,
) -> Result<RgbImage, ImageError> {
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
    limits.check(name, width, height)?;
    let pixels = u64::from(width) * u64::from(height);
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(width);
    decoder_limits.max_image_height = Some(height);
    // 4 channels × 4 bytes per sample (float TIFF) is the largest buffer a decoder fills.
    decoder_limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    let mut reader = reader()?;
    reader.limits(decoder_limits);
    let image: DynamicImage = reader.decode().map_err(decode_error)?;
    if (image.width(), image.height()) != (width, height) {
        // A header that lies about the size (the decoder's own limits caught larger ones).
        return Err(ImageError::Decode {
            name: name.into(),
            reason: format!(
                "decoded {}x{}, the header said {width}x{height}",
                image.width(),
                image.height()
            ),
        });
    }
    // No copy when the decoder already produced 8-bit RGB.
    Ok(image.into_rgb8())
}

/// Whether a JPEG ends with its EOI marker (`FF D9`), allowing up to 1 KiB of trailing
/// padding. Entropy-coded data never contains `FF D9` (0xFF is byte-stuffed), so a file cut
/// inside its scan lacks it.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|pair| pair == [0xFF, 0xD9])
}

/// Decodes within `limits` and preprocesses to `[3, size, size]`: what every path that turns
/// image bytes into model input calls.
pub fn load_image(
    bytes: &[u8],
    name: &str,
    limits: &ImageLimits,
    size: usize,
) -> Result<Vec<f32>, ImageError> {
    preprocess(&decode_image(bytes, name, limits)?, name, size)
}

/// CLIP preprocessing of a decoded image into a `[3, size, size]` row-major float buffer:
/// the centre square (in source coordinates), resized to `size × size` (bicubic, antialiased
/// when shrinking, as PIL), scaled to [0, 1], normalized with [`CLIP_MEAN`]/[`CLIP_STD`].
///
/// Cropping first bounds the work by the short side (∝ side², whatever the long side) and
/// gives CLIP's "shortest side to `size`, centre crop" up to the filter's reach across the
/// crop border; square images, the usual remote-sensing tiles, are identical.
pub fn preprocess(image: &RgbImage, name: &str, size: usize) -> Result<Vec<f32>, ImageError> {
    let (width, height) = image.dimensions();
    let overflow = || ImageError::Overflow {
        name: name.into(),
        width,
        height,
        size,
    };
    let side = width.min(height);
    let target = u32::try_from(size).map_err(|_| overflow())?;
    if side == 0 || target == 0 {
        return Err(overflow());
    }
    let plane = size.checked_mul(size).ok_or_else(overflow)?;
    let len = plane.checked_mul(3).ok_or_else(overflow)?;
    let left = (width - side) / 2;
    let top = (height - side) / 2;
    let square = image::imageops::crop_imm(image, left, top, side, side);
    let resized;
    let source: &dyn Fn(u32, u32) -> image::Rgb<u8> = if side == target {
        &|x, y| square.get_pixel(x, y)
    } else {
        resized = image::imageops::resize(&*square, target, target, FilterType::CatmullRom);
        &|x, y| *resized.get_pixel(x, y)
    };
    let mut out = vec![0.0f32; len];
    for y in 0..target {
        for x in 0..target {
            let pixel = source(x, y);
            let offset = y as usize * size + x as usize;
            for channel in 0..3 {
                let value = f32::from(pixel[channel]) / 255.0;
                out[channel * plane + offset] = (value - CLIP_MEAN[channel]) / CLIP_STD[channel];
            }
        }
    }
    Ok(out)
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
        let rgb = decode_image(
            &png_bytes(&gray),
            "gray.png",
            &ImageLimits::with_max_pixels(100),
        )
        .unwrap();
        assert_eq!(rgb.dimensions(), (4, 3));
        assert_eq!(rgb.get_pixel(1, 1).0, [200, 200, 200]);

        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Rgb([65535u16, 0, 32896]),
        ));
        let rgb = decode_image(
            &png_bytes(&deep),
            "deep.png",
            &ImageLimits::with_max_pixels(100),
        )
        .unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 0, 128]);
    }

    #[test]
    fn refuses_bad_input_with_the_name() {
        let error = decode_image(b"", "zero.jpg", &ImageLimits::with_max_pixels(100)).unwrap_err();
        assert!(error.to_string().contains("zero.jpg"));
        let error = decode_image(
            b"hello, not an image",
            "text.jpg",
            &ImageLimits::with_max_pixels(100),
        )
        .unwrap_err();
        assert!(matches!(error, ImageError::UnknownFormat { .. }), "{error}");
        let big = DynamicImage::ImageRgb8(RgbImage::new(20, 10));
        let error = decode_image(
            &png_bytes(&big),
            "big.png",
            &ImageLimits::with_max_pixels(199),
        )
        .unwrap_err();
        assert!(
            matches!(error, ImageError::TooLarge { pixels: 200, .. }),
            "{error}"
        );
        let mut truncated = png_bytes(&big);
        truncated.truncate(truncated.len() / 2);
        let error =
            decode_image(&truncated, "cut.png", &ImageLimits::with_max_pixels(1000)).unwrap_err();
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
        let pixels = preprocess(&image, "crop.png", 4).unwrap();
        assert_eq!(pixels.len(), 3 * 16);
        let white_red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!(pixels[..16].iter().all(|&v| (v - white_red).abs() < 1e-6));
    }

    #[test]
    fn aspect_ratio_limit_is_exact_and_checked_before_decoding() {
        let limits = ImageLimits::new(1 << 40, 20);
        assert!(limits.check("ok", 20, 1).is_ok());
        assert!(limits.check("ok", 1, 20).is_ok());
        assert!(matches!(
            limits.check("wide", 21, 1),
            Err(ImageError::AspectRatio { limit: 20, .. })
        ));
        assert!(matches!(
            limits.check("tall", 1, 100_000_000),
            Err(ImageError::AspectRatio { .. })
        ));
        assert!(matches!(
            limits.check("zero", 0, 5),
            Err(ImageError::Degenerate { .. })
        ));
        // The largest u32 sides do not overflow the check.
        assert!(matches!(
            limits.check("max", u32::MAX, 1),
            Err(ImageError::AspectRatio { .. })
        ));
        assert!(matches!(
            ImageLimits::new(u64::MAX, u32::MAX).check("max", u32::MAX, u32::MAX),
            Ok(())
        ));
        // A PNG header claiming 100,000,000 x 1 is refused from the header alone: the body
        // here is garbage and is never decoded.
        let mut png = png_bytes(&DynamicImage::ImageRgb8(RgbImage::new(2, 1)));
        png[16..20].copy_from_slice(&100_000_000u32.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]); // IHDR type + data
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let error = decode_image(&png, "strip.png", &ImageLimits::default()).unwrap_err();
        assert!(matches!(error, ImageError::AspectRatio { .. }), "{error}");
        assert!(error.to_string().contains("strip.png"), "{error}");
    }

    #[test]
    fn preprocessing_works_on_the_centre_square_only() {
        // 400x20 (aspect 20): left half red, right half blue; the centre square is 20x20
        // around x = 200, half red and half blue, and the result is the same as resizing
        // that square alone.
        let image = RgbImage::from_fn(400, 20, |x, _| {
            if x < 200 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let ours = preprocess(&image, "strip.png", 8).unwrap();
        let square = image::imageops::crop_imm(&image, 190, 0, 20, 20).to_image();
        let reference = preprocess(&square, "square.png", 8).unwrap();
        assert_eq!(ours, reference);
        let red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((ours[0] - red).abs() < 1e-6, "left edge is red");
        assert!((ours[7] - red).abs() > 0.5, "right edge is not red");
        // 1-pixel images and upscaling work.
        let dot = RgbImage::from_pixel(1, 1, image::Rgb([10, 20, 30]));
        assert_eq!(preprocess(&dot, "dot.png", 4).unwrap().len(), 48);
        // Sizes whose buffer cannot exist are an error, not a panic.
        assert!(matches!(
            preprocess(&dot, "dot.png", usize::MAX),
            Err(ImageError::Overflow { .. })
        ));
    }
}
