// YOLOv5 v7.0 ComputeLoss.__call__ on the tape.
// In: per level the raw head output p[i] as a [bs*na*ny*nx, no] var with rows
// in (b, a, y, x) order (= YOLOv5's p[i] of shape [bs, na, ny, nx, no],
// flattened), the grids (ny, nx), bs, targets [nt, 6] (image, class, x, y, w,
// h normalised), and a `LossConfig` (hyp, nc, anchors in grid units).
// `compute_loss_on_features` takes the frozen features and head parameters
// instead of p and evaluates the convs only where the loss reads them.
// Out: `LossParts` vars: total = (lbox + lobj + lcls) * bs and the three parts
// (already multiplied by hyp box/obj/cls), all 0-d.

use ndarray::{Array2, ArrayView2};

use super::bbox::bbox_ciou;
use super::hyp::{Hyp, balance_for, smooth_bce};
use super::targets::{LevelTargets, build_targets};
use crate::autograd::fused::conv1x1::Pick;
use crate::autograd::{Tape, Var};

/// Focal loss alpha, as YOLOv5's FocalLoss default.
const FOCAL_ALPHA: f32 = 0.25;

#[derive(Clone, Debug)]
pub struct LossConfig {
    pub hyp: Hyp,
    pub nc: usize,
    /// Per level, na anchors (w, h) in grid units (Detect.anchors).
    pub anchors: Vec<Vec<[f32; 2]>>,
    /// Obj loss weight per level ([4.0, 1.0, 0.4] for 3 levels).
    pub balance: Vec<f32>,
    /// IoU ratio used as obj target (1.0 in YOLOv5).
    pub gr: f32,
}

impl LossConfig {
    pub fn new(hyp: Hyp, nc: usize, anchors: Vec<Vec<[f32; 2]>>) -> LossConfig {
        let balance = balance_for(anchors.len());
        LossConfig {
            hyp,
            nc,
            anchors,
            balance,
            gr: 1.0,
        }
    }

    pub fn na(&self) -> usize {
        self.anchors[0].len()
    }

    pub fn no(&self) -> usize {
        self.nc + 5
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LossParts {
    pub total: Var,
    pub lbox: Var,
    pub lobj: Var,
    pub lcls: Var,
}

/// Mean of BCEWithLogits(pos_weight), optionally wrapped in YOLOv5's FocalLoss.
/// `target` is a plain array: targets never need gradients.
pub(crate) fn bce_mean(t: &mut Tape, logits: Var, target: ndarray::ArrayD<f32>, pw: f32, gamma: f32) -> Var {
    let focal = (gamma > 0.0).then(|| {
        // alpha_factor = true*a + (1-true)*(1-a); p_t needs 1-true as well.
        let af = target.mapv(|y| y * FOCAL_ALPHA + (1.0 - y) * (1.0 - FOCAL_ALPHA));
        let one_minus = target.mapv(|y| 1.0 - y);
        (af, one_minus)
    });
    let tc = t.constant(target);
    let mut loss = t.bce_with_logits(logits, tc, pw);
    if let Some((af, one_minus)) = focal {
        // p_t = true * p + (1 - true) * (1 - p); loss *= af * (1 - p_t)^gamma
        let p = t.sigmoid(logits);
        let tp = t.mul(tc, p);
        let q = t.neg(p);
        let q = t.add_scalar(q, 1.0);
        let om = t.constant(one_minus);
        let tq = t.mul(om, q);
        let p_t = t.add(tp, tq);
        let m = t.neg(p_t);
        let m = t.add_scalar(m, 1.0);
        let m = t.pow(m, gamma);
        let afc = t.constant(af);
        let factor = t.mul(afc, m);
        loss = t.mul(loss, factor);
    }
    t.mean(loss)
}

/// What the loss reads of one level's head output: `obj` the objectness
/// logits, and `ps` the full outputs `[n, no]` at build_targets' n positives,
/// in its order (None when n = 0).
#[derive(Clone, Copy, Debug)]
pub struct LevelOutputs {
    pub obj: ObjLogits,
    pub ps: Option<Var>,
}

/// Where a level's objectness logits come from.
#[derive(Clone, Copy, Debug)]
pub enum ObjLogits {
    /// Computed: `[bs*na*ny*nx, 1]`, rows (b, a, y, x).
    Var(Var),
    /// Still to compute from the features and the level's conv; without focal
    /// loss the BCE is then fused with the conv (`autograd::fused::obj_bce`);
    /// `x` is the level's feature map leaf (`Tape::input`).
    Features { x: Var, w: Var, b: Var },
}

/// CIoU `[n, 1]` of a level's positives: the box columns of `ps` (`[n, ≥4]`
/// logits) decoded as YOLOv5's Detect does (xy = 2σ − 0.5, wh = (2σ)² ×
/// anchor, in grid cells) against their targets. The sparse class step calls it
/// too, for its per-image box loss constants.
pub(crate) fn positives_ciou(t: &mut Tape, ps: Var, lt: &LevelTargets) -> Var {
    let n = lt.len();
    let pxy = t.slice_cols(ps, 0, 2);
    let pxy = t.sigmoid(pxy);
    let pxy = t.mul_scalar(pxy, 2.0);
    let pxy = t.add_scalar(pxy, -0.5);
    let pwh = t.slice_cols(ps, 2, 4);
    let pwh = t.sigmoid(pwh);
    let pwh = t.mul_scalar(pwh, 2.0);
    let pwh = t.pow(pwh, 2.0);
    let anch = t.constant(Array2::from_shape_fn((n, 2), |(k, d)| lt.anch[k][d]).into_dyn());
    let pwh = t.mul(pwh, anch);
    let tbox = t.constant(Array2::from_shape_fn((n, 4), |(k, d)| lt.tbox[k][d]).into_dyn());
    bbox_ciou(t, pxy, pwh, tbox)
}

/// ComputeLoss on the raw head output p[i] (`[bs*na*ny*nx, no]` per level).
pub fn compute_loss(
    t: &mut Tape,
    cfg: &LossConfig,
    p: &[Var],
    grids: &[(usize, usize)],
    bs: usize,
    targets: ArrayView2<f32>,
) -> LossParts {
    let (na, no) = (cfg.na(), cfg.no());
    assert_eq!(grids.len(), p.len());
    let tgts = build_targets(targets, &cfg.anchors, grids, cfg.hyp.anchor_t);
    let outs: Vec<LevelOutputs> = p
        .iter()
        .zip(&tgts)
        .zip(grids)
        .map(|((&pi, lt), &(ny, nx))| {
            assert_eq!(t.value(pi).shape(), &[bs * na * ny * nx, no], "p must be [bs*na*ny*nx, no]");
            let ps = (!lt.is_empty()).then(|| t.index_select(pi, &lt.rows(na, ny, nx)));
            LevelOutputs { obj: ObjLogits::Var(t.slice_cols(pi, 4, 5)), ps }
        })
        .collect();
    loss_from_outputs(t, cfg, &tgts, &outs, grids, bs)
}

/// ComputeLoss straight from the frozen features: `feats[i]` a feature map
/// leaf `[bs, cin, ny, nx]` (`Tape::input`: the cache's layout and dtype),
/// the head's conv `weights[i]` and `biases[i]`.
/// Same value as `head_forward` + `compute_loss`, but the conv is evaluated
/// only where the loss reads it: objectness everywhere, all channels at the
/// positives (see `autograd::fused::conv1x1`), and the objectness loss fused
/// with its conv when there is no focal loss (`autograd::fused::obj_bce`).
#[allow(clippy::too_many_arguments)]
pub fn compute_loss_on_features(
    t: &mut Tape,
    cfg: &LossConfig,
    feats: &[Var],
    weights: &[Var],
    biases: &[Var],
    grids: &[(usize, usize)],
    bs: usize,
    targets: ArrayView2<f32>,
) -> LossParts {
    let na = cfg.na();
    assert!(feats.len() == grids.len() && weights.len() == grids.len() && biases.len() == grids.len());
    let tgts = build_targets(targets, &cfg.anchors, grids, cfg.hyp.anchor_t);
    let outs: Vec<LevelOutputs> = (0..grids.len())
        .map(|i| {
            let (ny, nx) = grids[i];
            let [fbs, _, fny, fnx] = t.map(feats[i]).shape();
            assert!(fbs == bs && (fny, fnx) == (ny, nx), "features[{i}] must be [bs, cin, ny, nx]");
            let lt = &tgts[i];
            let picks: Vec<Pick> = (0..lt.len()).map(|k| (lt.b[k] as u32, (lt.gj[k] * nx + lt.gi[k]) as u32, lt.a[k] as u32)).collect();
            let ps = (!lt.is_empty()).then(|| t.conv1x1_at(feats[i], weights[i], biases[i], &picks, na));
            LevelOutputs { obj: ObjLogits::Features { x: feats[i], w: weights[i], b: biases[i] }, ps }
        })
        .collect();
    loss_from_outputs(t, cfg, &tgts, &outs, grids, bs)
}

fn loss_from_outputs(
    t: &mut Tape,
    cfg: &LossConfig,
    tgts: &[LevelTargets],
    outs: &[LevelOutputs],
    grids: &[(usize, usize)],
    bs: usize,
) -> LossParts {
    let nl = outs.len();
    let (na, no, nc) = (cfg.na(), cfg.no(), cfg.nc);
    assert_eq!(grids.len(), nl);
    assert_eq!(cfg.anchors.len(), nl);
    let h = &cfg.hyp;
    let (cp, cn) = smooth_bce(h.label_smoothing);

    let mut lbox: Option<Var> = None;
    let mut lobj: Option<Var> = None;
    let mut lcls: Option<Var> = None;
    let acc = |t: &mut Tape, slot: &mut Option<Var>, v: Var| {
        *slot = Some(match *slot {
            Some(s) => t.add(s, v),
            None => v,
        });
    };

    for i in 0..nl {
        let (ny, nx) = grids[i];
        let rows_total = bs * na * ny * nx;
        let lt = &tgts[i];
        // the non-zero objectness targets (row, value), in build_targets order
        let mut tobj: Vec<(usize, f32)> = Vec::new();

        let n = lt.len();
        if let Some(ps) = outs[i].ps.filter(|_| n > 0) {
            assert_eq!(t.value(ps).shape(), &[n, no], "ps[{i}] must be [n, no]");
            let rows = lt.rows(na, ny, nx);

            // Regression
            let iou = positives_ciou(t, ps, lt);
            let one_minus = t.neg(iou);
            let one_minus = t.add_scalar(one_minus, 1.0);
            let lb = t.mean(one_minus);
            acc(t, &mut lbox, lb);

            // Objectness: detached, clamped IoU.
            for (k, &r) in rows.iter().enumerate() {
                let v = t.value(iou)[[k, 0]].max(0.0);
                tobj.push((r, if cfg.gr < 1.0 { (1.0 - cfg.gr) + cfg.gr * v } else { v }));
            }

            // Classification (only if multiple classes)
            if nc > 1 {
                let pcls = t.slice_cols(ps, 5, no);
                let mut tc = Array2::<f32>::from_elem((n, nc), cn);
                for (k, &c) in lt.tcls.iter().enumerate() {
                    assert!(c < nc, "target class {c} >= nc {nc}");
                    tc[[k, c]] = cp;
                }
                let lc = bce_mean(t, pcls, tc.into_dyn(), h.cls_pw, h.fl_gamma);
                acc(t, &mut lcls, lc);
            }
        }

        let chans: Vec<usize> = (0..na).map(|a| a * no + 4).collect();
        let obji = match outs[i].obj {
            ObjLogits::Features { x, w, b } if h.fl_gamma <= 0.0 => t.obj_bce_on_features(x, w, b, &chans, &tobj, h.obj_pw),
            src => {
                let logits = match src {
                    ObjLogits::Var(v) => v,
                    ObjLogits::Features { x, w, b } => t.conv1x1_channels(x, w, b, &chans),
                };
                assert_eq!(t.value(logits).shape(), &[rows_total, 1], "obj[{i}] must be [bs*na*ny*nx, 1]");
                // sequential writes: the last duplicate in build_targets order
                // wins (PyTorch CPU index_put)
                let mut dense = Array2::<f32>::zeros((rows_total, 1));
                for &(r, v) in &tobj {
                    dense[[r, 0]] = v;
                }
                bce_mean(t, logits, dense.into_dyn(), h.obj_pw, h.fl_gamma)
            }
        };
        let lo = t.mul_scalar(obji, cfg.balance[i]);
        acc(t, &mut lobj, lo);
    }

    let zero = |t: &mut Tape, v: Option<Var>| v.unwrap_or_else(|| t.scalar_const(0.0));
    let lbox = zero(t, lbox);
    let lobj = zero(t, lobj);
    let lcls = zero(t, lcls);
    let lbox = t.mul_scalar(lbox, h.box_);
    let lobj = t.mul_scalar(lobj, h.obj);
    let lcls = t.mul_scalar(lcls, h.cls);
    let s = t.add(lbox, lobj);
    let s = t.add(s, lcls);
    let total = t.mul_scalar(s, bs as f32);
    LossParts {
        total,
        lbox,
        lobj,
        lcls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::head::{ANCHORS_P3_P5, STRIDES_P3_P5, anchors_in_grid_units};
    use ndarray::{ArrayD, IxDyn, arr2};

    fn setup(nc: usize, targets: Array2<f32>) -> (Tape, Var, LossParts) {
        let grids = [(4, 4), (2, 2), (1, 1)];
        let cfg = LossConfig::new(
            Hyp::scratch_low(),
            nc,
            anchors_in_grid_units(&ANCHORS_P3_P5, &STRIDES_P3_P5),
        );
        let mut t = Tape::new();
        let mut p = Vec::new();
        let mut first = None;
        for &(ny, nx) in &grids {
            let n = 3 * ny * nx;
            let v = ArrayD::from_shape_fn(IxDyn(&[n, nc + 5]), |i| {
                ((i[0] * 7 + i[1] * 3) % 11) as f32 * 0.2 - 1.0
            });
            let var = t.param(v);
            first.get_or_insert(var);
            p.push(var);
        }
        let parts = compute_loss(&mut t, &cfg, &p, &grids, 1, targets.view());
        (t, first.unwrap(), parts)
    }

    #[test]
    fn loss_on_features_equals_loss_on_full_output() {
        // head_forward + compute_loss vs compute_loss_on_features: same losses and
        // the same weight/bias gradients, with targets on every level, a border
        // target (neighbour cells) and label smoothing.
        use crate::autograd::fd::rand_array;
        use crate::loss::head::{head_forward, nchw_to_rows};
        let (bs, nc, na) = (2, 4, 3);
        let no = nc + 5;
        let grids = [(8, 8), (4, 4), (2, 2)];
        let cins = [5, 6, 7];
        let mut hyp = Hyp::scratch_low();
        hyp.label_smoothing = 0.1;
        let cfg = LossConfig::new(hyp, nc, anchors_in_grid_units(&ANCHORS_P3_P5, &STRIDES_P3_P5));
        let targets = arr2(&[[0.0f32, 1.0, 0.5, 0.5, 0.3, 0.4], [1.0, 3.0, 0.06, 0.9, 0.1, 0.1], [1.0, 0.0, 0.7, 0.3, 0.9, 0.8]]);
        let feats: Vec<ArrayD<f32>> = (0..3).map(|i| rand_array(&[bs, cins[i], grids[i].0, grids[i].1], 10 + i as u64, -1.0, 1.0)).collect();
        let ws: Vec<ArrayD<f32>> = (0..3).map(|i| rand_array(&[na * no, cins[i]], 20 + i as u64, -0.5, 0.5)).collect();
        let bsv: Vec<ArrayD<f32>> = (0..3).map(|i| rand_array(&[na * no], 30 + i as u64, -1.0, 1.0)).collect();
        let run = |sparse: bool| {
            let mut t = Tape::new();
            let w: Vec<Var> = ws.iter().map(|w| t.param(w.clone())).collect();
            let b: Vec<Var> = bsv.iter().map(|b| t.param(b.clone())).collect();
            let parts = if sparse {
                let f: Vec<Var> = feats.iter().map(|f| t.input(crate::autograd::Features::from_array(f.clone()))).collect();
                compute_loss_on_features(&mut t, &cfg, &f, &w, &b, &grids, bs, targets.view())
            } else {
                let f: Vec<Var> = feats.iter().map(|f| t.constant(nchw_to_rows(f.view().into_dimensionality().unwrap()).into_dyn())).collect();
                let p = head_forward(&mut t, &f, &w, &b, bs, &grids, na);
                compute_loss(&mut t, &cfg, &p, &grids, bs, targets.view())
            };
            let l = [t.scalar(parts.lbox), t.scalar(parts.lobj), t.scalar(parts.lcls)];
            let mut g = t.backward(parts.total);
            let grads: Vec<ArrayD<f32>> = w.iter().chain(&b).map(|&v| g.take(v).unwrap()).collect();
            (l, grads)
        };
        let (la, ga) = run(false);
        let (lb, gb) = run(true);
        for k in 0..3 {
            assert!(la[k] > 0.0 && (la[k] - lb[k]).abs() <= 1e-6 * la[k], "loss {k}: {} vs {}", la[k], lb[k]);
        }
        for (a, b) in ga.iter().zip(&gb) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale));
        }
    }

    #[test]
    fn no_targets_gives_only_obj_loss() {
        let (t, p0, parts) = setup(3, Array2::zeros((0, 6)));
        assert_eq!(t.scalar(parts.lbox), 0.0);
        assert_eq!(t.scalar(parts.lcls), 0.0);
        assert!(t.scalar(parts.lobj) > 0.0);
        let g = t.backward(parts.total);
        let gp = g.get(p0).unwrap();
        // Only the obj column (4) receives gradient.
        for ((_, k), v) in gp
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
            .indexed_iter()
        {
            assert_eq!(*v != 0.0, k == 4);
        }
    }

    #[test]
    fn single_class_has_no_cls_loss_and_total_is_scaled_sum() {
        let targets = arr2(&[[0.0f32, 0.0, 0.4, 0.6, 0.3, 0.2]]);
        let (t, _, parts) = setup(1, targets);
        assert_eq!(t.scalar(parts.lcls), 0.0);
        assert!(t.scalar(parts.lbox) > 0.0);
        let sum = t.scalar(parts.lbox) + t.scalar(parts.lobj) + t.scalar(parts.lcls);
        assert!((t.scalar(parts.total) - sum).abs() < 1e-6);
    }
}
