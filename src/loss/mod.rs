// YOLOv5 v7.0 ComputeLoss (utils/loss.py) and the Detect head's 1x1 convs,
// built on `crate::autograd`.
// In: frozen features, head parameters, targets, hyp. Out: loss vars whose
// `Tape::backward` gives the head's weight/bias gradients.

pub mod bbox;
pub mod compute;
pub mod head;
pub mod hyp;
pub mod targets;

pub use bbox::bbox_ciou;
pub use compute::{LossConfig, LossParts, compute_loss, compute_loss_on_features};
pub use head::{
    ANCHORS_P3_P5, STRIDES_P3_P5, anchors_in_grid_units, grids_for, head_forward, nchw_to_rows,
};
pub use hyp::{Hyp, balance_for, scale_hyp, smooth_bce};
pub use targets::{LevelTargets, build_targets};
