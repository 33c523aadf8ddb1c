// Shape and indexing ops: index_select (rows along axis 0), concat, slice
// (index range along an axis, usually the last), reshape, permute.
// In: vars plus index/shape metadata. Out: a new var; backward scatters or
// re-lays-out the gradient (index_select accumulates duplicate rows).

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use super::tape::{GradAcc, Op, Tape, Var};
use crate::kernels::elementwise as ew;

#[derive(Clone, Debug)]
pub enum ShapeOp {
    IndexSelect {
        x: Var,
        idx: Vec<usize>,
    },
    Concat {
        xs: Vec<Var>,
        axis: usize,
    },
    Slice {
        x: Var,
        axis: usize,
        start: usize,
        end: usize,
    },
    Reshape {
        x: Var,
    },
    Permute {
        x: Var,
        axes: Vec<usize>,
    },
}

impl Tape {
    /// Rows `idx` of `x` along axis 0 (torch `x[idx]`); duplicates allowed.
    pub fn index_select(&mut self, x: Var, idx: &[usize]) -> Var {
        let v = self.value(x).select(Axis(0), idx);
        self.push_op(
            v,
            Op::Shape(ShapeOp::IndexSelect {
                x,
                idx: idx.to_vec(),
            }),
            &[x],
        )
    }

    /// Concatenation along `axis`, always in standard (row-major) layout:
    /// `ndarray::concatenate` along an inner axis returns an array whose
    /// outermost axis is `axis`, which every later reader (the convs) then
    /// had to copy back, element by element.
    pub fn concat(&mut self, xs: &[Var], axis: usize) -> Var {
        let vals: Vec<&ArrayD<f32>> = xs.iter().map(|&v| self.value(v)).collect();
        let v = concat_standard(&vals, axis);
        self.push_op(
            v,
            Op::Shape(ShapeOp::Concat {
                xs: xs.to_vec(),
                axis,
            }),
            xs,
        )
    }

    /// `x[..., start..end]` along `axis` (copied).
    pub fn slice(&mut self, x: Var, axis: usize, start: usize, end: usize) -> Var {
        let xv = self.value(x);
        assert!(
            start <= end && end <= xv.shape()[axis],
            "slice out of range"
        );
        let v = match last_axis_rows(xv, axis) {
            // Row-wise copy: the generic strided path is several times slower
            // for the [N, 1] obj column of a large p.
            Some((data, cols)) => {
                let mut out = Vec::with_capacity(data.len() / cols.max(1) * (end - start));
                for row in data.chunks_exact(cols) {
                    out.extend_from_slice(&row[start..end]);
                }
                let mut shape = xv.shape().to_vec();
                shape[axis] = end - start;
                ArrayD::from_shape_vec(IxDyn(&shape), out).unwrap()
            }
            None => xv
                .slice_axis(Axis(axis), Slice::from(start..end))
                .to_owned(),
        };
        self.push_op(
            v,
            Op::Shape(ShapeOp::Slice {
                x,
                axis,
                start,
                end,
            }),
            &[x],
        )
    }

    /// Column range along the last axis (split xy / wh / obj / cls).
    pub fn slice_cols(&mut self, x: Var, start: usize, end: usize) -> Var {
        let axis = self.value(x).ndim() - 1;
        self.slice(x, axis, start, end)
    }

    /// Row-major reshape (torch `view` on a contiguous tensor).
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Var {
        let v = self
            .value(x)
            .to_shape(IxDyn(shape))
            .expect("reshape: element count differs")
            .into_owned();
        self.push_op(v, Op::Shape(ShapeOp::Reshape { x }), &[x])
    }

    /// Axis permutation materialised in row-major order (torch
    /// `permute(..).contiguous()`); also serves as 2-D transpose.
    pub fn permute(&mut self, x: Var, axes: &[usize]) -> Var {
        let v = self
            .value(x)
            .view()
            .permuted_axes(IxDyn(axes))
            .as_standard_layout()
            .into_owned();
        self.push_op(
            v,
            Op::Shape(ShapeOp::Permute {
                x,
                axes: axes.to_vec(),
            }),
            &[x],
        )
    }

    pub fn transpose(&mut self, x: Var) -> Var {
        self.permute(x, &[1, 0])
    }
}

/// `arrays` joined along `axis` into a standard-layout array. Row-major
/// inputs are copied as blocks (each input holds one contiguous run of
/// `dim(axis) * inner` values per outer index), outer indices in parallel.
fn concat_standard(arrays: &[&ArrayD<f32>], axis: usize) -> ArrayD<f32> {
    let first = arrays.first().expect("concat of nothing");
    let nd = first.ndim();
    assert!(axis < nd && arrays.iter().all(|a| a.ndim() == nd && (0..nd).all(|d| d == axis || a.shape()[d] == first.shape()[d])), "concat: shapes differ");
    let mut shape = first.shape().to_vec();
    shape[axis] = arrays.iter().map(|a| a.shape()[axis]).sum();
    let slices: Option<Vec<&[f32]>> = arrays.iter().map(|a| a.as_slice()).collect();
    let Some(slices) = slices else {
        let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
        return ndarray::concatenate(Axis(axis), &views).expect("concat: shapes differ").as_standard_layout().into_owned();
    };
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let runs: Vec<usize> = arrays.iter().map(|a| a.shape()[axis] * inner).collect();
    let row: usize = runs.iter().sum();
    // SAFETY: each piece (one outer index) gets every input's run in turn,
    // and the runs add up to the piece's length.
    let out = unsafe {
        ew::filled(outer * row, row, |o, dst| {
            let mut at = 0;
            for (src, &r) in slices.iter().zip(&runs) {
                ew::copy_into(&mut dst[at..at + r], &src[o * r..(o + 1) * r]);
                at += r;
            }
        })
    };
    ArrayD::from_shape_vec(IxDyn(&shape), out).unwrap()
}

/// `g[.., start..end, ..]` along `axis` as a standard-layout array (block
/// copies when `g` is row-major: the inverse of `concat_standard`).
fn slice_standard(g: &ArrayD<f32>, axis: usize, start: usize, end: usize) -> ArrayD<f32> {
    let Some(gd) = g.as_slice() else {
        return g.slice_axis(Axis(axis), Slice::from(start..end)).as_standard_layout().into_owned();
    };
    let mut shape = g.shape().to_vec();
    let inner: usize = shape[axis + 1..].iter().product();
    let row = shape[axis] * inner;
    shape[axis] = end - start;
    let run = (end - start) * inner;
    // SAFETY: each piece (one outer index) is one whole run of g, copied.
    let out = unsafe { ew::filled(shape.iter().product(), run, |o, dst| ew::copy_into(dst, &gd[o * row + start * inner..o * row + end * inner])) };
    ArrayD::from_shape_vec(IxDyn(&shape), out).unwrap()
}

/// (contiguous data, row length) when `axis` is the last axis of a
/// standard-layout, non-empty array.
fn last_axis_rows(a: &ArrayD<f32>, axis: usize) -> Option<(&[f32], usize)> {
    let cols = *a.shape().last()?;
    if axis + 1 != a.ndim() || cols == 0 {
        return None;
    }
    a.as_slice().map(|d| (d, cols))
}

pub fn backward(t: &Tape, op: &ShapeOp, g: ArrayD<f32>, acc: &mut GradAcc) {
    match op {
        ShapeOp::IndexSelect { x, idx } => {
            if !acc.wants(*x) {
                return;
            }
            // Scatter-add straight into x's gradient buffer (duplicates add up).
            let buf = acc.buffer(*x);
            let row_len: usize = buf.shape()[1..].iter().product();
            match (buf.as_slice_mut(), g.as_slice()) {
                (Some(bd), Some(gd)) if row_len > 0 => {
                    for (j, &i) in idx.iter().enumerate() {
                        let dst = &mut bd[i * row_len..(i + 1) * row_len];
                        for (d, s) in dst.iter_mut().zip(&gd[j * row_len..(j + 1) * row_len]) {
                            *d += s;
                        }
                    }
                }
                _ => {
                    for (j, &i) in idx.iter().enumerate() {
                        let mut row = buf.index_axis_mut(Axis(0), i);
                        row += &g.index_axis(Axis(0), j);
                    }
                }
            }
        }
        ShapeOp::Concat { xs, axis } => {
            let mut start = 0;
            for &v in xs {
                let n = t.value(v).shape()[*axis];
                if acc.wants(v) {
                    acc.add(v, slice_standard(&g, *axis, start, start + n));
                }
                start += n;
            }
        }
        ShapeOp::Slice {
            x,
            axis,
            start,
            end,
        } => {
            if !acc.wants(*x) {
                return;
            }
            let (axis, start, end) = (*axis, *start, *end);
            let buf = acc.buffer(*x);
            let cols = buf.shape()[axis];
            let w = end - start;
            let fast = axis + 1 == buf.ndim() && w > 0;
            match (buf.as_slice_mut(), g.as_slice()) {
                (Some(bd), Some(gd)) if fast => {
                    for (dst, src) in bd.chunks_exact_mut(cols).zip(gd.chunks_exact(w)) {
                        for (d, s) in dst[start..end].iter_mut().zip(src) {
                            *d += s;
                        }
                    }
                }
                _ => {
                    let mut part = buf.slice_axis_mut(Axis(axis), Slice::from(start..end));
                    part += &g;
                }
            }
        }
        ShapeOp::Reshape { x } => {
            let shape = t.value(*x).raw_dim();
            let gx = g.to_shape(shape).unwrap().into_owned();
            acc.add(*x, gx);
        }
        ShapeOp::Permute { x, axes } => {
            let mut inv = vec![0; axes.len()];
            for (i, &a) in axes.iter().enumerate() {
                inv[a] = i;
            }
            let gx = g
                .view()
                .permuted_axes(IxDyn(&inv))
                .as_standard_layout()
                .into_owned();
            acc.add(*x, gx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    #[test]
    fn index_select_with_duplicates() {
        let x = rand_array(&[5, 3], 1, -1.0, 1.0);
        check(&[x], |t, v| t.index_select(v[0], &[4, 0, 4, 2, 4]));
        let x3 = rand_array(&[4, 2, 3], 2, -1.0, 1.0);
        check(&[x3], |t, v| t.index_select(v[0], &[1, 1, 3]));
    }

    #[test]
    fn concat_axes() {
        let a = rand_array(&[2, 3], 3, -1.0, 1.0);
        let b = rand_array(&[2, 2], 4, -1.0, 1.0);
        check(&[a.clone(), b], |t, v| t.concat(v, 1));
        let c = rand_array(&[1, 3], 5, -1.0, 1.0);
        check(&[a, c], |t, v| t.concat(v, 0));
    }

    #[test]
    fn channel_concat_of_feature_maps_is_row_major_with_the_definition_values() {
        // the tail's Concat: NCHW maps along C, small and past PAR_MIN; the
        // result must be standard layout (convs read it as a slice) and its
        // gradient each input's channel block of the upstream gradient
        for [n, h, w] in [[2, 3, 4], [4, 40, 40]] {
            let (ca, cb, cc) = (3, 5, 2);
            let a = rand_array(&[n, ca, h, w], 1, -1.0, 1.0);
            let b = rand_array(&[n, cb, h, w], 2, -1.0, 1.0);
            let c = rand_array(&[n, cc, h, w], 3, -1.0, 1.0);
            let r = rand_array(&[n, ca + cb + cc, h, w], 4, -1.0, 1.0);
            let mut t = Tape::new();
            let (av, bv, cv, rv) = (t.param(a.clone()), t.param(b.clone()), t.param(c.clone()), t.constant(r.clone()));
            let y = t.concat(&[av, bv, cv], 1);
            assert!(t.value(y).is_standard_layout(), "concat must return a row-major array");
            for ((i, ch, yy, xx), &v) in t.value(y).view().into_dimensionality::<ndarray::Ix4>().unwrap().indexed_iter() {
                let want = if ch < ca { a[[i, ch, yy, xx]] } else if ch < ca + cb { b[[i, ch - ca, yy, xx]] } else { c[[i, ch - ca - cb, yy, xx]] };
                assert_eq!(v, want);
            }
            let z = t.mul(y, rv);
            let l = t.sum(z);
            let g = t.backward(l);
            for (v, lo, hi) in [(av, 0, ca), (bv, ca, ca + cb), (cv, ca + cb, ca + cb + cc)] {
                let gv = g.get(v).unwrap();
                assert!(gv.is_standard_layout());
                assert_eq!(gv, &r.slice_axis(Axis(1), Slice::from(lo..hi)).to_owned());
            }
        }
        // a non-row-major input takes the general path with the same values
        let a = rand_array(&[3, 4], 5, -1.0, 1.0);
        let at = a.t().to_owned();
        let mut t = Tape::new();
        let (x, y) = (t.constant(at.clone()), t.constant(at.clone()));
        let z = t.concat(&[x, y], 0);
        assert!(t.value(z).is_standard_layout());
        assert_eq!(t.value(z), &ndarray::concatenate(Axis(0), &[at.view(), at.view()]).unwrap());
    }

    #[test]
    fn concat_with_constant() {
        let mut t = Tape::new();
        let a = t.param(rand_array(&[2, 3], 3, -1.0, 1.0));
        let c = t.constant(rand_array(&[2, 1], 4, -1.0, 1.0));
        let y = t.concat(&[c, a], 1);
        let l = t.sum(y);
        let g = t.backward(l);
        assert!(g.get(c).is_none());
        assert!(g.get(a).unwrap().iter().all(|&v| v == 1.0));
    }

    #[test]
    fn slice_cols_and_axis() {
        let x = rand_array(&[4, 7], 6, -1.0, 1.0);
        check(std::slice::from_ref(&x), |t, v| t.slice_cols(v[0], 2, 4));
        check(std::slice::from_ref(&x), |t, v| t.slice_cols(v[0], 5, 7));
        check(&[x], |t, v| t.slice(v[0], 0, 1, 3));
    }

    #[test]
    fn reshape_and_permute() {
        let x = rand_array(&[2, 3, 4], 7, -1.0, 1.0);
        check(std::slice::from_ref(&x), |t, v| t.reshape(v[0], &[6, 4]));
        check(std::slice::from_ref(&x), |t, v| t.permute(v[0], &[2, 0, 1]));
        check(&[x], |t, v| {
            let p = t.permute(v[0], &[1, 2, 0]);
            t.reshape(p, &[12, 2])
        });
        let m = rand_array(&[3, 5], 8, -1.0, 1.0);
        check(&[m], |t, v| t.transpose(v[0]));
    }

    #[test]
    fn permute_values() {
        let mut t = Tape::new();
        let x = t.constant(
            ndarray::Array::from_iter(0..6)
                .mapv(|v| v as f32)
                .into_shape_with_order((2, 3))
                .unwrap()
                .into_dyn(),
        );
        let y = t.transpose(x);
        assert_eq!(
            t.value(y).as_slice().unwrap(),
            &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
    }
}
