//! Run results in; PNG plots out, as YOLOv5 draws them into a run directory:
//! `results.png` (losses and metrics per epoch), `PR_curve.png` and
//! `confusion_matrix.png`.
//!
//! Lines and cells are drawn with `plotters` on a bitmap; text with the same
//! `ab_glyph` rasteriser as the prediction labels (plotters' own text needs
//! system font libraries), and left out when no font is found.

use std::path::Path;

use ab_glyph::{FontVec, PxScale};
use anyhow::{Result, anyhow};
use image::{Rgb, RgbImage};
use ndarray::Array2;
use plotters::prelude::*;

use crate::metrics::ApPerClass;
use crate::predict::draw::{draw_text, find_font, text_size};

const BLUE: RGBColor = RGBColor(31, 119, 180);

fn save(buf: Vec<u8>, w: u32, h: u32, path: &Path) -> Result<()> {
    let img = RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("plot buffer size"))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::fsutil::write_atomic(path, &bytes)
}

#[allow(clippy::too_many_arguments)]
fn text(img: &mut [u8], w: u32, h: u32, font: Option<&FontVec>, x: i32, y: i32, size: f32, s: &str) {
    let Some(font) = font else { return };
    let mut tmp = RgbImage::from_raw(w, h, img.to_vec()).unwrap();
    draw_text(&mut tmp, Rgb([0, 0, 0]), x, y, PxScale::from(size), font, s);
    img.copy_from_slice(tmp.as_raw());
}

/// One small chart per series, in a 2 x 5 grid like YOLOv5's results.png.
pub fn results_png(path: &Path, titles: &[&str], series: &[Vec<f64>]) -> Result<()> {
    let (w, h) = (1500u32, 600u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let font = find_font().map(|f| f.0);
    let cols = 5;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let cells = root.split_evenly((2, cols));
        for (cell, ys) in cells.iter().zip(series) {
            let ys: Vec<f64> = ys.iter().copied().filter(|v| v.is_finite()).collect();
            if ys.is_empty() {
                continue;
            }
            let (lo, hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let pad = ((hi - lo) * 0.1).max(1e-6);
            let mut chart = ChartBuilder::on(cell).margin(30).build_cartesian_2d(0f64..(ys.len().max(2) - 1) as f64, (lo - pad)..(hi + pad)).map_err(|e| anyhow!("{e}"))?;
            chart.configure_mesh().disable_mesh().x_labels(0).y_labels(0).draw().map_err(|e| anyhow!("{e}"))?;
            chart.draw_series(LineSeries::new(ys.iter().enumerate().map(|(i, &v)| (i as f64, v)), BLUE.stroke_width(2))).map_err(|e| anyhow!("{e}"))?;
            chart.draw_series(ys.iter().enumerate().map(|(i, &v)| Circle::new((i as f64, v), 3, BLUE.filled()))).map_err(|e| anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let (cw, ch) = (w / cols as u32, h / 2);
    for (i, (t, ys)) in titles.iter().zip(series).enumerate() {
        let (cx, cy) = ((i as u32 % cols as u32) * cw, (i as u32 / cols as u32) * ch);
        text(&mut buf, w, h, font.as_ref(), cx as i32 + 30, cy as i32 + 6, 16.0, t);
        if let Some(last) = ys.last() {
            text(&mut buf, w, h, font.as_ref(), cx as i32 + 30, (cy + ch) as i32 - 26, 13.0, &format!("last {last:.4}, {} epochs", ys.len()));
        }
    }
    save(buf, w, h, path)
}

/// Precision against recall per class and for all classes (mAP@0.5), as
/// YOLOv5's `plot_pr_curve`.
pub fn pr_curve_png(path: &Path, curves: &ApPerClass, names: &[String]) -> Result<()> {
    let (w, h) = (900u32, 700u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let font = find_font().map(|f| f.0);
    let nc = curves.py.nrows();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let mut chart = ChartBuilder::on(&root).margin(50).build_cartesian_2d(0f64..1f64, 0f64..1f64).map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_labels(6).y_labels(6).draw().map_err(|e| anyhow!("{e}"))?;
        for c in 0..nc {
            let pts = curves.px.iter().zip(curves.py.row(c)).map(|(&x, &y)| (x, y));
            chart.draw_series(LineSeries::new(pts, RGBColor(150, 150, 150).stroke_width(1))).map_err(|e| anyhow!("{e}"))?;
        }
        let mean: Vec<(f64, f64)> = (0..curves.px.len()).map(|i| (curves.px[i], (0..nc).map(|c| curves.py[[c, i]]).sum::<f64>() / nc.max(1) as f64)).collect();
        chart.draw_series(LineSeries::new(mean, BLUE.stroke_width(3))).map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let map50 = curves.ap.column(0).mean().unwrap_or(0.0);
    text(&mut buf, w, h, font.as_ref(), 60, 14, 18.0, &format!("Precision-Recall: all classes {map50:.3} mAP@0.5 (blue)"));
    let mut y = 44;
    for (i, c) in curves.unique_classes.iter().enumerate().take(20) {
        let name = names.get(*c).map(String::as_str).unwrap_or("?");
        text(&mut buf, w, h, font.as_ref(), (w - 260) as i32, y, 13.0, &format!("{name} {:.3}", curves.ap[[i, 0]]));
        y += 16;
    }
    text(&mut buf, w, h, font.as_ref(), (w / 2) as i32 - 20, h as i32 - 30, 15.0, "Recall");
    text(&mut buf, w, h, font.as_ref(), 4, (h / 2) as i32, 15.0, "Precision");
    save(buf, w, h, path)
}

/// YOLOv5's confusion matrix plot: columns (true classes + background)
/// normalised to sum 1, rows the predicted class.
pub fn confusion_png(path: &Path, matrix: &Array2<u64>, names: &[String]) -> Result<()> {
    let n = matrix.nrows();
    let cell = (600 / n as u32).clamp(6, 80);
    let margin = 140u32;
    let (w, h) = (margin + cell * n as u32 + 20, margin + cell * n as u32 + 20);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let font = find_font().map(|f| f.0);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        for j in 0..n {
            let col: u64 = matrix.column(j).sum();
            for i in 0..n {
                let v = if col > 0 { matrix[[i, j]] as f64 / col as f64 } else { 0.0 };
                let shade = (255.0 * (1.0 - v)) as u8;
                let (x, y) = ((margin + j as u32 * cell) as i32, (margin + i as u32 * cell) as i32);
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], RGBColor(shade, shade, 255).filled())).map_err(|e| anyhow!("{e}"))?;
            }
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    if n <= 30 {
        let label = |i: usize| if i + 1 == n { "background".to_string() } else { names.get(i).cloned().unwrap_or_default() };
        for i in 0..n {
            let l = label(i);
            text(&mut buf, w, h, font.as_ref(), 4, (margin + i as u32 * cell + cell / 2) as i32 - 7, 12.0, &l);
            if let Some(f) = font.as_ref() {
                let (tw, _) = text_size(PxScale::from(12.0), f, &l);
                let x = (margin + i as u32 * cell + cell / 2) as i32 - (tw as i32 / 2);
                text(&mut buf, w, h, font.as_ref(), x.max(0), (margin - 20) as i32 - ((i % 2) as i32 * 16), 12.0, &l);
            }
        }
    }
    text(&mut buf, w, h, font.as_ref(), 4, 8, 16.0, "confusion matrix (columns: true, rows: predicted)");
    save(buf, w, h, path)
}
