// YOLOv5 v7.0 utils/metrics.py: ap_per_class, compute_ap, smooth.
// In: per-prediction true-positive flags [n, k] (k = 10 IoU thresholds in val.py), conf
// (f32, as the float32 stats val.py concatenates), predicted and target class ids.
// Out: per target class P, R, F1 at the max-mean-F1 confidence, AP per threshold, tp/fp
// counts, and the curves YOLOv5 plots (px, py and the P/R/F1-vs-confidence curves).
//
// Everything after the sort is float64 numpy math, reproduced with npmath (np.interp,
// pairwise sums, trapezoid) so results match to the last bit in the normal case.
// Known numerical differences: (1) np.argsort(-conf) is not stable on SIMD numpy builds;
// we sort stably, so only EQUAL confidences within one class can order differently;
// (2) smooth()'s np.convolve sums each window with BLAS ddot; we sum left to right, so
// the smoothed F1 may differ in the last bits (only matters for an exact argmax tie).

use ndarray::{Array2, ArrayView2};

use crate::metrics::npmath;

/// ap_per_class's eps.
pub const EPS: f64 = 1e-16;
/// Length of the confidence / recall axis of YOLOv5's curves.
pub const CURVE_POINTS: usize = 1000;

/// Output of [`ap_per_class`]; rows follow `unique_classes` (sorted target classes).
#[derive(Clone, Debug)]
pub struct ApPerClass {
    /// Rounded true / false positives at the chosen confidence, per class.
    pub tp: Vec<f64>,
    pub fp: Vec<f64>,
    /// Precision, recall and F1 at the chosen confidence (index `best_index` of px).
    pub p: Vec<f64>,
    pub r: Vec<f64>,
    pub f1: Vec<f64>,
    /// AP per class per IoU threshold, [nc_u, k]. Column 0 is AP50.
    pub ap: Array2<f64>,
    /// Target classes present (np.unique), ascending.
    pub unique_classes: Vec<usize>,
    /// Number of targets per unique class.
    pub nt: Vec<usize>,
    /// Index into px where the smoothed mean F1 peaks (the reported operating point).
    pub best_index: usize,
    /// linspace(0, 1, 1000): confidence axis of p/r/f1 curves, recall axis of py.
    pub px: Vec<f64>,
    /// Precision envelope at recall px, AP50 column, [nc_u, 1000] (YOLOv5's PR plot data).
    /// YOLOv5 only appends rows for classes with predictions; here such rows are zeros.
    pub py: Array2<f64>,
    /// Precision / recall / F1 versus confidence px, [nc_u, 1000].
    pub p_curve: Array2<f64>,
    pub r_curve: Array2<f64>,
    pub f1_curve: Array2<f64>,
}

/// YOLOv5 smooth: box filter of fraction f, edges padded with the end values.
pub fn smooth(y: &[f64], f: f64) -> Vec<f64> {
    if y.is_empty() {
        return Vec::new();
    }
    // round(len * f * 2) // 2 + 1 with Python's round-half-even
    let nf = ((y.len() as f64 * f * 2.0).round_ties_even() as usize) / 2 + 1;
    let half = nf / 2;
    let mut yp = Vec::with_capacity(y.len() + 2 * half);
    yp.extend(std::iter::repeat_n(y[0], half));
    yp.extend_from_slice(y);
    yp.extend(std::iter::repeat_n(y[y.len() - 1], half));
    let w = 1.0 / nf as f64;
    (0..=yp.len() - nf)
        .map(|i| {
            let mut s = 0.0;
            for &v in &yp[i..i + nf] {
                s += v * w;
            }
            s
        })
        .collect()
}

/// YOLOv5 compute_ap ('interp' method, 101-point COCO). Returns (ap, mpre, mrec).
pub fn compute_ap(recall: &[f64], precision: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
    let mut mrec = Vec::with_capacity(recall.len() + 2);
    mrec.push(0.0);
    mrec.extend_from_slice(recall);
    mrec.push(1.0);
    let mut mpre = Vec::with_capacity(precision.len() + 2);
    mpre.push(1.0);
    mpre.extend_from_slice(precision);
    mpre.push(0.0);
    // flip(maximum.accumulate(flip(mpre))): precision envelope from the right
    for k in (0..mpre.len() - 1).rev() {
        mpre[k] = npmath::np_maximum(mpre[k + 1], mpre[k]);
    }
    let x = npmath::linspace(0.0, 1.0, 101);
    let ap = npmath::trapz(&npmath::interp(&x, &mrec, &mpre, None, None), &x);
    (ap, mpre, mrec)
}

/// YOLOv5 ap_per_class (plot=False, eps=1e-16), plus the curve data it would plot.
/// `tp` is [n, k]; `conf`, `pred_cls` have n entries; `target_cls` one entry per label.
pub fn ap_per_class(
    tp: ArrayView2<bool>,
    conf: &[f32],
    pred_cls: &[usize],
    target_cls: &[usize],
) -> ApPerClass {
    let (n, k) = tp.dim();
    assert_eq!(conf.len(), n, "conf length must equal tp rows");
    assert_eq!(pred_cls.len(), n, "pred_cls length must equal tp rows");

    // np.argsort(-conf), stably; NaN last like numpy
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (-conf[a], -conf[b]);
        match (x.is_nan(), y.is_nan()) {
            (false, false) => x.partial_cmp(&y).unwrap(),
            (xn, yn) => xn.cmp(&yn),
        }
    });

    let mut counts = std::collections::BTreeMap::<usize, usize>::new();
    for &c in target_cls {
        *counts.entry(c).or_insert(0) += 1;
    }
    let unique_classes: Vec<usize> = counts.keys().copied().collect();
    let nt: Vec<usize> = counts.values().copied().collect();
    let nc = unique_classes.len();

    let px = npmath::linspace(0.0, 1.0, CURVE_POINTS);
    let neg_px: Vec<f64> = px.iter().map(|v| -v).collect();
    let mut ap = Array2::<f64>::zeros((nc, k));
    let mut p_curve = Array2::<f64>::zeros((nc, CURVE_POINTS));
    let mut r_curve = Array2::<f64>::zeros((nc, CURVE_POINTS));
    let mut py = Array2::<f64>::zeros((nc, CURVE_POINTS));

    for (ci, &c) in unique_classes.iter().enumerate() {
        let idx: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| pred_cls[i] == c)
            .collect();
        let (n_l, n_p) = (nt[ci], idx.len());
        if n_p == 0 || n_l == 0 {
            continue;
        }
        let neg_conf: Vec<f64> = idx.iter().map(|&i| -(conf[i] as f64)).collect();
        // cumulative tp / fp counts per threshold; recall and precision curves [n_p, k]
        let mut recall = vec![vec![0.0f64; n_p]; k];
        let mut precision = vec![vec![0.0f64; n_p]; k];
        for j in 0..k {
            let mut tpc: i64 = 0;
            for (row, &i) in idx.iter().enumerate() {
                tpc += tp[[i, j]] as i64;
                let fpc = (row as i64 + 1) - tpc;
                recall[j][row] = tpc as f64 / (n_l as f64 + EPS);
                precision[j][row] = tpc as f64 / (tpc + fpc) as f64;
            }
        }
        if k > 0 {
            let r = npmath::interp(&neg_px, &neg_conf, &recall[0], Some(0.0), None);
            let p = npmath::interp(&neg_px, &neg_conf, &precision[0], Some(1.0), None);
            r_curve.row_mut(ci).assign(&ndarray::Array1::from(r));
            p_curve.row_mut(ci).assign(&ndarray::Array1::from(p));
        }
        for j in 0..k {
            let (a, mpre, mrec) = compute_ap(&recall[j], &precision[j]);
            ap[[ci, j]] = a;
            if j == 0 {
                py.row_mut(ci).assign(&ndarray::Array1::from(npmath::interp(
                    &px, &mrec, &mpre, None, None,
                )));
            }
        }
    }

    let f1_curve = ndarray::Zip::from(&p_curve)
        .and(&r_curve)
        .map_collect(|&p, &r| 2.0 * p * r / (p + r + EPS));
    // f1.mean(0): numpy accumulates rows in order (axis-0 reduction is not pairwise)
    let mut fmean = vec![0.0f64; CURVE_POINTS];
    for row in f1_curve.rows() {
        for (m, &v) in fmean.iter_mut().zip(row.iter()) {
            *m += v;
        }
    }
    for m in &mut fmean {
        *m /= nc as f64;
    }
    let best_index = npmath::argmax(&smooth(&fmean, 0.1));
    let p: Vec<f64> = p_curve.column(best_index).to_vec();
    let r: Vec<f64> = r_curve.column(best_index).to_vec();
    let f1: Vec<f64> = f1_curve.column(best_index).to_vec();
    let tp_out: Vec<f64> = r
        .iter()
        .zip(&nt)
        .map(|(&r, &n)| (r * n as f64).round_ties_even())
        .collect();
    let fp_out: Vec<f64> = tp_out
        .iter()
        .zip(&p)
        .map(|(&t, &p)| (t / (p + EPS) - t).round_ties_even())
        .collect();

    ApPerClass {
        tp: tp_out,
        fp: fp_out,
        p,
        r,
        f1,
        ap,
        unique_classes,
        nt,
        best_index,
        px,
        py,
        p_curve,
        r_curve,
        f1_curve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn smooth_window_size_and_edges() {
        let y: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let s = smooth(&y, 0.1);
        assert_eq!(s.len(), 1000);
        // nf = 101: middle of a linear ramp is unchanged
        assert!((s[500] - 500.0).abs() < 1e-9);
        // left edge padded with y[0]: mean of 50 zeros and 0..=50
        assert!((s[0] - (0..=50).sum::<usize>() as f64 / 101.0).abs() < 1e-9);
    }

    #[test]
    fn compute_ap_perfect_and_half() {
        // the famous 0.995: np.interp at recall 1.0 takes the appended (1.0, 0.0) sentinel
        let (ap, _, _) = compute_ap(&[1.0], &[1.0]);
        assert!((ap - 0.995).abs() < 1e-12, "{ap}");
        // recall 0.5 at precision 1: square 0.5 plus the sentinel triangle 0.25 (numpy: 0.75)
        let (ap, mpre, mrec) = compute_ap(&[0.5], &[1.0]);
        assert_eq!(mrec, vec![0.0, 0.5, 1.0]);
        assert_eq!(mpre, vec![1.0, 1.0, 0.0]);
        assert!((ap - 0.75).abs() < 1e-12, "{ap}");
    }

    #[test]
    fn single_class_two_predictions() {
        // 2 labels of class 0; one TP (high conf) and one FP (low conf)
        let tp = Array2::from_shape_vec((2, 1), vec![false, true]).unwrap();
        let res = ap_per_class(tp.view(), &[0.3, 0.9], &[0, 0], &[0, 0]);
        assert_eq!(res.unique_classes, vec![0]);
        assert_eq!(res.nt, vec![2]);
        assert!((res.r[0] - 0.5).abs() < 1e-9, "r = {}", res.r[0]);
        assert_eq!(res.tp, vec![1.0]);
        assert_eq!(res.fp, vec![0.0]);
        // yolov5 7.0.14 + numpy 2.4 give p 0.95821 (5 s.f.), ap 0.6225
        assert!((res.p[0] - 0.95821).abs() < 5e-6, "p = {}", res.p[0]);
        assert!(
            (res.ap[[0, 0]] - 0.6225).abs() < 1e-12,
            "ap = {}",
            res.ap[[0, 0]]
        );
    }

    #[test]
    fn class_without_predictions_is_zero() {
        let tp = Array2::from_shape_vec((1, 2), vec![true, true]).unwrap();
        let res = ap_per_class(tp.view(), &[0.8], &[1], &[1, 2]);
        assert_eq!(res.unique_classes, vec![1, 2]);
        assert_eq!(res.ap.row(1).to_vec(), vec![0.0, 0.0]);
        assert_eq!(res.p[1], 0.0);
        assert!(res.ap[[0, 0]] > 0.9);
    }
}
