//! val.py's losses for one batch: the cached entries (features `[C, H, W]`
//! per level, f16 or f32 as stored), the head and the batch's letterboxed
//! targets in; `(lbox, lobj, lcls)` out, as `compute_loss(train_out,
//! targets)[1]` (hyp gains applied, not multiplied by the batch size).
//!
//! The loss runs on a tape where everything is a constant (no gradients are
//! needed), evaluating the convs only where the loss reads them. The hyp is
//! the run's (`batch_loss_with`: the trainer validates with its own loss
//! settings, as train.py does) or hyp.scratch-low (`batch_loss`), scaled by
//! train.py's `scale_hyp` for nc, nl and imgsz.

use std::sync::Arc;

use anyhow::Result;
use ndarray::{Array2, ArrayView2};

use crate::autograd::Tape;
use crate::cache::Entry;
use crate::cache::entry::lend_level;
use crate::head::Head;
use crate::loss::{Hyp, LossConfig, compute_loss_on_features, scale_hyp};

/// `entries[b]` holds image `b`'s levels; `targets[b]` is `[m, 5]`
/// (cls, x, y, w, h normalised by imgsz).
pub fn batch_loss(head: &Head, entries: &[Arc<Entry>], targets: &[ArrayView2<f32>]) -> Result<[f32; 3]> {
    batch_loss_with(head, &Hyp::scratch_low(), entries, targets)
}

/// `batch_loss` with the gains, focal gamma and label smoothing of `hyp`
/// (before `scale_hyp`).
pub fn batch_loss_with(head: &Head, hyp: &Hyp, entries: &[Arc<Entry>], targets: &[ArrayView2<f32>]) -> Result<[f32; 3]> {
    let bs = entries.len();
    let nl = head.nl();
    let grids: Vec<(usize, usize)> = entries[0].header.shapes.iter().map(|s| (s[1], s[2])).collect();
    let imgsz = (grids[0].0 as f32 * head.strides[0]) as usize;
    let anchors: Vec<Vec<[f32; 2]>> = head.anchors.iter().zip(&head.strides).map(|(a, &s)| a.iter().map(|[w, h]| [w / s, h / s]).collect()).collect();
    let cfg = LossConfig::new(scale_hyp(hyp, head.nc, nl, imgsz), head.nc, anchors);

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
        feats.push(t.input(lend_level(entries, i)?));
        ws.push(t.constant(head.weights[i].clone().into_dyn()));
        bsv.push(t.constant(head.biases[i].clone().into_dyn()));
    }
    let parts = compute_loss_on_features(&mut t, &cfg, &feats, &ws, &bsv, &grids, bs, tg.view());
    Ok([t.scalar(parts.lbox), t.scalar(parts.lobj), t.scalar(parts.lcls)])
}
