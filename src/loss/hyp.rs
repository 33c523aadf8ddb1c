// Loss hyperparameters (the subset of YOLOv5's hyp dict that ComputeLoss
// reads) and train.py's gain scaling.
// In: raw hyp values (e.g. data/hyps/hyp.scratch-low.yaml), nc, nl, imgsz.
// Out: a `Hyp` ready for `compute_loss`.

/// Field names follow the hyp keys; `box_` because `box` is a Rust keyword.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyp {
    pub box_: f32,
    pub obj: f32,
    pub cls: f32,
    pub cls_pw: f32,
    pub obj_pw: f32,
    pub anchor_t: f32,
    pub fl_gamma: f32,
    pub label_smoothing: f32,
}

impl Hyp {
    /// data/hyps/hyp.scratch-low.yaml, unscaled; label_smoothing is train.py's
    /// `--label-smoothing` default.
    pub fn scratch_low() -> Hyp {
        Hyp {
            box_: 0.05,
            obj: 1.0,
            cls: 0.5,
            cls_pw: 1.0,
            obj_pw: 1.0,
            anchor_t: 4.0,
            fl_gamma: 0.0,
            label_smoothing: 0.0,
        }
    }
}

/// train.py: the hyp gains are tuned for 3 layers, 80 classes and 640 px, so
/// they are rescaled before ComputeLoss is built.
pub fn scale_hyp(hyp: &Hyp, nc: usize, nl: usize, imgsz: usize) -> Hyp {
    let l = 3.0 / nl as f32;
    let s = imgsz as f32 / 640.0;
    Hyp {
        box_: hyp.box_ * l,
        cls: hyp.cls * (nc as f32 / 80.0 * l),
        obj: hyp.obj * (s * s * l),
        ..*hyp
    }
}

/// (positive, negative) class targets for label smoothing eps.
pub fn smooth_bce(eps: f32) -> (f32, f32) {
    (1.0 - 0.5 * eps, 0.5 * eps)
}

/// ComputeLoss.balance: obj loss weight per level, P3 first.
pub fn balance_for(nl: usize) -> Vec<f32> {
    if nl == 3 {
        vec![4.0, 1.0, 0.4]
    } else {
        [4.0, 1.0, 0.25, 0.06, 0.02]
            .iter()
            .copied()
            .take(nl)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_matches_train_py() {
        let h = scale_hyp(&Hyp::scratch_low(), 5, 3, 320);
        assert!((h.box_ - 0.05).abs() < 1e-7);
        assert!((h.cls - 0.5 * 5.0 / 80.0).abs() < 1e-7);
        assert!((h.obj - 0.25).abs() < 1e-7);
        assert_eq!(h.anchor_t, 4.0);
        assert_eq!(smooth_bce(0.1), (0.95, 0.05));
    }
}
