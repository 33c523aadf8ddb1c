//! One YOLO label file in (`class x y w h` lines, or polygons `class x1 y1
//! x2 y2 ...`); boxes out, with every line that was not used and why, as
//! YOLOv5's `verify_image_label` reads them. `scan_labels` counts a split's
//! labels for the log line and for refusing a split without any.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rayon::prelude::*;

use super::label_path;

/// One box: class and normalised `x, y, w, h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Label {
    pub class: usize,
    pub xywh: [f32; 4],
}

/// A label file, with the lines that were skipped and why.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub boxes: Vec<Label>,
    /// `(line number, reason)`; line 0 is the whole file (unreadable, a
    /// directory, not UTF-8 text).
    pub skipped: Vec<(usize, String)>,
    /// Polygon lines converted to their bounding boxes.
    pub segments: usize,
    /// Rows dropped as repeats of an earlier row (also in `skipped`).
    pub duplicates: usize,
    /// Whether something exists at the label path (an empty file is a
    /// background image, like a missing one, but counts as found; one that
    /// cannot be read counts as found and skipped).
    pub found: bool,
}

/// The warning for a skipped label line (`line` 0: the whole file).
pub fn skip_message(file: &Path, line: usize, reason: &str) -> String {
    if line == 0 { format!("warning: {}: {reason}; label file skipped", file.display()) } else { format!("warning: {}:{line}: {reason}; line skipped", file.display()) }
}

/// Reads a YOLO label file; a missing file means no objects (a background
/// image). Bad lines are skipped with a reason, as YOLOv5's `verify_image_label`
/// rejects them; a file that cannot be read as text is skipped whole (line 0),
/// so nothing here fails a run. Polygon lines (`cls x1 y1 x2 y2 ...`, more than
/// 6 values) become their bounding boxes (`segments2boxes`). Repeated rows are
/// dropped with a reason and the rest put in `np.unique`'s order, as YOLOv5
/// does, since the order decides which target wins a shared grid cell.
pub fn read_labels(path: &Path, nc: usize) -> Result<Labels> {
    let mut out = Labels { found: true, ..Default::default() };
    let bytes = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Labels::default()),
        Ok(m) if m.is_dir() => {
            out.skipped.push((0, "it is a directory, not a label file".into()));
            return Ok(out);
        }
        Ok(m) if !m.is_file() => {
            out.skipped.push((0, crate::fsutil::not_regular_reason(&m)));
            return Ok(out);
        }
        _ => match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                out.skipped.push((0, format!("cannot read it ({e})")));
                return Ok(out);
            }
        },
    };
    let Ok(text) = String::from_utf8(bytes) else {
        out.skipped.push((0, "it is not UTF-8 text (a YOLO label file holds `class x y w h` lines)".into()));
        return Ok(out);
    };
    let mut rows: Vec<(usize, Label)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        match parse_label(&fields, nc) {
            Ok((l, segment)) => {
                out.segments += segment as usize;
                match rows.iter().find(|(_, r)| *r == l) {
                    Some((first, _)) => {
                        out.duplicates += 1;
                        out.skipped.push((i + 1, format!("duplicate of line {first}, removed")));
                    }
                    None => rows.push((i + 1, l)),
                }
            }
            Err(reason) => out.skipped.push((i + 1, reason)),
        }
    }
    if out.duplicates > 0 {
        // np.unique(lb, axis=0): rows sorted lexicographically
        rows.sort_by(|(_, a), (_, b)| (a.class as f32).total_cmp(&(b.class as f32)).then_with(|| a.xywh.iter().zip(&b.xywh).map(|(x, y)| x.total_cmp(y)).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)));
    }
    out.boxes = rows.into_iter().map(|(_, l)| l).collect();
    Ok(out)
}

/// One line as a box; `true` when it was a polygon. YOLOv5 turns every line of
/// a file into a polygon once any line is one, so a box line next to polygons
/// becomes a box from (x, y) to (w, h) there; here each line keeps its kind.
fn parse_label(fields: &[&str], nc: usize) -> std::result::Result<(Label, bool), String> {
    let segment = fields.len() > 6;
    if !segment && fields.len() != 5 {
        return Err(format!("expected 5 values (class x y w h) or a polygon (class x1 y1 x2 y2 x3 y3 ...), found {}", fields.len()));
    }
    if segment && fields.len().is_multiple_of(2) {
        return Err(format!("a polygon needs x y pairs after the class, found {} coordinates", fields.len() - 1));
    }
    let v: Vec<f32> = fields.iter().map(|f| f.parse::<f32>().map_err(|_| format!("`{f}` is not a number"))).collect::<std::result::Result<_, _>>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err("a value is NaN or infinite".into());
    }
    if v[0] < 0.0 || v[0].fract() != 0.0 {
        return Err(format!("class `{}` is not a non-negative integer", fields[0]));
    }
    let class = v[0] as usize;
    if class >= nc {
        return Err(format!("class {class} is not below nc = {nc}"));
    }
    let xywh = if segment { segment_box(&v[1..]) } else { [v[1], v[2], v[3], v[4]] };
    // checked after the conversion, as YOLOv5 checks the converted boxes
    if xywh.iter().any(|&x| !(0.0..=1.0).contains(&x)) {
        return Err(if segment { "polygon points are not normalised to [0, 1]".into() } else { "coordinates are not normalised to [0, 1]".into() });
    }
    Ok((Label { class, xywh }, segment))
}

/// `segments2boxes`: the min/max of the points, as xywh (f32, as numpy).
fn segment_box(xy: &[f32]) -> [f32; 4] {
    let (mut x1, mut y1, mut x2, mut y2) = (f32::INFINITY, f32::INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for p in xy.chunks_exact(2) {
        (x1, x2, y1, y2) = (x1.min(p[0]), x2.max(p[0]), y1.min(p[1]), y2.max(p[1]));
    }
    [(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1]
}

/// The label counts of a split, as YOLOv5's "Scanning ..." line gives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelScan {
    pub images: usize,
    /// Images with something at their label path (possibly empty, possibly
    /// unreadable: `bad_files` of them).
    pub found: usize,
    pub segments: usize,
    pub duplicates: usize,
    /// Skipped lines, duplicates excluded.
    pub bad_lines: usize,
    /// Label files skipped whole.
    pub bad_files: usize,
}

pub fn scan_labels(images: &[PathBuf], nc: usize) -> LabelScan {
    let all: Vec<Labels> = images.par_iter().map(|i| read_labels(&label_path(i), nc).unwrap_or_default()).collect();
    let mut s = LabelScan { images: images.len(), ..Default::default() };
    for l in &all {
        s.found += l.found as usize;
        s.segments += l.segments;
        s.duplicates += l.duplicates;
        s.bad_files += l.skipped.iter().filter(|(line, _)| *line == 0).count();
        s.bad_lines += l.skipped.iter().filter(|(line, _)| *line > 0).count() - l.duplicates;
    }
    s
}

impl LabelScan {
    /// One line for the log, or None when every image has a clean label file.
    pub fn summary(&self, split: &str) -> Option<String> {
        let mut parts = Vec::new();
        let missing = self.images - self.found;
        let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        if missing > 0 {
            parts.push(format!("{} (background)", plural(missing, "image without a label file", "images without a label file")));
        }
        if self.segments > 0 {
            parts.push(format!("{} converted to boxes", plural(self.segments, "polygon label", "polygon labels")));
        }
        if self.duplicates > 0 {
            parts.push(format!("{} removed", plural(self.duplicates, "duplicate label", "duplicate labels")));
        }
        if self.bad_lines > 0 {
            parts.push(format!("{} skipped", plural(self.bad_lines, "bad label line", "bad label lines")));
        }
        if self.bad_files > 0 {
            parts.push(format!("{} skipped", plural(self.bad_files, "unreadable label file", "unreadable label files")));
        }
        (!parts.is_empty()).then(|| format!("{split}: {} images, {} label files: {}", self.images, self.found, parts.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{images, write};

    #[test]
    fn bad_label_lines_are_skipped_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n1 1.5 0.5 0.1 0.1\n1 nan 0.5 0.1 0.1\n1 0.5 0.5\n0 0.5 0.5 0.1 0.1\n").unwrap();
        let l = read_labels(&p, 5).unwrap();
        assert_eq!(l.boxes.len(), 1);
        assert_eq!(l.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
        assert_eq!(l.skipped[4].1, "duplicate of line 1, removed");
        assert_eq!(l.duplicates, 1);
    }

    #[test]
    fn polygons_become_their_bounding_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        // a triangle, a quadrilateral, an odd coordinate count, a box line
        std::fs::write(&p, "1 0.1 0.2 0.5 0.2 0.3 0.6\n0 0.25 0.75 0.75 0.75 0.75 0.25 0.25 0.25\n0 0.1 0.2 0.3 0.4 0.5 0.6 0.7\n2 0.5 0.5 0.2 0.2\n").unwrap();
        let l = read_labels(&p, 3).unwrap();
        assert_eq!(l.segments, 2);
        let (x1, y1, x2, y2) = (0.1f32, 0.2f32, 0.5f32, 0.6f32);
        assert_eq!(l.boxes[0], Label { class: 1, xywh: [(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1] });
        assert_eq!(l.boxes[1], Label { class: 0, xywh: [0.5, 0.5, 0.5, 0.5] });
        assert_eq!(l.boxes[2], Label { class: 2, xywh: [0.5, 0.5, 0.2, 0.2] });
        assert_eq!(l.skipped.len(), 1);
        assert!(l.skipped[0].0 == 3 && l.skipped[0].1.contains("x y pairs"), "{:?}", l.skipped);
        // points outside the image give a box outside it: skipped, as YOLOv5's check
        std::fs::write(&p, "0 0.1 0.2 1.5 0.2 0.3 0.6\n").unwrap();
        assert!(read_labels(&p, 3).unwrap().skipped[0].1.contains("polygon points are not normalised"));
    }

    #[test]
    fn duplicates_leave_the_rows_in_np_unique_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "2 0.5 0.5 0.2 0.2\n0 0.7 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n0 0.3 0.5 0.2 0.2\n").unwrap();
        let l = read_labels(&p, 3).unwrap();
        let xs: Vec<(usize, f32)> = l.boxes.iter().map(|b| (b.class, b.xywh[0])).collect();
        assert_eq!(xs, [(0, 0.3), (0, 0.7), (2, 0.5)]);
        assert_eq!(l.skipped, [(3, "duplicate of line 1, removed".to_string())]);
        // without duplicates the file's order stays (YOLOv5 only reindexes then)
        std::fs::write(&p, "2 0.5 0.5 0.2 0.2\n0 0.7 0.5 0.2 0.2\n").unwrap();
        assert_eq!(read_labels(&p, 3).unwrap().boxes[0].class, 2);
    }

    #[test]
    fn an_unreadable_label_file_is_skipped_whole_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let is_dir = dir.path().join("labels/a.txt");
        std::fs::create_dir_all(&is_dir).unwrap();
        let l = read_labels(&is_dir, 3).unwrap();
        assert!(l.boxes.is_empty() && l.skipped == [(0, "it is a directory, not a label file".to_string())], "{:?}", l.skipped);
        let latin1 = dir.path().join("labels/b.txt");
        std::fs::write(&latin1, b"0 0.5 0.5 0.2 0.2 \xe9t\xe9\n").unwrap();
        let l = read_labels(&latin1, 3).unwrap();
        assert!(l.found && l.skipped[0].0 == 0 && l.skipped[0].1.contains("not UTF-8"), "{:?}", l.skipped);
        assert_eq!(skip_message(&latin1, 0, "x"), format!("warning: {}: x; label file skipped", latin1.display()));
    }

    #[test]
    fn the_label_scan_counts_what_a_user_should_know() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        images(d, &["a.jpg", "b.jpg", "c.jpg", "e.jpg"]);
        write(&d.join("labels/a.txt"), b"0 0.1 0.1 0.2 0.1 0.2 0.2\n0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1 0.1\n9 0.5 0.5 0.1 0.1\n");
        std::fs::create_dir_all(d.join("labels/b.txt")).unwrap();
        write(&d.join("labels/c.txt"), b"");
        let imgs: Vec<PathBuf> = ["a", "b", "c", "e"].iter().map(|n| d.join(format!("images/{n}.jpg"))).collect();
        let s = scan_labels(&imgs, 1);
        assert_eq!(s, LabelScan { images: 4, found: 3, segments: 1, duplicates: 1, bad_lines: 1, bad_files: 1 });
        assert_eq!(
            s.summary("train").unwrap(),
            "train: 4 images, 3 label files: 1 image without a label file (background), 1 polygon label converted to boxes, 1 duplicate label removed, 1 bad label line skipped, 1 unreadable label file skipped"
        );
    }
}
