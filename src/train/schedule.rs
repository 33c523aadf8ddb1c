//! train.py's schedule as a pure function of the iteration: the epoch and
//! the batch index in; the learning rate and momentum per parameter group and
//! the gradient accumulation out. Warmup over `max(warmup_epochs·nb, 100)`
//! iterations (numpy `interp` from `warmup_bias_lr`/0 and `warmup_momentum`),
//! then the linear or cosine (`one_cycle`) factor `lf(epoch)` on lr0.
//!
//! Nothing is carried from one iteration to the next, so a resumed run gets
//! exactly the values of an uninterrupted one. Also YOLOv5's `EarlyStopping`.

use serde::{Deserialize, Serialize};

use super::hyp::TrainHyp;

/// YOLOv5's nominal batch size.
pub const NBS: usize = 64;

#[derive(Debug, Clone)]
pub struct Schedule {
    /// Batches per epoch.
    pub nb: usize,
    /// Warmup iterations.
    pub nw: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub cos_lr: bool,
    pub lr0: f64,
    pub lrf: f64,
    pub momentum: f64,
    pub warmup_momentum: f64,
    pub warmup_bias_lr: f64,
}

/// What one iteration runs at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct At {
    /// Per group: 0 biases, 1 weights.
    pub lr: [f64; 2],
    pub momentum: [f64; 2],
    /// Step the optimizer once this many batches' gradients are in.
    pub accumulate: usize,
}

impl Schedule {
    pub fn new(hyp: &TrainHyp, epochs: usize, nb: usize, batch_size: usize, cos_lr: bool) -> Schedule {
        let nw = ((hyp.warmup_epochs * nb as f64).round() as usize).max(100);
        Schedule { nb, nw, batch_size, epochs, cos_lr, lr0: hyp.lr0, lrf: hyp.lrf, momentum: hyp.momentum, warmup_momentum: hyp.warmup_momentum, warmup_bias_lr: hyp.warmup_bias_lr }
    }

    /// train.py's `accumulate = max(round(nbs / batch_size), 1)` after warmup.
    pub fn accumulate(&self) -> usize {
        ((NBS as f64 / self.batch_size as f64).round() as usize).max(1)
    }

    /// Weight decay × bs·accumulate/nbs, as train.py scales it.
    pub fn weight_decay(&self, hyp_weight_decay: f64) -> f64 {
        hyp_weight_decay * (self.batch_size * self.accumulate()) as f64 / NBS as f64
    }

    /// Batch `i` of `epoch`.
    pub fn at(&self, epoch: usize, i: usize) -> At {
        let ni = (i + self.nb * epoch) as f64;
        let base = self.lr0 * lr_factor(epoch as f64, self.epochs, self.lrf, self.cos_lr);
        if ni > self.nw as f64 {
            return At { lr: [base; 2], momentum: [self.momentum; 2], accumulate: self.accumulate() };
        }
        let nw = self.nw as f64;
        let accumulate = (interp(ni, 0.0, nw, 1.0, NBS as f64 / self.batch_size as f64).round() as usize).max(1);
        let lr = [interp(ni, 0.0, nw, self.warmup_bias_lr, base), interp(ni, 0.0, nw, 0.0, base)];
        let m = interp(ni, 0.0, nw, self.warmup_momentum, self.momentum);
        At { lr, momentum: [m; 2], accumulate }
    }

    /// The rates results.csv reports for an epoch: those of its last batch.
    pub fn reported_lr(&self, epoch: usize) -> [f64; 2] {
        self.at(epoch, self.nb - 1).lr
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

/// YOLOv5's `EarlyStopping` (utils/torch_utils.py), on the same fitness:
/// stop once `patience` epochs passed without a fitness at least as good as
/// the best. Patience 0 never stops. Its state travels in the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stopper {
    pub best_fitness: f64,
    pub best_epoch: usize,
    pub patience: usize,
}

impl Stopper {
    pub fn new(patience: usize) -> Stopper {
        Stopper { best_fitness: 0.0, best_epoch: 0, patience }
    }

    /// Records the epoch's fitness; true when training should stop.
    pub fn update(&mut self, epoch: usize, fitness: f64) -> bool {
        // >= lets the early zero-fitness epochs count as progress, as YOLOv5
        if fitness >= self.best_fitness {
            self.best_epoch = epoch;
            self.best_fitness = fitness;
        }
        self.patience > 0 && epoch - self.best_epoch >= self.patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(nb: usize, bs: usize) -> Schedule {
        Schedule::new(&TrainHyp::default(), 30, nb, bs, false)
    }

    #[test]
    fn schedules_end_at_lrf() {
        assert!((lr_factor(0.0, 30, 0.01, false) - 1.0).abs() < 1e-12);
        assert!((lr_factor(30.0, 30, 0.01, false) - 0.01).abs() < 1e-12);
        assert!((lr_factor(30.0, 30, 0.01, true) - 0.01).abs() < 1e-12);
        assert!((lr_factor(15.0, 30, 0.01, true) - 0.505).abs() < 1e-12);
    }

    #[test]
    fn warmup_then_the_epoch_rate() {
        // 28 batches of 16: warmup max(3·28, 100) = 100 iterations
        let s = schedule(28, 16);
        assert_eq!(s.nw, 100);
        let a = s.at(0, 0);
        assert_eq!((a.lr, a.momentum, a.accumulate), ([0.1, 0.0], [0.8; 2], 1));
        // iteration 100 is warmup's last: exactly the scheduled rate
        let lf3 = 0.01 * lr_factor(3.0, 30, 0.01, false);
        let w = s.at(3, 16);
        assert_eq!((w.lr, w.momentum, w.accumulate), ([lf3; 2], [0.937; 2], 4));
        // after warmup: lr0·lf(epoch), whatever came before (a resume)
        let lf6 = 0.01 * lr_factor(6.0, 30, 0.01, false);
        assert_eq!(s.at(6, 0), At { lr: [lf6; 2], momentum: [0.937; 2], accumulate: 4 });
        assert!((lf6 - 0.00802).abs() < 1e-12, "the rate issue 10 expected at epoch 6: {lf6}");
        assert_eq!(s.reported_lr(6), [lf6; 2]);
        assert_eq!(schedule(28, 200).accumulate(), 1);
    }

    #[test]
    fn early_stopping_as_yolov5() {
        let mut s = Stopper::new(2);
        let fits = [0.1, 0.3, 0.2, 0.3, 0.25, 0.29];
        let stops: Vec<bool> = fits.iter().enumerate().map(|(e, &f)| s.update(e, f)).collect();
        // 0.3 at epoch 3 ties the best (>=): best epoch 3; epoch 5 is 2 past it
        assert_eq!(stops, [false, false, false, false, false, true]);
        assert_eq!((s.best_epoch, s.best_fitness), (3, 0.3));
        let mut never = Stopper::new(0);
        assert!((0..50).all(|e| !never.update(e, 0.0 - e as f64)));
    }
}
