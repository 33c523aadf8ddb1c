// YOLOv5 Detect's 1x1 conv on row-major features, laid out as the loss reads it.
// In: x [bs*S, cin] rows (b, s), w [groups*kdim, cin] (or [groups*kdim, cin, 1, 1]),
// bias [groups*kdim]. Out: y [bs*groups*S, kdim] rows (b, g, s),
//   y[(b,g,s), k] = bias[g*kdim+k] + Σ_c x[(b,s), c] w[g*kdim+k, c].
// That is the conv + view(bs, na, no, ny, nx).permute(0,1,3,4,2) in one pass,
// without materialising the channel-major result. Used by `loss::head_forward`,
// the plain (all channels everywhere) reference path of the N = 24 loss.
// Backward computes only the sides that need gradients, and exploits the
// loss's row-sparse box/cls gradient.

use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, ArrayD, Axis, Ix1, Ix2, s};

use crate::autograd::matmul::{as2, weight2};
use crate::autograd::tape::{FusedOp, GradAcc, Tape, Var};

impl Tape {
    /// See the file header. `w` may also be a conv weight [groups*kdim, cin, 1, 1].
    pub fn linear_grouped(&mut self, x: Var, w: Var, b: Var, bs: usize, groups: usize) -> Var {
        let xv = as2(self.value(x));
        let wv = weight2(self.value(w));
        let bv = self
            .value(b)
            .view()
            .into_dimensionality::<Ix1>()
            .expect("bias must be 1-D");
        let (rows, cin) = xv.dim();
        let (cout, wcin) = wv.dim();
        assert_eq!(cin, wcin, "linear_grouped: cin differs");
        assert_eq!(bv.len(), cout, "linear_grouped: bias length");
        assert!(groups > 0 && cout % groups == 0 && bs > 0 && rows % bs == 0);
        let (kdim, sp) = (cout / groups, rows / bs);

        let mut out = Array2::<f32>::zeros((bs * groups * sp, kdim));
        let bias = bv.to_vec();
        // Images in parallel; each multiplies into a cache-sized scratch and
        // then regroups its rows (b, s) x (g, k) -> (b, g, s) x k.
        out.axis_chunks_iter_mut(Axis(0), groups * sp)
            .into_par_iter()
            .enumerate()
            .for_each(|(bi, mut ob)| {
                let mut scratch = Array2::<f32>::zeros((sp, cout));
                let xb = xv.slice(s![bi * sp..(bi + 1) * sp, ..]);
                general_mat_mul(1.0, &xb, &wv.t(), 0.0, &mut scratch);
                let sc = scratch.as_slice().unwrap();
                let od = ob.as_slice_mut().unwrap();
                for g in 0..groups {
                    let bg = &bias[g * kdim..(g + 1) * kdim];
                    let og = &mut od[g * sp * kdim..(g + 1) * sp * kdim];
                    for (dst, src) in og.chunks_exact_mut(kdim).zip(sc.chunks_exact(cout)) {
                        for ((d, v), bb) in
                            dst.iter_mut().zip(&src[g * kdim..(g + 1) * kdim]).zip(bg)
                        {
                            *d = v + bb;
                        }
                    }
                }
            });
        let v = out.into_dyn();
        self.push_ext(v, LinearGrouped { x, w, b, bs, groups }, &[x, w, b])
    }
}

/// `linear_grouped`'s record.
pub struct LinearGrouped {
    x: Var,
    w: Var,
    b: Var,
    bs: usize,
    groups: usize,
}

impl FusedOp for LinearGrouped {
    fn name(&self) -> &'static str {
        "LinearGrouped"
    }

    fn backward(&self, t: &Tape, g: ArrayD<f32>, acc: &mut GradAcc) {
        let LinearGrouped { x, w, b, bs, groups } = *self;
        linear_grouped_backward(t, x, w, b, bs, groups, g, acc)
    }
}

/// A column of the output gradient is treated as dense when more than this
/// fraction of rows is non-zero; other columns are handled row-sparsely.
const DENSE_FRACTION: usize = 16;

#[allow(clippy::too_many_arguments)]
fn linear_grouped_backward(
    t: &Tape,
    x: Var,
    w: Var,
    b: Var,
    bs: usize,
    groups: usize,
    g: ArrayD<f32>,
    acc: &mut GradAcc,
) {
    let xv = as2(t.value(x));
    let wv = weight2(t.value(w));
    let (rows, cin) = xv.dim();
    let cout = wv.nrows();
    let (kdim, sp) = (cout / groups, rows / bs);
    let g = if g.is_standard_layout() {
        g
    } else {
        g.as_standard_layout().into_owned()
    };
    let gd = g.as_slice().unwrap();

    // One pass for the bias gradient (f64: each channel sums bs*S rows),
    // the per-column non-zero counts that pick the dW strategy, and the
    // per-row non-zero counts that find the rows of the sparse columns.
    let mut db = vec![0.0f64; cout];
    let mut nnz = vec![0usize; kdim];
    let mut row_nnz = vec![0u32; rows * groups];
    for (blk, (gb, rn)) in gd
        .chunks_exact(sp * kdim)
        .zip(row_nnz.chunks_exact_mut(sp))
        .enumerate()
    {
        let gi = blk % groups;
        let dbg = &mut db[gi * kdim..(gi + 1) * kdim];
        for (row, rn) in gb.chunks_exact(kdim).zip(rn.iter_mut()) {
            let mut c = 0u32;
            for ((d, n), v) in dbg.iter_mut().zip(nnz.iter_mut()).zip(row) {
                let nz = (*v != 0.0) as usize;
                *d += *v as f64;
                *n += nz;
                c += nz as u32;
            }
            *rn = c;
        }
    }
    if acc.wants(b) {
        acc.add(
            b,
            Array1::from_iter(db.iter().map(|&v| v as f32)).into_dyn(),
        );
    }

    if acc.wants(w) {
        // In the YOLOv5 loss only the obj column has a gradient in every row;
        // box/cls columns are non-zero only at the positive rows. Dense
        // columns get a streaming pass over x, the rest a GEMM over the
        // gathered non-zero rows. Any g is handled; sparsity only speeds it up.
        let dense: Vec<usize> = (0..kdim)
            .filter(|&k| nnz[k] * DENSE_FRACTION > rows * groups)
            .collect();
        let sparse: Vec<usize> = (0..kdim)
            .filter(|&k| nnz[k] > 0 && !dense.contains(&k))
            .collect();
        let mut dw = Array2::<f32>::zeros((cout, cin));
        if dense.len() * 4 > kdim {
            // Mostly dense (not the loss's pattern): plain per-block GEMMs.
            for bi in 0..bs {
                let xb = xv.slice(s![bi * sp..(bi + 1) * sp, ..]);
                for gi in 0..groups {
                    let r0 = (bi * groups + gi) * sp;
                    let gb = g
                        .slice(s![r0..r0 + sp, ..])
                        .into_dimensionality::<Ix2>()
                        .unwrap();
                    let mut dwg = dw.slice_mut(s![gi * kdim..(gi + 1) * kdim, ..]);
                    general_mat_mul(1.0, &gb.t(), &xb, 1.0, &mut dwg);
                }
            }
        } else if !dense.is_empty() {
            let xs = xv.as_standard_layout();
            let part = dense_dw(
                gd,
                xs.as_slice().unwrap(),
                &dense,
                bs,
                groups,
                sp,
                kdim,
                cin,
            );
            for gi in 0..groups {
                for (j, &k) in dense.iter().enumerate() {
                    let src = &part[(gi * dense.len() + j) * cin..][..cin];
                    for (d, s) in dw.row_mut(gi * kdim + k).iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
        if !sparse.is_empty() && dense.len() * 4 <= kdim {
            let mut sel: Vec<Vec<(usize, usize)>> = vec![Vec::new(); groups]; // (g row, x row)
            for (r, row) in gd.chunks_exact(kdim).enumerate() {
                let dense_nz = dense.iter().filter(|&&k| row[k] != 0.0).count() as u32;
                if row_nnz[r] > dense_nz {
                    let (bi, gi, si) = (r / (groups * sp), (r / sp) % groups, r % sp);
                    sel[gi].push((r, bi * sp + si));
                }
            }
            for (gi, sel) in sel.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
                let gs = Array2::from_shape_fn((sparse.len(), sel.len()), |(j, n)| {
                    gd[sel[n].0 * kdim + sparse[j]]
                });
                let xs = Array2::from_shape_fn((sel.len(), cin), |(n, c)| xv[[sel[n].1, c]]);
                let prod = gs.dot(&xs);
                for (j, &k) in sparse.iter().enumerate() {
                    let mut r = dw.row_mut(gi * kdim + k);
                    r += &prod.row(j);
                }
            }
        }
        let dw = dw
            .into_dyn()
            .into_shape_with_order(t.value(w).raw_dim())
            .unwrap();
        acc.add(w, dw);
    }

    if acc.wants(x) {
        let mut dx = Array2::<f32>::zeros((rows, cin));
        for bi in 0..bs {
            for gi in 0..groups {
                let r0 = (bi * groups + gi) * sp;
                let gb = g.slice(s![r0..r0 + sp, ..]);
                let gb = gb.into_dimensionality::<Ix2>().unwrap();
                let wg = wv.slice(s![gi * kdim..(gi + 1) * kdim, ..]);
                let mut dxb = dx.slice_mut(s![bi * sp..(bi + 1) * sp, ..]);
                general_mat_mul(1.0, &gb, &wg, 1.0, &mut dxb);
            }
        }
        acc.add(x, dx.into_dyn());
    }
}

/// Σ over rows of g[r, k] * x[row(r)] for the dense columns, as
/// [groups * dense.len(), cin] (row gi*nd + j). A streaming axpy: a GEMM
/// with only `groups` output rows wastes most of its kernel and repacks x.
#[allow(clippy::too_many_arguments)]
fn dense_dw(
    gd: &[f32],
    xd: &[f32],
    dense: &[usize],
    bs: usize,
    groups: usize,
    sp: usize,
    kdim: usize,
    cin: usize,
) -> Vec<f32> {
    let nd = dense.len();
    let one_image = |bi: usize| -> Vec<f32> {
        let mut part = vec![0.0f32; groups * nd * cin];
        for si in 0..sp {
            let xrow = &xd[(bi * sp + si) * cin..][..cin];
            for gi in 0..groups {
                let r = (bi * groups + gi) * sp + si;
                for (j, &k) in dense.iter().enumerate() {
                    let c = gd[r * kdim + k];
                    if c == 0.0 {
                        continue;
                    }
                    let a = &mut part[(gi * nd + j) * cin..][..cin];
                    for (a, xv) in a.iter_mut().zip(xrow) {
                        *a += c * xv;
                    }
                }
            }
        }
        part
    };
    let parts: Vec<Vec<f32>> = (0..bs).into_par_iter().map(one_image).collect();
    let mut total = vec![0.0f32; groups * nd * cin];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};
    #[test]
    fn linear_grouped_equals_matmul_permute() {
        let (bs, sp, cin, groups, kdim) = (2, 5, 3, 3, 4);
        let x = rand_array(&[bs * sp, cin], 7, -1.0, 1.0);
        let w = rand_array(&[groups * kdim, cin], 8, -1.0, 1.0);
        let b = rand_array(&[groups * kdim], 9, -1.0, 1.0);
        let mut t = Tape::new();
        let (xv, wv, bv) = (t.constant(x), t.constant(w), t.constant(b));
        let fused = t.linear_grouped(xv, wv, bv, bs, groups);
        let wt = t.transpose(wv);
        let y = t.matmul(xv, wt);
        let y = t.add(y, bv);
        let y = t.reshape(y, &[bs, sp, groups, kdim]);
        let y = t.permute(y, &[0, 2, 1, 3]);
        let y = t.reshape(y, &[bs * groups * sp, kdim]);
        let d = (t.value(fused) - t.value(y)).mapv(f32::abs);
        assert!(d.iter().all(|&e| e < 1e-5));
    }

    #[test]
    fn linear_grouped_grads_dense() {
        let (bs, sp, cin, groups, kdim) = (2, 3, 4, 2, 3);
        let x = rand_array(&[bs * sp, cin], 10, -1.0, 1.0);
        let w = rand_array(&[groups * kdim, cin, 1, 1], 11, -1.0, 1.0);
        let b = rand_array(&[groups * kdim], 12, -1.0, 1.0);
        check(&[x, w, b], |t, v| {
            t.linear_grouped(v[0], v[1], v[2], bs, groups)
        });
    }

    #[test]
    fn linear_grouped_grads_row_sparse() {
        // Output gradient dense in column 1 only, a few rows elsewhere: the
        // loss's pattern, exercising both the dense and the gathered path
        // (kdim 5 > 4 * one dense column, so the sparse strategy is chosen).
        let (bs, sp, cin, groups, kdim) = (2, 20, 3, 2, 5);
        let x = rand_array(&[bs * sp, cin], 13, -1.0, 1.0);
        let w = rand_array(&[groups * kdim, cin], 14, -1.0, 1.0);
        let b = rand_array(&[groups * kdim], 15, -1.0, 1.0);
        let mut mask = ArrayD::<f32>::zeros(ndarray::IxDyn(&[bs * groups * sp, kdim]));
        for r in 0..bs * groups * sp {
            mask[[r, 1]] = 1.0;
        }
        for &r in &[3usize, 17, 41, 42, 77] {
            mask[[r, 0]] = 1.0;
            mask[[r, 3]] = 1.0;
        }
        mask[[5, 4]] = 1.0;
        check(&[x, w, b], move |t, v| {
            let y = t.linear_grouped(v[0], v[1], v[2], bs, groups);
            let m = t.constant(mask.clone());
            t.mul(y, m)
        });
    }
}
