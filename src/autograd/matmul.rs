// Matrix product via ndarray (matrixmultiply sgemm): a [m, k] · b [k, n]
// -> [m, n]; backward computes only the sides that need gradients. Also
// `weight2`, a conv weight [cout, cin(, 1, 1)] viewed as [cout, cin], for the
// 1x1 fused ops (autograd::fused).

use ndarray::{ArrayD, ArrayView2, Ix2};

use super::tape::{GradAcc, Op, Tape, Var};

pub(crate) fn as2(a: &ArrayD<f32>) -> ArrayView2<'_, f32> {
    a.view()
        .into_dimensionality::<Ix2>()
        .expect("expected a 2-D operand")
}

impl Tape {
    pub fn matmul(&mut self, a: Var, b: Var) -> Var {
        let (av, bv) = (as2(self.value(a)), as2(self.value(b)));
        assert_eq!(av.ncols(), bv.nrows(), "matmul: inner dims differ");
        let v = av.dot(&bv).into_dyn();
        self.push_op(v, Op::MatMul(a, b), &[a, b])
    }
}

pub(crate) fn weight2(w: &ArrayD<f32>) -> ArrayView2<'_, f32> {
    let sh = w.shape();
    let cin = if sh.len() == 4 {
        sh[1]
    } else {
        sh[sh.len() - 1]
    };
    w.view()
        .into_shape_with_order((sh[0], cin))
        .expect("weight must be [cout, cin(, 1, 1)]")
}

pub fn backward(t: &Tape, a: Var, b: Var, g: ArrayD<f32>, acc: &mut GradAcc) {
    let g2 = as2(&g);
    if acc.wants(a) {
        acc.add(a, g2.dot(&as2(t.value(b)).t()).into_dyn());
    }
    if acc.wants(b) {
        acc.add(b, as2(t.value(a)).t().dot(&g2).into_dyn());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    #[test]
    fn matmul_grads() {
        let a = rand_array(&[3, 4], 1, -1.0, 1.0);
        let b = rand_array(&[4, 2], 2, -1.0, 1.0);
        check(&[a, b], |t, v| t.matmul(v[0], v[1]));
    }

    #[test]
    fn matmul_with_constant_lhs_and_transposed_rhs() {
        let w = rand_array(&[5, 3], 3, -1.0, 1.0);
        let bias = rand_array(&[5], 4, -1.0, 1.0);
        let x = rand_array(&[6, 3], 5, -1.0, 1.0);
        check(&[w, bias], move |t, v| {
            let xc = t.constant(x.clone());
            let wt = t.transpose(v[0]);
            let y = t.matmul(xc, wt);
            t.add(y, v[1])
        });
    }

    #[test]
    fn constant_side_not_computed() {
        let mut t = Tape::new();
        let x = t.constant(rand_array(&[6, 3], 5, -1.0, 1.0));
        let w = t.param(rand_array(&[3, 2], 6, -1.0, 1.0));
        let y = t.matmul(x, w);
        let l = t.sum(y);
        let g = t.backward(l);
        assert!(g.get(x).is_none());
        assert_eq!(g.get(w).unwrap().shape(), &[3, 2]);
    }
}
