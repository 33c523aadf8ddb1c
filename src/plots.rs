//! Run results in; PNG plots out, as YOLOv5 draws them into a run directory:
//! `results.png` (losses and metrics per epoch, 2 x 5 panels with titled
//! axes, values and the smoothed line), `PR_curve.png` (one coloured line per
//! class, `name AP50` in the legend, a thick blue "all classes" line) and
//! `confusion_matrix.png` (column-normalised cells with their values, True on
//! x, Predicted on y, a colour bar).
//!
//! Everything is drawn with `plotters` on a bitmap. Its text goes through
//! `ab_glyph` with the TTF that prediction labels use (`predict::draw`), which
//! is registered with plotters once; without a font the plots are drawn
//! without text.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use image::RgbImage;
use ndarray::Array2;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::metrics::ApPerClass;

const FONT: &str = "sans-serif";
/// matplotlib's 'blue', YOLOv5's "all classes" line.
const ALL_BLUE: RGBColor = RGBColor(0, 0, 255);
/// matplotlib's default colour cycle (tab10), YOLOv5's per-class PR colours.
const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// matplotlib's 'Blues' colour map at 0, 1/8, ..., 1.
const BLUES: [(u8, u8, u8); 9] = [
    (247, 251, 255),
    (222, 235, 247),
    (198, 219, 239),
    (158, 202, 225),
    (107, 174, 214),
    (66, 146, 198),
    (33, 113, 181),
    (8, 81, 156),
    (8, 48, 107),
];

/// Registers the system font with plotters once; false when there is none.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let Some((_, path)) = crate::predict::draw::find_font() else { return false };
        let Ok(bytes) = std::fs::read(&path) else { return false };
        // plotters keeps fonts for the life of the process
        plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok()
    })
}

fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

fn style(size: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

fn save(buf: Vec<u8>, w: u32, h: u32, path: &Path) -> Result<()> {
    let img = RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("plot buffer size"))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// Decimals that tell apart tick values spread over `span`.
fn decimals(span: f64) -> usize {
    if span.is_nan() || span <= 0.0 { 3 } else { ((-span.log10()).ceil() as i64 + 1).clamp(1, 8) as usize }
}

/// scipy's `gaussian_filter1d(y, sigma)` (mode 'reflect', truncate 4), which
/// YOLOv5 draws as the "smooth" line.
pub fn gaussian_smooth(y: &[f64], sigma: f64) -> Vec<f64> {
    let n = y.len() as i64;
    let radius = (4.0 * sigma + 0.5) as i64;
    let weights: Vec<f64> = (-radius..=radius).map(|k| (-0.5 * (k as f64 / sigma).powi(2)).exp()).collect();
    let total: f64 = weights.iter().sum();
    // 'reflect': d c b a | a b c d | d c b a, repeated as far as needed
    let at = |i: i64| {
        let period = 2 * n;
        let m = i.rem_euclid(period);
        y[(if m < n { m } else { period - 1 - m }) as usize]
    };
    (0..n).map(|i| (-radius..=radius).zip(&weights).map(|(k, w)| w * at(i + k)).sum::<f64>() / total).collect()
}

/// One small chart per series, in a 2 x 5 grid like YOLOv5's results.png:
/// the values (dots and line), the smoothed line, the epoch on x, and y
/// ticks with enough decimals to read a small change.
pub fn results_png(path: &Path, titles: &[&str], series: &[Vec<f64>]) -> Result<()> {
    let (w, h) = (2000u32, 800u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let text = font_ready();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        for (i, (cell, ys)) in root.split_evenly((2, 5)).iter().zip(series).enumerate() {
            results_panel(cell, titles.get(i).copied().unwrap_or(""), ys, text, i == 0)?;
        }
        root.present().map_err(pe)?;
    }
    save(buf, w, h, path)
}

fn results_panel(cell: &DrawingArea<BitMapBackend, Shift>, title: &str, ys: &[f64], text: bool, legend: bool) -> Result<()> {
    let pts: Vec<(f64, f64)> = ys.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as f64, v)).collect();
    let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), &(_, v)| (a.min(v), b.max(v)));
    let (lo, hi) = if pts.is_empty() { (0.0, 1.0) } else { (lo, hi) };
    let pad = if hi > lo { (hi - lo) * 0.08 } else { (hi.abs() * 0.01).max(1e-6) };
    let xmax = (ys.len().max(2) - 1) as f64;
    let mut b = ChartBuilder::on(cell);
    b.margin(10);
    if text {
        b.caption(title, style(17.0)).x_label_area_size(34).y_label_area_size(62);
    }
    let mut chart = b.build_cartesian_2d(0f64..xmax, (lo - pad)..(hi + pad)).map_err(pe)?;
    let dec = decimals((hi - lo).max(pad));
    let yfmt = move |v: &f64| format!("{v:.dec$}");
    let xfmt = |v: &f64| format!("{v:.0}");
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235)).bold_line_style(RGBColor(215, 215, 215));
    if text {
        mesh.x_labels(ys.len().clamp(2, 6)).y_labels(5).x_label_formatter(&xfmt).y_label_formatter(&yfmt).label_style(style(12.0)).x_desc("epoch").axis_desc_style(style(12.0));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(pe)?;
    if pts.is_empty() {
        return Ok(());
    }
    let blue = TAB10[0];
    chart.draw_series(LineSeries::new(pts.clone(), blue.stroke_width(2))).map_err(pe)?.label("results").legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], blue.stroke_width(2)));
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, blue.filled()))).map_err(pe)?;
    let vals: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let smooth: Vec<(f64, f64)> = pts.iter().map(|p| p.0).zip(gaussian_smooth(&vals, 3.0)).collect();
    let orange = TAB10[1];
    chart
        .draw_series(DashedLineSeries::new(smooth, 4, 3, orange.stroke_width(2)))
        .map_err(pe)?
        .label("smooth")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], orange.stroke_width(2)));
    if text && legend {
        chart.configure_series_labels().label_font(style(12.0)).background_style(WHITE.mix(0.8)).border_style(RGBColor(200, 200, 200)).position(SeriesLabelPosition::UpperRight).draw().map_err(pe)?;
    }
    Ok(())
}

/// Precision against recall per class and for all classes (mAP@0.5), as
/// YOLOv5's `plot_pr_curve`: a tab10 colour per class (grey from 21 classes
/// on, without legend entries), the class mean as a thick blue line.
pub fn pr_curve_png(path: &Path, curves: &ApPerClass, names: &[String]) -> Result<()> {
    let (w, h) = (1100u32, 700u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let text = font_ready();
    let nc = curves.py.nrows();
    let per_class = nc < 21;
    let map50 = curves.ap.column(0).mean().unwrap_or(0.0);
    let mut legend: Vec<(String, RGBColor, u32)> = Vec::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let (plot, side) = root.split_horizontally(780);
        let mut b = ChartBuilder::on(&plot);
        b.margin(20);
        if text {
            b.caption("Precision-Recall Curve", style(20.0)).x_label_area_size(45).y_label_area_size(60);
        }
        let mut chart = b.build_cartesian_2d(0f64..1f64, 0f64..1f64).map_err(pe)?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(240, 240, 240)).bold_line_style(RGBColor(220, 220, 220));
        if text {
            mesh.x_labels(11).y_labels(11).x_label_formatter(&|v| format!("{v:.1}")).y_label_formatter(&|v| format!("{v:.1}")).label_style(style(13.0)).x_desc("Recall").y_desc("Precision").axis_desc_style(style(15.0));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(pe)?;
        for c in 0..nc {
            let color = if per_class { TAB10[c % TAB10.len()] } else { RGBColor(128, 128, 128) };
            let pts = curves.px.iter().zip(curves.py.row(c)).map(|(&x, &y)| (x, y));
            chart.draw_series(LineSeries::new(pts, color.stroke_width(1))).map_err(pe)?;
            if per_class {
                let name = curves.unique_classes.get(c).and_then(|&k| names.get(k)).map_or("?", String::as_str);
                legend.push((format!("{name} {:.3}", curves.ap[[c, 0]]), color, 2));
            }
        }
        let mean: Vec<(f64, f64)> = (0..curves.px.len()).map(|i| (curves.px[i], (0..nc).map(|c| curves.py[[c, i]]).sum::<f64>() / nc.max(1) as f64)).collect();
        chart.draw_series(LineSeries::new(mean, ALL_BLUE.stroke_width(3))).map_err(pe)?;
        legend.push((format!("all classes {map50:.3} mAP@0.5"), ALL_BLUE, 4));
        if text {
            draw_legend(&side, &legend)?;
        }
        root.present().map_err(pe)?;
    }
    save(buf, w, h, path)
}

/// A legend box at the top left of `area`: a line sample and a label per entry.
fn draw_legend(area: &DrawingArea<BitMapBackend, Shift>, entries: &[(String, RGBColor, u32)]) -> Result<()> {
    let (x0, y0, row) = (10i32, 50i32, 22i32);
    let width = entries.iter().map(|(s, ..)| area.estimate_text_size(s, &style(14.0)).map_or(0, |(w, _)| w as i32)).max().unwrap_or(0) + 56;
    let height = row * entries.len() as i32 + 10;
    area.draw(&Rectangle::new([(x0, y0), (x0 + width, y0 + height)], RGBColor(200, 200, 200).stroke_width(1))).map_err(pe)?;
    for (i, (label, color, thick)) in entries.iter().enumerate() {
        let y = y0 + 16 + row * i as i32;
        area.draw(&PathElement::new([(x0 + 8, y), (x0 + 38, y)], color.stroke_width(*thick))).map_err(pe)?;
        area.draw(&Text::new(label.clone(), (x0 + 46, y), style(14.0).pos(Pos::new(HPos::Left, VPos::Center)))).map_err(pe)?;
    }
    Ok(())
}

/// The colour of `v` in [0, 1] in matplotlib's 'Blues'.
fn blues(v: f64) -> RGBColor {
    let t = v.clamp(0.0, 1.0) * 8.0;
    let (i, f) = ((t.floor() as usize).min(7), t - t.floor().min(7.0));
    let (a, b) = (BLUES[i], BLUES[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// YOLOv5's `ConfusionMatrix.plot`: columns (true classes + background)
/// normalised to sum 1, rows the predicted class, values below 0.005 left
/// blank, the values written in the cells when there are fewer than 30
/// classes, a colour bar from 0 to the largest value.
pub fn confusion_png(path: &Path, matrix: &Array2<u64>, names: &[String]) -> Result<()> {
    let n = matrix.nrows();
    let norm = Array2::from_shape_fn((n, n), |(i, j)| {
        let col: u64 = matrix.column(j).sum();
        let v = matrix[[i, j]] as f64 / (col as f64 + 1e-9);
        if v < 0.005 { f64::NAN } else { v }
    });
    let vmax = norm.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-9);
    let text = font_ready();
    let label = |i: usize| if i + 1 == n { "background".to_string() } else { names.get(i).cloned().unwrap_or_else(|| i.to_string()) };
    let ticks = text && n < 100;
    let Layout { cell, label_size, longest, left, top } = confusion_layout(n, names, ticks);
    let grid = cell * n as i32;
    let (w, h) = ((left + grid + 130) as u32, (top + grid + longest as i32 + 50) as u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let annotate = text && n < 31 && cell >= 22;
        let value_size = (cell as f64 * 0.32).clamp(8.0, 16.0);
        for i in 0..n {
            for j in 0..n {
                let (x, y) = (left + j as i32 * cell, top + i as i32 * cell);
                let v = norm[[i, j]];
                if !v.is_finite() {
                    continue;
                }
                let c = blues(v / vmax);
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], c.filled())).map_err(pe)?;
                if annotate {
                    // seaborn: light text on dark cells
                    let luminance = 0.2126 * c.0 as f64 + 0.7152 * c.1 as f64 + 0.0722 * c.2 as f64;
                    let ink = if luminance > 0.408 * 255.0 { BLACK } else { WHITE };
                    root.draw(&Text::new(format!("{v:.2}"), (x + cell / 2, y + cell / 2), style(value_size).color(&ink).pos(Pos::new(HPos::Center, VPos::Center)))).map_err(pe)?;
                }
            }
        }
        root.draw(&Rectangle::new([(left, top), (left + grid, top + grid)], RGBColor(180, 180, 180).stroke_width(1))).map_err(pe)?;
        colour_bar(&root, left + grid + 25, top, grid, vmax, text)?;
        if text {
            let centre = Pos::new(HPos::Center, VPos::Center);
            root.draw(&Text::new("Confusion Matrix", (left + grid / 2, top / 2), style(18.0).pos(centre))).map_err(pe)?;
            root.draw(&Text::new("True", (left + grid / 2, h as i32 - 20), style(15.0).pos(centre))).map_err(pe)?;
            root.draw(&Text::new("Predicted", (14, top + grid / 2), style(15.0).pos(centre).transform(FontTransform::Rotate270))).map_err(pe)?;
        }
        if ticks {
            for i in 0..n {
                let mid = i as i32 * cell + cell / 2;
                root.draw(&Text::new(label(i), (left - 6, top + mid), style(label_size).pos(Pos::new(HPos::Right, VPos::Center)))).map_err(pe)?;
                let rotated = style(label_size).pos(Pos::new(HPos::Right, VPos::Center)).transform(FontTransform::Rotate270);
                root.draw(&Text::new(label(i), (left + mid, top + grid + 6), rotated)).map_err(pe)?;
            }
        }
        root.present().map_err(pe)?;
    }
    save(buf, w, h, path)
}

/// Where the confusion matrix's cells go: their size, the tick label size,
/// the longest label's width and the grid's top-left corner.
struct Layout {
    cell: i32,
    label_size: f64,
    longest: f64,
    left: i32,
    top: i32,
}

fn confusion_layout(n: usize, names: &[String], ticks: bool) -> Layout {
    let cell = (720 / n.max(1) as u32).clamp(10, 90) as i32;
    let label_size = (cell as f64 * 0.7).clamp(8.0, 14.0);
    let chars = names.iter().take(n.saturating_sub(1)).map(|s| s.chars().count()).chain([10]).max().unwrap_or(10);
    let longest = if ticks { chars as f64 * label_size * 0.62 } else { 0.0 };
    Layout { cell, label_size, longest, left: longest as i32 + 50, top: 50 }
}

/// A vertical colour bar of `height` px from 0 (bottom) to `vmax` (top).
fn colour_bar(root: &DrawingArea<BitMapBackend, Shift>, x: i32, top: i32, height: i32, vmax: f64, text: bool) -> Result<()> {
    let bw = 22;
    for k in 0..height {
        let v = 1.0 - k as f64 / (height - 1).max(1) as f64;
        root.draw(&Rectangle::new([(x, top + k), (x + bw, top + k + 1)], blues(v).filled())).map_err(pe)?;
    }
    root.draw(&Rectangle::new([(x, top), (x + bw, top + height)], RGBColor(120, 120, 120).stroke_width(1))).map_err(pe)?;
    if text {
        let step = if vmax > 0.5 { 0.2 } else if vmax > 0.2 { 0.1 } else { 0.05 };
        let mut t = 0.0;
        while t <= vmax + 1e-9 {
            let y = top + height - 1 - ((t / vmax) * (height - 1) as f64).round() as i32;
            root.draw(&PathElement::new([(x + bw, y), (x + bw + 5, y)], BLACK.stroke_width(1))).map_err(pe)?;
            root.draw(&Text::new(format!("{t:.1}"), (x + bw + 8, y), style(13.0).pos(Pos::new(HPos::Left, VPos::Center)))).map_err(pe)?;
            t += step;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(p: &Path) -> RgbImage {
        image::open(p).unwrap().to_rgb8()
    }

    /// Hue buckets (30° wide) of the saturated pixels that cover at least
    /// `min` pixels each.
    fn hues(img: &RgbImage, min: usize) -> usize {
        let mut count = [0usize; 12];
        for p in img.pixels() {
            let [r, g, b] = p.0.map(|v| v as f64 / 255.0);
            let (mx, mn) = (r.max(g).max(b), r.min(g).min(b));
            if mx - mn < 0.35 {
                continue; // grey, black, white or pale
            }
            let d = mx - mn;
            let h = if mx == r { ((g - b) / d).rem_euclid(6.0) } else if mx == g { (b - r) / d + 2.0 } else { (r - g) / d + 4.0 };
            count[((h * 60.0) as usize / 30).min(11)] += 1;
        }
        count.iter().filter(|&&c| c >= min).count()
    }

    /// Dark pixels (text, ticks) in a rectangle.
    fn dark(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
        (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 140)).count()
    }

    fn curves(nc: usize) -> ApPerClass {
        let px = crate::metrics::npmath::linspace(0.0, 1.0, 1000);
        let py = Array2::from_shape_fn((nc, 1000), |(c, i)| (1.0 - px[i].powi(c as i32 + 1)) * (0.95 - 0.2 * c as f64));
        let ap = Array2::from_shape_fn((nc, 10), |(c, _)| 0.9 - 0.2 * c as f64);
        ApPerClass {
            tp: vec![0.0; nc],
            fp: vec![0.0; nc],
            p: vec![0.0; nc],
            r: vec![0.0; nc],
            f1: vec![0.0; nc],
            ap,
            unique_classes: (0..nc).collect(),
            nt: vec![1; nc],
            best_index: 0,
            px,
            p_curve: py.clone(),
            r_curve: py.clone(),
            f1_curve: py.clone(),
            py,
        }
    }

    #[test]
    fn smoothing_matches_scipy() {
        // scipy.ndimage.gaussian_filter1d([0, 0, 1, 0, 0, 0], 1.0)
        let s = gaussian_smooth(&[0.0, 0.0, 1.0, 0.0, 0.0, 0.0], 1.0);
        let want = [0.05842299, 0.24210528, 0.39894347, 0.24197145, 0.05399113, 0.00456569];
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{s:?}");
        assert_eq!(gaussian_smooth(&[2.5], 3.0), vec![2.5]);
    }

    #[test]
    fn pr_curve_has_a_colour_per_class_and_the_blue_mean() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("PR_curve.png");
        pr_curve_png(&p, &curves(3), &["car".into(), "bus".into(), "truck".into()]).unwrap();
        let img = load(&p);
        // three tab10 colours (blue, orange, green) and pure blue: at least
        // the orange, green and blue hue buckets, not a single grey
        assert!(hues(&img, 200) >= 3, "{} hues", hues(&img, 200));
        if font_ready() {
            // the legend (right of the plot) and the y tick values (left) hold text
            assert!(dark(&img, 790, 40, 1100, 160) > 200, "no legend text");
            assert!(dark(&img, 0, 100, 70, 600) > 200, "no y axis values");
        }
    }

    #[test]
    fn results_show_values_on_the_axes() {
        if !font_ready() {
            eprintln!("skipping the text checks: no TTF font found (set FREEZESPLIT_FONT)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("results.png");
        // a 0.2 % wobble must read as one on the y axis
        let wobble: Vec<f64> = (0..20).map(|i| 0.0424 + if i % 2 == 0 { 0.0001 } else { 0.0 }).collect();
        let titles = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        results_png(&p, &titles, &vec![wobble; 10]).unwrap();
        let img = load(&p);
        // every panel is 400 x 400; its y tick values sit in the 62 px left of the plot
        for (cx, cy) in [(0, 0), (400, 0), (1600, 400)] {
            let (y, x) = (dark(&img, cx + 2, cy + 40, cx + 62, cy + 340), dark(&img, cx + 70, cy + 363, cx + 390, cy + 380));
            assert!(y > 40 && x > 40, "no values on the axes of the panel at {cx},{cy}: {y} and {x} dark pixels");
        }
    }

    #[test]
    fn confusion_matrix_has_values_and_a_colour_bar() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("confusion_matrix.png");
        let m = ndarray::array![[50u64, 2, 5], [1, 30, 7], [4, 8, 0]];
        confusion_png(&p, &m, &["car".into(), "bus".into()]).unwrap();
        let img = load(&p);
        let (w, _) = img.dimensions();
        // the colour bar: many shades of blue in one column right of the grid
        let x = (w - 130 + 25 + 11).min(w - 1);
        let shades: std::collections::HashSet<[u8; 3]> = (0..img.height()).map(|y| img.get_pixel(x, y).0).filter(|c| c[2] > c[0]).collect();
        assert!(shades.len() > 50, "{} shades in the colour bar", shades.len());
        if font_ready() {
            // the darkest cell (car, car: 50/55) carries its value in light ink
            let Layout { cell, left, top, .. } = confusion_layout(3, &["car".into(), "bus".into()], true);
            let (cx, cy, cell) = (left as u32, top as u32, cell as u32);
            let light = (cy + 4..cy + cell - 4).flat_map(|y| (cx + 4..cx + cell - 4).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0[0] > 200).count();
            assert!(light > 20, "no value in the car/car cell");
            // and the tick labels: `car` left of the first row
            assert!(dark(&img, 0, cy, cx, cy + cell) > 30, "no row label");
        }
    }
}
