// Reductions: sum and mean over everything (to a 0-d value), sum over one axis.
// In: one var. Out: a 0-d var, or the input shape with that axis removed.
// Full reductions accumulate in f64: the obj loss averages ~10^5..10^6 cells
// and f32 running sums would drift by ~1e-5 relative.

use ndarray::{ArrayD, Axis};

use super::tape::{GradAcc, Op, Tape, Var};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    SumAxis(usize),
}

pub fn sum_f64(a: &ArrayD<f32>) -> f64 {
    a.iter().map(|&x| x as f64).sum()
}

impl Tape {
    pub fn sum(&mut self, a: Var) -> Var {
        let s = sum_f64(self.value(a)) as f32;
        self.push_op(
            ndarray::arr0(s).into_dyn(),
            Op::Reduce(ReduceOp::Sum, a),
            &[a],
        )
    }

    /// Mean of all elements; NaN for an empty input, as in torch.
    pub fn mean(&mut self, a: Var) -> Var {
        let x = self.value(a);
        let m = (sum_f64(x) / x.len() as f64) as f32;
        self.push_op(
            ndarray::arr0(m).into_dyn(),
            Op::Reduce(ReduceOp::Mean, a),
            &[a],
        )
    }

    /// Sum over `axis`, dropping it (torch `sum(dim)` without keepdim).
    pub fn sum_axis(&mut self, a: Var, axis: usize) -> Var {
        let v = self.value(a).sum_axis(Axis(axis));
        self.push_op(v, Op::Reduce(ReduceOp::SumAxis(axis), a), &[a])
    }
}

pub fn backward(t: &Tape, op: &ReduceOp, a: Var, g: ArrayD<f32>, acc: &mut GradAcc) {
    let x = t.value(a);
    let gx = match *op {
        ReduceOp::Sum => ArrayD::from_elem(x.raw_dim(), g[[]]),
        ReduceOp::Mean => ArrayD::from_elem(x.raw_dim(), g[[]] / x.len() as f32),
        ReduceOp::SumAxis(axis) => {
            let ge = g.insert_axis(Axis(axis));
            ge.broadcast(x.raw_dim()).unwrap().to_owned()
        }
    };
    acc.add(a, gx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    #[test]
    fn sum_mean_grads() {
        let x = rand_array(&[3, 4], 1, -1.0, 1.0);
        check(std::slice::from_ref(&x), |t, v| t.sum(v[0]));
        check(&[x], |t, v| t.mean(v[0]));
    }

    #[test]
    fn sum_axis_grads() {
        let x = rand_array(&[2, 3, 4], 2, -1.0, 1.0);
        for ax in 0..3 {
            check(std::slice::from_ref(&x), |t, v| t.sum_axis(v[0], ax));
        }
    }

    #[test]
    fn values() {
        let mut t = Tape::new();
        let x = t.constant(ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn());
        let s = t.sum(x);
        let m = t.mean(x);
        let c = t.sum_axis(x, 0);
        assert_eq!(t.scalar(s), 10.0);
        assert_eq!(t.scalar(m), 2.5);
        assert_eq!(t.value(c).as_slice().unwrap(), &[4.0, 6.0]);
    }
}
