// Nearest-neighbour resize of NCHW maps, with backward.
// In: x [N, C, H, W], the output [H', W'] and the [h, w] scales (ONNX
// Resize nearest, asymmetric, floor: output index o reads input floor(o /
// scale), `tail::ops::resize::nearest_src`). Out: y [N, C, H', W']; the
// backward adds each output gradient into the input cell it was read from.
// Planes (n, c) run in parallel.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::conv::contiguous;
use super::tape::{GradAcc, Op, Tape, Var};
use crate::tail::ops::resize::nearest_src;

impl Tape {
    /// Nearest resize to `out_hw` with scale out/in per axis (YOLOv5's
    /// `nn.Upsample(scale_factor=2)` is `resize_nearest(x, [2h, 2w])`).
    pub fn resize_nearest(&mut self, x: Var, out_hw: [usize; 2]) -> Var {
        let sh = self.value(x).shape();
        let scales = [out_hw[0] as f32 / sh[2] as f32, out_hw[1] as f32 / sh[3] as f32];
        self.resize_nearest_scaled(x, out_hw, scales)
    }

    /// Nearest resize to `out_hw` with the ONNX `scales` given (see the file header).
    pub fn resize_nearest_scaled(&mut self, x: Var, out_hw: [usize; 2], scales: [f32; 2]) -> Var {
        let xv = self.value(x);
        let &[n, c, h, w] = xv.shape() else { panic!("resize_nearest: expected NCHW, got {:?}", xv.shape()) };
        let [oh, ow] = out_hw;
        assert!(h > 0 && w > 0 && oh > 0 && ow > 0, "resize_nearest: empty map");
        let (ys, xs) = (nearest_src(oh, h, scales[0]), nearest_src(ow, w, scales[1]));
        let data = contiguous(xv);
        // SAFETY: every output row of every plane is written, cell by cell.
        let out = unsafe {
            crate::kernels::elementwise::filled(n * c * oh * ow, oh * ow, |pi, o| {
                let plane = &data[pi * h * w..(pi + 1) * h * w];
                for (orow, &iy) in o.chunks_exact_mut(ow).zip(&ys) {
                    let src = &plane[iy * w..(iy + 1) * w];
                    for (d, &ix) in orow.iter_mut().zip(&xs) {
                        d.write(src[ix]);
                    }
                }
            })
        };
        let v = ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).unwrap();
        self.push_op(v, Op::ResizeNearest { x, ys, xs }, &[x])
    }
}

pub fn resize_nearest_backward(t: &Tape, x: Var, ys: &[usize], xs: &[usize], g: ArrayD<f32>, acc: &mut GradAcc) {
    if !acc.wants(x) {
        return;
    }
    let w = t.value(x).shape()[3];
    let p = t.value(x).shape()[2] * w;
    let gs = contiguous(&g);
    let mut dx = ArrayD::<f32>::zeros(t.value(x).raw_dim());
    let bd = dx.as_slice_mut().unwrap();
    bd.par_chunks_mut(p).zip(gs.par_chunks(ys.len() * xs.len())).for_each(|(d, gp)| {
        for (grow, &iy) in gp.chunks_exact(xs.len()).zip(ys) {
            let dst = &mut d[iy * w..(iy + 1) * w];
            for (&gv, &ix) in grow.iter().zip(xs) {
                dst[ix] += gv;
            }
        }
    });
    acc.add(x, dx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    #[test]
    fn times_two_repeats_each_pixel() {
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut t = Tape::new();
        let xv = t.param(x);
        let y = t.resize_nearest(xv, [4, 4]);
        #[rustfmt::skip]
        assert_eq!(t.value(y).as_slice().unwrap(), &[
            1.0, 1.0, 2.0, 2.0,
            1.0, 1.0, 2.0, 2.0,
            3.0, 3.0, 4.0, 4.0,
            3.0, 3.0, 4.0, 4.0,
        ]);
        let l = t.sum(y);
        assert_eq!(t.backward(l).get(xv).unwrap().as_slice().unwrap(), &[4.0; 4]);
    }

    #[test]
    fn grads_times_two_and_uneven() {
        check(&[rand_array(&[2, 3, 3, 4], 1, -1.0, 1.0)], |t, v| t.resize_nearest(v[0], [6, 8]));
        // scales 1.5 x 2: rows 0 0 1 2 2 3 of a 4-row input
        check(&[rand_array(&[1, 2, 4, 2], 2, -1.0, 1.0)], |t, v| t.resize_nearest_scaled(v[0], [6, 4], [1.5, 2.0]));
    }
}
