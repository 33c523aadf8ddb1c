// YOLOv5's objectness loss for one level, straight from the frozen features:
// `BCEobj(pi[..., 4], tobj)`, the mean BCE-with-logits (pos_weight) over every
// anchor at every position, without materialising the logits.
// In: features x (a feature map leaf [bs, cin, ny, nx], S = ny*nx), the level's conv w [cout, cin]
// (or [cout, cin, 1, 1]) and b [cout], the objectness channels `chans` (a·no + 4
// per anchor a), the non-zero targets as `(row, value)` with rows (b, j, s)
// numbered as `conv1x1_channels` numbers its output (of duplicate rows the
// last wins, as ComputeLoss's `tobj[b, a, gj, gi] = iou` does), pos_weight.
// Out: a 0-d var, the mean loss. Backward: gradients for w and b only.
// Why fused: the loss reads objectness at 76,800 anchor-positions per 640
// image but needs only their mean. Done as separate ops (conv, BCE, mean and
// their backwards) that meant five full-size arrays per level and a second
// pass over the features for dW. Here each image's features are read once, a
// tile of positions at a time: the tile's logits, losses and dz are computed
// while its features sit in L1/L2, and dz goes straight into dW. The output
// is a scalar, so dz is known in the forward; backward only scales the
// accumulated dW and db by the incoming gradient.

use ndarray::{ArrayD, arr0};
use rayon::prelude::*;

use super::conv1x1::{w_rows, zeros_like_w};
use crate::autograd::tape::{FusedOp, GradAcc, Tape, Var};
use crate::kernels::bce::{bce_logits_grad, bce_logits_sum};
use crate::kernels::{Elem, conv_rows_window, dots_lanes};
use crate::with_slice;

/// Positions per tile: big enough for long vector loops, small enough that a
/// tile of the widest level (256 channels, f16) stays in L2.
const TILE: usize = 256;

/// One image's share: loss sum, dW lanes `[k·cin]`, db `[k]`.
type ImagePart = (f64, Vec<[f32; 8]>, Vec<f64>);

/// `obj_bce_on_features`'s record: `dw` `[k, cin]` and `db` `[k]` are
/// d(loss)/d(w rows `chans`, b[chans]), computed in the forward.
pub struct ObjBce {
    w: Var,
    b: Var,
    chans: Vec<usize>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

impl Tape {
    /// See the file header.
    pub fn obj_bce_on_features(&mut self, x: Var, w: Var, b: Var, chans: &[usize], targets: &[(usize, f32)], pos_weight: f32) -> Var {
        let (wsel, bsel) = self.conv_rows_of("obj_bce_on_features", x, w, b, chans);
        let wrefs: Vec<&[f32]> = wsel.iter().map(|w| w.as_slice()).collect();
        let f = self.map(x);
        let (bs, cin, sp) = (f.bs, f.cin, f.sp());
        let k = chans.len();
        let n = bs * k * sp;
        assert!(targets.iter().all(|&(r, _)| r < n), "obj_bce_on_features: target row out of range");
        let tg = last_wins(targets);
        let grad = self.requires_grad(w) || self.requires_grad(b);
        let scale = 1.0 / n as f32;

        // per image in parallel, summed in image order: the result does not
        // depend on the thread count
        let parts: Vec<ImagePart> = (0..bs)
            .into_par_iter()
            .map(|bi| {
                let lo = tg.partition_point(|&(r, _)| r < bi * k * sp);
                let hi = tg.partition_point(|&(r, _)| r < (bi + 1) * k * sp);
                let mine: Vec<(usize, f32)> = tg[lo..hi].iter().map(|&(r, v)| (r - bi * k * sp, v)).collect();
                with_slice!(f.image(bi), xb => image_pass(xb, sp, &wrefs, &bsel, &mine, pos_weight, scale, grad))
            })
            .collect();
        let mut loss = 0.0f64;
        let mut dw = vec![0.0f64; k * cin];
        let mut db = vec![0.0f64; k];
        for (l, lanes, d) in parts {
            loss += l;
            for (acc, lane) in dw.iter_mut().zip(&lanes) {
                *acc += lane.iter().map(|&v| v as f64).sum::<f64>();
            }
            for (acc, v) in db.iter_mut().zip(&d) {
                *acc += v;
            }
        }
        let value = arr0((loss / n as f64) as f32).into_dyn();
        let op = ObjBce { w, b, chans: chans.to_vec(), dw: dw.iter().map(|&v| v as f32).collect(), db: db.iter().map(|&v| v as f32).collect() };
        self.push_ext(value, op, &[x, w, b])
    }
}

/// Sorted by row, one value per row: the last given.
fn last_wins(targets: &[(usize, f32)]) -> Vec<(usize, f32)> {
    let mut tg = targets.to_vec();
    tg.sort_by_key(|&(r, _)| r); // stable: duplicates keep their order
    let mut out: Vec<(usize, f32)> = Vec::with_capacity(tg.len());
    for (r, v) in tg {
        match out.last_mut() {
            Some(last) if last.0 == r => last.1 = v,
            _ => out.push((r, v)),
        }
    }
    out
}

/// One image `[cin, sp]`, tile by tile. `tg`: this image's targets, rows j·sp + s.
#[allow(clippy::too_many_arguments)]
fn image_pass<T: Elem>(x: &[T], sp: usize, w: &[&[f32]], b: &[f32], tg: &[(usize, f32)], pw: f32, scale: f32, grad: bool) -> ImagePart {
    let (k, cin) = (w.len(), x.len() / sp);
    let mut z = vec![0.0f32; k * TILE];
    let mut t = vec![0.0f32; k * TILE];
    let mut dz = vec![0.0f32; if grad { k * TILE } else { 0 }];
    let mut lanes = vec![[0.0f32; 8]; if grad { k * cin } else { 0 }];
    let mut db = vec![0.0f64; k];
    let mut loss = 0.0f64;
    for s0 in (0..sp).step_by(TILE) {
        let len = TILE.min(sp - s0);
        let (z, t) = (&mut z[..k * len], &mut t[..k * len]);
        conv_rows_window(w, b, x, sp, s0..s0 + len, z);
        t.fill(0.0);
        for j in 0..k {
            let (from, to) = (j * sp + s0, j * sp + s0 + len);
            let lo = tg.partition_point(|&(r, _)| r < from);
            for &(r, v) in tg[lo..].iter().take_while(|&&(r, _)| r < to) {
                t[j * len + r - from] = v;
            }
        }
        if !grad {
            loss += bce_logits_sum(z, t, pw);
            continue;
        }
        let dz = &mut dz[..k * len];
        loss += bce_logits_grad(z, t, pw, scale, dz);
        let rows: Vec<&[f32]> = dz.chunks_exact(len).collect();
        for (d, r) in db.iter_mut().zip(&rows) {
            *d += r.iter().map(|&v| v as f64).sum::<f64>();
        }
        dots_lanes(&rows, x, sp, s0..s0 + len, &mut lanes);
    }
    (loss, lanes, db)
}

impl FusedOp for ObjBce {
    fn name(&self) -> &'static str {
        "ObjBce"
    }

    fn backward(&self, t: &Tape, g: ArrayD<f32>, acc: &mut GradAcc) {
        backward(t, self, g, acc)
    }
}

/// d(mean loss)/dw and /db were accumulated in the forward; scale them by the
/// incoming (scalar) gradient.
fn backward(t: &Tape, op: &ObjBce, g: ArrayD<f32>, acc: &mut GradAcc) {
    let ObjBce { w, b, ref chans, ref dw, ref db } = *op;
    let gs = *g.iter().next().expect("obj_bce gradient is a scalar");
    if acc.wants(b) {
        let mut gb = ArrayD::zeros(t.value(b).raw_dim());
        for (&c, &d) in chans.iter().zip(db) {
            gb[[c]] = gs * d;
        }
        acc.add(b, gb);
    }
    if acc.wants(w) {
        let mut gw = zeros_like_w(t, w);
        let mut rows = w_rows(&mut gw);
        let cin = rows.ncols();
        for (j, &c) in chans.iter().enumerate() {
            for (o, &d) in rows.row_mut(c).iter_mut().zip(&dw[j * cin..(j + 1) * cin]) {
                *o = gs * d;
            }
        }
        acc.add(w, gw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};
    use crate::features::{FeatData, Features};
    use half::f16;

    /// The same loss from separate ops: conv1x1_channels, bce_with_logits, mean.
    fn unfused(t: &mut Tape, x: Var, w: Var, b: Var, chans: &[usize], targets: &[(usize, f32)], pw: f32) -> Var {
        let z = t.conv1x1_channels(x, w, b, chans);
        let mut dense = ArrayD::zeros(t.value(z).raw_dim());
        for &(r, v) in targets {
            dense[[r, 0]] = v;
        }
        let tc = t.constant(dense);
        let l = t.bce_with_logits(z, tc, pw);
        t.mean(l)
    }

    #[test]
    fn equals_the_unfused_ops_over_tiles_and_images() {
        // sp = 600 spans three tiles (the last partial); a duplicate row; f16 too
        let (bs, cin, ny, nx) = (3, 20, 20, 30);
        let chans = [4usize, 13, 22];
        let x = rand_array(&[bs, cin, ny, nx], 1, -1.0, 1.0);
        let w = rand_array(&[27, cin], 2, -0.5, 0.5);
        let b = rand_array(&[27], 3, -2.0, 0.0);
        let targets = vec![(5usize, 0.7f32), (600 + 599, 0.2), (2 * 1800 + 1200 + 256, 0.9), (5, 0.4), (1800 + 3, 1.0)];
        for f16s in [false, true] {
            let mut t = Tape::new();
            let feats = if f16s {
                let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                Features { data: FeatData::F16(h), bs, cin, ny, nx }
            } else {
                Features::from_array(x.clone())
            };
            let xf = t.input(feats);
            let (wv, bv) = (t.param(w.clone()), t.param(b.clone()));
            let fused = t.obj_bce_on_features(xf, wv, bv, &chans, &targets, 1.3);
            let plain = unfused(&mut t, xf, wv, bv, &chans, &targets, 1.3);
            let (a, p) = (t.scalar(fused), t.scalar(plain));
            assert!((a - p).abs() <= 1e-6 * p, "{a} vs {p}");
            let ga = t.backward(fused);
            let gp = t.backward(plain);
            for v in [wv, bv] {
                let (x, y) = (ga.get(v).unwrap(), gp.get(v).unwrap());
                let m = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-5 * m));
            }
        }
    }

    #[test]
    fn grads() {
        let (bs, cin) = (2, 3);
        let x = rand_array(&[bs, cin, 4, 5], 4, -1.0, 1.0);
        let w = rand_array(&[6, cin, 1, 1], 5, -1.0, 1.0);
        let b = rand_array(&[6], 6, -1.0, 1.0);
        check(&[w, b], move |t, v| {
            let f = t.input(Features::from_array(x.clone()));
            t.obj_bce_on_features(f, v[0], v[1], &[1, 4], &[(3, 0.5), (45, 0.8)], 2.0)
        });
    }

    #[test]
    fn constants_take_no_gradient_pass_and_give_the_same_loss() {
        let (bs, cin) = (2, 5);
        let x = rand_array(&[bs, cin, 15, 20], 7, -1.0, 1.0);
        let w = rand_array(&[3, cin], 8, -1.0, 1.0);
        let b = rand_array(&[3], 9, -1.0, 1.0);
        let mut t = Tape::new();
        let f = t.input(Features::from_array(x));
        let (wc, bc) = (t.constant(w.clone()), t.constant(b.clone()));
        let (wp, bp) = (t.param(w), t.param(b));
        let c = t.obj_bce_on_features(f, wc, bc, &[0, 2], &[(7, 0.3)], 1.0);
        let p = t.obj_bce_on_features(f, wp, bp, &[0, 2], &[(7, 0.3)], 1.0);
        assert_eq!(t.scalar(c), t.scalar(p));
        assert!(!t.requires_grad(c));
        let op = t.ext_op::<ObjBce>(c).expect("an ObjBce node");
        assert!(op.dw.iter().all(|&v| v == 0.0));
        assert!(t.ext_op::<ObjBce>(f).is_none());
    }
}
