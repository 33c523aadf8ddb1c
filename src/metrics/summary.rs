// ValStats: val.py's per-image metrics loop and final "Compute metrics" block, plus two
// metrics of our own.
// In (per image, via `update`): predictions after NMS as [n, 6] (x1, y1, x2, y2, conf, cls)
// and labels as [m, 5] (cls, x1, y1, x2, y2), both f32 in original-image pixels (val.py's
// predn / labelsn). Out (`finish`): P, R, mAP50, mAP50-95, the per-class table, the
// confusion matrix, class-agnostic mAP50 and matched-box class accuracy.
//
// Parity notes (YOLOv5 v7.0 val.py, single_cls=False, plots=True):
// - an image with no predictions adds its labels to the targets and, if it has labels,
//   counts them as background FNs in the confusion matrix; an image with predictions but
//   no labels adds its predictions as FPs to the AP stats but is NOT passed to the
//   confusion matrix (so its FPs never appear there);
// - if no prediction is a TP at any IoU threshold, P/R/mAP are all 0 and the per-class
//   table is empty (val.py's `if len(stats) and stats[0].any()`);
// - the per-class "images" column is the total number of images seen, as v7.0 prints it.
//
// Our extra metrics (no YOLOv5 counterpart):
// - agnostic_map50: ap_per_class with every predicted and true class set to 0, on a
//   correct matrix recomputed with classes ignored. NMS stays class-aware (the caller's),
//   so one box emitted for two classes by multi-label NMS yields one TP and one FP here.
// - class accuracy: among predictions with conf > 0.25 (the confusion matrix's filter,
//   strict like it) that overlap a ground-truth box with IoU >= 0.5, class ignored, the
//   box takes the most confident one (ties: higher IoU, then lower index); the box is
//   "matched" if there is one and "correct" if its class equals the label's. Not
//   one-to-one: one prediction may serve several labels. Most confident rather than
//   highest IoU: multi-label NMS leaves several boxes per object (one per class and
//   anchor), and picking by IoU would score whichever low-confidence class box happens
//   to sit best, not the class the detector gives the object.

use ndarray::{Array2, ArrayView2};

use crate::metrics::ap::{ApPerClass, ap_per_class};
use crate::metrics::boxes::box_iou;
use crate::metrics::confusion::ConfusionMatrix;
use crate::metrics::matching::{IOUV, process_batch};
use crate::metrics::npmath;

/// Confidence threshold of the class-accuracy metric (ConfusionMatrix's default).
pub const CLASS_ACC_CONF: f32 = 0.25;
/// IoU a label needs with its best prediction to count as matched.
pub const CLASS_ACC_IOU: f32 = 0.5;

/// One row of val.py's per-class table.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassMetrics {
    pub class: usize,
    /// Images seen in total (v7.0 prints `seen` here, not images containing the class).
    pub images: usize,
    pub instances: usize,
    pub p: f64,
    pub r: f64,
    pub ap50: f64,
    pub ap50_95: f64,
}

/// Matched-box class accuracy (see file header for the definition).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassAccuracy {
    /// Ground-truth boxes whose best prediction has IoU >= 0.5.
    pub matched: usize,
    /// Of those, how many the best prediction names correctly.
    pub correct: usize,
    /// correct / matched, 0 when nothing matched.
    pub accuracy: f64,
}

/// Everything val.py reports, plus our two metrics.
#[derive(Clone, Debug)]
pub struct ValSummary {
    pub seen: usize,
    /// Total labels (val.py's nt.sum()).
    pub instances: usize,
    pub mp: f64,
    pub mr: f64,
    pub map50: f64,
    pub map: f64,
    /// Rows for the target classes present, ascending (empty when no TP at all).
    pub per_class: Vec<ClassMetrics>,
    /// Labels per class id, length max(nc, largest id + 1) (np.bincount(minlength=nc)).
    pub nt: Vec<usize>,
    pub confusion: ConfusionMatrix,
    pub agnostic_map50: f64,
    pub class_accuracy: ClassAccuracy,
    /// Full ap_per_class output (curves for plots); None when val.py would skip it.
    pub curves: Option<ApPerClass>,
}

/// Accumulates val.py's `stats` list image by image.
#[derive(Clone, Debug)]
pub struct ValStats {
    pub nc: usize,
    seen: usize,
    /// Row-major [n, 10] correct flags, class-aware and class-agnostic.
    correct: Vec<bool>,
    correct_agnostic: Vec<bool>,
    conf: Vec<f32>,
    pred_cls: Vec<usize>,
    target_cls: Vec<usize>,
    confusion: ConfusionMatrix,
    acc_matched: usize,
    acc_correct: usize,
}

impl ValStats {
    /// Empty accumulator; the confusion matrix uses YOLOv5's conf 0.25 / IoU 0.45.
    pub fn new(nc: usize) -> Self {
        ValStats {
            nc,
            seen: 0,
            correct: Vec::new(),
            correct_agnostic: Vec::new(),
            conf: Vec::new(),
            pred_cls: Vec::new(),
            target_cls: Vec::new(),
            confusion: ConfusionMatrix::new(nc, 0.25, 0.45),
            acc_matched: 0,
            acc_correct: 0,
        }
    }

    /// Add one image: `predn` [n, 6] after NMS and `labels` [m, 5], original-image pixels.
    pub fn update(&mut self, predn: ArrayView2<f32>, labels: ArrayView2<f32>) {
        assert!(
            predn.ncols() >= 6 || predn.nrows() == 0,
            "predn needs [x1, y1, x2, y2, conf, cls]"
        );
        assert!(
            labels.ncols() >= 5 || labels.nrows() == 0,
            "labels need [cls, x1, y1, x2, y2]"
        );
        let (npr, nl) = (predn.nrows(), labels.nrows());
        self.seen += 1;
        let tcls = labels.rows().into_iter().map(|r| r[0] as usize);
        if npr == 0 {
            if nl > 0 {
                self.target_cls.extend(tcls);
                self.confusion.process_batch(None, labels);
            }
            return;
        }
        let niou = IOUV.len();
        let (mut correct, mut correct_agn) = (vec![false; npr * niou], vec![false; npr * niou]);
        if nl > 0 {
            correct = process_batch(predn, labels, &IOUV).into_iter().collect();
            self.confusion.process_batch(Some(predn), labels);
            let mut p0 = predn.to_owned();
            p0.column_mut(5).fill(0.0);
            let mut l0 = labels.to_owned();
            l0.column_mut(0).fill(0.0);
            correct_agn = process_batch(p0.view(), l0.view(), &IOUV)
                .into_iter()
                .collect();
            self.update_class_accuracy(predn, labels);
        }
        self.correct.extend(correct);
        self.correct_agnostic.extend(correct_agn);
        self.conf.extend(predn.column(4).iter());
        self.pred_cls
            .extend(predn.column(5).iter().map(|&c| c as usize));
        self.target_cls.extend(tcls);
    }

    /// Appends `other`'s images after this one's, as if they had been
    /// `update`d here in that order: the per-image work runs where the
    /// images are (sparse validation, on every thread), the order of the
    /// stats and so `finish`'s ties stay the sequential ones.
    pub fn merge(&mut self, other: ValStats) {
        assert_eq!(self.nc, other.nc, "merging the stats of {} classes into {}", other.nc, self.nc);
        self.seen += other.seen;
        self.correct.extend(other.correct);
        self.correct_agnostic.extend(other.correct_agnostic);
        self.conf.extend(other.conf);
        self.pred_cls.extend(other.pred_cls);
        self.target_cls.extend(other.target_cls);
        self.confusion.matrix += &other.confusion.matrix;
        self.acc_matched += other.acc_matched;
        self.acc_correct += other.acc_correct;
    }

    fn update_class_accuracy(&mut self, predn: ArrayView2<f32>, labels: ArrayView2<f32>) {
        let kept: Vec<usize> = (0..predn.nrows())
            .filter(|&i| predn[[i, 4]] > CLASS_ACC_CONF)
            .collect();
        if kept.is_empty() {
            return;
        }
        let p = predn.select(ndarray::Axis(0), &kept);
        let iou = box_iou(
            labels.slice(ndarray::s![.., 1..5]),
            p.slice(ndarray::s![.., ..4]),
        );
        for l in 0..labels.nrows() {
            // the most confident box on the object: multi-label NMS leaves one
            // box per class and anchor on it, and the top one is what a user
            // sees (detect.py keeps one class per box)
            let mut best: Option<usize> = None;
            for d in 0..p.nrows() {
                if iou[[l, d]] < CLASS_ACC_IOU {
                    continue;
                }
                let better = match best {
                    None => true,
                    Some(b) => p[[d, 4]] > p[[b, 4]] || (p[[d, 4]] == p[[b, 4]] && iou[[l, d]] > iou[[l, b]]),
                };
                if better {
                    best = Some(d);
                }
            }
            if let Some(b) = best {
                self.acc_matched += 1;
                if p[[b, 5]] as usize == labels[[l, 0]] as usize {
                    self.acc_correct += 1;
                }
            }
        }
    }

    /// Images added so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// val.py's "Compute metrics" and per-class table, plus our metrics.
    pub fn finish(&self) -> ValSummary {
        let n = self.conf.len();
        let niou = IOUV.len();
        let (mut mp, mut mr, mut map50, mut map) = (0.0, 0.0, 0.0, 0.0);
        let mut per_class = Vec::new();
        let mut curves = None;

        let mut nt = vec![
            0usize;
            self.nc
                .max(self.target_cls.iter().map(|c| c + 1).max().unwrap_or(0))
        ];
        for &c in &self.target_cls {
            nt[c] += 1;
        }

        if self.correct.iter().any(|&v| v) {
            let tp = Array2::from_shape_vec((n, niou), self.correct.clone()).expect("stats shape");
            let res = ap_per_class(tp.view(), &self.conf, &self.pred_cls, &self.target_cls);
            let ap50: Vec<f64> = res.ap.column(0).to_vec();
            let ap_mean: Vec<f64> = res
                .ap
                .rows()
                .into_iter()
                .map(|r| npmath::mean(&r.to_vec()))
                .collect();
            mp = npmath::mean(&res.p);
            mr = npmath::mean(&res.r);
            map50 = npmath::mean(&ap50);
            map = npmath::mean(&ap_mean);
            for (i, &c) in res.unique_classes.iter().enumerate() {
                per_class.push(ClassMetrics {
                    class: c,
                    images: self.seen,
                    instances: nt[c],
                    p: res.p[i],
                    r: res.r[i],
                    ap50: ap50[i],
                    ap50_95: ap_mean[i],
                });
            }
            curves = Some(res);
        }

        let mut agnostic_map50 = 0.0;
        if self.correct_agnostic.iter().any(|&v| v) {
            let tp = Array2::from_shape_vec((n, niou), self.correct_agnostic.clone())
                .expect("stats shape");
            let res = ap_per_class(
                tp.view(),
                &self.conf,
                &vec![0; n],
                &vec![0; self.target_cls.len()],
            );
            agnostic_map50 = npmath::mean(&res.ap.column(0).to_vec());
        }

        let accuracy = if self.acc_matched > 0 {
            self.acc_correct as f64 / self.acc_matched as f64
        } else {
            0.0
        };
        ValSummary {
            seen: self.seen,
            instances: self.target_cls.len(),
            mp,
            mr,
            map50,
            map,
            per_class,
            nt,
            confusion: self.confusion.clone(),
            agnostic_map50,
            class_accuracy: ClassAccuracy {
                matched: self.acc_matched,
                correct: self.acc_correct,
                accuracy,
            },
            curves,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    #[test]
    fn perfect_predictions_score_one() {
        let mut s = ValStats::new(2);
        let labels = array![
            [0.0f32, 0.0, 0.0, 10.0, 10.0],
            [1.0, 20.0, 20.0, 40.0, 40.0]
        ];
        let preds = array![
            [0.0f32, 0.0, 10.0, 10.0, 0.9, 0.0],
            [20.0, 20.0, 40.0, 40.0, 0.8, 1.0]
        ];
        s.update(preds.view(), labels.view());
        s.update(Array2::zeros((0, 6)).view(), Array2::zeros((0, 5)).view());
        let r = s.finish();
        assert_eq!(r.seen, 2);
        assert_eq!(r.instances, 2);
        assert!(r.map50 > 0.99 && r.map > 0.99, "{} {}", r.map50, r.map);
        assert_eq!(r.per_class.len(), 2);
        assert_eq!(r.per_class[1].images, 2);
        assert!(r.agnostic_map50 > 0.99);
        assert_eq!(
            r.class_accuracy,
            ClassAccuracy {
                matched: 2,
                correct: 2,
                accuracy: 1.0
            }
        );
        assert_eq!(r.confusion.matrix[[0, 0]] + r.confusion.matrix[[1, 1]], 2);
    }

    #[test]
    fn wrong_class_hurts_map_but_not_agnostic() {
        let mut s = ValStats::new(2);
        let labels = array![[0.0f32, 0.0, 0.0, 10.0, 10.0]];
        let preds = array![[0.0f32, 0.0, 10.0, 10.0, 0.9, 1.0]];
        s.update(preds.view(), labels.view());
        let r = s.finish();
        // no TP at all -> val.py reports zeros and no per-class rows
        assert_eq!((r.mp, r.mr, r.map50, r.map), (0.0, 0.0, 0.0, 0.0));
        assert!(r.per_class.is_empty() && r.curves.is_none());
        assert!(r.agnostic_map50 > 0.99);
        assert_eq!(
            r.class_accuracy,
            ClassAccuracy {
                matched: 1,
                correct: 0,
                accuracy: 0.0
            }
        );
        assert_eq!(r.confusion.matrix[[1, 0]], 1);
        assert_eq!(r.nt, vec![1, 0]);
    }

    #[test]
    fn class_accuracy_takes_the_most_confident_overlapping_box() {
        let mut s = ValStats::new(3);
        let labels = array![[2.0f32, 0.0, 0.0, 10.0, 10.0], [1.0, 50.0, 50.0, 60.0, 60.0]];
        let preds = array![
            [0.0f32, 0.0, 10.0, 10.0, 0.3, 0.0], // exact box, wrong class, low conf
            [1.0, 1.0, 10.0, 10.0, 0.9, 2.0],    // IoU 0.81, right class, top conf
            [0.0, 0.0, 10.0, 10.0, 0.95, 1.0],   // exact box, wrong class, highest conf
            [50.0, 50.0, 58.0, 58.0, 0.8, 1.0],  // IoU 0.64 with label 1
            [40.0, 40.0, 60.0, 60.0, 0.99, 0.0]  // IoU 0.25: not a match, however confident
        ];
        // label 0 (class 2): the most confident overlapping box is row 2 (class 1): wrong;
        // without row 2 it would be row 1 (class 2): right
        s.update(preds.view(), labels.view());
        let r = s.finish();
        assert_eq!((r.class_accuracy.matched, r.class_accuracy.correct), (2, 1));
        let mut s = ValStats::new(3);
        s.update(preds.select(ndarray::Axis(0), &[0, 1, 3, 4]).view(), labels.view());
        let r = s.finish();
        assert_eq!((r.class_accuracy.matched, r.class_accuracy.correct), (2, 2));
    }

    #[test]
    fn missed_labels_and_unlabelled_predictions() {
        let mut s = ValStats::new(1);
        s.update(
            Array2::zeros((0, 6)).view(),
            array![[0.0f32, 0.0, 0.0, 5.0, 5.0]].view(),
        );
        s.update(
            array![[0.0f32, 0.0, 5.0, 5.0, 0.9, 0.0]].view(),
            Array2::zeros((0, 5)).view(),
        );
        s.update(
            array![[0.0f32, 0.0, 5.0, 5.0, 0.8, 0.0]].view(),
            array![[0.0f32, 0.0, 0.0, 5.0, 5.0]].view(),
        );
        let r = s.finish();
        assert_eq!(r.instances, 2);
        // FN from image 1 only; the FP on the unlabelled image 2 is not in the matrix
        assert_eq!(r.confusion.matrix, array![[1u64, 0], [1, 0]]);
        // one TP at conf 0.8 after an FP at 0.9, two labels
        let c = r.curves.unwrap();
        assert_eq!(c.nt, vec![2]);
        assert!(r.map50 > 0.1 && r.map50 < 0.5);
    }
}
