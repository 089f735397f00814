//! Document thumbnails: PNG, JPEG or WebP in, JPEG of at most 256×256 out.
//!
//! The cheap checks (format sniffing, dimensions from the header) run before
//! any decoding so a huge or bogus image is refused without allocating for
//! its pixels; decoding and resizing are CPU work for the pool.
//!
//! Memory is bounded per worker, whatever the image:
//! - non-interlaced PNGs (which can be 16-bit, 400 MB decoded at the pixel
//!   cap) are decoded row by row and averaged into the thumbnail as they
//!   come, so only a few rows are ever held;
//! - everything else is decoded whole under the `image` crate's [`Limits`]
//!   (`max_alloc` and sides), after reserving its decoded size from the
//!   worker's [`DecodeBudget`], so concurrent decodes together stay within
//!   [`DECODE_BUDGET_BYTES`];
//! - the shrink never builds a full-size intermediate (`resize` would make
//!   one of new-width × height floats, 800 MB for a 50,000,000 × 1 image).

use std::io::Cursor;
use std::sync::Arc;

use image::codecs::jpeg::JpegEncoder;
use image::{ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest image accepted, in pixels.
pub const MAX_PIXELS: u64 = 50_000_000;

/// Longest side accepted, in pixels (JPEG's own limit; it bounds the row
/// buffers of a streamed PNG).
pub const MAX_DIMENSION: u32 = 65_535;

/// Decoded pixels one worker holds at once, over all its decodes. With the
/// worker's own ~20 MiB and a 32 MiB upload this keeps it under 256 MiB.
pub const DECODE_BUDGET_BYTES: u64 = 160 * 1024 * 1024;

/// Thumbnails fit in a square of this side.
pub const MAX_SIDE: u32 = 256;

/// JPEG quality of thumbnails.
const QUALITY: u8 = 85;

/// The png decoder's own allocations for a streamed image (rows and
/// inflate state; at most ~1.5 MiB at the widest side).
const PNG_STREAM_LIMIT: usize = 16 * 1024 * 1024;

/// Why no thumbnail was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThumbnailError {
    /// Not a PNG, JPEG or WebP.
    #[error("the document must be a PNG, JPEG or WebP image")]
    Unsupported,
    /// The image could not be decoded.
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    /// More than [`MAX_PIXELS`] or a side over [`MAX_DIMENSION`].
    #[error("the image has {width}×{height} pixels; at most {MAX_PIXELS} pixels and {MAX_DIMENSION} per side are accepted")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
    },
    /// Decoding it would take more memory than a worker allows.
    #[error("decoding this image needs {needed_mib} MiB, more than the {budget_mib} MiB a worker allows; send a smaller or 8-bit image")]
    NeedsTooMuchMemory {
        /// Estimated decoder memory.
        needed_mib: u64,
        /// [`DECODE_BUDGET_BYTES`] in MiB.
        budget_mib: u64,
    },
    /// Other decodes are using the worker's budget right now.
    #[error("the worker is decoding other images; retry later")]
    Busy,
    /// Encoding the JPEG failed.
    #[error("encoding the thumbnail failed: {0}")]
    Encode(String),
}

fn corrupt(e: impl std::fmt::Display) -> ThumbnailError {
    ThumbnailError::Corrupt(e.to_string())
}

/// The image format from the body's magic bytes; anything other than PNG,
/// JPEG or WebP is refused.
pub fn sniff(body: &[u8]) -> Result<ImageFormat, ThumbnailError> {
    match image::guess_format(body) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => Ok(f),
        _ => Err(ThumbnailError::Unsupported),
    }
}

/// Width and height read from the header only.
pub fn check_dimensions(body: &[u8], format: ImageFormat) -> Result<(u32, u32), ThumbnailError> {
    let (width, height) = ImageReader::with_format(Cursor::new(body), format)
        .into_dimensions()
        .map_err(corrupt)?;
    if u64::from(width) * u64::from(height) > MAX_PIXELS
        || width > MAX_DIMENSION
        || height > MAX_DIMENSION
    {
        return Err(ThumbnailError::TooLarge { width, height });
    }
    if width == 0 || height == 0 {
        return Err(corrupt("empty image"));
    }
    Ok((width, height))
}

/// How an accepted image will be decoded, decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The sniffed format.
    pub format: ImageFormat,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Decoded row by row (non-interlaced PNG) rather than whole.
    pub streamed: bool,
    /// Bytes the decode may hold at once, reserved from the budget.
    pub cost: u64,
}

/// Check the header and decide how to decode, without decoding any pixel.
///
/// ```
/// use payments::compute::thumbnail::{make_thumbnail, plan, DecodeBudget};
///
/// let mut png = std::io::Cursor::new(Vec::new());
/// image::DynamicImage::new_rgb16(1000, 500).write_to(&mut png, image::ImageFormat::Png)?;
/// let plan = plan(png.get_ref())?;
/// assert!(plan.streamed); // a non-interlaced PNG is decoded row by row
/// let _held = DecodeBudget::default().try_reserve(&plan)?;
/// let jpeg = make_thumbnail(png.get_ref(), &plan)?;
/// let thumb = image::load_from_memory(&jpeg)?;
/// assert_eq!((thumb.width(), thumb.height()), (256, 128));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan(body: &[u8]) -> Result<Plan, ThumbnailError> {
    let format = sniff(body)?;
    let (width, height) = check_dimensions(body, format)?;
    let (nw, nh) = fit(width, height);
    let grid = u64::from(nw) * u64::from(nh) * 32;
    let streamed = format == ImageFormat::Png && !png_interlaced(body)?;
    let cost = if streamed {
        // Raw current and previous rows plus one output row, 16-bit RGBA
        // at worst, the averaging grid and the inflate state.
        3 * u64::from(width) * 8 + grid + (1 << 20)
    } else {
        let decoder = ImageReader::with_format(Cursor::new(body), format)
            .into_decoder()
            .map_err(corrupt)?;
        let pixels = decoder.total_bytes();
        // A progressive JPEG keeps every coefficient (two bytes per sample)
        // besides the output.
        let factor = if format == ImageFormat::Jpeg && jpeg_progressive(body) {
            3
        } else {
            1
        };
        pixels * factor + grid
    };
    if cost > DECODE_BUDGET_BYTES {
        return Err(ThumbnailError::NeedsTooMuchMemory {
            needed_mib: cost.div_ceil(1 << 20),
            budget_mib: DECODE_BUDGET_BYTES >> 20,
        });
    }
    Ok(Plan {
        format,
        width,
        height,
        streamed,
        cost,
    })
}

fn png_interlaced(body: &[u8]) -> Result<bool, ThumbnailError> {
    let mut decoder = png::Decoder::new(Cursor::new(body));
    Ok(decoder.read_header_info().map_err(corrupt)?.interlaced)
}

/// Whether a JPEG's frame is progressive (SOF2, SOF6, SOF10 or SOF14),
/// from its markers.
fn jpeg_progressive(body: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= body.len() {
        if body[i] != 0xFF {
            return false;
        }
        let marker = body[i + 1];
        match marker {
            0xC2 | 0xC6 | 0xCA | 0xCE => return true,
            0xC0 | 0xC1 | 0xC3 | 0xC5 | 0xC7 | 0xC9 | 0xCB | 0xCD | 0xCF | 0xDA => return false,
            // Fill bytes before a marker.
            0xFF => i += 1,
            _ => {
                let len = usize::from(u16::from_be_bytes([body[i + 2], body[i + 3]]));
                i += 2 + len;
            }
        }
    }
    false
}

/// The decoded bytes a worker may hold at once, shared by its decodes.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    kib: Arc<Semaphore>,
}

impl Default for DecodeBudget {
    fn default() -> Self {
        DecodeBudget::new(DECODE_BUDGET_BYTES)
    }
}

impl DecodeBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes / 1024).unwrap_or(usize::MAX >> 4);
        DecodeBudget {
            kib: Arc::new(Semaphore::new(kib)),
        }
    }

    /// Reserve `plan.cost` for one decode, or fail at once with
    /// [`ThumbnailError::Busy`] when other decodes hold too much of it.
    pub fn try_reserve(&self, plan: &Plan) -> Result<Reservation, ThumbnailError> {
        let kib = u32::try_from(plan.cost.div_ceil(1024)).unwrap_or(u32::MAX);
        self.kib
            .clone()
            .try_acquire_many_owned(kib)
            .map(Reservation)
            .map_err(|_| ThumbnailError::Busy)
    }
}

/// Part of a [`DecodeBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation(#[allow(dead_code)] OwnedSemaphorePermit);

/// Size that fits `w`×`h` in [`MAX_SIDE`]² keeping the aspect ratio; images
/// already small enough keep their size (never upscaled).
pub fn fit(w: u32, h: u32) -> (u32, u32) {
    if w <= MAX_SIDE && h <= MAX_SIDE {
        return (w, h);
    }
    let scale = f64::from(MAX_SIDE) / f64::from(w.max(h));
    let nw = ((f64::from(w) * scale).round() as u32).clamp(1, MAX_SIDE);
    let nh = ((f64::from(h) * scale).round() as u32).clamp(1, MAX_SIDE);
    (nw, nh)
}

/// Decode, shrink and encode as JPEG. CPU-heavy: run on the pool, holding
/// a [`Reservation`] for `plan`.
pub fn make_thumbnail(body: &[u8], plan: &Plan) -> Result<Vec<u8>, ThumbnailError> {
    let (nw, nh) = fit(plan.width, plan.height);
    let rgb = if plan.streamed {
        shrink_png_rows(body, plan, nw, nh)?
    } else {
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_DIMENSION);
        limits.max_image_height = Some(MAX_DIMENSION);
        limits.max_alloc = Some(DECODE_BUDGET_BYTES);
        let mut reader = ImageReader::with_format(Cursor::new(body), plan.format);
        reader.limits(limits);
        let img = reader.decode().map_err(corrupt)?;
        let small = if (nw, nh) == (plan.width, plan.height) {
            img
        } else {
            img.thumbnail_exact(nw, nh)
        };
        // JPEG has no alpha channel.
        small.to_rgb8()
    };
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, QUALITY)
        .encode_image(&rgb)
        .map_err(|e| ThumbnailError::Encode(e.to_string()))?;
    Ok(out)
}

/// Average every source pixel into its thumbnail cell while the rows are
/// decoded; 16-bit samples are cut to 8 by the decoder.
fn shrink_png_rows(body: &[u8], plan: &Plan, nw: u32, nh: u32) -> Result<RgbImage, ThumbnailError> {
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(body),
        png::Limits {
            bytes: PNG_STREAM_LIMIT,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let (color, _depth) = reader.output_color_type();
    let channels = color.samples();
    let (w, h) = (plan.width as usize, plan.height as usize);
    let (nw_us, nh_us) = (nw as usize, nh as usize);
    let column: Vec<usize> = (0..w).map(|x| x * nw_us / w).collect();
    let mut sums = vec![0u64; nw_us * nh_us * 3];
    let mut counts = vec![0u32; nw_us * nh_us];
    let mut y = 0usize;
    while let Some(row) = reader.next_row().map_err(corrupt)? {
        if y >= h {
            return Err(corrupt("more rows than the header says"));
        }
        let base = y * nh_us / h * nw_us;
        for (pixel, &ox) in row.data().chunks_exact(channels).zip(&column) {
            let cell = base + ox;
            let (r, g, b) = if channels >= 3 {
                (pixel[0], pixel[1], pixel[2])
            } else {
                (pixel[0], pixel[0], pixel[0])
            };
            sums[cell * 3] += u64::from(r);
            sums[cell * 3 + 1] += u64::from(g);
            sums[cell * 3 + 2] += u64::from(b);
            counts[cell] += 1;
        }
        y += 1;
    }
    if y != h {
        return Err(corrupt("the image data ends early"));
    }
    Ok(RgbImage::from_fn(nw, nh, |x, y| {
        let cell = y as usize * nw_us + x as usize;
        let n = u64::from(counts[cell].max(1));
        let avg = |c: usize| ((sums[cell * 3 + c] + n / 2) / n) as u8;
        image::Rgb([avg(0), avg(1), avg(2)])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect() {
        assert_eq!(fit(100, 50), (100, 50));
        assert_eq!(fit(1024, 512), (256, 128));
        assert_eq!(fit(300, 1200), (64, 256));
        assert_eq!(fit(10_000, 1), (256, 1));
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"GIF89a...."), Err(ThumbnailError::Unsupported));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n").ok(), Some(ImageFormat::Png));
    }

    fn png(img: image::DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn streamed_png_averages_each_cell() {
        // Left half red, right half blue, 16-bit: the thumbnail keeps the
        // halves and their colours.
        let img = image::ImageBuffer::from_fn(512, 64, |x, _| {
            if x < 256 {
                image::Rgba([65535u16, 0, 0, 65535])
            } else {
                image::Rgba([0, 0, 65535, 65535])
            }
        });
        let body = png(image::DynamicImage::ImageRgba16(img));
        let plan = plan(&body).expect("plan");
        assert!(plan.streamed);
        assert!(plan.cost < 2 << 20, "{}", plan.cost);
        let jpeg = make_thumbnail(&body, &plan).expect("thumbnail");
        let thumb = image::load_from_memory(&jpeg).expect("jpeg").to_rgb8();
        assert_eq!(thumb.dimensions(), (256, 32));
        let left = thumb.get_pixel(10, 16);
        let right = thumb.get_pixel(245, 16);
        assert!(left[0] > 240 && left[2] < 16, "{left:?}");
        assert!(right[2] > 240 && right[0] < 16, "{right:?}");
    }

    #[test]
    fn budget_is_shared_and_given_back() {
        let body = png(image::DynamicImage::new_rgb8(300, 300));
        let mut p = plan(&body).expect("plan");
        p.cost = DECODE_BUDGET_BYTES / 2;
        let budget = DecodeBudget::default();
        let first = budget.try_reserve(&p).expect("room");
        let second = budget.try_reserve(&p).expect("room");
        assert_eq!(budget.try_reserve(&p).err(), Some(ThumbnailError::Busy));
        drop(first);
        assert!(budget.try_reserve(&p).is_ok());
        drop(second);
    }

    #[test]
    fn progressive_jpegs_are_recognised_by_their_markers() {
        assert!(jpeg_progressive(&[0xFF, 0xD8, 0xFF, 0xC2, 0, 17]));
        assert!(!jpeg_progressive(&[0xFF, 0xD8, 0xFF, 0xC0, 0, 17]));
        assert!(!jpeg_progressive(&[
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC0, 0, 17
        ]));
        assert!(jpeg_progressive(&[
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC2, 0, 17
        ]));
    }
}
