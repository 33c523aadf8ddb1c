// 1x1 convolutions read straight from cached NCHW features, computing only the
// outputs the YOLOv5 loss reads.
// In: features x (a feature map leaf, `Tape::input`: [bs, cin, ny, nx] as the
//     cache stores a level, f32 or f16; S = ny*nx), w [cout, cin] (or
//     [cout, cin, 1, 1]), b [cout].
// - conv1x1_channels(x, w, b, chans): output channels `chans` at every position
//   -> [bs*k*S, 1] with rows (b, j, s). With chans = the na objectness channels
//   (a*no + 4) this is YOLOv5's p[i][..., 4] flattened in (b, a, y, x) order.
// - conv1x1_at(x, w, b, picks, groups): for each pick (b, s, g) the
//   kdim = cout/groups channels of group g at image b, position s -> [n, kdim]:
//   the positives' outputs p[i][b, a, y, x, :] in build_targets' order.
// Why: ComputeLoss reads box and class outputs only at the positives (a few
// hundred rows a batch) and objectness everywhere. The plain conv computes all
// na*no channels at every position, ~10x the work the loss uses, and needs the
// features transposed and converted to f32 first. Backward follows the same
// pattern, for w and b only: frozen features never get a gradient.

use ndarray::{ArrayD, ArrayView2, Axis, IxDyn};
use rayon::prelude::*;

use crate::autograd::matmul::weight2;
use crate::autograd::tape::{FusedOp, GradAcc, Tape, Var};
use crate::kernels::{axpy, conv_rows, dot, dots};
use crate::with_slice;

/// `(image, position, group)` of one gathered output row.
pub type Pick = (u32, u32, u32);

/// `conv1x1_channels`'s record: output channels `chans` everywhere.
pub struct Conv1x1Channels {
    x: Var,
    w: Var,
    b: Var,
    chans: Vec<usize>,
}

/// `conv1x1_at`'s record: `groups` channel groups at `picks`.
pub struct Conv1x1At {
    x: Var,
    w: Var,
    b: Var,
    picks: Vec<Pick>,
    groups: usize,
}

impl Tape {
    /// The weight rows and biases of output channels `chans` of the conv
    /// (w, b) on feature map `x`, checked against the map's cin.
    pub(super) fn conv_rows_of(&self, op: &str, x: Var, w: Var, b: Var, chans: &[usize]) -> (Vec<Vec<f32>>, Vec<f32>) {
        let wv = weight2(self.value(w));
        let bv = self.value(b);
        assert_eq!(wv.ncols(), self.map(x).cin, "{op}: cin differs");
        assert!(chans.iter().all(|&c| c < wv.nrows()), "{op}: channel out of range");
        (chans.iter().map(|&c| wv.row(c).to_vec()).collect(), chans.iter().map(|&c| bv[[c]]).collect())
    }

    /// See the file header.
    pub fn conv1x1_channels(&mut self, x: Var, w: Var, b: Var, chans: &[usize]) -> Var {
        let (wsel, bsel) = self.conv_rows_of("conv1x1_channels", x, w, b, chans);
        let wrefs: Vec<&[f32]> = wsel.iter().map(|w| w.as_slice()).collect();
        let f = self.map(x);
        let (bs, sp) = (f.bs, f.sp());
        let k = chans.len();
        let mut out = vec![0.0f32; bs * k * sp];
        out.par_chunks_mut(k * sp).enumerate().for_each(|(bi, ob)| with_slice!(f.image(bi), xb => conv_rows(&wrefs, &bsel, xb, sp, ob)));
        let v = ArrayD::from_shape_vec(IxDyn(&[bs * k * sp, 1]), out).unwrap();
        self.push_ext(v, Conv1x1Channels { x, w, b, chans: chans.to_vec() }, &[x, w, b])
    }

    /// See the file header.
    pub fn conv1x1_at(&mut self, x: Var, w: Var, b: Var, picks: &[Pick], groups: usize) -> Var {
        let f = self.map(x);
        let sp = f.sp();
        let wv = weight2(self.value(w));
        let bv = self.value(b);
        assert_eq!(wv.ncols(), f.cin, "conv1x1_at: cin differs");
        assert!(groups > 0 && wv.nrows().is_multiple_of(groups), "conv1x1_at: groups");
        let kdim = wv.nrows() / groups;
        let mut out = vec![0.0f32; picks.len() * kdim];
        let mut col = vec![0.0f32; f.cin];
        for (o, &(bi, si, g)) in out.chunks_exact_mut(kdim).zip(picks) {
            assert!((bi as usize) < f.bs && (si as usize) < sp && (g as usize) < groups, "conv1x1_at: pick out of range");
            f.image(bi as usize).gather_col(sp, si as usize, &mut col);
            for (j, o) in o.iter_mut().enumerate() {
                let r = g as usize * kdim + j;
                *o = bv[[r]] + dot(wv.row(r).as_slice().unwrap(), &col);
            }
        }
        let v = ArrayD::from_shape_vec(IxDyn(&[picks.len(), kdim]), out).unwrap();
        self.push_ext(v, Conv1x1At { x, w, b, picks: picks.to_vec(), groups }, &[x, w, b])
    }
}

impl FusedOp for Conv1x1Channels {
    fn name(&self) -> &'static str {
        "Conv1x1Channels"
    }

    fn backward(&self, t: &Tape, g: ArrayD<f32>, acc: &mut GradAcc) {
        channels_backward(t, self, g, acc)
    }
}

impl FusedOp for Conv1x1At {
    fn name(&self) -> &'static str {
        "Conv1x1At"
    }

    fn backward(&self, t: &Tape, g: ArrayD<f32>, acc: &mut GradAcc) {
        at_backward(t, self, g, acc)
    }
}

/// A zero gradient of `w`'s shape (`[cout, cin]` or `[cout, cin, 1, 1]`).
pub(super) fn zeros_like_w(t: &Tape, w: Var) -> ArrayD<f32> {
    ArrayD::zeros(t.value(w).raw_dim())
}

/// A weight gradient's `[cout, cin]` view, to write rows into.
pub(super) fn w_rows(dw: &mut ArrayD<f32>) -> ndarray::ArrayViewMut2<'_, f32> {
    let (cout, cin) = (dw.shape()[0], dw.shape()[1]);
    dw.view_mut().into_shape_with_order((cout, cin)).unwrap()
}

fn bias_grad(db: &[f64]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(&[db.len()]), db.iter().map(|&v| v as f32).collect()).unwrap()
}

fn channels_backward(t: &Tape, op: &Conv1x1Channels, g: ArrayD<f32>, acc: &mut GradAcc) {
    let Conv1x1Channels { x, w, b, ref chans } = *op;
    let f = t.map(x);
    let (cin, sp) = (f.cin, f.sp());
    let g = if g.is_standard_layout() { g } else { g.as_standard_layout().into_owned() };
    let gd = g.as_slice().unwrap();
    let k = chans.len();
    if acc.wants(b) {
        let mut db = vec![0.0f64; t.value(b).len()];
        for gb in gd.chunks_exact(k * sp) {
            for (j, gj) in gb.chunks_exact(sp).enumerate() {
                db[chans[j]] += gj.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        acc.add(b, bias_grad(&db));
    }
    if acc.wants(w) {
        // per image [k, cin] partials in parallel, summed in image order so the
        // result does not depend on the thread count
        let parts: Vec<Vec<f32>> = gd
            .par_chunks(k * sp)
            .enumerate()
            .map(|(bi, gb)| {
                let grows: Vec<&[f32]> = gb.chunks_exact(sp).collect();
                let mut p = vec![0.0f32; k * cin];
                let mut d = vec![0.0f32; k];
                with_slice!(f.image(bi), xb => for (c, xr) in xb.chunks_exact(sp).enumerate() {
                    dots(&grows, xr, &mut d);
                    for (j, v) in d.iter().enumerate() {
                        p[j * cin + c] = *v;
                    }
                });
                p
            })
            .collect();
        let mut dw = zeros_like_w(t, w);
        let mut dw2 = w_rows(&mut dw);
        for p in parts {
            for (j, &ch) in chans.iter().enumerate() {
                for (d, v) in dw2.row_mut(ch).iter_mut().zip(&p[j * cin..(j + 1) * cin]) {
                    *d += v;
                }
            }
        }
        acc.add(w, dw);
    }
}

fn at_backward(t: &Tape, op: &Conv1x1At, g: ArrayD<f32>, acc: &mut GradAcc) {
    let Conv1x1At { x, w, b, ref picks, groups } = *op;
    let f = t.map(x);
    let g = if g.is_standard_layout() { g } else { g.as_standard_layout().into_owned() };
    let g2: ArrayView2<f32> = g.view().into_dimensionality().unwrap();
    let kdim = g2.ncols();
    debug_assert_eq!(kdim * groups, weight2(t.value(w)).nrows());
    if acc.wants(b) {
        let mut db = vec![0.0f64; t.value(b).len()];
        for (gr, &(_, _, gi)) in g2.axis_iter(Axis(0)).zip(picks) {
            for (j, v) in gr.iter().enumerate() {
                db[gi as usize * kdim + j] += *v as f64;
            }
        }
        acc.add(b, bias_grad(&db));
    }
    if acc.wants(w) {
        let mut dw = zeros_like_w(t, w);
        let mut dw2 = w_rows(&mut dw);
        let mut col = vec![0.0f32; f.cin];
        for (gr, &(bi, si, gi)) in g2.axis_iter(Axis(0)).zip(picks) {
            f.image(bi as usize).gather_col(f.sp(), si as usize, &mut col);
            for (j, &gv) in gr.iter().enumerate() {
                if gv != 0.0 {
                    axpy(dw2.row_mut(gi as usize * kdim + j).as_slice_mut().unwrap(), gv, &col);
                }
            }
        }
        acc.add(w, dw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{FeatData, Features};
    use half::f16;
    use crate::autograd::fd::{check, rand_array};

    /// The plain conv: y[b, o, s] = bias[o] + Σ_c w[o, c] x[b, c, s].
    fn conv(x: &ArrayD<f32>, w: &ArrayD<f32>, b: &ArrayD<f32>) -> ndarray::Array3<f32> {
        let (bs, cin, ny, nx) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let cout = w.shape()[0];
        ndarray::Array3::from_shape_fn((bs, cout, ny * nx), |(bi, o, s)| b[[o]] + (0..cin).map(|c| w[[o, c]] * x[[bi, c, s / nx, s % nx]]).sum::<f32>())
    }

    #[test]
    fn channels_and_picks_equal_the_plain_conv() {
        let (bs, cin, sp, groups, kdim) = (2, 37, 21, 3, 4);
        let x = rand_array(&[bs, cin, 3, 7], 1, -1.0, 1.0);
        let w = rand_array(&[groups * kdim, cin], 2, -1.0, 1.0);
        let b = rand_array(&[groups * kdim], 3, -1.0, 1.0);
        let want = conv(&x, &w, &b);
        let mut t = Tape::new();
        let (xv, wv, bv) = (t.input(Features::from_array(x)), t.constant(w), t.constant(b));
        assert_eq!(t.shape(xv), &[bs, cin, 3, 7]);
        let chans = [2usize, 6, 10];
        let y = t.conv1x1_channels(xv, wv, bv, &chans);
        for bi in 0..bs {
            for (j, &c) in chans.iter().enumerate() {
                for s in 0..sp {
                    assert!((t.value(y)[[(bi * 3 + j) * sp + s, 0]] - want[[bi, c, s]]).abs() < 1e-5);
                }
            }
        }
        let picks: Vec<Pick> = vec![(1, 20, 2), (0, 0, 0), (1, 20, 2), (0, 7, 1)];
        let z = t.conv1x1_at(xv, wv, bv, &picks, groups);
        for (k, &(bi, s, g)) in picks.iter().enumerate() {
            for j in 0..kdim {
                let v = t.value(z)[[k, j]];
                assert!((v - want[[bi as usize, g as usize * kdim + j, s as usize]]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn f16_features_give_the_f32_result_of_the_rounded_values() {
        let (bs, cin, ny, nx) = (2, 19, 5, 9);
        let x = rand_array(&[bs, cin, ny, nx], 11, -2.0, 2.0).mapv(|v| f16::from_f32(v).to_f32());
        let w = rand_array(&[6, cin], 12, -1.0, 1.0);
        let b = rand_array(&[6], 13, -1.0, 1.0);
        let halves: Vec<half::f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let mut t = Tape::new();
        let f32s = t.input(Features::from_array(x));
        let f16s = t.input(Features { data: FeatData::F16(halves), bs, cin, ny, nx });
        let (wv, bv) = (t.param(w), t.param(b));
        let a = t.conv1x1_channels(f32s, wv, bv, &[4, 1]);
        let h = t.conv1x1_channels(f16s, wv, bv, &[4, 1]);
        assert!(t.value(a).iter().zip(t.value(h)).all(|(p, q)| (p - q).abs() < 1e-4));
        let pa = t.conv1x1_at(f32s, wv, bv, &[(1, 44, 1)], 2);
        let ph = t.conv1x1_at(f16s, wv, bv, &[(1, 44, 1)], 2);
        assert!(t.value(pa).iter().zip(t.value(ph)).all(|(p, q)| (p - q).abs() < 1e-4));
    }

    #[test]
    fn channels_grads() {
        let (bs, cin, ny, nx) = (2, 3, 2, 3);
        let x = rand_array(&[bs, cin, ny, nx], 4, -1.0, 1.0);
        let w = rand_array(&[6, cin, 1, 1], 5, -1.0, 1.0);
        let b = rand_array(&[6], 6, -1.0, 1.0);
        check(&[w, b], move |t, v| {
            let f = t.input(Features::from_array(x.clone()));
            t.conv1x1_channels(f, v[0], v[1], &[1, 4])
        });
    }

    #[test]
    fn at_grads_with_duplicate_picks() {
        let (bs, cin) = (2, 3);
        let x = rand_array(&[bs, cin, 1, 5], 7, -1.0, 1.0);
        let w = rand_array(&[6, cin], 8, -1.0, 1.0);
        let b = rand_array(&[6], 9, -1.0, 1.0);
        check(&[w, b], move |t, v| {
            let f = t.input(Features::from_array(x.clone()));
            t.conv1x1_at(f, v[0], v[1], &[(0, 1, 1), (1, 4, 0), (0, 1, 1)], 2)
        });
    }
}
