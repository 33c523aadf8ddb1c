// The Detect head's 1x1 conv straight into YOLOv5's p layout, with backward.
// In: x [B, cin, ny, nx] (NCHW feature maps on the tape), w [na*no, cin]
// (the head's weight as the store holds it), b [na*no], na. Out: p
// [B*na*ny*nx, no], rows in (b, a, y, x) order, columns o: what
// `x.view(bs, na, no, ny, nx).permute(0, 1, 3, 4, 2)` gives after the conv.
// Why: the conv, reshape, permute, reshape chain materialises four
// full-size copies forward and four backward; here each image/anchor block
// is one GEMM in the conv's layout (y_b = W · x_b + b, [na*no, ny*nx]) then
// transposed into p's rows in cache, and the backward transposes each image's p gradient to the conv's layout
// G_b [na*no, ny*nx] (in cache) for dW = Σ_b G_b · x_bᵀ, dx_b = Wᵀ · G_b;
// db = column sums. Images run in parallel; the
// per-image weight partials are summed in image order (thread-count
// independent), the bias sums in f64 as the conv's.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use crate::autograd::conv::{NT_MIN_P, contiguous, row_sum};
use crate::autograd::tape::{FusedOp, GradAcc, Tape, Var};
use crate::kernels::conv::{Mat, pack_a, sgemm, sgemm_nt_acc, sgemm_packed};

fn dims(t: &Tape, x: Var, w: Var, na: usize) -> (usize, usize, usize, usize) {
    let xs = t.value(x).shape();
    let ws = t.value(w).shape();
    assert!(xs.len() == 4 && ws.len() == 2 && ws[1] == xs[1] && ws[0] % na == 0, "head_rows: x {xs:?} and w {ws:?} do not fit na = {na}");
    (xs[0], xs[1], xs[2] * xs[3], ws[0] / na)
}

/// `head_rows`'s record.
pub struct HeadRows {
    x: Var,
    w: Var,
    b: Var,
    na: usize,
}

impl Tape {
    /// See the file header.
    pub fn head_rows(&mut self, x: Var, w: Var, b: Var, na: usize) -> Var {
        let (n, cin, p, no) = dims(self, x, w, na);
        let xs = contiguous(self.value(x));
        let ws = contiguous(self.value(w));
        let bs = contiguous(self.value(b));
        assert_eq!(bs.len(), na * no, "head_rows: bias length");
        let wp = pack_a(na * no, cin, Mat::rows(&ws, cin));
        let mut out = vec![0.0f32; n * na * p * no];
        out.par_chunks_mut(na * p * no).enumerate().for_each(|(i, oi)| {
            let xi = &xs[i * cin * p..(i + 1) * cin * p];
            // the conv's own layout first, y [na*no, p] = W · x_i + b (one
            // GEMM with n = p: per anchor with n = no the 48-wide kernel ran
            // mostly on padding), then transposed into the p rows in cache
            let mut y = vec![0.0f32; na * no * p];
            y.chunks_exact_mut(p).zip(bs.iter()).for_each(|(r, &v)| r.fill(v));
            sgemm_packed(&wp, p, 1.0, Mat::rows(xi, p), 1.0, &mut y);
            for (ya, oa) in y.chunks_exact(no * p).zip(oi.chunks_exact_mut(p * no)) {
                for (o, yr) in ya.chunks_exact(p).enumerate() {
                    oa.iter_mut().skip(o).step_by(no).zip(yr).for_each(|(d, &v)| *d = v);
                }
            }
        });
        let v = ArrayD::from_shape_vec(IxDyn(&[n * na * p, no]), out).unwrap();
        self.push_ext(v, HeadRows { x, w, b, na }, &[x, w, b])
    }
}

impl FusedOp for HeadRows {
    fn name(&self) -> &'static str {
        "HeadRows"
    }

    fn backward(&self, t: &Tape, g: ArrayD<f32>, acc: &mut GradAcc) {
        backward(t, self, g, acc)
    }
}

fn backward(t: &Tape, op: &HeadRows, g: ArrayD<f32>, acc: &mut GradAcc) {
    let HeadRows { x, w, b, na } = *op;
    let (n, cin, p, no) = dims(t, x, w, na);
    let gs = contiguous(&g);
    let (need_b, need_w, need_x) = (acc.wants(b), acc.wants(w), acc.wants(x));
    if !need_b && !need_w && !need_x {
        return;
    }
    let xs = contiguous(t.value(x));
    let ws = contiguous(t.value(w));
    let wtp = need_x.then(|| pack_a(cin, na * no, Mat::t(&ws, cin)));
    let mut dx = if need_x { vec![0.0f32; n * cin * p] } else { Vec::new() };
    let chunks: Vec<&mut [f32]> = if need_x { dx.chunks_mut(cin * p).collect() } else { (0..n).map(|_| <&mut [f32]>::default()).collect() };
    let parts: Vec<(Vec<f32>, Vec<f64>)> = chunks
        .into_par_iter()
        .enumerate()
        .map(|(i, dxi)| {
            let xi = &xs[i * cin * p..(i + 1) * cin * p];
            // image i's gradient as the conv's [na*no, p] (a transpose in
            // cache), so that dW and dx are one GEMM each with k = p and
            // k = na*no; per anchor, k = no is too thin for the GEMM kernel
            let gi = &gs[i * na * p * no..(i + 1) * na * p * no];
            let mut gt = vec![0.0f32; na * no * p];
            for (gba, gta) in gi.chunks_exact(p * no).zip(gt.chunks_exact_mut(no * p)) {
                for (o, gr) in gta.chunks_exact_mut(p).enumerate() {
                    gr.iter_mut().zip(gba.iter().skip(o).step_by(no)).for_each(|(d, &v)| *d = v);
                }
            }
            // the bias gradient: the rows of the conv-layout gradient, summed
            // on this image's thread (it was a serial pass over all of g)
            let db: Vec<f64> = if need_b { gt.chunks_exact(p).map(row_sum).collect() } else { Vec::new() };
            let mut dw = if need_w { vec![0.0f32; na * no * cin] } else { Vec::new() };
            if need_w {
                // as the conv's dW: row dot products on large maps
                if p >= NT_MIN_P {
                    sgemm_nt_acc(na * no, cin, p, &gt, p, xi, p, &mut dw);
                } else {
                    sgemm(na * no, p, cin, 1.0, Mat::rows(&gt, p), Mat::t(xi, p), 0.0, &mut dw);
                }
            }
            if let Some(wtp) = &wtp {
                sgemm_packed(wtp, p, 1.0, Mat::rows(&gt, p), 0.0, dxi);
            }
            (dw, db)
        })
        .collect();
    let (parts, dbs): (Vec<Vec<f32>>, Vec<Vec<f64>>) = parts.into_iter().unzip();
    if need_b {
        // per-image sums added in image order (thread-count independent)
        let mut s = vec![0.0f64; na * no];
        for d in dbs {
            s.iter_mut().zip(d).for_each(|(a, v)| *a += v);
        }
        acc.add(b, ArrayD::from_shape_vec(IxDyn(&[na * no]), s.into_iter().map(|v| v as f32).collect()).unwrap());
    }
    if need_w {
        let mut it = parts.into_iter();
        let mut dw = it.next().unwrap_or_else(|| vec![0.0; na * no * cin]);
        for part in it {
            dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        acc.add(w, ArrayD::from_shape_vec(IxDyn(&[na * no, cin]), dw).unwrap());
    }
    if need_x {
        let shape = t.value(x).raw_dim();
        acc.add(x, ArrayD::from_shape_vec(shape, dx).unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};
    use crate::tail::ops::ConvSpec;

    /// The chain it replaces (train::tail's former head_p): conv 1x1,
    /// reshape, permute, reshape.
    fn chain(t: &mut Tape, x: Var, w: Var, b: Var, na: usize) -> Var {
        let [bs, cin, ny, nx] = t.value(x).shape().try_into().unwrap();
        let no = t.value(w).shape()[0] / na;
        let w4 = t.reshape(w, &[na * no, cin, 1, 1]);
        let y = t.conv2d(x, w4, Some(b), &ConvSpec::square(1, 1, 0));
        let y = t.reshape(y, &[bs, na, no, ny, nx]);
        let y = t.permute(y, &[0, 1, 3, 4, 2]);
        t.reshape(y, &[bs * na * ny * nx, no])
    }

    #[test]
    fn equals_conv_reshape_permute_in_value_and_gradient() {
        // non-square grid, 3 anchors, batch 3, and a loss that weights every
        // row and column differently so a transposed block would show
        let (bs, cin, ny, nx, na, no) = (3, 5, 4, 6, 3, 7);
        let x = rand_array(&[bs, cin, ny, nx], 1, -1.0, 1.0);
        let w = rand_array(&[na * no, cin], 2, -1.0, 1.0);
        let b = rand_array(&[na * no], 3, -1.0, 1.0);
        let r = rand_array(&[bs * na * ny * nx, no], 4, -1.0, 1.0);
        let run = |fused: bool| {
            let mut t = Tape::new();
            let (xv, wv, bv, rv) = (t.param(x.clone()), t.param(w.clone()), t.param(b.clone()), t.constant(r.clone()));
            let p = if fused { t.head_rows(xv, wv, bv, na) } else { chain(&mut t, xv, wv, bv, na) };
            let val = t.value(p).clone();
            let l = t.mul(p, rv);
            let l = t.sum(l);
            let mut g = t.backward(l);
            (val, [xv, wv, bv].map(|v| g.take(v).unwrap()))
        };
        let (va, ga) = run(false);
        let (vb, gb) = run(true);
        assert_eq!(va.shape(), vb.shape());
        assert!(va.iter().zip(&vb).all(|(a, b)| (a - b).abs() <= 1e-5), "values differ");
        for (a, b) in ga.iter().zip(&gb) {
            assert_eq!(a.shape(), b.shape());
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4), "gradients differ");
        }
    }

    /// Value and gradients against the definition summed in f64, on a grid
    /// below and one above NT_MIN_P pixels (dW as a packed GEMM and as row
    /// dot products: the second is what yolov5n's 80x80 level runs).
    #[test]
    fn equals_the_definition_on_both_sides_of_the_dot_product_threshold() {
        for (ny, nx) in [(5, 7), (40, 41)] {
            let (bs, cin, na, no) = (2, 3, 3, 6);
            let p = ny * nx;
            assert_eq!(p >= NT_MIN_P, ny == 40);
            let x = rand_array(&[bs, cin, ny, nx], 11, -1.0, 1.0);
            let w = rand_array(&[na * no, cin], 12, -1.0, 1.0);
            let b = rand_array(&[na * no], 13, -1.0, 1.0);
            let r = rand_array(&[bs * na * p, no], 14, -1.0, 1.0);
            let mut t = Tape::new();
            let (xv, wv, bv, rv) = (t.param(x.clone()), t.param(w.clone()), t.param(b.clone()), t.constant(r.clone()));
            let pv = t.head_rows(xv, wv, bv, na);
            let val = t.value(pv).clone();
            let l = t.mul(pv, rv);
            let l = t.sum(l);
            let mut g = t.backward(l);
            let [gx, gw, gb] = [xv, wv, bv].map(|v| g.take(v).unwrap());
            let (xs, ws, rs) = (x.as_slice().unwrap(), w.as_slice().unwrap(), r.as_slice().unwrap());
            let row = |i: usize, a: usize, px: usize| ((i * na + a) * p + px) * no;
            let (mut dw, mut db, mut dx) = (vec![0.0f64; na * no * cin], vec![0.0f64; na * no], vec![0.0f64; bs * cin * p]);
            for i in 0..bs {
                for a in 0..na {
                    for px in 0..p {
                        for o in 0..no {
                            let (k, ro) = (a * no + o, rs[row(i, a, px) + o] as f64);
                            let mut y = b[[k]] as f64;
                            for c in 0..cin {
                                let xv = xs[(i * cin + c) * p + px] as f64;
                                y += ws[k * cin + c] as f64 * xv;
                                dw[k * cin + c] += ro * xv;
                                dx[(i * cin + c) * p + px] += ro * ws[k * cin + c] as f64;
                            }
                            db[k] += ro;
                            assert!((val[[row(i, a, px) / no, o]] as f64 - y).abs() < 1e-5, "{ny}x{nx}: value");
                        }
                    }
                }
            }
            for (name, got, want) in [("dW", &gw, &dw), ("db", &gb, &db), ("dx", &gx, &dx)] {
                let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (a, e) in got.iter().zip(want.iter()) {
                    assert!((*a as f64 - e).abs() <= 1e-5 * scale, "{ny}x{nx} {name}: {a} vs {e}");
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = rand_array(&[2, 3, 2, 3], 5, -1.0, 1.0);
        let w = rand_array(&[2 * 4, 3], 6, -1.0, 1.0);
        let b = rand_array(&[2 * 4], 7, -1.0, 1.0);
        check(&[x, w, b], |t, v| t.head_rows(v[0], v[1], v[2], 2));
    }
}
