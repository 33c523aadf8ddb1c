// Elementwise binary ops with numpy broadcasting: add, sub, mul, div,
// minimum, maximum.
// In: two vars of broadcast-compatible shapes. Out: a var of the broadcast
// shape; backward sums gradients back down to each input's own shape.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use super::tape::{GradAcc, Op, Tape, Var};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Minimum,
    Maximum,
}

/// Numpy broadcast of two shapes (trailing axes aligned).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let db = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            assert!(
                da == db || da == 1 || db == 1,
                "cannot broadcast {a:?} with {b:?}"
            );
            da.max(db)
        })
        .collect()
}

/// Sums `g` over the axes that broadcasting added or stretched, so the
/// result has exactly `shape`.
pub fn reduce_to_shape(g: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if g.shape() == shape {
        return g;
    }
    let mut g = g;
    while g.ndim() > shape.len() {
        g = g.sum_axis(Axis(0));
    }
    for (i, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape()[i] != 1 {
            g = g.sum_axis(Axis(i)).insert_axis(Axis(i));
        }
    }
    g
}

/// Maps from this many elements on run in parallel (the tail's NCHW maps,
/// up to [16, 128, 80, 80]); the loss's small arrays stay serial.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// `f` over two same-shape views, in parallel when they are large.
fn zip2(a: ArrayViewD<f32>, b: ArrayViewD<f32>, f: impl Fn(f32, f32) -> f32 + Sync + Send) -> ArrayD<f32> {
    let z = Zip::from(&a).and(&b);
    if a.len() >= PAR_MIN { z.par_map_collect(|&x, &y| f(x, y)) } else { z.map_collect(|&x, &y| f(x, y)) }
}

fn zip3(a: ArrayViewD<f32>, b: ArrayViewD<f32>, c: ArrayViewD<f32>, f: impl Fn(f32, f32, f32) -> f32 + Sync + Send) -> ArrayD<f32> {
    let z = Zip::from(&a).and(&b).and(&c);
    if a.len() >= PAR_MIN { z.par_map_collect(|&x, &y, &w| f(x, y, w)) } else { z.map_collect(|&x, &y, &w| f(x, y, w)) }
}

fn apply(op: BinaryOp, a: &ArrayD<f32>, b: &ArrayD<f32>) -> ArrayD<f32> {
    let shape = broadcast_shape(a.shape(), b.shape());
    let av = a.broadcast(IxDyn(&shape)).unwrap();
    let bv = b.broadcast(IxDyn(&shape)).unwrap();
    let f: fn(f32, f32) -> f32 = match op {
        BinaryOp::Add => |x, y| x + y,
        BinaryOp::Sub => |x, y| x - y,
        BinaryOp::Mul => |x, y| x * y,
        BinaryOp::Div => |x, y| x / y,
        BinaryOp::Minimum => |x: f32, y: f32| x.min(y),
        BinaryOp::Maximum => |x: f32, y: f32| x.max(y),
    };
    zip2(av, bv, f)
}

impl Tape {
    pub fn binary(&mut self, op: BinaryOp, a: Var, b: Var) -> Var {
        let v = apply(op, self.value(a), self.value(b));
        self.push_op(v, Op::Binary(op, a, b), &[a, b])
    }
    pub fn add(&mut self, a: Var, b: Var) -> Var {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: Var, b: Var) -> Var {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: Var, b: Var) -> Var {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: Var, b: Var) -> Var {
        self.binary(BinaryOp::Div, a, b)
    }
    /// Elementwise min; like torch, a tie sends half the gradient each way.
    pub fn minimum(&mut self, a: Var, b: Var) -> Var {
        self.binary(BinaryOp::Minimum, a, b)
    }
    pub fn maximum(&mut self, a: Var, b: Var) -> Var {
        self.binary(BinaryOp::Maximum, a, b)
    }
}

/// Gradient share of `a` for min/max: 1 where a wins, 0.5 on ties.
fn select_share(a: f32, b: f32, a_wins: bool) -> f32 {
    if a == b {
        0.5
    } else if a_wins {
        1.0
    } else {
        0.0
    }
}

pub fn backward(
    t: &Tape,
    op: BinaryOp,
    a: Var,
    b: Var,
    out: &ArrayD<f32>,
    g: ArrayD<f32>,
    acc: &mut GradAcc,
) {
    if op == BinaryOp::Mul && silu_backward(t, a, b, &g, acc) {
        return;
    }
    let (av, bv) = (t.value(a), t.value(b));
    let (need_a, need_b) = (t.requires_grad(a), t.requires_grad(b));
    let shape = out.raw_dim();
    let ab = av.broadcast(shape.clone()).unwrap();
    let bb = bv.broadcast(shape.clone()).unwrap();
    // Each arm builds the full-shape gradient for an input, then reduces.
    let ga: Option<ArrayD<f32>> = if !need_a {
        None
    } else {
        Some(match op {
            BinaryOp::Add | BinaryOp::Sub => g.clone(),
            BinaryOp::Mul => zip2(g.view(), bb.view(), |g, y| g * y),
            BinaryOp::Div => zip2(g.view(), bb.view(), |g, y| g / y),
            BinaryOp::Minimum => zip3(g.view(), ab.view(), bb.view(), |g, x, y| g * select_share(x, y, x < y)),
            BinaryOp::Maximum => zip3(g.view(), ab.view(), bb.view(), |g, x, y| g * select_share(x, y, x > y)),
        })
    };
    let gb: Option<ArrayD<f32>> = if !need_b {
        None
    } else {
        Some(match op {
            BinaryOp::Add => g,
            BinaryOp::Sub => g.mapv_into(|x| -x),
            BinaryOp::Mul => zip2(g.view(), ab.view(), |g, x| g * x),
            BinaryOp::Div => zip3(g.view(), out.view(), bb.view(), |g, o, y| -g * o / y),
            BinaryOp::Minimum => zip3(g.view(), ab.view(), bb.view(), |g, x, y| g * select_share(y, x, y < x)),
            BinaryOp::Maximum => zip3(g.view(), ab.view(), bb.view(), |g, x, y| g * select_share(y, x, y > x)),
        })
    };
    if let Some(ga) = ga {
        acc.add(a, reduce_to_shape(ga, av.shape()));
    }
    if let Some(gb) = gb {
        acc.add(b, reduce_to_shape(gb, bv.shape()));
    }
}

/// SiLU as exported, `Mul(x, Sigmoid(x))` (either operand order): the
/// gradient of both paths goes straight to x in one pass,
/// g·s + (g·x)·s(1-s), instead of two full-size products, the Sigmoid's
/// backward pass and two accumulations. Nothing is sent to the Sigmoid node
/// (its other readers, if any, still send theirs). False when the pattern
/// does not apply (then the generic backward runs).
fn silu_backward(t: &Tape, a: Var, b: Var, g: &ArrayD<f32>, acc: &mut GradAcc) -> bool {
    let is_sig_of = |s: Var, x: Var| matches!(t.nodes[s.0].op, Op::Unary(super::unary::UnaryOp::Sigmoid, src) if src == x);
    let (x, s) = if is_sig_of(b, a) {
        (a, b)
    } else if is_sig_of(a, b) {
        (b, a)
    } else {
        return false;
    };
    if !acc.wants(x) {
        return true;
    }
    let (xv, sv) = (t.value(x), t.value(s));
    if xv.shape() != g.shape() || sv.shape() != g.shape() {
        return false;
    }
    let f = |g: f32, x: f32, s: f32| g * s + (g * x) * (s * (1.0 - s));
    let z = Zip::from(g).and(xv).and(sv);
    let dx = if g.len() >= PAR_MIN { z.par_map_collect(|&g, &x, &s| f(g, x, s)) } else { z.map_collect(|&g, &x, &s| f(g, x, s)) };
    acc.add(x, dx);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    const OPS: [BinaryOp; 6] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Minimum,
        BinaryOp::Maximum,
    ];

    fn pair(sa: &[usize], sb: &[usize], seed: u64, op: BinaryOp) -> Vec<ArrayD<f32>> {
        let a = rand_array(sa, seed, -2.0, 2.0);
        // Keep divisors away from zero.
        let b = if op == BinaryOp::Div {
            rand_array(sb, seed + 7, 0.5, 2.0)
        } else {
            rand_array(sb, seed + 7, -2.0, 2.0)
        };
        if matches!(op, BinaryOp::Minimum | BinaryOp::Maximum) {
            // Put a and b on interleaved grids so no pair is within the FD step.
            let a = a.mapv(|v| (v * 5.0).round() / 5.0);
            let b = b.mapv(|v| (v * 5.0).round() / 5.0 + 0.1);
            return vec![a, b];
        }
        vec![a, b]
    }

    #[test]
    fn same_shape() {
        for (i, op) in OPS.into_iter().enumerate() {
            check(&pair(&[3, 4], &[3, 4], i as u64, op), |t, v| {
                t.binary(op, v[0], v[1])
            });
        }
    }

    #[test]
    fn broadcast_row_and_col() {
        for (i, op) in OPS.into_iter().enumerate() {
            check(&pair(&[3, 4], &[4], 10 + i as u64, op), |t, v| {
                t.binary(op, v[0], v[1])
            });
            check(&pair(&[3, 1], &[3, 4], 20 + i as u64, op), |t, v| {
                t.binary(op, v[0], v[1])
            });
            check(&pair(&[2, 1, 4], &[3, 1], 30 + i as u64, op), |t, v| {
                t.binary(op, v[0], v[1])
            });
        }
    }

    #[test]
    fn broadcast_scalar() {
        for (i, op) in OPS.into_iter().enumerate() {
            check(&pair(&[], &[2, 3], 40 + i as u64, op), |t, v| {
                t.binary(op, v[0], v[1])
            });
            check(&pair(&[2, 3], &[], 50 + i as u64, op), |t, v| {
                t.binary(op, v[0], v[1])
            });
        }
    }

    #[test]
    fn constant_operand_gets_nothing() {
        let mut t = Tape::new();
        let a = t.param(rand_array(&[2, 3], 1, -1.0, 1.0));
        let c = t.constant(rand_array(&[3], 2, 1.0, 2.0));
        let y = t.div(a, c);
        let l = t.sum(y);
        let g = t.backward(l);
        assert!(g.get(c).is_none());
        let ga = g.get(a).unwrap();
        for ((_, j), &v) in ga
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
            .indexed_iter()
        {
            assert!((v - 1.0 / t.value(c)[[j]]).abs() < 1e-6);
        }
    }

    #[test]
    fn min_max_tie_splits_gradient() {
        let mut t = Tape::new();
        let a = t.param(ndarray::arr1(&[1.0f32, 2.0]).into_dyn());
        let b = t.param(ndarray::arr1(&[1.0f32, 3.0]).into_dyn());
        let y = t.minimum(a, b);
        let l = t.sum(y);
        let g = t.backward(l);
        assert_eq!(g.get(a).unwrap().as_slice().unwrap(), &[0.5, 1.0]);
        assert_eq!(g.get(b).unwrap().as_slice().unwrap(), &[0.5, 0.0]);
    }

    #[test]
    fn large_maps_take_the_parallel_path_with_the_same_values() {
        // SiLU as exported (Sigmoid, Mul) plus a broadcast per-channel Add, on
        // a map past PAR_MIN: values and gradients equal the closed forms
        let shape = [2, 4, 64, 65];
        assert!(shape.iter().product::<usize>() >= PAR_MIN);
        let x = rand_array(&shape, 1, -3.0, 3.0);
        let c = rand_array(&[1, 4, 1, 1], 2, -1.0, 1.0);
        let mut t = Tape::new();
        let (xv, cv) = (t.param(x.clone()), t.param(c.clone()));
        let s = t.sigmoid(xv);
        let y = t.mul(xv, s);
        let z = t.add(y, cv);
        let l = t.sum(z);
        let g = t.backward(l);
        let sig = crate::autograd::unary::sigmoid;
        for (idx, &xv_) in x.indexed_iter() {
            let sv = sig(xv_);
            assert_eq!(t.value(z)[&idx], xv_ * sv + c[[0, idx[1], 0, 0]]);
            let want = sv + xv_ * sv * (1.0 - sv);
            assert!((g.get(xv).unwrap()[&idx] - want).abs() < 1e-6);
        }
        let per_channel = (shape[0] * shape[2] * shape[3]) as f32;
        assert!(g.get(cv).unwrap().iter().all(|&v| v == per_channel));
    }

    #[test]
    fn silu_gradient_goes_straight_to_x_in_either_order_and_with_other_readers() {
        // Mul(x, Sigmoid(x)) and Mul(Sigmoid(x), x), below and above PAR_MIN,
        // and a Sigmoid that another op also reads (its gradient must still
        // reach x through the Sigmoid): against the closed form.
        let sig = crate::autograd::unary::sigmoid;
        for shape in [vec![3, 5], vec![2, 4, 64, 65]] {
            for (swap, extra) in [(false, false), (true, false), (false, true), (true, true)] {
                let x = rand_array(&shape, 3, -4.0, 4.0);
                let r = rand_array(&shape, 4, -1.0, 1.0);
                let mut t = Tape::new();
                let (xv, rv) = (t.param(x.clone()), t.constant(r.clone()));
                let s = t.sigmoid(xv);
                let y = if swap { t.mul(s, xv) } else { t.mul(xv, s) };
                let y = t.mul(y, rv);
                let l = if extra {
                    let s3 = t.mul_scalar(s, 3.0);
                    let z = t.add(y, s3);
                    t.sum(z)
                } else {
                    t.sum(y)
                };
                let g = t.backward(l);
                let gx = g.get(xv).unwrap();
                for (idx, &xe) in x.indexed_iter() {
                    let sv = sig(xe);
                    let mut want = r[&idx] * (sv + xe * sv * (1.0 - sv));
                    if extra {
                        want += 3.0 * sv * (1.0 - sv);
                    }
                    assert!((gx[&idx] - want).abs() <= 1e-5 * (1.0 + want.abs()), "{shape:?} swap {swap} extra {extra}: {} vs {want}", gx[&idx]);
                }
            }
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]), vec![2, 3, 4]);
        assert_eq!(broadcast_shape(&[], &[5]), vec![5]);
    }
}
