//! results.csv and the plots: an epoch's row in, its line of results.csv
//! (YOLOv5's columns) out; results.png, PR_curve.png and confusion_matrix.png
//! from the whole results.csv (also across a resume) and the best head's report.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use super::EpochRow;

/// results.png from results.csv (all epochs, also across a resume), and the
/// best head's PR curve and confusion matrix.
pub fn plot_run(save_dir: &Path, csv: &Path, best: Option<&crate::val::ValReport>) -> Result<()> {
    let text = std::fs::read_to_string(csv)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|v| v.parse().unwrap_or(f64::NAN)).collect()).collect();
    let titles = ["train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall", "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"];
    let series: Vec<Vec<f64>> = titles.iter().map(|t| header.iter().position(|h| h == t).map(|c| rows.iter().map(|r| r[c]).collect()).unwrap_or_default()).collect();
    crate::plots::results_png(&save_dir.join("results.png"), &titles, &series)?;
    if let Some(r) = best {
        if let Some(c) = &r.summary.curves {
            crate::plots::pr_curve_png(&save_dir.join("PR_curve.png"), c, &r.names)?;
        }
        crate::plots::confusion_png(&save_dir.join("confusion_matrix.png"), &r.summary.confusion.matrix, &r.names)?;
    }
    Ok(())
}

pub fn csv_header() -> String {
    "epoch,train/box_loss,train/obj_loss,train/cls_loss,metrics/precision,metrics/recall,metrics/mAP_0.5,metrics/mAP_0.5:0.95,val/box_loss,val/obj_loss,val/cls_loss,x/lr0,x/lr1\n".to_string()
}

/// The row's line of results.csv, with its newline.
pub fn csv_row(r: &EpochRow) -> Result<String> {
    let mut line = Vec::new();
    write!(
        line,
        "{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.8},{:.8}",
        r.epoch, r.train[0], r.train[1], r.train[2], r.metrics[0], r.metrics[1], r.metrics[2], r.metrics[3], r.val[0], r.val[1], r.val[2], r.lr[0], r.lr[1]
    )?;
    line.push(b'\n');
    Ok(String::from_utf8(line)?)
}
