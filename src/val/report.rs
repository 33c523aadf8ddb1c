//! A `ValReport` out as text (val.py's table, then our extra lines) or as one
//! JSON object.

use serde_json::{Value, json};

use super::ValReport;

/// Python's `'%.3g' % x`.
pub fn fmt_g3(x: f64) -> String {
    fmt_g(x, 3)
}

/// Python's `'%.{precision}g' % x` (`'%g'` is precision 6).
pub fn fmt_g(x: f64, precision: usize) -> String {
    if x == 0.0 || !x.is_finite() {
        return if x == 0.0 { "0".into() } else { x.to_string() };
    }
    let p = precision.max(1);
    let sci = format!("{:.*e}", p - 1, x);
    let (m, ex) = sci.split_once('e').unwrap();
    let ex: i32 = ex.parse().unwrap();
    if ex < -4 || ex >= p as i32 {
        let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
        return format!("{m}e{}{:02}", if ex < 0 { '-' } else { '+' }, ex.abs());
    }
    let decimals = (p as i32 - 1 - ex).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

fn row(name: &str, images: usize, instances: usize, v: [f64; 4]) -> String {
    format!("{name:>22}{images:>11}{instances:>11}{:>11}{:>11}{:>11}{:>11}", fmt_g3(v[0]), fmt_g3(v[1]), fmt_g3(v[2]), fmt_g3(v[3]))
}

/// Confusion matrix totals (rows = predicted class, columns = true class, the
/// last of each = background): correct, wrong class, background FP, missed.
pub fn confusion_totals(r: &ValReport) -> [u64; 4] {
    let m = &r.summary.confusion.matrix;
    let nc = r.summary.confusion.nc;
    let (mut correct, mut wrong, mut fp, mut missed) = (0, 0, 0, 0);
    for p in 0..=nc {
        for t in 0..=nc {
            let v = m[[p, t]];
            match (p == nc, t == nc) {
                (false, false) if p == t => correct += v,
                (false, false) => wrong += v,
                (false, true) => fp += v,
                (true, false) => missed += v,
                (true, true) => {}
            }
        }
    }
    [correct, wrong, fp, missed]
}

pub fn text(r: &ValReport) -> String {
    let s = &r.summary;
    let mut out = format!("{:>22}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}\n", "Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95");
    out += &row("all", s.seen, s.instances, [s.mp, s.mr, s.map50, s.map]);
    out.push('\n');
    for c in &s.per_class {
        let name = r.names.get(c.class).cloned().unwrap_or_else(|| c.class.to_string());
        out += &row(&name, c.images, c.instances, [c.p, c.r, c.ap50, c.ap50_95]);
        out.push('\n');
    }
    let [correct, wrong, fp, missed] = confusion_totals(r);
    out += &format!(
        "confusion matrix (conf {}, IoU {}): {correct} correct, {wrong} wrong class, {fp} background FP, {missed} missed\n",
        s.confusion.conf, s.confusion.iou_thres
    );
    out += &format!("class-agnostic mAP50 {:.4}\n", s.agnostic_map50);
    let a = &s.class_accuracy;
    out += &format!("matched-box class accuracy {:.4} ({} of {} labels matched at IoU >= 0.5)\n", a.accuracy, a.correct, a.matched);
    if let Some(g) = r.groups.as_ref().filter(|g| g.base_nc < g.model_nc) {
        let [old, new] = g.maps(s);
        for (what, m) in [("old", old), ("new", new)] {
            match m {
                Some(m) => out += &format!("{what} classes of the model ({} with labels): mAP50 {:.4}, mAP50-95 {:.4}\n", m.classes, m.map50, m.map),
                None => out += &format!("{what} classes of the model: none with labels here\n"),
            }
        }
    }
    if let Some([b, o, c]) = r.losses {
        out += &format!("val losses: box {b:.5}, obj {o:.5}, cls {c:.5}\n");
    }
    if !r.skipped_images.is_empty() || !r.skipped_labels.is_empty() {
        out += &format!("skipped: {} images, {} label lines\n", r.skipped_images.len(), r.skipped_labels.len());
    }
    if r.segments > 0 {
        out += &format!("{} polygon labels read as their bounding boxes\n", r.segments);
    }
    out
}

pub fn to_json(r: &ValReport) -> Value {
    let s = &r.summary;
    let per_class: Vec<Value> = s
        .per_class
        .iter()
        .map(|c| {
            json!({"class": c.class, "name": r.names.get(c.class), "images": c.images, "instances": c.instances,
                   "P": c.p, "R": c.r, "mAP50": c.ap50, "mAP50_95": c.ap50_95})
        })
        .collect();
    let m = &s.confusion.matrix;
    let matrix: Vec<Vec<u64>> = m.rows().into_iter().map(|r| r.to_vec()).collect();
    let [correct, wrong, fp, missed] = confusion_totals(r);
    let loss = |i: usize| r.losses.map(|l| l[i]);
    let [old, new] = r.groups.as_ref().map_or([None, None], |g| g.maps(s));
    json!({
        "model_classes": r.groups.as_ref().map(|g| &g.model_ids),
        "model_nc": r.groups.as_ref().map(|g| g.model_nc),
        "base_nc": r.groups.as_ref().map(|g| g.base_nc),
        "old_classes": old, "new_classes": new,
        "images": s.seen,
        "instances": s.instances,
        "P": s.mp, "R": s.mr, "mAP50": s.map50, "mAP50_95": s.map,
        "class_agnostic_mAP50": s.agnostic_map50,
        "matched_class_accuracy": s.class_accuracy.accuracy,
        "matched_boxes": s.class_accuracy.matched,
        "box_loss": loss(0), "obj_loss": loss(1), "cls_loss": loss(2),
        "per_class": per_class,
        "confusion_matrix": {"conf": s.confusion.conf, "iou_thres": s.confusion.iou_thres,
            "rows": "predicted class, then background", "columns": "true class, then background",
            "matrix": matrix, "correct": correct, "wrong_class": wrong, "background_fp": fp, "missed": missed},
        "skipped_images": r.skipped_images.len(),
        "skipped_labels": r.skipped_labels.len(),
        "segments_converted": r.segments,
        "skipped": {"images": r.skipped_images, "labels": r.skipped_labels},
        "seconds": r.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::fmt_g3;


    #[test]
    fn percent_g() {
        assert_eq!(fmt_g3(0.5678), "0.568");
        assert_eq!(fmt_g3(0.05234), "0.0523");
        assert_eq!(fmt_g3(1.0), "1");
        assert_eq!(fmt_g3(0.9996), "1");
        assert_eq!(fmt_g3(0.0), "0");
        assert_eq!(fmt_g3(0.1), "0.1");
        assert_eq!(fmt_g3(0.00001234), "1.23e-05");
        assert_eq!(super::fmt_g(0.123456789, 6), "0.123457");
        assert_eq!(super::fmt_g(12.0, 6), "12");
        assert_eq!(super::fmt_g(1234567.0, 6), "1.23457e+06");
    }
}
