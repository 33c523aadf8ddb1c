//! Annotation: an image and its detections in; the image with YOLOv5-style
//! boxes and "name conf" labels out. Text is rasterised with `ab_glyph` from
//! a TTF found on the system (`$FREEZESPLIT_FONT`, then common DejaVu/Arial
//! paths); without one, boxes are drawn without text. Rectangles are drawn
//! here rather than with imageproc, whose nalgebra dependency changes the
//! features of crates shared with tract and forces a full rebuild.

use std::path::PathBuf;

use ab_glyph::{Font, FontVec, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage};
use ndarray::ArrayView2;

/// YOLOv5's `Colors` palette (utils/plots.py), indexed by class.
const PALETTE: [u32; 20] = [
    0xFF3838, 0xFF9D97, 0xFF701F, 0xFFB21D, 0xCFD231, 0x48F90A, 0x92CC17, 0x3DDB86, 0x1A9334, 0x00D4BB, 0x2C99A8, 0x00C2FF, 0x344593, 0x6473FF, 0x0018EC, 0x8438FF,
    0x520085, 0xCB38FF, 0xFF95C8, 0xFF37C7,
];

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

pub fn color(class: usize) -> Rgb<u8> {
    let c = PALETTE[class % PALETTE.len()];
    Rgb([(c >> 16) as u8, (c >> 8) as u8, c as u8])
}

/// The first loadable font, and its path.
pub fn find_font() -> Option<(FontVec, PathBuf)> {
    let env = std::env::var_os("FREEZESPLIT_FONT").map(PathBuf::from);
    env.into_iter().chain(FONT_PATHS.iter().map(PathBuf::from)).find_map(|p| {
        let bytes = std::fs::read(&p).ok()?;
        FontVec::try_from_vec(bytes).ok().map(|f| (f, p))
    })
}

/// Draws `det` rows `[x1, y1, x2, y2, conf, cls]` (original pixels) on `img`.
pub fn annotate(img: &mut RgbImage, det: ArrayView2<f32>, names: &[String], font: Option<&FontVec>) {
    let (w, h) = img.dimensions();
    // YOLOv5's Annotator line width: max(round(sum(shape) / 2 * 0.003), 2)
    let lw = (((w + h) as f32 / 2.0 * 0.003).round() as i32).max(2);
    let scale = PxScale::from((lw * 6).max(12) as f32);
    for r in det.rows() {
        let cls = r[5] as usize;
        let c = color(cls);
        let (x1, y1) = (r[0].round() as i32, r[1].round() as i32);
        let (x2, y2) = (r[2].round() as i32, r[3].round() as i32);
        fill_rect(img, x1, y1, x2, y1 + lw, c);
        fill_rect(img, x1, y2 - lw, x2, y2, c);
        fill_rect(img, x1, y1, x1 + lw, y2, c);
        fill_rect(img, x2 - lw, y1, x2, y2, c);
        let Some(font) = font else { continue };
        let name = names.get(cls).cloned().unwrap_or_else(|| cls.to_string());
        let label = format!("{name} {:.2}", r[4]);
        let (tw, th) = text_size(scale, font, &label);
        let pad = 2;
        let outside = y1 - th as i32 - 2 * pad >= 0;
        let ty = if outside { y1 - th as i32 - 2 * pad } else { y1 };
        fill_rect(img, x1, ty, x1 + tw as i32 + 2 * pad, ty + th as i32 + 2 * pad, c);
        draw_text(img, Rgb([255, 255, 255]), x1 + pad, ty + pad, scale, font, &label);
    }
}

/// Fills `[x1, x2) x [y1, y2)`, clipped to the image.
fn fill_rect(img: &mut RgbImage, x1: i32, y1: i32, x2: i32, y2: i32, c: Rgb<u8>) {
    let (w, h) = (img.width() as i32, img.height() as i32);
    for y in y1.max(0)..y2.min(h) {
        for x in x1.max(0)..x2.min(w) {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Width and height in pixels of `text` at `scale` (one line).
pub(crate) fn text_size(scale: PxScale, font: &FontVec, text: &str) -> (u32, u32) {
    let f = font.as_scaled(scale);
    let w: f32 = text.chars().map(|ch| f.h_advance(f.glyph_id(ch))).sum();
    (w.ceil() as u32, (f.ascent() - f.descent()).ceil() as u32)
}

/// Draws one line of text with its top-left corner at (x, y), alpha-blended.
pub(crate) fn draw_text(img: &mut RgbImage, c: Rgb<u8>, x: i32, y: i32, scale: PxScale, font: &FontVec, text: &str) {
    let f = font.as_scaled(scale);
    let (w, h) = (img.width() as i32, img.height() as i32);
    let mut caret = x as f32;
    for ch in text.chars() {
        let id = f.glyph_id(ch);
        let glyph = id.with_scale_and_position(scale, point(caret, y as f32 + f.ascent()));
        caret += f.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else { continue };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, cov| {
            let (px, py) = (b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32);
            if px >= 0 && py >= 0 && px < w && py < h {
                let p = img.get_pixel_mut(px as u32, py as u32);
                for k in 0..3 {
                    p.0[k] = (p.0[k] as f32 * (1.0 - cov) + c.0[k] as f32 * cov).round() as u8;
                }
            }
        });
    }
}
