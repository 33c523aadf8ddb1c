// YOLOv5 v7.0 ConfusionMatrix (utils/metrics.py).
// In: per image, detections [N, 6] (x1, y1, x2, y2, conf, cls) and labels [M, 5]
// (cls, x1, y1, x2, y2) in the same pixel space. Out: an (nc+1) x (nc+1) count matrix,
// rows = predicted class, columns = true class, index nc = background.
//
// v7.0 behaviour kept on purpose (later YOLOv5 versions changed some of it):
// - detections are kept if conf > conf (strict), matched if IoU > iou_thres (strict);
// - unmatched detections count as background FPs only when the image had at least one
//   match at all (`if n:`); an image whose detections all miss adds no FPs;
// - matches: sort by IoU, first per detection, re-sort by IoU, first per label.
// Thresholds are compared in f32 (torch tensor vs Python float). Equal IoUs among >= 4
// matches order as numpy's small-array sort would; YOLOv5 itself is build-dependent there
// (see matching.rs).

use ndarray::{Array2, ArrayView2};

use crate::metrics::boxes::box_iou;
use crate::metrics::matching::{Match, sort_by_iou_desc, unique_first};

/// YOLOv5 ConfusionMatrix; `matrix[[pred, true]]` counts, nc = background.
#[derive(Clone, Debug)]
pub struct ConfusionMatrix {
    pub matrix: Array2<u64>,
    pub nc: usize,
    pub conf: f64,
    pub iou_thres: f64,
}

impl ConfusionMatrix {
    /// YOLOv5 defaults are conf = 0.25, iou_thres = 0.45 (what val.py uses).
    pub fn new(nc: usize, conf: f64, iou_thres: f64) -> Self {
        ConfusionMatrix {
            matrix: Array2::zeros((nc + 1, nc + 1)),
            nc,
            conf,
            iou_thres,
        }
    }

    /// YOLOv5 process_batch. `detections = None` is val.py's "no predictions" call: every
    /// label (class from column 0 of `labels`) is a background FN.
    pub fn process_batch(&mut self, detections: Option<ArrayView2<f32>>, labels: ArrayView2<f32>) {
        let gt_classes: Vec<usize> = labels.column(0).iter().map(|&c| c as usize).collect();
        let Some(detections) = detections else {
            for gc in gt_classes {
                self.matrix[[self.nc, gc]] += 1;
            }
            return;
        };
        let conf_t = self.conf as f32;
        let iou_t = self.iou_thres as f32;
        let kept: Vec<usize> = (0..detections.nrows())
            .filter(|&i| detections[[i, 4]] > conf_t)
            .collect();
        let dets = detections.select(ndarray::Axis(0), &kept);
        // .int() truncates toward zero
        let detection_classes: Vec<usize> = dets.column(5).iter().map(|&c| c as usize).collect();
        let iou = box_iou(
            labels.slice(ndarray::s![.., 1..5]),
            dets.slice(ndarray::s![.., ..4]),
        );

        let mut matches: Vec<Match> = Vec::new();
        for l in 0..iou.nrows() {
            for d in 0..iou.ncols() {
                if iou[[l, d]] > iou_t {
                    matches.push(Match {
                        label: l,
                        det: d,
                        iou: iou[[l, d]],
                    });
                }
            }
        }
        if matches.len() > 1 {
            sort_by_iou_desc(&mut matches);
            matches = unique_first(&matches, |m| m.det);
            sort_by_iou_desc(&mut matches);
            matches = unique_first(&matches, |m| m.label);
        }

        let n = !matches.is_empty();
        for (i, &gc) in gt_classes.iter().enumerate() {
            // after the per-label pass a label has at most one match
            let hits: Vec<&Match> = matches.iter().filter(|m| m.label == i).collect();
            if n && hits.len() == 1 {
                self.matrix[[detection_classes[hits[0].det], gc]] += 1;
            } else {
                self.matrix[[self.nc, gc]] += 1;
            }
        }
        if n {
            for (i, &dc) in detection_classes.iter().enumerate() {
                if !matches.iter().any(|m| m.det == i) {
                    self.matrix[[dc, self.nc]] += 1;
                }
            }
        }
    }

    /// YOLOv5 tp_fp: diagonal and row sums minus diagonal, background dropped.
    pub fn tp_fp(&self) -> (Vec<u64>, Vec<u64>) {
        let tp: Vec<u64> = (0..self.nc).map(|i| self.matrix[[i, i]]).collect();
        let fp: Vec<u64> = (0..self.nc)
            .map(|i| self.matrix.row(i).sum() - self.matrix[[i, i]])
            .collect();
        (tp, fp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn correct_wrong_class_and_background() {
        let mut cm = ConfusionMatrix::new(2, 0.25, 0.45);
        let labels = array![
            [0.0f32, 0.0, 0.0, 10.0, 10.0],
            [1.0, 50.0, 50.0, 60.0, 60.0],
            [1.0, 100.0, 100.0, 110.0, 110.0]
        ];
        let dets = array![
            [0.0f32, 0.0, 10.0, 10.0, 0.9, 0.0],    // TP class 0
            [50.0, 50.0, 60.0, 60.0, 0.8, 0.0],     // class 1 predicted as 0
            [200.0, 200.0, 210.0, 210.0, 0.7, 1.0], // background FP (class 1)
            [100.0, 100.0, 110.0, 110.0, 0.2, 1.0], // below conf: ignored -> label 2 is FN
        ];
        cm.process_batch(Some(dets.view()), labels.view());
        assert_eq!(cm.matrix, array![[1u64, 1, 0], [0, 0, 1], [0, 1, 0]]);
        let (tp, fp) = cm.tp_fp();
        assert_eq!(tp, vec![1, 0]);
        assert_eq!(fp, vec![1, 1]);
    }

    #[test]
    fn no_match_means_no_background_fp() {
        let mut cm = ConfusionMatrix::new(1, 0.25, 0.45);
        let labels = array![[0.0f32, 0.0, 0.0, 10.0, 10.0]];
        let dets = array![[100.0f32, 100.0, 110.0, 110.0, 0.9, 0.0]];
        cm.process_batch(Some(dets.view()), labels.view());
        // v7.0: the unmatched detection is not counted
        assert_eq!(cm.matrix, array![[0u64, 0], [1, 0]]);
        cm.process_batch(None, labels.view());
        assert_eq!(cm.matrix[[1, 0]], 2);
    }
}
