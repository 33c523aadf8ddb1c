// 2-D convolution and transposed convolution on NCHW maps, with backward.
// In: x [N, C, H, W]; conv2d: w [M, C/groups, kH, kW], optional b [M], a
// `ConvSpec`; conv_transpose2d: w [C, M/groups, kH, kW], optional b [M], a
// `ConvTransposeSpec`. Out: y [N, M, H', W'] (ONNX Conv / ConvTranspose).
// How: per image and group, im2col + one GEMM (a 1x1 stride-1 conv needs no
// im2col: the input is its own col matrix); images run in parallel (rayon).
// Backward is composed from the same pieces (as candle's backprop.rs does):
// conv dW = dY · colᵀ, dX = col2im(Wᵀ · dY); the transposed conv is the
// adjoint of a conv, so its forward is the conv's dX and its dX the conv's
// forward. dW uses row dot products on large maps (see NT_MIN_P); the
// conv's dX adds into x's gradient buffer in place. dX is
// skipped when x needs no gradient (the tail's first layer reads cached
// features), dW/db when the weights are frozen. The per-image
// weight partials are summed in image order, so results do not depend on
// the thread count.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::tape::{GradAcc, Op, Tape, Var};
use crate::kernels::conv::{Geom, Mat, PackedA, Path, col2im, im2col, pack_a_on, sgemm_nt_acc_on, sgemm_on, sgemm_packed};
use crate::kernels::elementwise::filled;
use crate::tail::ops::{ConvSpec, ConvTransposeSpec};

/// From this many output pixels on, dW = dY·colᵀ runs as row dot products
/// (`sgemm_nt_acc`: no packing); below, as a packed GEMM on the transposed
/// col (the dot kernel's per-tile lane sums then cost more than the packing).
pub(crate) const NT_MIN_P: usize = 1600;

thread_local! {
    /// This thread's col matrix from its previous image (see `take_col`).
    static COL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A col buffer of `len` floats: the one this thread used last, contents
/// left as they were (im2col and the beta = 0 GEMMs that fill it overwrite
/// every entry), so an image costs no multi-MB allocation and zero-fill.
/// Hand it back with `give_col`.
fn take_col(len: usize) -> Vec<f32> {
    let mut v = COL.take();
    v.resize(len, 0.0);
    v
}

fn give_col(v: Vec<f32>) {
    if v.capacity() > 0 {
        COL.set(v);
    }
}

/// A value's data in row-major order (borrowed when it already is).
pub(super) fn contiguous(a: &ArrayD<f32>) -> std::borrow::Cow<'_, [f32]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => {
            let t0 = std::time::Instant::now();
            let v = a.iter().copied().collect();
            super::profile::phase("contiguous copy", t0);
            std::borrow::Cow::Owned(v)
        }
    }
}

fn nchw(op: &str, a: &ArrayD<f32>) -> [usize; 4] {
    a.shape().try_into().unwrap_or_else(|_| panic!("{op}: expected a 4-D NCHW value, got shape {:?}", a.shape()))
}

/// Per-channel sums of g [n, m, p] (the bias gradient), in f64; images in
/// parallel, their sums added in image order (the serial loop's order).
fn channel_sums(g: &[f32], m: usize, p: usize) -> ArrayD<f32> {
    let per_image: Vec<Vec<f64>> = g.par_chunks_exact(m * p).map(|gi| gi.chunks_exact(p).map(row_sum).collect()).collect();
    let mut s = vec![0.0f64; m];
    for r in per_image {
        s.iter_mut().zip(r).for_each(|(sj, v)| *sj += v);
    }
    ArrayD::from_shape_vec(IxDyn(&[m]), s.into_iter().map(|v| v as f32).collect()).unwrap()
}

/// The sum of a row in f64, in 8 lanes (positions ≡ l mod 8) added at the
/// end: independent chains the compiler vectorises, where one running sum
/// waited on each add's latency (a bias gradient reads every output).
pub(crate) fn row_sum(row: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut it = row.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v as f64;
        }
    }
    for (l, &v) in lanes.iter_mut().zip(it.remainder()) {
        *l += v as f64;
    }
    lanes.iter().sum()
}

/// Writes each row (length p) of one image's uninitialised output with its
/// channel's bias (0 without one) and returns it as initialised: the GEMMs
/// then add to it, and the output costs no zero fill first.
fn with_bias<'a>(out: &'a mut [MaybeUninit<f32>], bias: Option<&[f32]>, p: usize) -> &'a mut [f32] {
    match bias {
        Some(b) => out.chunks_exact_mut(p).zip(b).for_each(|(r, &v)| r.iter_mut().for_each(|d| _ = d.write(v))),
        None => out.iter_mut().for_each(|d| _ = d.write(0.0)),
    }
    // SAFETY: every slot was written above (the caller's buffer holds whole rows).
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Each group's [rows, k] block of the weights w, packed once for all the
/// images of a batch: as it is, or transposed ([k, rows]: Wᵀ for a conv's
/// dX and a transposed conv's forward), for the GEMM path `gp`.
fn pack_groups(gp: Path, w: &[f32], groups: usize, rows: usize, k: usize, transposed: bool) -> Vec<PackedA> {
    (0..groups)
        .map(|gi| {
            let block = &w[gi * rows * k..(gi + 1) * rows * k];
            if transposed { pack_a_on(gp, k, rows, Mat::t(block, k)) } else { pack_a_on(gp, rows, k, Mat::rows(block, k)) }
        })
        .collect()
}

/// Sums per-image weight partials in image order.
fn sum_parts(parts: Vec<Vec<f32>>, shape: &[usize]) -> ArrayD<f32> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![0.0; shape.iter().product()]);
    for p in it {
        acc.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    ArrayD::from_shape_vec(IxDyn(shape), acc).unwrap()
}

/// The mutable per-image chunks of a gradient buffer, or `n` empty slices
/// when that gradient is not wanted (so one parallel loop serves both).
fn chunks_or_empty(buf: &mut [f32], len: usize, n: usize) -> Vec<&mut [f32]> {
    if buf.is_empty() { (0..n).map(|_| <&mut [f32]>::default()).collect() } else { buf.chunks_mut(len).collect() }
}

impl Tape {
    /// ONNX Conv (see the file header).
    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, spec: &ConvSpec) -> Var {
        let [n, c, h, wd] = nchw("conv2d", self.value(x));
        let [m, cg, kh, kw] = nchw("conv2d weight", self.value(w));
        let groups = spec.groups;
        assert!(cg * groups == c && m % groups == 0 && [kh, kw] == spec.kernel, "conv2d: weight {:?} does not fit input {:?} and {spec:?}", self.value(w).shape(), self.value(x).shape());
        let g = spec.geom(c, h, wd).unwrap_or_else(|| panic!("conv2d: kernel {spec:?} larger than the padded input {h}x{wd}"));
        let (mg, k, p) = (m / groups, g.k(), g.p());
        let xs = contiguous(self.value(x));
        let ws = contiguous(self.value(w));
        let bias = b.map(|b| contiguous(self.value(b)).into_owned());
        assert!(bias.as_ref().is_none_or(|b| b.len() == m), "conv2d: bias length");
        let wp = pack_groups(self.gemm(), &ws, groups, mg, k, false);
        let image = |i: usize, oi: &mut [MaybeUninit<f32>]| {
            let oi = with_bias(oi, bias.as_deref(), p);
            let xi = &xs[i * c * h * wd..(i + 1) * c * h * wd];
            let mut col = if g.is_pointwise() { Vec::new() } else { take_col(k * p) };
            for gi in 0..groups {
                let xg = &xi[gi * cg * h * wd..(gi + 1) * cg * h * wd];
                let cm: &[f32] = if g.is_pointwise() {
                    xg
                } else {
                    im2col(&g, xg, &mut col);
                    &col
                };
                let og = &mut oi[gi * mg * p..(gi + 1) * mg * p];
                sgemm_packed(&wp[gi], p, 1.0, Mat::rows(cm, p), 1.0, og);
            }
            give_col(col);
        };
        // SAFETY: `image` writes every slot of its piece (with_bias).
        let out = unsafe { filled(n * m * p, m * p, image) };
        let v = ArrayD::from_shape_vec(IxDyn(&[n, m, g.oh, g.ow]), out).unwrap();
        let inputs: Vec<Var> = [x, w].into_iter().chain(b).collect();
        self.push_op(v, Op::Conv2d { x, w, b, spec: *spec }, &inputs)
    }

    /// ONNX ConvTranspose (see the file header).
    pub fn conv_transpose2d(&mut self, x: Var, w: Var, b: Option<Var>, spec: &ConvTransposeSpec) -> Var {
        let [n, c, h, wd] = nchw("conv_transpose2d", self.value(x));
        let [wc, mg, kh, kw] = nchw("conv_transpose2d weight", self.value(w));
        let groups = spec.groups;
        assert!(wc == c && c % groups == 0 && [kh, kw] == spec.kernel, "conv_transpose2d: weight {:?} does not fit input {:?} and {spec:?}", self.value(w).shape(), self.value(x).shape());
        let (m, cg) = (mg * groups, c / groups);
        let g = spec.conv_geom(m, h, wd).unwrap_or_else(|| panic!("conv_transpose2d: {spec:?} gives no output for {h}x{wd}"));
        // g runs from the output (g.h x g.w, mg channels) back to the input (p = h*w)
        let (k, p, op) = (g.k(), g.p(), g.h * g.w);
        let xs = contiguous(self.value(x));
        let ws = contiguous(self.value(w));
        let bias = b.map(|b| contiguous(self.value(b)).into_owned());
        assert!(bias.as_ref().is_none_or(|b| b.len() == m), "conv_transpose2d: bias length");
        let wp = pack_groups(self.gemm(), &ws, groups, cg, k, true);
        let image = |i: usize, oi: &mut [MaybeUninit<f32>]| {
            let oi = with_bias(oi, bias.as_deref(), op);
            let xi = &xs[i * c * p..(i + 1) * c * p];
            let mut col = if g.is_pointwise() { Vec::new() } else { take_col(k * p) };
            for gi in 0..groups {
                let og = &mut oi[gi * mg * op..(gi + 1) * mg * op];
                let xg = Mat::rows(&xi[gi * cg * p..(gi + 1) * cg * p], p);
                if g.is_pointwise() {
                    sgemm_packed(&wp[gi], p, 1.0, xg, 1.0, og);
                } else {
                    sgemm_packed(&wp[gi], p, 1.0, xg, 0.0, &mut col);
                    col2im(&g, &col, og);
                }
            }
            give_col(col);
        };
        // SAFETY: `image` writes every slot of its piece (with_bias).
        let out = unsafe { filled(n * m * op, m * op, image) };
        let v = ArrayD::from_shape_vec(IxDyn(&[n, m, g.h, g.w]), out).unwrap();
        let inputs: Vec<Var> = [x, w].into_iter().chain(b).collect();
        self.push_op(v, Op::ConvTranspose2d { x, w, b, spec: *spec }, &inputs)
    }
}

pub fn conv2d_backward(t: &Tape, x: Var, w: Var, b: Option<Var>, spec: &ConvSpec, g: ArrayD<f32>, acc: &mut GradAcc) {
    let [n, c, h, wd] = nchw("conv2d", t.value(x));
    let [m, cg, _, _] = nchw("conv2d weight", t.value(w));
    let groups = spec.groups;
    let geo = spec.geom(c, h, wd).unwrap();
    let (mg, k, p) = (m / groups, geo.k(), geo.p());
    let gs = contiguous(&g);
    if let Some(b) = b
        && acc.wants(b)
    {
        acc.add(b, channel_sums(&gs, m, p));
    }
    let (need_w, need_x) = (acc.wants(w), acc.wants(x));
    if !need_w && !need_x {
        return;
    }
    let xs = contiguous(t.value(x));
    let ws = contiguous(t.value(w));
    let chw = c * h * wd;
    let gp = t.gemm();
    let wtp = if need_x { pack_groups(gp, &ws, groups, mg, k, true) } else { Vec::new() };
    // dX adds straight into x's gradient buffer (zeros, or what x's other
    // readers left there: a C3's input feeds two convs), which saves a
    // full-size temporary and the pass adding it; a buffer in another
    // layout (from some other op's `add`) gets a temporary as before
    let in_place = need_x && acc.buffer(x).is_standard_layout();
    let mut own = if need_x && !in_place { vec![0.0f32; n * chw] } else { Vec::new() };
    let dx: &mut [f32] = if in_place { acc.buffer(x).as_slice_mut().expect("standard layout") } else { &mut own };
    let parts: Vec<Vec<f32>> = chunks_or_empty(dx, chw, n)
        .into_par_iter()
        .enumerate()
        .map(|(i, dxi)| {
            let mut dw = if need_w { vec![0.0f32; m * k] } else { Vec::new() };
            let mut col = if geo.is_pointwise() { Vec::new() } else { take_col(k * p) };
            for gi in 0..groups {
                let gy = Mat::rows(&gs[(i * m + gi * mg) * p..(i * m + (gi + 1) * mg) * p], p);
                if need_w {
                    let xg = &xs[i * chw + gi * cg * h * wd..i * chw + (gi + 1) * cg * h * wd];
                    let cm: &[f32] = if geo.is_pointwise() {
                        xg
                    } else {
                        im2col(&geo, xg, &mut col);
                        &col
                    };
                    let dwg = &mut dw[gi * mg * k..(gi + 1) * mg * k];
                    if p >= NT_MIN_P {
                        sgemm_nt_acc_on(gp, mg, k, p, gy.data, p, cm, p, dwg);
                    } else {
                        sgemm_on(gp, mg, p, k, 1.0, gy, Mat::t(cm, p), 0.0, dwg);
                    }
                }
                if need_x {
                    let dxg = &mut dxi[gi * cg * h * wd..(gi + 1) * cg * h * wd];
                    if geo.is_pointwise() {
                        sgemm_packed(&wtp[gi], p, 1.0, gy, 1.0, dxg);
                    } else {
                        sgemm_packed(&wtp[gi], p, 1.0, gy, 0.0, &mut col);
                        col2im(&geo, &col, dxg);
                    }
                }
            }
            give_col(col);
            dw
        })
        .collect();
    if need_w {
        acc.add(w, sum_parts(parts, t.value(w).shape()));
    }
    if need_x && !in_place {
        acc.add(x, ArrayD::from_shape_vec(IxDyn(&[n, c, h, wd]), own).unwrap());
    }
}

#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward(t: &Tape, x: Var, w: Var, b: Option<Var>, spec: &ConvTransposeSpec, g: ArrayD<f32>, acc: &mut GradAcc) {
    let [n, c, h, wd] = nchw("conv_transpose2d", t.value(x));
    let [_, mg, _, _] = nchw("conv_transpose2d weight", t.value(w));
    let groups = spec.groups;
    let (m, cg) = (mg * groups, c / groups);
    let geo: Geom = spec.conv_geom(m, h, wd).unwrap();
    let (k, p, op) = (geo.k(), geo.p(), geo.h * geo.w);
    let gs = contiguous(&g);
    if let Some(b) = b
        && acc.wants(b)
    {
        acc.add(b, channel_sums(&gs, m, op));
    }
    let (need_w, need_x) = (acc.wants(w), acc.wants(x));
    if !need_w && !need_x {
        return;
    }
    let xs = contiguous(t.value(x));
    let ws = contiguous(t.value(w));
    let gp = t.gemm();
    let wp = if need_x { pack_groups(gp, &ws, groups, cg, k, false) } else { Vec::new() };
    let mut dx = if need_x { vec![0.0f32; n * c * p] } else { Vec::new() };
    let parts: Vec<Vec<f32>> = chunks_or_empty(&mut dx, c * p, n)
        .into_par_iter()
        .enumerate()
        .map(|(i, dxi)| {
            let mut dw = if need_w { vec![0.0f32; c * k] } else { Vec::new() };
            let mut col = if geo.is_pointwise() { Vec::new() } else { take_col(k * p) };
            for gi in 0..groups {
                let gy = &gs[(i * m + gi * mg) * op..(i * m + (gi + 1) * mg) * op];
                // the conv's forward on dY: its col matrix [k, p]
                let cm: &[f32] = if geo.is_pointwise() {
                    gy
                } else {
                    im2col(&geo, gy, &mut col);
                    &col
                };
                if need_x {
                    sgemm_packed(&wp[gi], p, 1.0, Mat::rows(cm, p), 0.0, &mut dxi[gi * cg * p..(gi + 1) * cg * p]);
                }
                if need_w {
                    let xg = Mat::rows(&xs[(i * c + gi * cg) * p..(i * c + (gi + 1) * cg) * p], p);
                    sgemm_on(gp, cg, p, k, 1.0, xg, Mat::t(cm, p), 0.0, &mut dw[gi * cg * k..(gi + 1) * cg * k]);
                }
            }
            give_col(col);
            dw
        })
        .collect();
    if need_w {
        acc.add(w, sum_parts(parts, t.value(w).shape()));
    }
    if need_x {
        acc.add(x, ArrayD::from_shape_vec(IxDyn(&[n, c, h, wd]), dx).unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, check_grads, rand_array};
    use ndarray::Array4;

    /// The ONNX Conv definition, loop by loop.
    fn conv_ref(x: &ArrayD<f32>, w: &ArrayD<f32>, b: Option<&ArrayD<f32>>, s: &ConvSpec) -> Array4<f32> {
        let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let (m, cg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
        let [oh, ow] = s.out_hw(h, wd).unwrap();
        let mg = m / s.groups;
        assert_eq!(cg * s.groups, c);
        Array4::from_shape_fn((n, m, oh, ow), |(i, o, y, xx)| {
            let gi = o / mg;
            let mut acc = b.map_or(0.0, |b| b[[o]] as f64);
            for ci in 0..cg {
                for ki in 0..kh {
                    for kj in 0..kw {
                        let iy = (y * s.strides[0] + ki * s.dilations[0]) as isize - s.pads[0] as isize;
                        let ix = (xx * s.strides[1] + kj * s.dilations[1]) as isize - s.pads[1] as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                            acc += (w[[o, ci, ki, kj]] * x[[i, gi * cg + ci, iy as usize, ix as usize]]) as f64;
                        }
                    }
                }
            }
            acc as f32
        })
    }

    /// The ONNX ConvTranspose definition: every input pixel scatters its kernel.
    fn conv_t_ref(x: &ArrayD<f32>, w: &ArrayD<f32>, b: Option<&ArrayD<f32>>, s: &ConvTransposeSpec) -> Array4<f32> {
        let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let (mg, kh, kw) = (w.shape()[1], w.shape()[2], w.shape()[3]);
        let cg = c / s.groups;
        let [oh, ow] = s.out_hw(h, wd).unwrap();
        let mut y = Array4::<f32>::zeros((n, mg * s.groups, oh, ow));
        for i in 0..n {
            for ci in 0..c {
                let gi = ci / cg;
                for iy in 0..h {
                    for ix in 0..wd {
                        for oc in 0..mg {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let oy = (iy * s.strides[0] + ki * s.dilations[0]) as isize - s.pads[0] as isize;
                                    let ox = (ix * s.strides[1] + kj * s.dilations[1]) as isize - s.pads[1] as isize;
                                    if oy >= 0 && ox >= 0 && (oy as usize) < oh && (ox as usize) < ow {
                                        y[[i, gi * mg + oc, oy as usize, ox as usize]] += x[[i, ci, iy, ix]] * w[[ci, oc, ki, kj]];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(b) = b {
            for ((_, o, _, _), v) in y.indexed_iter_mut() {
                *v += b[[o]];
            }
        }
        y
    }

    fn specs() -> Vec<(ConvSpec, [usize; 4], [usize; 4])> {
        // (spec, x shape, w shape)
        let mut dil = ConvSpec::square(3, 1, 2);
        dil.dilations = [2, 2];
        let mut grouped = ConvSpec::square(3, 1, 1);
        grouped.groups = 2;
        let mut asym = ConvSpec::square(3, 2, 0);
        asym.pads = [0, 1, 2, 0];
        asym.kernel = [3, 2];
        asym.strides = [2, 1];
        vec![
            (ConvSpec::square(3, 2, 1), [2, 3, 7, 6], [4, 3, 3, 3]),
            (ConvSpec::square(3, 1, 1), [2, 2, 5, 5], [3, 2, 3, 3]),
            (ConvSpec::square(1, 1, 0), [2, 4, 3, 5], [3, 4, 1, 1]),
            (grouped, [1, 4, 5, 4], [6, 2, 3, 3]),
            (dil, [1, 2, 6, 6], [2, 2, 3, 3]),
            (asym, [1, 2, 7, 5], [3, 2, 3, 2]),
        ]
    }

    #[test]
    fn conv2d_matches_the_definition() {
        for (k, (s, xs, wsh)) in specs().into_iter().enumerate() {
            let x = rand_array(&xs, 10 + k as u64, -1.0, 1.0);
            let w = rand_array(&wsh, 20 + k as u64, -1.0, 1.0);
            let b = rand_array(&[wsh[0]], 30 + k as u64, -1.0, 1.0);
            let mut t = Tape::new();
            let (xv, wv, bv) = (t.constant(x.clone()), t.constant(w.clone()), t.constant(b.clone()));
            let y = t.conv2d(xv, wv, Some(bv), &s);
            let want = conv_ref(&x, &w, Some(&b), &s);
            assert_eq!(t.value(y).shape(), want.shape(), "{s:?}");
            for (a, e) in t.value(y).iter().zip(want.iter()) {
                assert!((a - e).abs() < 1e-5, "{s:?}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn conv2d_hand_computed() {
        // 1 channel 3x3 input 1..9, 2x2 kernel of ones, stride 1, no pad: window sums
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 1, 3, 3]), (1..=9).map(|v| v as f32).collect()).unwrap();
        let w = ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 1.0);
        let mut t = Tape::new();
        let (xv, wv) = (t.constant(x), t.constant(w));
        let y = t.conv2d(xv, wv, None, &ConvSpec { bias: false, ..ConvSpec::square(2, 1, 0) });
        assert_eq!(t.value(y).as_slice().unwrap(), &[12.0, 16.0, 24.0, 28.0]);
        // k3 s2 p1 on the same input: the centre sees all 9 (45), corners 4 cells
        let w3 = ArrayD::from_elem(IxDyn(&[1, 1, 3, 3]), 1.0);
        let w3v = t.constant(w3);
        let y3 = t.conv2d(xv, w3v, None, &ConvSpec::square(3, 2, 1));
        assert_eq!(t.value(y3).as_slice().unwrap(), &[12.0, 16.0, 24.0, 28.0]);
        let y31 = t.conv2d(xv, w3v, None, &ConvSpec::square(3, 1, 1));
        assert_eq!(t.value(y31)[[0, 0, 1, 1]], 45.0);
    }

    #[test]
    fn conv2d_grads() {
        for (k, (s, xs, wsh)) in specs().into_iter().enumerate() {
            let x = rand_array(&xs, 40 + k as u64, -1.0, 1.0);
            let w = rand_array(&wsh, 50 + k as u64, -1.0, 1.0);
            let b = rand_array(&[wsh[0]], 60 + k as u64, -1.0, 1.0);
            check(&[x, w, b], |t, v| t.conv2d(v[0], v[1], Some(v[2]), &s));
        }
    }

    #[test]
    fn conv2d_skips_dx_for_constant_input_and_works_without_bias() {
        let (s, xs, wsh) = specs()[0];
        let x = rand_array(&xs, 1, -1.0, 1.0);
        let w = rand_array(&wsh, 2, -1.0, 1.0);
        let mut t = Tape::new();
        let xv = t.constant(x.clone());
        let wv = t.param(w.clone());
        let y = t.conv2d(xv, wv, None, &s);
        let l = t.sum(y);
        let gr = t.backward(l);
        assert!(gr.get(xv).is_none());
        // d sum(y) / dw equals the gradient a param x would also give
        let mut t2 = Tape::new();
        let (x2, w2) = (t2.param(x), t2.param(w));
        let y2 = t2.conv2d(x2, w2, None, &s);
        let l2 = t2.sum(y2);
        let g2 = t2.backward(l2);
        assert_eq!(gr.get(wv).unwrap(), g2.get(w2).unwrap());
        assert!(g2.get(x2).is_some());
    }

    fn t_specs() -> Vec<(ConvTransposeSpec, [usize; 4], [usize; 4])> {
        let mut padded = ConvTransposeSpec::upsample(3);
        padded.strides = [2, 2];
        padded.pads = [1, 1, 1, 1];
        padded.output_padding = [1, 0];
        padded.groups = 2;
        let mut one = ConvTransposeSpec::upsample(1);
        one.bias = false;
        vec![(ConvTransposeSpec::upsample(2), [2, 3, 3, 4], [3, 2, 2, 2]), (padded, [1, 4, 3, 3], [4, 1, 3, 3]), (one, [1, 3, 2, 2], [3, 2, 1, 1])]
    }

    #[test]
    fn conv_transpose2d_matches_the_definition() {
        for (k, (s, xs, wsh)) in t_specs().into_iter().enumerate() {
            let x = rand_array(&xs, 70 + k as u64, -1.0, 1.0);
            let w = rand_array(&wsh, 80 + k as u64, -1.0, 1.0);
            let m = wsh[1] * s.groups;
            let b = rand_array(&[m], 90 + k as u64, -1.0, 1.0);
            let mut t = Tape::new();
            let (xv, wv, bv) = (t.constant(x.clone()), t.constant(w.clone()), t.constant(b.clone()));
            let y = t.conv_transpose2d(xv, wv, Some(bv), &s);
            let want = conv_t_ref(&x, &w, Some(&b), &s);
            assert_eq!(t.value(y).shape(), want.shape(), "{s:?}");
            for (a, e) in t.value(y).iter().zip(want.iter()) {
                assert!((a - e).abs() < 1e-5, "{s:?}: {a} vs {e}");
            }
        }
        // k2 s2: each input pixel becomes its 2x2 kernel block, scaled
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 1, 1, 2]), vec![1.0, 10.0]).unwrap();
        let w = ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut t = Tape::new();
        let (xv, wv) = (t.constant(x), t.constant(w));
        let y = t.conv_transpose2d(xv, wv, None, &ConvTransposeSpec::upsample(2));
        assert_eq!(t.value(y).as_slice().unwrap(), &[1.0, 2.0, 10.0, 20.0, 3.0, 4.0, 30.0, 40.0]);
    }

    #[test]
    fn conv_transpose2d_grads() {
        for (k, (s, xs, wsh)) in t_specs().into_iter().enumerate() {
            let x = rand_array(&xs, 100 + k as u64, -1.0, 1.0);
            let w = rand_array(&wsh, 110 + k as u64, -1.0, 1.0);
            if s.bias {
                let b = rand_array(&[wsh[1] * s.groups], 120 + k as u64, -1.0, 1.0);
                check(&[x, w, b], |t, v| t.conv_transpose2d(v[0], v[1], Some(v[2]), &s));
            } else {
                check_grads(&[x, w], |t, v| t.conv_transpose2d(v[0], v[1], None, &s), 1e-2, 2e-3, 1e-2);
            }
        }
    }
}
