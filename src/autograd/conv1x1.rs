// 1x1 convolutions read straight from cached NCHW features, computing only the
// outputs the YOLOv5 loss reads.
// In: x [bs, cin, S...] (a level's features as the cache stores them, S = ny*nx),
//     w [cout, cin] (or the conv's [cout, cin, 1, 1]), b [cout].
// - conv1x1_channels(x, w, b, chans): output channels `chans` at every position
//   -> [bs*k*S, 1] with rows (b, j, s). With chans = the na objectness channels
//   (a*no + 4) this is YOLOv5's p[i][..., 4] flattened in (b, a, y, x) order.
// - conv1x1_at(x, w, b, picks, groups): for each pick (b, s, g) the
//   kdim = cout/groups channels of group g at image b, position s -> [n, kdim]:
//   the positives' outputs p[i][b, a, y, x, :] in build_targets' order.
// Why: ComputeLoss reads box and class outputs only at the positives (a few
// hundred rows a batch) and objectness everywhere. The plain conv computes all
// na*no channels at every position, ~10x the work the loss uses, and needs the
// features transposed to rows first. Backward follows the same pattern.

use rayon::prelude::*;
use ndarray::{Array2, ArrayD, ArrayView2, Axis, IxDyn};

use crate::kernels::{axpy, conv_rows, dot, dots};
use super::matmul::weight2;
use super::tape::{GradAcc, Op, Tape, Var};

/// `(image, position, group)` of one gathered output row.
pub type Pick = (u32, u32, u32);

/// x as [bs, cin, S] (trailing spatial dims flattened), standard layout.
fn x3(x: &ArrayD<f32>) -> (&[f32], usize, usize, usize) {
    let sh = x.shape();
    assert!(sh.len() >= 3, "conv1x1: features must be [bs, cin, spatial...]");
    let s: usize = sh[2..].iter().product();
    (x.as_slice().expect("conv1x1: features must be in standard layout"), sh[0], sh[1], s)
}

impl Tape {
    /// See the file header.
    pub fn conv1x1_channels(&mut self, x: Var, w: Var, b: Var, chans: &[usize]) -> Var {
        let (xd, bs, cin, sp) = x3(self.value(x));
        let wv = weight2(self.value(w));
        let bv = self.value(b);
        assert_eq!(wv.ncols(), cin, "conv1x1_channels: cin differs");
        assert!(chans.iter().all(|&c| c < wv.nrows()), "conv1x1_channels: channel out of range");
        let k = chans.len();
        let wsel: Vec<Vec<f32>> = chans.iter().map(|&c| wv.row(c).to_vec()).collect();
        let mut out = vec![0.0f32; bs * k * sp];
        let bsel: Vec<f32> = chans.iter().map(|&c| bv[[c]]).collect();
        let wrefs: Vec<&[f32]> = wsel.iter().map(|w| w.as_slice()).collect();
        out.par_chunks_mut(k * sp).enumerate().for_each(|(bi, ob)| {
            conv_rows(&wrefs, &bsel, &xd[bi * cin * sp..(bi + 1) * cin * sp], sp, ob);
        });
        let v = ArrayD::from_shape_vec(IxDyn(&[bs * k * sp, 1]), out).unwrap();
        self.push_op(v, Op::Conv1x1Channels { x, w, b, chans: chans.to_vec() }, &[x, w, b])
    }

    /// See the file header.
    pub fn conv1x1_at(&mut self, x: Var, w: Var, b: Var, picks: &[Pick], groups: usize) -> Var {
        let (xd, bs, cin, sp) = x3(self.value(x));
        let wv = weight2(self.value(w));
        let bv = self.value(b);
        assert_eq!(wv.ncols(), cin, "conv1x1_at: cin differs");
        assert!(groups > 0 && wv.nrows() % groups == 0, "conv1x1_at: groups");
        let kdim = wv.nrows() / groups;
        let mut out = Array2::<f32>::zeros((picks.len(), kdim));
        let mut col = vec![0.0f32; cin];
        for (mut o, &(bi, si, g)) in out.outer_iter_mut().zip(picks) {
            let (bi, si, g) = (bi as usize, si as usize, g as usize);
            assert!(bi < bs && si < sp && g < groups, "conv1x1_at: pick out of range");
            gather_col(xd, cin, sp, bi, si, &mut col);
            for (j, o) in o.iter_mut().enumerate() {
                let r = g * kdim + j;
                *o = bv[[r]] + dot(wv.row(r).as_slice().unwrap(), &col);
            }
        }
        self.push_op(out.into_dyn(), Op::Conv1x1At { x, w, b, picks: picks.to_vec(), groups }, &[x, w, b])
    }
}

fn gather_col(xd: &[f32], cin: usize, sp: usize, bi: usize, si: usize, col: &mut [f32]) {
    let base = bi * cin * sp + si;
    for (c, v) in col.iter_mut().enumerate() {
        *v = xd[base + c * sp];
    }
}

/// An all-zero gradient of `w`'s shape, filled as [cout, cin].
fn zeros_like_w(t: &Tape, w: Var) -> (ArrayD<f32>, usize) {
    let cin = weight2(t.value(w)).ncols();
    (ArrayD::zeros(t.value(w).raw_dim()), cin)
}

fn w_rows(dw: &mut ArrayD<f32>, cin: usize) -> ndarray::ArrayViewMut2<'_, f32> {
    let cout = dw.len() / cin;
    dw.view_mut().into_shape_with_order((cout, cin)).unwrap()
}

pub fn channels_backward(t: &Tape, x: Var, w: Var, b: Var, chans: &[usize], g: ArrayD<f32>, acc: &mut GradAcc) {
    let (xd, bs, cin, sp) = x3(t.value(x));
    let g = g.as_standard_layout().into_owned();
    let gd = g.as_slice().unwrap();
    let k = chans.len();
    if acc.wants(b) {
        let mut db = vec![0.0f64; t.value(b).len()];
        for gb in gd.chunks_exact(k * sp) {
            for (j, gj) in gb.chunks_exact(sp).enumerate() {
                db[chans[j]] += gj.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        acc.add(b, ArrayD::from_shape_vec(IxDyn(&[db.len()]), db.iter().map(|&v| v as f32).collect()).unwrap());
    }
    if acc.wants(w) {
        // per image [k, cin] partials in parallel, summed in image order so the
        // result does not depend on the thread count
        let parts: Vec<Vec<f32>> = (0..bs)
            .into_par_iter()
            .map(|bi| {
                let xb = &xd[bi * cin * sp..(bi + 1) * cin * sp];
                let gb = &gd[bi * k * sp..(bi + 1) * k * sp];
                let mut p = vec![0.0f32; k * cin];
                let grows: Vec<&[f32]> = gb.chunks_exact(sp).collect();
                let mut d = vec![0.0f32; k];
                for (c, xr) in xb.chunks_exact(sp).enumerate() {
                    dots(&grows, xr, &mut d);
                    for (j, v) in d.iter().enumerate() {
                        p[j * cin + c] = *v;
                    }
                }
                p
            })
            .collect();
        let (mut dw, cin2) = zeros_like_w(t, w);
        let mut dw2 = w_rows(&mut dw, cin2);
        for p in parts {
            for (j, &ch) in chans.iter().enumerate() {
                let mut r = dw2.row_mut(ch);
                for (d, v) in r.iter_mut().zip(&p[j * cin..(j + 1) * cin]) {
                    *d += v;
                }
            }
        }
        acc.add(w, dw);
    }
    if acc.wants(x) {
        let wv = weight2(t.value(w));
        let mut dx = ArrayD::<f32>::zeros(t.value(x).raw_dim());
        let dxd = dx.as_slice_mut().unwrap();
        dxd.par_chunks_mut(cin * sp).zip(gd.par_chunks(k * sp)).for_each(|(dxb, gb)| {
            for (c, dxr) in dxb.chunks_exact_mut(sp).enumerate() {
                for (j, gj) in gb.chunks_exact(sp).enumerate() {
                    axpy(dxr, wv[[chans[j], c]], gj);
                }
            }
        });
        acc.add(x, dx);
    }
}

#[allow(clippy::too_many_arguments)]
pub fn at_backward(t: &Tape, x: Var, w: Var, b: Var, picks: &[Pick], groups: usize, g: ArrayD<f32>, acc: &mut GradAcc) {
    let (xd, _, cin, sp) = x3(t.value(x));
    let g = g.as_standard_layout().into_owned();
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
        acc.add(b, ArrayD::from_shape_vec(IxDyn(&[db.len()]), db.iter().map(|&v| v as f32).collect()).unwrap());
    }
    if acc.wants(w) {
        let (mut dw, _) = zeros_like_w(t, w);
        let mut dw2 = w_rows(&mut dw, cin);
        let mut col = vec![0.0f32; cin];
        for (gr, &(bi, si, gi)) in g2.axis_iter(Axis(0)).zip(picks) {
            gather_col(xd, cin, sp, bi as usize, si as usize, &mut col);
            for (j, &gv) in gr.iter().enumerate() {
                if gv != 0.0 {
                    axpy(dw2.row_mut(gi as usize * kdim + j).as_slice_mut().unwrap(), gv, &col);
                }
            }
        }
        acc.add(w, dw);
    }
    if acc.wants(x) {
        let wv = weight2(t.value(w));
        let mut dx = ArrayD::<f32>::zeros(t.value(x).raw_dim());
        let dxd = dx.as_slice_mut().unwrap();
        for (gr, &(bi, si, gi)) in g2.axis_iter(Axis(0)).zip(picks) {
            let base = bi as usize * cin * sp + si as usize;
            for c in 0..cin {
                let s: f32 = gr.iter().enumerate().map(|(j, gv)| gv * wv[[gi as usize * kdim + j, c]]).sum();
                dxd[base + c * sp] += s;
            }
        }
        acc.add(x, dx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    /// The plain conv: y[b, o, s] = bias[o] + Σ_c w[o, c] x[b, c, s].
    fn conv(x: &ArrayD<f32>, w: &ArrayD<f32>, b: &ArrayD<f32>) -> ndarray::Array3<f32> {
        let (bs, cin, sp) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let cout = w.shape()[0];
        ndarray::Array3::from_shape_fn((bs, cout, sp), |(bi, o, s)| b[[o]] + (0..cin).map(|c| w[[o, c]] * x[[bi, c, s]]).sum::<f32>())
    }

    #[test]
    fn channels_and_picks_equal_the_plain_conv() {
        let (bs, cin, sp, groups, kdim) = (2, 37, 21, 3, 4);
        let x = rand_array(&[bs, cin, sp], 1, -1.0, 1.0);
        let w = rand_array(&[groups * kdim, cin], 2, -1.0, 1.0);
        let b = rand_array(&[groups * kdim], 3, -1.0, 1.0);
        let want = conv(&x, &w, &b);
        let mut t = Tape::new();
        let (xv, wv, bv) = (t.constant(x), t.constant(w), t.constant(b));
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
    fn channels_grads() {
        let (bs, cin, ny, nx) = (2, 3, 2, 3);
        let x = rand_array(&[bs, cin, ny, nx], 4, -1.0, 1.0);
        let w = rand_array(&[6, cin, 1, 1], 5, -1.0, 1.0);
        let b = rand_array(&[6], 6, -1.0, 1.0);
        check(&[x, w, b], |t, v| t.conv1x1_channels(v[0], v[1], v[2], &[1, 4]));
    }

    #[test]
    fn at_grads_with_duplicate_picks() {
        let (bs, cin, sp) = (2, 3, 5);
        let x = rand_array(&[bs, cin, sp], 7, -1.0, 1.0);
        let w = rand_array(&[6, cin], 8, -1.0, 1.0);
        let b = rand_array(&[6], 9, -1.0, 1.0);
        check(&[x, w, b], |t, v| t.conv1x1_at(v[0], v[1], v[2], &[(0, 1, 1), (1, 4, 0), (0, 1, 1)], 2));
    }
}
