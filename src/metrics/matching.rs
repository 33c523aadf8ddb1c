// val.py's process_batch: which detections are true positives at each IoU threshold.
// In: detections [N, 6] (x1, y1, x2, y2, conf, cls) and labels [M, 5] (cls, x1, y1, x2, y2),
// both f32 in the same (original-image) pixel space; iouv thresholds (IOUV = YOLOv5's).
// Out: correct [N, len(iouv)] bool.
//
// The matching is YOLOv5 v7.0's, quirks included: matches are sorted by IoU, deduplicated
// per detection (keeping its highest-IoU label), and then deduplicated per label WITHOUT
// re-sorting (that line is commented out in val.py), so a label keeps the match with the
// lowest detection index, not the highest IoU. np.unique(return_index=True) keeps the first
// occurrence and returns rows ordered by the unique key; we do the same.
//
// Ties: numpy's argsort (quicksort kind) is only deterministic for <= 3 elements on SIMD
// builds; there it equals a stable ascending sort, reversed by [::-1]. We always use that
// (equal IoUs: later match first). With >= 4 matches and exactly equal IoUs, YOLOv5's own
// result depends on the numpy build.

use ndarray::{Array2, ArrayView2};

use crate::metrics::boxes::box_iou;

/// torch.linspace(0.5, 0.95, 10) in float32 (bit patterns checked in the tests).
pub const IOUV: [f32; 10] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];

/// One [label, detection, iou] row of YOLOv5's `matches` array.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Match {
    pub label: usize,
    pub det: usize,
    pub iou: f32,
}

/// `matches[matches[:, 2].argsort()[::-1]]` with numpy's small-array tie order (see header).
pub(crate) fn sort_by_iou_desc(m: &mut [Match]) {
    m.sort_by(|a, b| a.iou.total_cmp(&b.iou));
    m.reverse();
}

/// `matches[np.unique(key, return_index=True)[1]]`: first row per key, ordered by key.
pub(crate) fn unique_first(m: &[Match], key: impl Fn(&Match) -> usize) -> Vec<Match> {
    let mut seen = std::collections::BTreeMap::new();
    for r in m {
        seen.entry(key(r)).or_insert(*r);
    }
    seen.into_values().collect()
}

/// val.py process_batch. `iouv` is normally `&IOUV`.
pub fn process_batch(
    detections: ArrayView2<f32>,
    labels: ArrayView2<f32>,
    iouv: &[f32],
) -> Array2<bool> {
    assert!(
        detections.ncols() >= 6,
        "detections need [x1, y1, x2, y2, conf, cls]"
    );
    assert!(labels.ncols() >= 5, "labels need [cls, x1, y1, x2, y2]");
    let mut correct = Array2::from_elem((detections.nrows(), iouv.len()), false);
    let iou = box_iou(
        labels.slice(ndarray::s![.., 1..5]),
        detections.slice(ndarray::s![.., ..4]),
    );
    for (i, &thr) in iouv.iter().enumerate() {
        // torch.where order: label-major, then detection
        let mut matches: Vec<Match> = Vec::new();
        for l in 0..labels.nrows() {
            for d in 0..detections.nrows() {
                let v = iou[[l, d]];
                if v >= thr && labels[[l, 0]] == detections[[d, 5]] {
                    matches.push(Match {
                        label: l,
                        det: d,
                        iou: v,
                    });
                }
            }
        }
        if matches.len() > 1 {
            sort_by_iou_desc(&mut matches);
            matches = unique_first(&matches, |m| m.det);
            matches = unique_first(&matches, |m| m.label);
        }
        for m in &matches {
            correct[[m.det, i]] = true;
        }
    }
    correct
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn iouv_is_torch_linspace_f32() {
        let bits: Vec<u32> = IOUV.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            bits,
            vec![
                0x3f000000, 0x3f0ccccd, 0x3f19999a, 0x3f266666, 0x3f333333, 0x3f400000, 0x3f4ccccd,
                0x3f59999a, 0x3f666666, 0x3f733333
            ]
        );
    }

    #[test]
    fn one_label_one_tp() {
        let labels = array![[0.0f32, 0.0, 0.0, 10.0, 10.0]];
        // det 0 exact, det 1 slightly worse, det 2 wrong class
        let dets = array![
            [0.0f32, 0.0, 10.0, 10.0, 0.9, 0.0],
            [0.0, 0.0, 10.0, 9.0, 0.8, 0.0],
            [0.0, 0.0, 10.0, 10.0, 0.95, 1.0]
        ];
        let c = process_batch(dets.view(), labels.view(), &IOUV);
        assert!(c.row(0).iter().all(|&v| v));
        assert!(c.row(1).iter().all(|&v| !v));
        assert!(c.row(2).iter().all(|&v| !v));
    }

    #[test]
    fn label_keeps_lowest_detection_index_not_best_iou() {
        // one label matched by det 0 (IoU 0.7) and det 1 (IoU 0.9): after the per-detection
        // pass rows are in detection order, so the per-label pass keeps det 0
        let labels = array![[0.0f32, 0.0, 0.0, 10.0, 10.0]];
        let dets = array![
            [0.0f32, 0.0, 10.0, 7.0, 0.9, 0.0],
            [0.0, 0.0, 10.0, 9.0, 0.8, 0.0]
        ];
        let c = process_batch(dets.view(), labels.view(), &IOUV);
        // det 0 (iou 0.7) wins over det 1 (iou 0.9) at thresholds <= 0.7
        assert!(c[[0, 0]] && !c[[1, 0]]);
        // above 0.7 only det 1 qualifies
        assert!(!c[[0, 5]] && c[[1, 5]]);
    }

    #[test]
    fn unique_first_orders_by_key() {
        let m = [
            Match {
                label: 2,
                det: 5,
                iou: 0.9,
            },
            Match {
                label: 1,
                det: 3,
                iou: 0.8,
            },
            Match {
                label: 2,
                det: 3,
                iou: 0.7,
            },
        ];
        let u = unique_first(&m, |r| r.det);
        assert_eq!(u, vec![m[1], m[0]]);
    }

    #[test]
    fn ties_put_later_match_first() {
        let mut m = vec![
            Match {
                label: 0,
                det: 0,
                iou: 0.5,
            },
            Match {
                label: 0,
                det: 1,
                iou: 0.5,
            },
        ];
        sort_by_iou_desc(&mut m);
        assert_eq!(m[0].det, 1);
    }
}
