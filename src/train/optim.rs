//! Gradients in, updated head parameters out: YOLOv5's optimizer set-up
//! (`smart_optimizer`), its warmup and learning-rate schedule, and `ModelEMA`.
//!
//! Parameters come by name from a `ParamStore`: weights (with weight decay)
//! and biases (without), in YOLOv5's groups. A parameter row (one output
//! channel: a box, objectness or class row of one anchor) may have a
//! learning-rate multiplier; a multiplier of 0 freezes the row exactly:
//! neither the optimizer nor the EMA touches it. The learning rate and
//! momentum of each step come from the schedule (`schedule.rs`); what a resume
//! needs is in `state_dict`.

use anyhow::Result;
use ndarray::{ArrayViewD, ArrayViewMutD, Axis, Zip};
use serde::{Deserialize, Serialize};

use super::params::{Group, ParamStore, Tensors, take_like, trained_rows};
use super::state::StateDict;

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

pub struct Optimizer {
    pub kind: OptimizerKind,
    /// Already scaled as train.py scales it (× bs·accumulate/64).
    weight_decay: f64,
    /// Momentum buffers (SGD) or first moments (Adam), by parameter name.
    m: Tensors,
    /// Second moments (Adam); empty for SGD.
    v: Tensors,
    steps: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &ParamStore, weight_decay: f64) -> Optimizer {
        let v = if kind == OptimizerKind::Sgd { Tensors::new() } else { params.zeros() };
        Optimizer { kind, weight_decay, m: params.zeros(), v, steps: 0 }
    }

    /// One step over all parameters with the accumulated gradients, at the
    /// schedule's learning rate and momentum per group.
    pub fn step(&mut self, params: &mut ParamStore, grads: &Tensors, lr: [f64; 2], momentum: [f64; 2]) {
        self.steps += 1;
        let u = Update { kind: self.kind, t: self.steps as i32, first: self.steps == 1 };
        for (name, p) in params.iter_mut() {
            let g = &grads[name];
            let lr = lr[p.group as usize] as f32;
            let wd = if p.group == Group::Decay { self.weight_decay as f32 } else { 0.0 };
            let mom = momentum[p.group as usize] as f32;
            let m = self.m.get_mut(name).expect("a buffer per parameter");
            let mut v = self.v.get_mut(name);
            match trained_rows(&p.row_lr) {
                Some(rows) => {
                    for (r, mult) in rows {
                        let v = v.as_mut().map(|v| v.index_axis_mut(Axis(0), r));
                        u.apply(p.value.index_axis_mut(Axis(0), r), g.index_axis(Axis(0), r), m.index_axis_mut(Axis(0), r), v, lr * mult, wd, mom);
                    }
                }
                None => u.apply(p.value.view_mut(), g.view(), m.view_mut(), v.map(|v| v.view_mut()), lr, wd, mom),
            }
        }
    }

    /// The buffers and the step count, for a checkpoint.
    pub fn state_dict(&self, prefix: &str, out: &mut StateDict) {
        put(&format!("{prefix}m."), &self.m, out);
        put(&format!("{prefix}v."), &self.v, out);
        out.counts.insert(format!("{prefix}steps"), self.steps);
    }

    pub fn load_state_dict(&mut self, prefix: &str, from: &StateDict) -> Result<()> {
        take(&format!("{prefix}m."), &mut self.m, from)?;
        take(&format!("{prefix}v."), &mut self.v, from)?;
        self.steps = from.count(&format!("{prefix}steps"))?;
        Ok(())
    }
}

/// The per-element update rule of one optimizer step.
struct Update {
    kind: OptimizerKind,
    /// Steps so far, this one included.
    t: i32,
    first: bool,
}

impl Update {
    #[allow(clippy::too_many_arguments)]
    fn apply(&self, mut pv: ArrayViewMutD<f32>, gv: ArrayViewD<f32>, mut m: ArrayViewMutD<f32>, v: Option<ArrayViewMutD<f32>>, lr: f32, wd: f32, mom: f32) {
        match self.kind {
            // torch.optim.SGD(nesterov=True): d = g + wd·p; buf = μ·buf + d
            // (buf = d on the first step); p -= lr·(d + μ·buf)
            OptimizerKind::Sgd => {
                let first = self.first;
                Zip::from(&mut pv).and(&gv).and(&mut m).for_each(|p, &g, b| {
                    let d = g + wd * *p;
                    *b = if first { d } else { mom * *b + d };
                    *p -= lr * (d + mom * *b);
                })
            }
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                let (b1, b2, eps) = (mom, 0.999f32, 1e-8f32);
                let c1 = 1.0 - b1.powi(self.t);
                let c2 = 1.0 - b2.powi(self.t);
                let decoupled = self.kind == OptimizerKind::AdamW;
                let mut v = v.expect("Adam keeps second moments");
                Zip::from(&mut pv).and(&gv).and(&mut m).and(&mut v).for_each(|p, &g, m, v| {
                    let g = if decoupled {
                        *p *= 1.0 - lr * wd;
                        g
                    } else {
                        g + wd * *p
                    };
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                });
            }
        }
    }
}

fn put(prefix: &str, t: &Tensors, out: &mut StateDict) {
    for (k, v) in t {
        out.tensors.insert(format!("{prefix}{k}"), v.as_standard_layout().into_owned());
    }
}

/// Replaces each tensor of `into` by `from[prefix + name]` (same shape).
fn take(prefix: &str, into: &mut Tensors, from: &StateDict) -> Result<()> {
    for (k, v) in into.iter_mut() {
        *v = take_like(&from.tensors, &format!("{prefix}{k}"), v)?;
    }
    Ok(())
}

/// YOLOv5's `ModelEMA`: `ema = d·ema + (1 − d)·model`, `d = decay·(1 − e^(−updates/tau))`.
#[derive(Debug, Clone)]
pub struct Ema {
    values: Tensors,
    updates: u64,
    decay: f64,
    tau: f64,
}

impl Ema {
    pub fn new(params: &ParamStore) -> Ema {
        Ema { values: params.values(), updates: 0, decay: 0.9999, tau: 2000.0 }
    }

    /// The averaged parameters by name (what is validated and saved).
    pub fn values(&self) -> &Tensors {
        &self.values
    }

    pub fn update(&mut self, params: &ParamStore) {
        self.updates += 1;
        let d = (self.decay * (1.0 - (-(self.updates as f64) / self.tau).exp())) as f32;
        let mix = |e: ArrayViewMutD<f32>, m: ArrayViewD<f32>| Zip::from(e).and(m).for_each(|e, &m| *e = *e * d + (1.0 - d) * m);
        for (name, p) in params.iter() {
            let e = self.values.get_mut(name).expect("an average per parameter");
            match trained_rows(&p.row_lr) {
                // frozen rows stay bit-identical
                Some(rows) => rows.for_each(|(r, _)| mix(e.index_axis_mut(Axis(0), r), p.value.index_axis(Axis(0), r))),
                None => mix(e.view_mut(), p.value.view()),
            }
        }
    }

    pub fn state_dict(&self, prefix: &str, out: &mut StateDict) {
        put(prefix, &self.values, out);
        out.counts.insert(format!("{prefix}updates"), self.updates);
    }

    pub fn load_state_dict(&mut self, prefix: &str, from: &StateDict) -> Result<()> {
        take(prefix, &mut self.values, from)?;
        self.updates = from.count(&format!("{prefix}updates"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::params::Param;
    use ndarray::{ArrayD, IxDyn};

    fn store(v: &[f32], group: Group, row_lr: Option<Vec<f32>>) -> ParamStore {
        let mut s = ParamStore::default();
        s.insert("w", Param { value: ArrayD::from_shape_vec(IxDyn(&[v.len(), 1]), v.to_vec()).unwrap(), group, row_lr });
        s
    }

    fn grads(n: usize, g: f32) -> Tensors {
        [("w".to_string(), ArrayD::from_elem(IxDyn(&[n, 1]), g))].into_iter().collect()
    }

    #[test]
    fn sgd_nesterov_matches_torch_by_hand() {
        let mut ps = store(&[1.0], Group::Decay, None);
        let mut opt = Optimizer::new(OptimizerKind::Sgd, &ps, 0.01);
        let g = grads(1, 0.5);
        opt.step(&mut ps, &g, [0.1; 2], [0.9; 2]);
        // d = 0.5 + 0.01 = 0.51; buf = 0.51; p = 1 - 0.1*(0.51 + 0.9*0.51)
        let p1 = ps.get("w").unwrap().value[[0, 0]];
        assert!((p1 - (1.0 - 0.1 * 0.51 * 1.9)).abs() < 1e-7);
        opt.step(&mut ps, &g, [0.1; 2], [0.9; 2]);
        let d = 0.5 + 0.01 * p1;
        let buf = 0.9 * 0.51 + d;
        assert!((ps.get("w").unwrap().value[[0, 0]] - (p1 - 0.1 * (d + 0.9 * buf))).abs() < 1e-6);
    }

    #[test]
    fn frozen_rows_are_untouched_by_optimizer_and_ema() {
        let mut ps = store(&[0.123_456_79, 0.987_654_3], Group::Decay, Some(vec![0.0, 1.0]));
        let before = ps.get("w").unwrap().value.clone();
        let mut ema = Ema::new(&ps);
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::AdamW] {
            let mut opt = Optimizer::new(kind, &ps, 0.1);
            opt.step(&mut ps, &grads(2, 3.0), [0.01; 2], [0.937; 2]);
            ema.update(&ps);
        }
        let after = &ps.get("w").unwrap().value;
        assert_eq!(after[[0, 0]].to_bits(), before[[0, 0]].to_bits());
        assert_eq!(ema.values()["w"][[0, 0]].to_bits(), before[[0, 0]].to_bits());
        assert_ne!(after[[1, 0]], before[[1, 0]]);
    }

    #[test]
    fn state_dicts_restore_the_optimizer_and_ema_exactly() {
        let mut ps = store(&[0.5, -0.25], Group::NoDecay, None);
        let mut opt = Optimizer::new(OptimizerKind::Adam, &ps, 0.0);
        let mut ema = Ema::new(&ps);
        for _ in 0..3 {
            opt.step(&mut ps, &grads(2, 0.7), [0.01; 2], [0.9; 2]);
            ema.update(&ps);
        }
        let mut sd = StateDict::default();
        opt.state_dict("optimizer.", &mut sd);
        ema.state_dict("ema.", &mut sd);
        let (mut ps2, mut opt2, mut ema2) = (ps.clone(), Optimizer::new(OptimizerKind::Adam, &ps, 0.0), Ema::new(&ps));
        opt2.load_state_dict("optimizer.", &sd).unwrap();
        ema2.load_state_dict("ema.", &sd).unwrap();
        opt.step(&mut ps, &grads(2, 0.3), [0.01; 2], [0.9; 2]);
        opt2.step(&mut ps2, &grads(2, 0.3), [0.01; 2], [0.9; 2]);
        ema.update(&ps);
        ema2.update(&ps2);
        assert_eq!(ps.values(), ps2.values());
        assert_eq!(ema.values(), ema2.values());
        sd.tensors.remove("optimizer.v.w");
        let e = Optimizer::new(OptimizerKind::Adam, &ps, 0.0).load_state_dict("optimizer.", &sd).unwrap_err();
        assert!(format!("{e:#}").contains("optimizer.v.w"), "{e:#}");
    }
}
