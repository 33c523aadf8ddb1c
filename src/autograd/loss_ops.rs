// Fused, numerically stable BCE-with-logits (torch
// `binary_cross_entropy_with_logits(reduction='none', pos_weight=pw)`).
// In: logits var, targets var (must be a constant), scalar pos_weight.
// Out: elementwise loss of the logits' shape
//   -(pw * t * log σ(x) + (1 - t) * log(1 - σ(x))).

use ndarray::{ArrayD, Zip};

use super::tape::{GradAcc, Op, Tape, Var};
use super::unary::sigmoid;

/// Below this many elements threading costs more than it saves.
const PAR_MIN: usize = 1 << 15;

fn bce(x: f32, t: f32, pw: f32) -> f32 {
    let log_weight = (pw - 1.0) * t + 1.0;
    // -log σ(x) = log1p(exp(-|x|)) + max(-x, 0), never overflows.
    (1.0 - t) * x + log_weight * ((-x.abs()).exp().ln_1p() + (-x).max(0.0))
}

impl Tape {
    pub fn bce_with_logits(&mut self, logits: Var, targets: Var, pos_weight: f32) -> Var {
        assert!(
            !self.requires_grad(targets),
            "bce_with_logits: targets must be constant"
        );
        let (x, t) = (self.value(logits), self.value(targets));
        assert_eq!(x.shape(), t.shape(), "bce_with_logits: shape mismatch");
        let z = Zip::from(x).and(t);
        let v = if x.len() >= PAR_MIN {
            z.par_map_collect(|&x, &t| bce(x, t, pos_weight))
        } else {
            z.map_collect(|&x, &t| bce(x, t, pos_weight))
        };
        self.push_op(
            v,
            Op::BceWithLogits {
                logits,
                targets,
                pos_weight,
            },
            &[logits],
        )
    }
}

pub fn bce_backward(
    t: &Tape,
    logits: Var,
    targets: Var,
    pw: f32,
    mut g: ArrayD<f32>,
    acc: &mut GradAcc,
) {
    let f = |g: &mut f32, &x: &f32, &y: &f32| {
        let log_weight = (pw - 1.0) * y + 1.0;
        *g *= (1.0 - y) - log_weight * sigmoid(-x);
    };
    let z = Zip::from(&mut g).and(t.value(logits)).and(t.value(targets));
    if z.size() >= PAR_MIN {
        z.par_for_each(f);
    } else {
        z.for_each(f);
    }
    acc.add(logits, g);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};

    fn run(pw: f32, seed: u64) {
        let x = rand_array(&[4, 3], seed, -6.0, 6.0);
        let tg = rand_array(&[4, 3], seed + 1, 0.0, 1.0);
        check(&[x], move |t, v| {
            let tc = t.constant(tg.clone());
            t.bce_with_logits(v[0], tc, pw)
        });
    }

    #[test]
    fn grads_various_pos_weight() {
        run(1.0, 1);
        run(2.5, 2);
        run(0.4, 3);
    }

    #[test]
    fn matches_naive_formula_and_is_stable() {
        for &(x, t, pw) in &[
            (0.3f32, 1.0f32, 1.0f32),
            (-2.0, 0.0, 1.0),
            (1.5, 0.7, 2.0),
            (-0.4, 0.05, 0.5),
        ] {
            let s = sigmoid(x);
            let naive = -(pw * t * s.ln() + (1.0 - t) * (1.0 - s).ln());
            assert!((bce(x, t, pw) - naive).abs() < 1e-5, "{x} {t} {pw}");
        }
        assert!(bce(-200.0, 1.0, 1.0).is_finite());
        assert!((bce(200.0, 0.0, 1.0) - 200.0).abs() < 1e-3);
    }
}
