// CIoU of predicted vs target boxes on the tape: YOLOv5 v7.0
// utils/metrics.py `bbox_iou(box1, box2, xywh=True, CIoU=True, eps=1e-7)`.
// In: pxy [n, 2], pwh [n, 2] (prediction vars, grid units relative to the
// cell) and tbox [n, 4] (constant xywh). Out: CIoU var [n, 1].
// Composed from primitive ops (each FD-tested) in torch's operation order;
// the CIoU alpha term is detached exactly like YOLOv5's `torch.no_grad()`.

use crate::autograd::{Tape, Var};

pub const EPS: f32 = 1e-7;

/// Corner coordinates (x1, x2, y1, y2) and size (w, h) of one box set.
struct Corners {
    x1: Var,
    x2: Var,
    y1: Var,
    y2: Var,
    w: Var,
    h: Var,
}

fn corners(t: &mut Tape, x: Var, y: Var, w: Var, h: Var) -> Corners {
    // w / 2 and w * 0.5 are the same f32 value.
    let w_ = t.mul_scalar(w, 0.5);
    let h_ = t.mul_scalar(h, 0.5);
    Corners {
        x1: t.sub(x, w_),
        x2: t.add(x, w_),
        y1: t.sub(y, h_),
        y2: t.add(y, h_),
        w,
        h,
    }
}

pub fn bbox_ciou(t: &mut Tape, pxy: Var, pwh: Var, tbox: Var) -> Var {
    let (x1, y1) = (t.slice_cols(pxy, 0, 1), t.slice_cols(pxy, 1, 2));
    let (w1, h1) = (t.slice_cols(pwh, 0, 1), t.slice_cols(pwh, 1, 2));
    let (x2, y2) = (t.slice_cols(tbox, 0, 1), t.slice_cols(tbox, 1, 2));
    let (w2, h2) = (t.slice_cols(tbox, 2, 3), t.slice_cols(tbox, 3, 4));
    let b1 = corners(t, x1, y1, w1, h1);
    let b2 = corners(t, x2, y2, w2, h2);

    // Intersection area
    let ix2 = t.minimum(b1.x2, b2.x2);
    let ix1 = t.maximum(b1.x1, b2.x1);
    let iw = t.sub(ix2, ix1);
    let iw = t.clamp(iw, 0.0, f32::INFINITY);
    let iy2 = t.minimum(b1.y2, b2.y2);
    let iy1 = t.maximum(b1.y1, b2.y1);
    let ih = t.sub(iy2, iy1);
    let ih = t.clamp(ih, 0.0, f32::INFINITY);
    let inter = t.mul(iw, ih);

    // Union area
    let a1 = t.mul(b1.w, b1.h);
    let a2 = t.mul(b2.w, b2.h);
    let union = t.add(a1, a2);
    let union = t.sub(union, inter);
    let union = t.add_scalar(union, EPS);
    let iou = t.div(inter, union);

    // Smallest enclosing box diagonal squared
    let cx2 = t.maximum(b1.x2, b2.x2);
    let cx1 = t.minimum(b1.x1, b2.x1);
    let cw = t.sub(cx2, cx1);
    let cy2 = t.maximum(b1.y2, b2.y2);
    let cy1 = t.minimum(b1.y1, b2.y1);
    let ch = t.sub(cy2, cy1);
    let cw2 = t.pow(cw, 2.0);
    let ch2 = t.pow(ch, 2.0);
    let c2 = t.add(cw2, ch2);
    let c2 = t.add_scalar(c2, EPS);

    // Centre distance squared: ((b2_x1 + b2_x2 - b1_x1 - b1_x2)^2 + (..y..)^2) / 4
    let dx = t.add(b2.x1, b2.x2);
    let dx = t.sub(dx, b1.x1);
    let dx = t.sub(dx, b1.x2);
    let dy = t.add(b2.y1, b2.y2);
    let dy = t.sub(dy, b1.y1);
    let dy = t.sub(dy, b1.y2);
    let dx2 = t.pow(dx, 2.0);
    let dy2 = t.pow(dy, 2.0);
    let rho2 = t.add(dx2, dy2);
    let rho2 = t.mul_scalar(rho2, 0.25);

    // Aspect-ratio term v and its (detached) trade-off weight alpha
    let r2 = t.div(b2.w, b2.h);
    let r2 = t.atan(r2);
    let r1 = t.div(b1.w, b1.h);
    let r1 = t.atan(r1);
    let dv = t.sub(r2, r1);
    let dv = t.pow(dv, 2.0);
    let v = t.mul_scalar(
        dv,
        (4.0 / (std::f64::consts::PI * std::f64::consts::PI)) as f32,
    );
    let alpha = {
        let v_val = t.value(v);
        let iou_val = t.value(iou);
        let one_eps = (1.0f64 + EPS as f64) as f32;
        let a = ndarray::Zip::from(v_val)
            .and(iou_val)
            // an IoU rounded above 1 (a prediction on its own box, as a
            // pseudo-label is) would make the denominator 0 and the loss -inf;
            // for IoU <= 1 this is YOLOv5's expression unchanged
            .map_collect(|&v, &i| v / (v - i.min(1.0) + one_eps));
        t.constant(a)
    };

    let d = t.div(rho2, c2);
    let va = t.mul(v, alpha);
    let pen = t.add(d, va);
    t.sub(iou, pen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    /// Straight scalar transcription of bbox_iou(CIoU=True) in f64; `alpha`
    /// overrides the trade-off weight (None: computed, as in the forward).
    fn ciou_ref(b1: [f64; 4], b2: [f64; 4], alpha: Option<f64>) -> (f64, f64) {
        let eps = 1e-7;
        let (x1, y1, w1, h1) = (b1[0], b1[1], b1[2], b1[3]);
        let (x2, y2, w2, h2) = (b2[0], b2[1], b2[2], b2[3]);
        let (b1x1, b1x2, b1y1, b1y2) = (x1 - w1 / 2.0, x1 + w1 / 2.0, y1 - h1 / 2.0, y1 + h1 / 2.0);
        let (b2x1, b2x2, b2y1, b2y2) = (x2 - w2 / 2.0, x2 + w2 / 2.0, y2 - h2 / 2.0, y2 + h2 / 2.0);
        let inter =
            (b1x2.min(b2x2) - b1x1.max(b2x1)).max(0.0) * (b1y2.min(b2y2) - b1y1.max(b2y1)).max(0.0);
        let union = w1 * h1 + w2 * h2 - inter + eps;
        let iou = inter / union;
        let cw = b1x2.max(b2x2) - b1x1.min(b2x1);
        let ch = b1y2.max(b2y2) - b1y1.min(b2y1);
        let c2 = cw * cw + ch * ch + eps;
        let rho2 =
            ((b2x1 + b2x2 - b1x1 - b1x2).powi(2) + (b2y1 + b2y2 - b1y1 - b1y2).powi(2)) / 4.0;
        let v = 4.0 / std::f64::consts::PI.powi(2) * ((w2 / h2).atan() - (w1 / h1).atan()).powi(2);
        let alpha = alpha.unwrap_or(v / (v - iou + (1.0 + eps)));
        (iou - (rho2 / c2 + v * alpha), alpha)
    }

    fn tape_ciou(pred: &[[f32; 4]], targ: &[[f32; 4]]) -> (Tape, Var, Var, Var) {
        let mut t = Tape::new();
        let pa = arr2(pred);
        let pxy = t.param(pa.slice(ndarray::s![.., 0..2]).to_owned().into_dyn());
        let pwh = t.param(pa.slice(ndarray::s![.., 2..4]).to_owned().into_dyn());
        let tb = t.constant(arr2(targ).into_dyn());
        let c = bbox_ciou(&mut t, pxy, pwh, tb);
        (t, pxy, pwh, c)
    }

    #[test]
    fn matches_scalar_reference() {
        let pred = [
            [0.3f32, 0.7, 1.2, 2.0],
            [1.1, -0.2, 3.0, 0.5],
            [0.5, 0.5, 1.0, 1.0],
            [5.0, 5.0, 0.5, 0.5],
        ];
        let targ = [
            [0.5f32, 0.5, 1.0, 1.5],
            [0.9, 0.1, 2.0, 2.0],
            [0.5, 0.5, 1.0, 1.0],
            [0.0, 0.0, 1.0, 3.0],
        ];
        let (t, _, _, c) = tape_ciou(&pred, &targ);
        assert_eq!(t.value(c).shape(), &[4, 1]);
        for k in 0..4 {
            let (r, _) = ciou_ref(pred[k].map(|v| v as f64), targ[k].map(|v| v as f64), None);
            assert!(
                (t.value(c)[[k, 0]] as f64 - r).abs() < 1e-5,
                "box {k}: {} vs {r}",
                t.value(c)[[k, 0]]
            );
        }
        // Identical boxes: CIoU ~ 1.
        assert!((t.value(c)[[2, 0]] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn gradient_treats_alpha_as_constant() {
        // Tape grad == FD of the reference with alpha frozen at the base point.
        let pred = [[0.3f32, 0.7, 1.2, 2.0], [0.1, 0.9, 0.6, 0.4]];
        let targ = [[0.5f32, 0.45, 1.0, 1.5], [0.4, 0.6, 2.5, 1.1]];
        let (mut t, pxy, pwh, c) = tape_ciou(&pred, &targ);
        let l = t.sum(c);
        let g = t.backward(l);
        let (gxy, gwh) = (g.get(pxy).unwrap(), g.get(pwh).unwrap());
        for n in 0..2 {
            let base = pred[n].map(|v| v as f64);
            let tg = targ[n].map(|v| v as f64);
            let (_, a0) = ciou_ref(base, tg, None);
            for k in 0..4 {
                let e = 1e-5;
                let (mut pp, mut pm) = (base, base);
                pp[k] += e;
                pm[k] -= e;
                let fd = (ciou_ref(pp, tg, Some(a0)).0 - ciou_ref(pm, tg, Some(a0)).0) / (2.0 * e);
                let an = if k < 2 { gxy[[n, k]] } else { gwh[[n, k - 2]] } as f64;
                assert!(
                    (an - fd).abs() < 1e-4 + 1e-3 * fd.abs(),
                    "box {n} coord {k}: {an} vs {fd}"
                );
            }
        }
    }
}
