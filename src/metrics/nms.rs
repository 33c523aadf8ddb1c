// YOLOv5 v7.0 non_max_suppression (utils/general.py) for ONE image, with
// torchvision.ops.nms's CPU kernel inside.
// In: [N, 5+nc] f32 rows in the exported output0 layout (cx, cy, w, h in network-input
// pixels, obj, per-class scores; already sigmoided). Out: [n, 6] f32 rows
// [x1, y1, x2, y2, conf, cls], highest conf first, n <= max_det.
//
// Precision follows torch: scores/boxes in f32; conf_thres compared in f32 (torch
// rounds a Python float to the tensor dtype for `>`); the NMS IoU is f32 but compared
// with iou_thres as f64 (torchvision's kernel takes `double iou_threshold`).
//
// Ties: torch's argsort(descending=True) and torchvision's score sort are not stable
// for more than 16 elements, so YOLOv5's order among EQUAL confidences is unspecified.
// We use a stable sort: equal confidences keep candidate order (row index, then class
// index), which is also what torch gives for <= 16 candidates.

use ndarray::{Array2, ArrayView2};

/// YOLOv5's class offset for batched NMS ("maximum box width and height").
pub const MAX_WH: f32 = 7680.0;
/// YOLOv5's cap on boxes fed into torchvision.ops.nms.
pub const MAX_NMS: usize = 30000;

/// One candidate after the conf filter: xyxy box, conf, class.
#[derive(Clone, Copy, Debug)]
struct Cand {
    b: [f32; 4],
    conf: f32,
    cls: usize,
}

/// YOLOv5 non_max_suppression for one image (labels=(), nm=0, merge off).
/// `conf_thres`/`iou_thres` are the Python floats YOLOv5 receives (val.py: 0.001 / 0.6,
/// detect.py: 0.25 / 0.45); `multi_label` is forced off when nc == 1, as YOLOv5 does.
pub fn non_max_suppression(
    prediction: ArrayView2<f32>,
    conf_thres: f64,
    iou_thres: f64,
    classes: Option<&[usize]>,
    agnostic: bool,
    multi_label: bool,
    max_det: usize,
) -> Array2<f32> {
    assert!(
        (0.0..=1.0).contains(&conf_thres),
        "Invalid Confidence threshold {conf_thres}, valid values are between 0.0 and 1.0"
    );
    assert!(
        (0.0..=1.0).contains(&iou_thres),
        "Invalid IoU {iou_thres}, valid values are between 0.0 and 1.0"
    );
    assert!(
        prediction.ncols() >= 5,
        "prediction rows need 5 + nc columns"
    );
    let nc = prediction.ncols() - 5;
    let multi_label = multi_label && nc > 1;
    let conf_t = conf_thres as f32;

    let mut cands: Vec<Cand> = Vec::new();
    for row in prediction.rows() {
        let obj = row[4];
        // written as a positive test so a NaN obj is dropped, as torch's `obj > conf_thres`
        let is_candidate = obj > conf_t;
        if !is_candidate {
            continue;
        }
        // same arithmetic as boxes::xywh2xyxy
        let b = [
            row[0] - row[2] / 2.0,
            row[1] - row[3] / 2.0,
            row[0] + row[2] / 2.0,
            row[1] + row[3] / 2.0,
        ];
        if multi_label {
            for j in 0..nc {
                let conf = row[5 + j] * obj;
                if conf > conf_t {
                    cands.push(Cand { b, conf, cls: j });
                }
            }
        } else if nc > 0 {
            // torch max(1): first index of the maximum; a NaN wins (and then fails the filter)
            let mut best = 0;
            let mut best_v = row[5] * obj;
            for j in 1..nc {
                let v = row[5 + j] * obj;
                if best_v.is_nan() {
                    break;
                }
                if v > best_v || v.is_nan() {
                    best = j;
                    best_v = v;
                }
            }
            if best_v > conf_t {
                cands.push(Cand {
                    b,
                    conf: best_v,
                    cls: best,
                });
            }
        }
    }
    if let Some(keep) = classes {
        cands.retain(|c| keep.contains(&c.cls));
    }
    if cands.is_empty() {
        return Array2::zeros((0, 6));
    }
    // NaN confs never pass `> conf_t`, so partial_cmp is total here
    cands.sort_by(|a, b| b.conf.partial_cmp(&a.conf).unwrap());
    cands.truncate(MAX_NMS);

    let keep = batched_nms(&cands, iou_thres, agnostic);
    let n = keep.len().min(max_det);
    let mut out = Array2::<f32>::zeros((n, 6));
    for (r, &k) in keep[..n].iter().enumerate() {
        let c = &cands[k];
        out.row_mut(r).assign(&ndarray::arr1(&[
            c.b[0],
            c.b[1],
            c.b[2],
            c.b[3],
            c.conf,
            c.cls as f32,
        ]));
    }
    out
}

/// YOLOv5's class-offset trick + torchvision nms. Returns kept positions in score order.
///
/// YOLOv5 adds cls * 7680 to every coordinate (in f32, which rounds) and runs one NMS.
/// When all x (or all y) coordinates span at most 7680 px, offset boxes of different classes can never
/// intersect (f32 rounding is monotone), so per-class greedy NMS on the same offset boxes
/// keeps exactly the same set; we use that to avoid an O(n^2) pass over all classes, and
/// fall back to the single global pass otherwise (huge or non-finite coordinates).
fn batched_nms(cands: &[Cand], iou_thres: f64, agnostic: bool) -> Vec<usize> {
    let boxes: Vec<[f32; 4]> = cands
        .iter()
        .map(|c| {
            let off = c.cls as f32 * if agnostic { 0.0 } else { MAX_WH };
            [c.b[0] + off, c.b[1] + off, c.b[2] + off, c.b[3] + off]
        })
        .collect();
    // the offset moves both axes, so disjoint x (or y) ranges per class are enough
    let span = |axis: usize| {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for c in cands {
            for v in [c.b[axis], c.b[axis + 2]] {
                if !v.is_finite() {
                    return f64::INFINITY;
                }
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
        hi as f64 - lo as f64
    };
    let separable = !agnostic && (span(0) <= MAX_WH as f64 || span(1) <= MAX_WH as f64);
    if !separable {
        let all: Vec<usize> = (0..cands.len()).collect();
        return nms_greedy(&boxes, &all, iou_thres);
    }
    let ncls = cands.iter().map(|c| c.cls).max().unwrap_or(0) + 1;
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); ncls];
    for (i, c) in cands.iter().enumerate() {
        groups[c.cls].push(i);
    }
    let mut keep: Vec<usize> = groups
        .iter()
        .filter(|g| !g.is_empty())
        .flat_map(|g| nms_greedy(&boxes, g, iou_thres))
        .collect();
    keep.sort_unstable();
    keep
}

/// C++ std::max / std::min as torchvision calls them (NaN handling included).
#[inline]
fn cmax(a: f32, b: f32) -> f32 {
    if a < b { b } else { a }
}
#[inline]
fn cmin(a: f32, b: f32) -> f32 {
    if b < a { b } else { a }
}

/// torchvision nms_kernel_impl over `order` (indices into `boxes`, already score-sorted):
/// keep a box, suppress every later one with IoU > iou_thres (IoU in f32, compared in f64).
fn nms_greedy(boxes: &[[f32; 4]], order: &[usize], iou_thres: f64) -> Vec<usize> {
    let areas: Vec<f32> = order
        .iter()
        .map(|&i| (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
        .collect();
    let mut suppressed = vec![false; order.len()];
    let mut keep = Vec::new();
    for a in 0..order.len() {
        if suppressed[a] {
            continue;
        }
        keep.push(order[a]);
        let bi = boxes[order[a]];
        for b in a + 1..order.len() {
            if suppressed[b] {
                continue;
            }
            let bj = boxes[order[b]];
            let xx1 = cmax(bi[0], bj[0]);
            let yy1 = cmax(bi[1], bj[1]);
            let xx2 = cmin(bi[2], bj[2]);
            let yy2 = cmin(bi[3], bj[3]);
            let w = cmax(0.0, xx2 - xx1);
            let h = cmax(0.0, yy2 - yy1);
            let inter = w * h;
            let ovr = inter / (areas[a] + areas[b] - inter);
            if ovr as f64 > iou_thres {
                suppressed[b] = true;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn suppresses_overlaps_per_class() {
        // two heavily overlapping class-0 boxes, one class-1 box on top of them
        let p = array![
            [50.0f32, 50.0, 20.0, 20.0, 0.9, 0.9, 0.1],
            [51.0, 50.0, 20.0, 20.0, 0.8, 0.9, 0.1],
            [50.0, 50.0, 20.0, 20.0, 0.7, 0.1, 0.9],
            [200.0, 200.0, 10.0, 10.0, 0.0005, 0.9, 0.9],
        ];
        let out = non_max_suppression(p.view(), 0.25, 0.45, None, false, false, 300);
        assert_eq!(out.nrows(), 2);
        assert_eq!(
            out.row(0).to_vec(),
            vec![40.0, 40.0, 60.0, 60.0, 0.9f32 * 0.9, 0.0]
        );
        assert_eq!(out[[1, 5]], 1.0);
        let agn = non_max_suppression(p.view(), 0.25, 0.45, None, true, false, 300);
        assert_eq!(agn.nrows(), 1);
        let only1 = non_max_suppression(p.view(), 0.25, 0.45, Some(&[1]), false, false, 300);
        assert_eq!(only1.nrows(), 1);
        assert_eq!(only1[[0, 5]], 1.0);
    }

    #[test]
    fn multi_label_emits_box_class_pairs() {
        let p = array![[50.0f32, 50.0, 20.0, 20.0, 0.9, 0.9, 0.5]];
        let out = non_max_suppression(p.view(), 0.001, 0.6, None, false, true, 300);
        assert_eq!(out.nrows(), 2);
        assert!(out[[0, 4]] > out[[1, 4]]);
        assert_eq!(out.column(5).to_vec(), vec![0.0, 1.0]);
        // nc == 1 turns multi_label off (same result either way here)
        let p1 = array![[50.0f32, 50.0, 20.0, 20.0, 0.9, 0.9]];
        assert_eq!(
            non_max_suppression(p1.view(), 0.001, 0.6, None, false, true, 300).nrows(),
            1
        );
    }

    #[test]
    fn max_det_and_empty() {
        let p = array![
            [10.0f32, 10.0, 5.0, 5.0, 0.9, 0.9],
            [100.0, 100.0, 5.0, 5.0, 0.8, 0.9]
        ];
        assert_eq!(
            non_max_suppression(p.view(), 0.25, 0.45, None, false, false, 1).nrows(),
            1
        );
        let none = non_max_suppression(p.view(), 0.95, 0.45, None, false, false, 300);
        assert_eq!(none.dim(), (0, 6));
    }

    #[test]
    fn global_fallback_equals_grouped() {
        // spread boxes beyond 7680 px in both axes force the single-pass path
        let p = array![
            [50.0f32, 50.0, 20.0, 20.0, 0.9, 0.9, 0.8],
            [52.0, 50.0, 20.0, 20.0, 0.8, 0.9, 0.8],
            [9000.0, 9000.0, 20.0, 20.0, 0.8, 0.9, 0.8],
        ];
        let out = non_max_suppression(p.view(), 0.25, 0.45, None, false, true, 300);
        assert_eq!(out.nrows(), 4);
        // class 1 at (20, 120) lands on class 0 at (7700, 7800) after the offset: suppressed,
        // as in YOLOv5 (edge_cases.json checks the same against yolov5)
        let q = array![
            [7700.0f32, 7800.0, 60.0, 60.0, 0.9, 0.9, 0.1],
            [20.0, 120.0, 60.0, 60.0, 0.8, 0.1, 0.9]
        ];
        assert_eq!(
            non_max_suppression(q.view(), 0.25, 0.45, None, false, false, 300).nrows(),
            1
        );
    }
}
