// Test-only finite-difference gradient checker.
// In: input arrays (made parameters), a closure that builds an op graph on a
// fresh tape. Out: panics if the tape gradient of sum(out * W) (W a fixed
// pseudo-random weighting, so every Jacobian entry matters) differs from the
// central difference.

use ndarray::{ArrayD, IxDyn};

use super::tape::{Tape, Var};

/// Deterministic uniform values in [lo, hi) (tiny LCG; avoids a rand dependency).
pub fn rand_array(shape: &[usize], seed: u64, lo: f32, hi: f32) -> ArrayD<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = ((s >> 40) as f32) / ((1u64 << 24) as f32);
        lo + (hi - lo) * u
    })
}

fn weighted_loss(t: &mut Tape, out: Var, seed: u64) -> Var {
    let shape = t.value(out).shape().to_vec();
    let w = t.constant(rand_array(&shape, seed, -1.0, 1.0));
    let y = t.mul(out, w);
    t.sum(y)
}

fn eval(inputs: &[ArrayD<f32>], build: &dyn Fn(&mut Tape, &[Var]) -> Var) -> f64 {
    let mut t = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|a| t.param(a.clone())).collect();
    let out = build(&mut t, &vars);
    let l = weighted_loss(&mut t, out, 99);
    t.scalar(l) as f64
}

/// Compares analytic and central-difference gradients for every input
/// element: |analytic - fd| <= atol + rtol * |fd|.
pub fn check_grads(
    inputs: &[ArrayD<f32>],
    build: impl Fn(&mut Tape, &[Var]) -> Var,
    eps: f32,
    atol: f32,
    rtol: f32,
) {
    let mut t = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|a| t.param(a.clone())).collect();
    let out = build(&mut t, &vars);
    let l = weighted_loss(&mut t, out, 99);
    let grads = t.backward(l);

    for (k, inp) in inputs.iter().enumerate() {
        let zeros = ArrayD::zeros(inp.raw_dim());
        let analytic = grads.get(vars[k]).unwrap_or(&zeros);
        assert_eq!(analytic.shape(), inp.shape(), "grad shape of input {k}");
        for (idx, _) in inp.indexed_iter() {
            let mut plus = inputs.to_vec();
            plus[k][&idx] += eps;
            let mut minus = inputs.to_vec();
            minus[k][&idx] -= eps;
            let fd = (eval(&plus, &build) - eval(&minus, &build)) / (2.0 * eps as f64);
            let an = analytic[&idx] as f64;
            let tol = atol as f64 + rtol as f64 * fd.abs();
            assert!(
                (an - fd).abs() <= tol,
                "input {k} at {idx:?}: analytic {an} vs fd {fd} (tol {tol})"
            );
        }
    }
}

/// Default tolerances for well-conditioned ops on O(1) values.
pub fn check(inputs: &[ArrayD<f32>], build: impl Fn(&mut Tape, &[Var]) -> Var) {
    check_grads(inputs, build, 1e-2, 2e-3, 1e-2);
}
