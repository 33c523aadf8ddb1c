//! Gradients in, updated head parameters out: YOLOv5's optimizer set-up
//! (`smart_optimizer`), its warmup and learning-rate schedule, and `ModelEMA`.
//!
//! Parameters are the head's conv weights (group 1, with weight decay) and
//! biases (group 0, without), the group order of YOLOv5 whose warmup treats
//! group 0 specially. Each parameter row (one output channel: a box, objectness
//! or class row of one anchor) has a learning-rate multiplier; a multiplier of
//! 0 freezes the row exactly: neither the optimizer nor the EMA touches it.

use ndarray::{ArrayD, Axis, Zip};
use serde::{Deserialize, Serialize};

use super::hyp::TrainHyp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum OptimizerKind {
    #[serde(rename = "SGD")]
    #[value(name = "SGD", alias = "sgd")]
    Sgd,
    #[value(name = "Adam", alias = "adam")]
    Adam,
    #[value(name = "AdamW", alias = "adamw")]
    AdamW,
}

/// One trainable tensor: `[rows, ...]` with a multiplier per row.
#[derive(Debug, Clone)]
pub struct Param {
    pub value: ArrayD<f32>,
    /// 0 = biases (no decay), 1 = weights (decay)
    pub group: usize,
    pub row_lr: Vec<f32>,
}

/// Optimizer state that a checkpoint must carry for an exact resume.
#[derive(Debug, Clone, Default)]
pub struct OptState {
    /// Momentum buffers (SGD) or first moments (Adam).
    pub m: Vec<ArrayD<f32>>,
    /// Second moments (Adam); empty for SGD.
    pub v: Vec<ArrayD<f32>>,
    pub steps: u64,
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    pub state: OptState,
    /// Current learning rate and momentum per group.
    pub lr: [f64; 2],
    pub momentum: [f64; 2],
}

impl Optimizer {
    /// `weight_decay` already scaled as train.py scales it (× bs·accumulate/64).
    pub fn new(kind: OptimizerKind, params: &[Param], hyp: &TrainHyp, weight_decay: f64) -> Optimizer {
        let zeros = |_: &Param| -> Vec<ArrayD<f32>> { params.iter().map(|p| ArrayD::zeros(p.value.raw_dim())).collect() };
        let state = OptState {
            m: zeros(&params[0]),
            v: if kind == OptimizerKind::Sgd { Vec::new() } else { zeros(&params[0]) },
            steps: 0,
        };
        Optimizer { kind, weight_decay, state, lr: [hyp.lr0; 2], momentum: [hyp.momentum; 2] }
    }

    /// One step over all parameters with the accumulated gradients.
    pub fn step(&mut self, params: &mut [Param], grads: &[ArrayD<f32>]) {
        self.state.steps += 1;
        let t = self.state.steps as i32;
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let lr = self.lr[p.group] as f32;
            let wd = if p.group == 1 { self.weight_decay as f32 } else { 0.0 };
            let mom = self.momentum[p.group] as f32;
            let first = self.state.steps == 1;
            for (r, mult) in p.row_lr.iter().enumerate() {
                if *mult == 0.0 {
                    continue;
                }
                let lr_r = lr * mult;
                let mut pv = p.value.index_axis_mut(Axis(0), r);
                let gv = g.index_axis(Axis(0), r);
                let mut m = self.state.m[i].index_axis_mut(Axis(0), r);
                match self.kind {
                    // torch.optim.SGD(nesterov=True): d = g + wd·p; buf = μ·buf + d
                    // (buf = d on the first step); p -= lr·(d + μ·buf)
                    OptimizerKind::Sgd => Zip::from(&mut pv).and(&gv).and(&mut m).for_each(|p, &g, b| {
                        let d = g + wd * *p;
                        *b = if first { d } else { mom * *b + d };
                        *p -= lr_r * (d + mom * *b);
                    }),
                    OptimizerKind::Adam | OptimizerKind::AdamW => {
                        let (b1, b2, eps) = (mom, 0.999f32, 1e-8f32);
                        let c1 = 1.0 - b1.powi(t);
                        let c2 = 1.0 - b2.powi(t);
                        let decoupled = self.kind == OptimizerKind::AdamW;
                        let mut v = self.state.v[i].index_axis_mut(Axis(0), r);
                        Zip::from(&mut pv).and(&gv).and(&mut m).and(&mut v).for_each(|p, &g, m, v| {
                            let g = if decoupled {
                                *p *= 1.0 - lr_r * wd;
                                g
                            } else {
                                g + wd * *p
                            };
                            *m = b1 * *m + (1.0 - b1) * g;
                            *v = b2 * *v + (1.0 - b2) * g * g;
                            *p -= lr_r * (*m / c1) / ((*v / c2).sqrt() + eps);
                        });
                    }
                }
            }
        }
    }
}

/// `lf(epoch)`: YOLOv5's linear or cosine (`one_cycle`) learning-rate factor.
pub fn lr_factor(epoch: f64, epochs: usize, lrf: f64, cos: bool) -> f64 {
    if cos {
        ((1.0 - (epoch * std::f64::consts::PI / epochs as f64).cos()) / 2.0) * (lrf - 1.0) + 1.0
    } else {
        (1.0 - epoch / epochs as f64) * (1.0 - lrf) + lrf
    }
}

/// numpy's `interp` for one segment, clamped at both ends.
pub fn interp(x: f64, x0: f64, x1: f64, y0: f64, y1: f64) -> f64 {
    if x <= x0 {
        y0
    } else if x >= x1 {
        y1
    } else {
        y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    }
}

/// YOLOv5's `ModelEMA`: `ema = d·ema + (1 − d)·model`, `d = decay·(1 − e^(−updates/tau))`.
#[derive(Debug, Clone)]
pub struct Ema {
    pub params: Vec<ArrayD<f32>>,
    pub updates: u64,
    pub decay: f64,
    pub tau: f64,
}

impl Ema {
    pub fn new(params: &[Param]) -> Ema {
        Ema { params: params.iter().map(|p| p.value.clone()).collect(), updates: 0, decay: 0.9999, tau: 2000.0 }
    }

    pub fn update(&mut self, params: &[Param]) {
        self.updates += 1;
        let d = (self.decay * (1.0 - (-(self.updates as f64) / self.tau).exp())) as f32;
        for (e, p) in self.params.iter_mut().zip(params) {
            for (r, mult) in p.row_lr.iter().enumerate() {
                if *mult == 0.0 {
                    continue; // frozen rows stay bit-identical
                }
                Zip::from(e.index_axis_mut(Axis(0), r)).and(p.value.index_axis(Axis(0), r)).for_each(|e, &m| *e = *e * d + (1.0 - d) * m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn param(v: &[f32], group: usize) -> Param {
        Param { value: ArrayD::from_shape_vec(IxDyn(&[v.len(), 1]), v.to_vec()).unwrap(), group, row_lr: vec![1.0; v.len()] }
    }

    #[test]
    fn sgd_nesterov_matches_torch_by_hand() {
        let hyp = TrainHyp { lr0: 0.1, momentum: 0.9, ..Default::default() };
        let mut ps = vec![param(&[1.0], 1)];
        let mut opt = Optimizer::new(OptimizerKind::Sgd, &ps, &hyp, 0.01);
        let g = vec![ArrayD::from_elem(IxDyn(&[1, 1]), 0.5f32)];
        opt.step(&mut ps, &g);
        // d = 0.5 + 0.01 = 0.51; buf = 0.51; p = 1 - 0.1*(0.51 + 0.9*0.51)
        assert!((ps[0].value[[0, 0]] - (1.0 - 0.1 * 0.51 * 1.9)).abs() < 1e-7);
        let p1 = ps[0].value[[0, 0]];
        opt.step(&mut ps, &g);
        let d = 0.5 + 0.01 * p1;
        let buf = 0.9 * 0.51 + d;
        assert!((ps[0].value[[0, 0]] - (p1 - 0.1 * (d + 0.9 * buf))).abs() < 1e-6);
    }

    #[test]
    fn frozen_rows_are_untouched_by_optimizer_and_ema() {
        let hyp = TrainHyp::default();
        let mut ps = vec![param(&[0.123_456_79, 0.987_654_3], 1)];
        ps[0].row_lr = vec![0.0, 1.0];
        let before = ps[0].value.clone();
        let mut ema = Ema::new(&ps);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::AdamW] {
            let mut opt = Optimizer::new(kind, &ps, &hyp, 0.1);
            opt.step(&mut ps, &[ArrayD::from_elem(IxDyn(&[2, 1]), 3.0f32)]);
            ema.update(&ps);
        }
        assert_eq!(ps[0].value[[0, 0]].to_bits(), before[[0, 0]].to_bits());
        assert_eq!(ema.params[0][[0, 0]].to_bits(), before[[0, 0]].to_bits());
        assert_ne!(ps[0].value[[1, 0]], before[[1, 0]]);
    }

    #[test]
    fn schedules_end_at_lrf() {
        assert!((lr_factor(0.0, 30, 0.01, false) - 1.0).abs() < 1e-12);
        assert!((lr_factor(30.0, 30, 0.01, false) - 0.01).abs() < 1e-12);
        assert!((lr_factor(30.0, 30, 0.01, true) - 0.01).abs() < 1e-12);
        assert!((lr_factor(15.0, 30, 0.01, true) - 0.505).abs() < 1e-12);
    }
}
