//! val.py's losses for one batch: cached features `[C, H, W]` per image and
//! level, the head and the batch's letterboxed targets in; `(lbox, lobj,
//! lcls)` out, as `compute_loss(train_out, targets)[1]` (hyp gains applied,
//! not multiplied by the batch size).
//!
//! The loss runs on a tape where everything is a constant (no gradients are
//! needed), evaluating the convs only where the loss reads them; hyp is hyp.scratch-low scaled by
//! train.py's `scale_hyp` for nc, nl and imgsz.

use anyhow::Result;
use ndarray::{Array2, Array3, Array4, ArrayView2, Axis};

use crate::autograd::{Features, Tape};
use crate::head::Head;
use crate::loss::{Hyp, LossConfig, compute_loss_on_features, scale_hyp};

/// `levels[b][i]` is image `b`'s level `i`; `targets[b]` is `[m, 5]`
/// (cls, x, y, w, h normalised by imgsz).
pub fn batch_loss(head: &Head, levels: &[Vec<Array3<f32>>], targets: &[ArrayView2<f32>]) -> Result<[f32; 3]> {
    let bs = levels.len();
    let nl = head.nl();
    let grids: Vec<(usize, usize)> = levels[0].iter().map(|l| (l.dim().1, l.dim().2)).collect();
    let imgsz = (grids[0].0 as f32 * head.strides[0]) as usize;
    let anchors: Vec<Vec<[f32; 2]>> = head.anchors.iter().zip(&head.strides).map(|(a, &s)| a.iter().map(|[w, h]| [w / s, h / s]).collect()).collect();
    let cfg = LossConfig::new(scale_hyp(&Hyp::scratch_low(), head.nc, nl, imgsz), head.nc, anchors);

    let nt: usize = targets.iter().map(|t| t.nrows()).sum();
    let mut tg = Array2::<f32>::zeros((nt, 6));
    let mut r = 0;
    for (b, t) in targets.iter().enumerate() {
        for row in t.rows() {
            tg[[r, 0]] = b as f32;
            for k in 0..5 {
                tg[[r, k + 1]] = row[k];
            }
            r += 1;
        }
    }

    let mut t = Tape::new();
    let (mut feats, mut ws, mut bsv) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..nl {
        let views: Vec<_> = levels.iter().map(|l| l[i].view().insert_axis(Axis(0))).collect();
        let x: Array4<f32> = ndarray::concatenate(Axis(0), &views)?;
        feats.push(t.features(Features::from_array(x.into_dyn())));
        ws.push(t.constant(head.weights[i].clone().into_dyn()));
        bsv.push(t.constant(head.biases[i].clone().into_dyn()));
    }
    let parts = compute_loss_on_features(&mut t, &cfg, &feats, &ws, &bsv, &grids, bs, tg.view());
    Ok([t.scalar(parts.lbox), t.scalar(parts.lobj), t.scalar(parts.lcls)])
}
