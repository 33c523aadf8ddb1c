//! An image file in; YOLOv5's validation input out: RGB, long side resized to
//! `imgsz` (`load_image`), letterboxed to a square with value 114 (`letterbox`,
//! `auto=False, scaleup=False`), scaled to [0, 1], CHW f32.
//!
//! The two resamplers reproduce OpenCV's, which YOLOv5 calls: INTER_AREA when
//! shrinking (exact area weights, float sums, rounded) and INTER_LINEAR when
//! enlarging (half-pixel centres, 11-bit fixed-point weights). The rounding of
//! sizes and padding follows the Python code, including Python's `round`
//! (half to even).
//!
//! Images above `MAX_PIXELS` are refused from their header, before decoding.

use std::path::Path;

use anyhow::{Context, Result, bail};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

/// Bump whenever the pixels this module produces change: it is part of the
/// feature cache key.
pub const PREPROCESS_VERSION: u32 = 1;

/// How the original image maps into the letterboxed square.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LetterboxMeta {
    /// Original `[h0, w0]`.
    pub shape0: [usize; 2],
    /// Size after `load_image`'s resize, `[h, w]`.
    pub resized: [usize; 2],
    /// Letterbox padding `[dw, dh]` per side as YOLOv5 returns it (may be .5).
    pub pad: [f32; 2],
    pub imgsz: usize,
}

impl LetterboxMeta {
    /// YOLOv5's `ratio_pad` gain `[h/h0, w/w0]`.
    pub fn gain(&self) -> [f32; 2] {
        [self.resized[0] as f32 / self.shape0[0] as f32, self.resized[1] as f32 / self.shape0[1] as f32]
    }
}

/// A letterboxed image: the resized image `inner` (HWC RGB u8) placed at
/// `(left, top)` in an `imgsz x imgsz` square of value 114. The square itself
/// is only drawn on request: the engine input is written straight from `inner`.
pub struct Letterboxed {
    pub inner: RgbImage,
    pub left: usize,
    pub top: usize,
    pub meta: LetterboxMeta,
}

/// YOLOv5's letterbox padding value.
const PAD: u8 = 114;

impl Letterboxed {
    /// The full square as an image.
    pub fn to_image(&self) -> RgbImage {
        let s = self.meta.imgsz as u32;
        let mut out = RgbImage::from_pixel(s, s, image::Rgb([PAD; 3]));
        image::imageops::replace(&mut out, &self.inner, self.left as i64, self.top as i64);
        out
    }

    /// Writes the square as CHW f32 in [0, 1] into `out` (`3 * imgsz²` values).
    pub fn write_chw(&self, out: &mut [f32]) {
        let s = self.meta.imgsz;
        let plane = s * s;
        assert_eq!(out.len(), 3 * plane);
        let (w, h) = (self.inner.width() as usize, self.inner.height() as usize);
        // torch divides by 255 (a reciprocal multiply rounds differently): a
        // table of the 256 quotients gives the same values without a division
        let unit: [f32; 256] = std::array::from_fn(|v| v as f32 / 255.0);
        let pad = unit[PAD as usize];
        let raw = self.inner.as_raw();
        for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
            dst[..self.top * s].fill(pad);
            for y in 0..h {
                let row = &mut dst[(self.top + y) * s..(self.top + y + 1) * s];
                row[..self.left].fill(pad);
                for (d, p) in row[self.left..self.left + w].iter_mut().zip(raw[y * w * 3..(y + 1) * w * 3].chunks_exact(3)) {
                    *d = unit[p[c] as usize];
                }
                row[self.left + w..].fill(pad);
            }
            dst[(self.top + h) * s..].fill(pad);
        }
    }
}

/// PIL's decompression-bomb limit (`2 * Image.MAX_IMAGE_PIXELS`), above which
/// YOLOv5's image check (`Image.open`) refuses an image: a 6 MB PNG can hold
/// 46000x46000 pixels, 6 GB once decoded.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Decodes an image file to RGB, applying EXIF orientation as `cv2.imread` does.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bytes = crate::fsutil::read_regular(path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_bytes(&bytes).with_context(|| format!("{} is not a readable image", path.display()))
}

pub fn decode_bytes(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    if is_truncated_jpeg(bytes) {
        bail!("the JPEG is truncated (no end-of-image marker after its image data)");
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut decoder = reader.into_decoder()?;
    // from the header, before anything is allocated for the pixels
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > MAX_PIXELS {
        bail!("the image is {w}x{h} ({:.1} Mpixel), above the {:.1} Mpixel limit YOLOv5 (PIL) accepts", (w as f64 * h as f64) / 1e6, MAX_PIXELS as f64 / 1e6);
    }
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder)?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    let rgb = img.into_rgb8();
    if rgb.width() < 2 || rgb.height() < 2 {
        bail!("the image is {}x{}, too small", rgb.width(), rgb.height());
    }
    Ok(rgb)
}

/// JPEG decoders fill a truncated scan with grey instead of failing; YOLOv5
/// checks the end-of-image marker for the same reason. Data after the marker
/// (some cameras append some) is allowed.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(sos) => !bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true,
    }
}

/// `load_image` + `letterbox` as YOLOv5's validation dataloader does them.
pub fn letterbox(img: &RgbImage, imgsz: usize) -> Letterboxed {
    letterbox_cow(std::borrow::Cow::Borrowed(img), imgsz)
}

/// `letterbox`, keeping the image itself when it already has the right size.
pub fn letterbox_owned(img: RgbImage, imgsz: usize) -> Letterboxed {
    letterbox_cow(std::borrow::Cow::Owned(img), imgsz)
}

fn letterbox_cow(img: std::borrow::Cow<RgbImage>, imgsz: usize) -> Letterboxed {
    let (h0, w0) = (img.height() as usize, img.width() as usize);
    let r = imgsz as f64 / h0.max(w0) as f64;
    let resized = if r != 1.0 {
        let (w, h) = ((w0 as f64 * r).ceil() as usize, (h0 as f64 * r).ceil() as usize);
        if r > 1.0 { resize_linear(&img, w, h) } else { resize_area(&img, w, h) }
    } else {
        img.into_owned()
    };
    // letterbox(img, (imgsz, imgsz), auto=False, scaleup=False)
    let (h, w) = (resized.height() as usize, resized.width() as usize);
    let lr = (imgsz as f64 / h as f64).min(imgsz as f64 / w as f64).min(1.0);
    let (uw, uh) = (py_round(w as f64 * lr) as usize, py_round(h as f64 * lr) as usize);
    let dw = (imgsz - uw) as f64 / 2.0;
    let dh = (imgsz - uh) as f64 / 2.0;
    let inner = if (uw, uh) != (w, h) { resize_linear(&resized, uw, uh) } else { resized };
    let top = py_round(dh - 0.1) as usize;
    let left = py_round(dw - 0.1) as usize;
    Letterboxed { inner, left, top, meta: LetterboxMeta { shape0: [h0, w0], resized: [uh, uw], pad: [dw as f32, dh as f32], imgsz } }
}

/// Python's `round`: half to even.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// OpenCV INTER_LINEAR on u8: source coordinate `(d + 0.5) * scale - 0.5`,
/// clamped at the borders, weights in 11-bit fixed point, two passes.
pub fn resize_linear(src: &RgbImage, dw: usize, dh: usize) -> RgbImage {
    const BITS: i32 = 11;
    const ONE: i32 = 1 << BITS;
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let taps = |ssize: usize, dsize: usize| -> Vec<(usize, usize, i32, i32)> {
        let scale = ssize as f64 / dsize as f64;
        (0..dsize)
            .map(|d| {
                let f = (d as f64 + 0.5) * scale - 0.5;
                let mut s = f.floor() as i64;
                let mut frac = (f - s as f64) as f32;
                if s < 0 {
                    s = 0;
                    frac = 0.0;
                }
                if s >= ssize as i64 - 1 {
                    s = ssize as i64 - 1;
                    frac = 0.0;
                }
                let a0 = ((1.0 - frac) * ONE as f32).round_ties_even() as i32;
                let s1 = (s as usize + 1).min(ssize - 1);
                (s as usize, s1, a0, ONE - a0)
            })
            .collect()
    };
    let xt = taps(sw, dw);
    let yt = taps(sh, dh);
    let srcb = src.as_raw();
    // horizontal pass on every source row, kept as ints scaled by 2^11
    let mut rows = vec![0i32; sh * dw * 3];
    for y in 0..sh {
        let srow = &srcb[y * sw * 3..(y + 1) * sw * 3];
        let drow = &mut rows[y * dw * 3..(y + 1) * dw * 3];
        for (d, &(s0, s1, a0, a1)) in drow.chunks_exact_mut(3).zip(&xt) {
            let (p0, p1) = (&srow[s0 * 3..s0 * 3 + 3], &srow[s1 * 3..s1 * 3 + 3]);
            for c in 0..3 {
                d[c] = p0[c] as i32 * a0 + p1[c] as i32 * a1;
            }
        }
    }
    let mut out = vec![0u8; dh * dw * 3];
    for (y, &(s0, s1, b0, b1)) in yt.iter().enumerate() {
        let r0 = &rows[s0 * dw * 3..(s0 + 1) * dw * 3];
        let r1 = &rows[s1 * dw * 3..(s1 + 1) * dw * 3];
        // zipped, not indexed: no bounds checks, so the loop vectorises
        for ((o, &v0), &v1) in out[y * dw * 3..(y + 1) * dw * 3].iter_mut().zip(r0).zip(r1) {
            // OpenCV's SIMD vertical pass: rows >> 4 to 16 bits, 16x16 high
            // multiply, saturating add, then (y + 2) >> 2.
            let y0 = ((v0 >> 4) * b0) >> 16;
            let y1 = ((v1 >> 4) * b1) >> 16;
            let y = (y0 + y1).clamp(i16::MIN as i32, i16::MAX as i32);
            *o = ((y + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    RgbImage::from_raw(dw as u32, dh as u32, out).unwrap()
}

/// OpenCV INTER_AREA for shrinking: each destination pixel is the
/// area-weighted mean of the source pixels its footprint covers.
pub fn resize_area(src: &RgbImage, dw: usize, dh: usize) -> RgbImage {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let xt = area_tab(sw, dw);
    let yt = area_tab(sh, dh);
    let srcb = src.as_raw();
    // horizontal pass per source row
    let mut rows = vec![0f32; sh * dw * 3];
    for y in 0..sh {
        let srow = &srcb[y * sw * 3..(y + 1) * sw * 3];
        let drow = &mut rows[y * dw * 3..(y + 1) * dw * 3];
        for &(d, s, a) in &xt {
            for c in 0..3 {
                drow[d * 3 + c] += srow[s * 3 + c] as f32 * a;
            }
        }
    }
    let mut acc = vec![0f32; dh * dw * 3];
    for &(d, s, b) in &yt {
        let r = &rows[s * dw * 3..(s + 1) * dw * 3];
        for (o, v) in acc[d * dw * 3..(d + 1) * dw * 3].iter_mut().zip(r) {
            *o += v * b;
        }
    }
    let out = acc.into_iter().map(|v| v.round_ties_even().clamp(0.0, 255.0) as u8).collect();
    RgbImage::from_raw(dw as u32, dh as u32, out).unwrap()
}

/// OpenCV's `computeResizeAreaTab`: (dst index, src index, weight) triples.
fn area_tab(ssize: usize, dsize: usize) -> Vec<(usize, usize, f32)> {
    let scale = ssize as f64 / dsize as f64;
    let mut tab = Vec::new();
    for d in 0..dsize {
        let fs1 = d as f64 * scale;
        let fs2 = fs1 + scale;
        let cell = scale.min(ssize as f64 - fs1);
        let mut s1 = fs1.ceil() as usize;
        let s2 = (fs2.floor() as usize).min(ssize - 1);
        s1 = s1.min(s2);
        if s1 as f64 - fs1 > 1e-3 {
            tab.push((d, s1 - 1, ((s1 as f64 - fs1) / cell) as f32));
        }
        for s in s1..s2 {
            tab.push((d, s, (1.0 / cell) as f32));
        }
        if fs2 - s2 as f64 > 1e-3 {
            tab.push((d, s2, ((fs2 - s2 as f64).min(1.0).min(cell) / cell) as f32));
        }
    }
    tab
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_jpegs_are_recognised() {
        let mut jpg = vec![0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3, 0xFF, 0xD9];
        assert!(!is_truncated_jpeg(&jpg));
        jpg.extend_from_slice(b"trailing");
        assert!(!is_truncated_jpeg(&jpg));
        assert!(is_truncated_jpeg(&jpg[..6]));
        assert!(!is_truncated_jpeg(b"\x89PNG"));
    }

    /// A complete, valid 1-bit grayscale PNG of `w x h` black pixels, with
    /// the image data in stored (uncompressed) deflate blocks: no encoder
    /// needed, about `w * h / 8` bytes.
    fn black_png(w: u32, h: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let table: Vec<u32> = (0..256u32).map(|n| (0..8).fold(n, |c, _| if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 })).collect();
            !bytes.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        // every row: filter byte 0, then w bits of 0
        let raw = vec![0u8; h as usize * (1 + w.div_ceil(8) as usize)];
        let mut z = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
        for (i, b) in blocks.iter().enumerate() {
            z.push((i + 1 == blocks.len()) as u8);
            z.extend_from_slice(&(b.len() as u16).to_le_bytes());
            z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
            z.extend_from_slice(b);
        }
        // adler32 of zeros: a = 1, b = len (mod 65521)
        let adler = ((raw.len() % 65521) as u32) << 16 | 1;
        z.extend_from_slice(&adler.to_be_bytes());
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = [w.to_be_bytes(), h.to_be_bytes()].concat();
        ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // bit depth 1, grayscale
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &z);
        chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn images_above_the_pixel_limit_are_refused_from_the_header() {
        // the writer itself: a small one decodes to black
        let small = decode_bytes(&black_png(300, 200)).unwrap();
        assert_eq!((small.width(), small.height(), small.get_pixel(299, 199).0), (300, 200, [0, 0, 0]));
        // 13400 x 13400 = 179.56 Mpixel, just above PIL's 178.96; a 22 MB
        // file that would take 180 MB as L8 and 540 MB as RGB
        let err = format!("{:#}", decode_bytes(&black_png(13400, 13400)).unwrap_err());
        assert_eq!(err, "the image is 13400x13400 (179.6 Mpixel), above the 179.0 Mpixel limit YOLOv5 (PIL) accepts");
    }

    #[test]
    fn chw_is_the_padded_square_divided_by_255() {
        // odd padding on both axes: 50x30 at 64 -> 64x39, 12/13 rows of pad
        let img = RgbImage::from_fn(50, 30, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8]));
        let lb = letterbox(&img, 64);
        let square = lb.to_image();
        let mut out = vec![0.0; 3 * 64 * 64];
        lb.write_chw(&mut out);
        for (i, p) in square.pixels().enumerate() {
            for c in 0..3 {
                assert_eq!(out[c * 64 * 64 + i], p[c] as f32 / 255.0);
            }
        }
    }

    #[test]
    fn letterbox_geometry_matches_yolov5() {
        // 810x1080 (bus.jpg) at 640: long side 1080 -> 640, width ceil(810*0.5926)=480
        let img = RgbImage::from_pixel(810, 1080, image::Rgb([10, 20, 30]));
        let lb = letterbox(&img, 640);
        assert_eq!(lb.meta.resized, [640, 480]);
        assert_eq!(lb.meta.pad, [80.0, 0.0]);
        assert_eq!(lb.to_image().get_pixel(0, 0).0, [114, 114, 114]);
        assert_eq!(lb.to_image().get_pixel(80, 0).0, [10, 20, 30]);
        assert_eq!(lb.to_image().get_pixel(559, 639).0, [10, 20, 30]);
        assert_eq!(lb.to_image().get_pixel(560, 639).0, [114, 114, 114]);
    }

    #[test]
    fn odd_padding_splits_as_yolov5() {
        // 100x33 at 100: dh = 67/2 = 33.5 -> top round(33.4)=33, bottom 34
        let img = RgbImage::from_pixel(100, 33, image::Rgb([0, 0, 0]));
        let lb = letterbox(&img, 100);
        assert_eq!(lb.to_image().get_pixel(0, 32).0, [114, 114, 114]);
        assert_eq!(lb.to_image().get_pixel(0, 33).0, [0, 0, 0]);
        assert_eq!(lb.to_image().get_pixel(0, 65).0, [0, 0, 0]);
        assert_eq!(lb.to_image().get_pixel(0, 66).0, [114, 114, 114]);
    }

    #[test]
    fn area_halving_is_a_box_mean() {
        let src = RgbImage::from_fn(4, 2, |x, _| image::Rgb([(x * 10) as u8, 0, 255]));
        let out = resize_area(&src, 2, 1);
        assert_eq!(out.get_pixel(0, 0).0, [5, 0, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [25, 0, 255]);
    }

    #[test]
    fn linear_keeps_constant_images() {
        let src = RgbImage::from_pixel(3, 5, image::Rgb([7, 77, 177]));
        let out = resize_linear(&src, 7, 11);
        assert!(out.pixels().all(|p| p.0 == [7, 77, 177]));
    }
}
