// Elementwise unary ops: neg, scalar mul/add, sigmoid, SiLU, exp, log, pow
// (scalar exponent), sqrt, atan, clamp.
// In: one var. Out: a var of the same shape.
// Contiguous inputs run through `kernels::elementwise` (vectorised, in
// parallel chunks when large, outputs never zero-filled; backward updates
// the incoming gradient in place); other layouts through ndarray's Zip.

use ndarray::{ArrayD, Zip};

use super::tape::{GradAcc, Op, Tape, Var};
use crate::kernels::elementwise as ew;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    MulScalar(f32),
    AddScalar(f32),
    Sigmoid,
    /// x·σ(x): the exported SiLU (Sigmoid then Mul) as one op (`tail::net`
    /// fuses it); the backward recomputes σ from x rather than keep it.
    Silu,
    Exp,
    Log,
    Pow(f32),
    Sqrt,
    Atan,
    /// Inclusive bounds; use +-inf for a one-sided clamp.
    Clamp(f32, f32),
}

/// σ(x), stable for any x (`kernels::elementwise::sigmoid`).
pub fn sigmoid(x: f32) -> f32 {
    ew::sigmoid(x)
}

#[inline(always)]
fn forward(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::MulScalar(s) => x * s,
        UnaryOp::AddScalar(s) => x + s,
        UnaryOp::Sigmoid => ew::sigmoid(x),
        UnaryOp::Silu => ew::silu(x),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Pow(p) => {
            if p == 2.0 {
                x * x
            } else {
                x.powf(p)
            }
        }
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Atan => x.atan(),
        UnaryOp::Clamp(lo, hi) => x.max(lo).min(hi),
    }
}

/// d out / d x, given input x and output y.
#[inline(always)]
fn derivative(op: UnaryOp, x: f32, y: f32) -> f32 {
    match op {
        UnaryOp::Neg => -1.0,
        UnaryOp::MulScalar(s) => s,
        UnaryOp::AddScalar(_) => 1.0,
        UnaryOp::Sigmoid => y * (1.0 - y),
        UnaryOp::Silu => ew::silu_grad(1.0, x),
        UnaryOp::Exp => y,
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Pow(p) => {
            // torch: exponent 0 gives a zero gradient, else p * x^(p-1).
            if p == 0.0 {
                0.0
            } else if p == 2.0 {
                2.0 * x
            } else {
                p * x.powf(p - 1.0)
            }
        }
        UnaryOp::Sqrt => 0.5 / y,
        UnaryOp::Atan => 1.0 / (1.0 + x * x),
        // torch's clamp_backward passes the gradient on the closed interval.
        UnaryOp::Clamp(lo, hi) => {
            if x >= lo && x <= hi {
                1.0
            } else {
                0.0
            }
        }
    }
}

impl Tape {
    pub fn unary(&mut self, op: UnaryOp, a: Var) -> Var {
        let x = self.value(a);
        let v = match x.as_slice() {
            // one instantiation per hot op, so the kernel loop has no match
            Some(xs) => {
                let v = match op {
                    UnaryOp::Sigmoid => ew::map(xs, ew::sigmoid),
                    UnaryOp::Silu => ew::map(xs, ew::silu),
                    _ => ew::map(xs, move |x| forward(op, x)),
                };
                ArrayD::from_shape_vec(x.raw_dim(), v).expect("same element count")
            }
            None if x.len() >= super::binary::PAR_MIN => Zip::from(x).par_map_collect(|&x| forward(op, x)),
            None => x.mapv(|x| forward(op, x)),
        };
        self.push_op(v, Op::Unary(op, a), &[a])
    }
    /// x·σ(x) in one pass (see `UnaryOp::Silu`).
    pub fn silu(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Silu, a)
    }
    pub fn neg(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Neg, a)
    }
    pub fn mul_scalar(&mut self, a: Var, s: f32) -> Var {
        self.unary(UnaryOp::MulScalar(s), a)
    }
    pub fn add_scalar(&mut self, a: Var, s: f32) -> Var {
        self.unary(UnaryOp::AddScalar(s), a)
    }
    pub fn sigmoid(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Sigmoid, a)
    }
    pub fn exp(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Exp, a)
    }
    pub fn log(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Log, a)
    }
    pub fn pow(&mut self, a: Var, p: f32) -> Var {
        self.unary(UnaryOp::Pow(p), a)
    }
    pub fn sqrt(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Sqrt, a)
    }
    pub fn atan(&mut self, a: Var) -> Var {
        self.unary(UnaryOp::Atan, a)
    }
    pub fn clamp(&mut self, a: Var, min: f32, max: f32) -> Var {
        self.unary(UnaryOp::Clamp(min, max), a)
    }
}

pub fn backward(
    t: &Tape,
    op: &UnaryOp,
    a: Var,
    out: &ArrayD<f32>,
    g: ArrayD<f32>,
    acc: &mut GradAcc,
) {
    let op = *op;
    let mut g = g;
    match op {
        UnaryOp::AddScalar(_) => {}
        UnaryOp::Neg | UnaryOp::MulScalar(_) => {
            let d = derivative(op, 0.0, 0.0);
            g.mapv_inplace(|v| v * d);
        }
        UnaryOp::Sigmoid | UnaryOp::Silu if g.is_standard_layout() && out.is_standard_layout() && t.value(a).is_standard_layout() => {
            let gs = g.as_slice_mut().expect("standard layout");
            match op {
                UnaryOp::Sigmoid => ew::zip_in_place(gs, out.as_slice().unwrap(), |g, y| g * (y * (1.0 - y))),
                _ => ew::zip_in_place(gs, t.value(a).as_slice().unwrap(), ew::silu_grad),
            }
        }
        _ => {
            let z = Zip::from(&mut g).and(t.value(a)).and(out);
            if out.len() >= super::binary::PAR_MIN {
                z.par_for_each(|g, &x, &y| *g *= derivative(op, x, y))
            } else {
                z.for_each(|g, &x, &y| *g *= derivative(op, x, y))
            }
        }
    }
    acc.add(a, g);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    fn one(op: UnaryOp, lo: f32, hi: f32, seed: u64) {
        let x = rand_array(&[3, 5], seed, lo, hi);
        check(&[x], |t, v| t.unary(op, v[0]));
    }

    #[test]
    fn elementwise_ops() {
        one(UnaryOp::Neg, -2.0, 2.0, 1);
        one(UnaryOp::MulScalar(-1.7), -2.0, 2.0, 2);
        one(UnaryOp::AddScalar(0.3), -2.0, 2.0, 3);
        one(UnaryOp::Sigmoid, -4.0, 4.0, 4);
        one(UnaryOp::Silu, -5.0, 5.0, 12);
        one(UnaryOp::Exp, -2.0, 1.5, 5);
        one(UnaryOp::Log, 0.3, 3.0, 6);
        one(UnaryOp::Pow(2.0), -2.0, 2.0, 7);
        one(UnaryOp::Pow(1.5), 0.2, 2.0, 8);
        one(UnaryOp::Pow(-0.5), 0.3, 2.0, 9);
        one(UnaryOp::Sqrt, 0.3, 3.0, 10);
        one(UnaryOp::Atan, -3.0, 3.0, 11);
    }

    #[test]
    fn clamp_inside_and_outside() {
        // Values kept >= 0.05 away from the bounds so FD does not straddle a kink.
        let x = ndarray::arr2(&[[-1.0f32, -0.3, 0.2, 0.5], [0.9, 1.4, 2.0, -0.8]]).into_dyn();
        check(std::slice::from_ref(&x), |t, v| t.clamp(v[0], -0.5, 1.0));
        check(&[x], |t, v| t.clamp(v[0], 0.0, f32::INFINITY));
    }

    #[test]
    fn silu_matches_sigmoid_times_x_on_large_and_strided_maps() {
        // past the parallel threshold (kernel path) and transposed (Zip
        // path): values and gradients equal the unfused Sigmoid + Mul's
        for transpose in [false, true] {
            let x = rand_array(&[2, 4, 64, 65], 5, -6.0, 6.0);
            let x = if transpose { x.reversed_axes() } else { x };
            let r = rand_array(x.shape(), 6, -1.0, 1.0);
            let (mut t, mut u) = (Tape::new(), Tape::new());
            let (xa, xb) = (t.param(x.clone()), u.param(x.clone()));
            let (ra, rb) = (t.constant(r.clone()), u.constant(r));
            let y = t.silu(xa);
            let s = u.sigmoid(xb);
            let y2 = u.mul(xb, s);
            assert_eq!(t.value(y), u.value(y2), "transpose {transpose}");
            let (ya, yb) = (t.mul(y, ra), u.mul(y2, rb));
            let (la, lb) = (t.sum(ya), u.sum(yb));
            let (ga, gb) = (t.backward(la), u.backward(lb));
            let (ga, gb) = (ga.get(xa).unwrap(), gb.get(xb).unwrap());
            for (a, b) in ga.iter().zip(gb.iter()) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn sigmoid_is_stable() {
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
    }
}
