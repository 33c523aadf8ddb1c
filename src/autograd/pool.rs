// 2-D max pooling on NCHW maps, with backward.
// In: x [N, C, H, W] and a `PoolSpec` (kernel, strides, pads of -inf,
// dilations). Out: y [N, C, H', W'] (ONNX MaxPool, ceil_mode 0); the index of
// each window's maximum is kept for the backward, which routes each output
// gradient to that one input cell (torch's rule: the first maximum in
// row-major window order wins a tie, a NaN always wins).
// Planes (n, c) run in parallel.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::conv::contiguous;
use super::tape::{GradAcc, Op, Tape, Var};
use crate::tail::ops::PoolSpec;

impl Tape {
    /// ONNX MaxPool (see the file header).
    pub fn max_pool2d(&mut self, x: Var, spec: &PoolSpec) -> Var {
        let xv = self.value(x);
        let &[n, c, h, w] = xv.shape() else { panic!("max_pool2d: expected NCHW, got {:?}", xv.shape()) };
        let [oh, ow] = spec.out_hw(h, w).unwrap_or_else(|| panic!("max_pool2d: {spec:?} does not fit {h}x{w}"));
        let xs = contiguous(xv);
        let (p, q) = (h * w, oh * ow);
        let mut out = vec![0.0f32; n * c * q];
        let mut arg = vec![0u32; n * c * q];
        out.par_chunks_mut(q).zip(arg.par_chunks_mut(q)).enumerate().for_each(|(pi, (o, a))| {
            let plane = &xs[pi * p..(pi + 1) * p];
            let [kh, kw] = spec.kernel;
            let ([sh, sw], [dh, dw]) = (spec.strides, spec.dilations);
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut best, mut at) = (f32::NEG_INFINITY, u32::MAX);
                    for ki in 0..kh {
                        let Some(iy) = (oy * sh + ki * dh).checked_sub(spec.pads[0]).filter(|&v| v < h) else { continue };
                        for kj in 0..kw {
                            let Some(ix) = (ox * sw + kj * dw).checked_sub(spec.pads[1]).filter(|&v| v < w) else { continue };
                            let v = plane[iy * w + ix];
                            if at == u32::MAX || v > best || v.is_nan() {
                                (best, at) = (v, (iy * w + ix) as u32);
                                if v.is_nan() {
                                    break;
                                }
                            }
                        }
                    }
                    o[oy * ow + ox] = best;
                    a[oy * ow + ox] = at;
                }
            }
        });
        let v = ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).unwrap();
        self.push_op(v, Op::MaxPool2d { x, argmax: arg }, &[x])
    }
}

pub fn max_pool2d_backward(t: &Tape, x: Var, argmax: &[u32], g: ArrayD<f32>, acc: &mut GradAcc) {
    if !acc.wants(x) {
        return;
    }
    let sh = t.value(x).shape();
    let p = sh[2] * sh[3];
    let q = g.shape()[2] * g.shape()[3];
    let gs = contiguous(&g);
    let mut dx = ArrayD::<f32>::zeros(t.value(x).raw_dim());
    let bd = dx.as_slice_mut().unwrap();
    bd.par_chunks_mut(p).zip(gs.par_chunks(q)).zip(argmax.par_chunks(q)).for_each(|((d, gp), ap)| {
        for (&gv, &i) in gp.iter().zip(ap) {
            if i != u32::MAX {
                d[i as usize] += gv;
            }
        }
    });
    acc.add(x, dx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    /// Distinct values on a grid coarser than the FD step, so no window has a
    /// near-tie that the central difference could flip.
    fn distinct(shape: &[usize], seed: u64) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let mut order: Vec<usize> = (0..n).collect();
        let r = rand_array(&[n], seed, 0.0, 1.0);
        order.sort_by(|&a, &b| r[[a]].total_cmp(&r[[b]]));
        let mut v = vec![0.0f32; n];
        for (rank, &i) in order.iter().enumerate() {
            v[i] = rank as f32 * 0.1 - n as f32 * 0.05;
        }
        ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
    }

    #[test]
    fn sppf_pool_values_and_grads() {
        let x = distinct(&[2, 2, 6, 7], 1);
        let s = PoolSpec::square(5, 1, 2);
        let mut t = Tape::new();
        let xv = t.constant(x.clone());
        let y = t.max_pool2d(xv, &s);
        assert_eq!(t.value(y).shape(), &[2, 2, 6, 7]);
        for ((i, c, oy, ox), &v) in t.value(y).view().into_dimensionality::<ndarray::Ix4>().unwrap().indexed_iter() {
            let mut want = f32::NEG_INFINITY;
            for iy in oy.saturating_sub(2)..(oy + 3).min(6) {
                for ix in ox.saturating_sub(2)..(ox + 3).min(7) {
                    want = want.max(x[[i, c, iy, ix]]);
                }
            }
            assert_eq!(v, want);
        }
        check(&[x], |t, v| t.max_pool2d(v[0], &s));
    }

    #[test]
    fn strided_dilated_pool_grads_and_hand_values() {
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 4]), vec![1.0, 5.0, 2.0, 0.0, 3.0, 4.0, 8.0, -1.0]).unwrap();
        let mut t = Tape::new();
        let xv = t.param(x);
        let y = t.max_pool2d(xv, &PoolSpec::square(2, 2, 0));
        assert_eq!(t.value(y).as_slice().unwrap(), &[5.0, 8.0]);
        let l = t.sum(y);
        let g = t.backward(l);
        assert_eq!(g.get(xv).unwrap().as_slice().unwrap(), &[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        // ties go to the first maximum
        let tie = ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 3.0);
        let mut t = Tape::new();
        let tv = t.param(tie);
        let y = t.max_pool2d(tv, &PoolSpec::square(2, 1, 0));
        let l = t.sum(y);
        assert_eq!(t.backward(l).get(tv).unwrap().as_slice().unwrap(), &[1.0, 0.0, 0.0, 0.0]);
        let mut s = PoolSpec::square(2, 2, 1);
        s.dilations = [2, 1];
        check(&[distinct(&[1, 2, 7, 6], 3)], |t, v| t.max_pool2d(v[0], &s));
    }
}
