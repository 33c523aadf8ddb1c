//! One epoch: the run's set-up and the trainer's state in; the state moved
//! on by the epoch's batches (gradients accumulated, optimizer steps at the
//! schedule's rates, EMA updates) and the mean train losses out. Also `step`,
//! the loss and gradients of one batch, and `evaluate`, the EMA head on the
//! val split with the run's own loss settings.
//!
//! A non-finite loss or parameter stops the run at once with the epoch, the
//! batch and the likely cause, before anything of the epoch is saved.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::batches::{Batch, ReadAhead, Sample, load_batch};
use super::params::{HeadLayout, ParamStore, Tensors};
use super::schedule::At;
use super::setup::Run;
use super::{State, TrainOptions};
use crate::autograd::Tape;
use crate::head::Head;
use crate::loss::{LossConfig, compute_loss_on_features};

/// Trains `epoch`; the mean `[box, obj, cls]` losses of its batches.
pub fn train_epoch(run: &Run, st: &mut State, epoch: usize, opts: &TrainOptions) -> Result<[f64; 3]> {
    let n = run.train.samples.len();
    let nb = run.schedule.nb;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)));
    let bar = progress_bar(opts, nb, epoch);
    let mut mloss = [0f64; 3];
    let batches: Vec<&[usize]> = order.chunks(opts.batch_size).collect();
    // the sparse epochs read their positives from memory, not the entries
    let ahead = ReadAhead::new(&run.train.samples, &batches, run.sparse.is_none());
    for (i, &chunk) in batches.iter().enumerate() {
        ahead.at(i);
        let at = run.schedule.at(epoch, i);
        let ni = (i + nb * epoch) as i64;
        let refs: Vec<&Sample> = chunk.iter().map(|&j| &run.train.samples[j]).collect();
        let (l, g) = match (&run.sparse, &run.tail) {
            (Some(sp), _) => super::sparse::step(&st.params, &sp.train, chunk, &run.cfg, &run.layout),
            (None, None) => step(&st.params, load_batch(&refs, &run.shapes, opts.dtype)?, &run.cfg, &run.grids, &run.layout),
            (None, Some(tail)) => {
                let targets = super::batches::targets_of(&refs);
                super::tail::step(&st.params, super::tail::load_dense(&refs, &run.shapes, opts.dtype)?, targets.view(), refs.len(), &run.cfg, &run.grids, &run.layout, tail)
            }
        };
        if l.iter().any(|v| !v.is_finite()) {
            let what = format!("the training loss is not finite (box {} obj {} cls {})", l[0], l[1], l[2]);
            bail!(diverged(epoch, i, &what, !st.has_stepped(), &at, opts));
        }
        for (name, g) in g {
            // the loss is × bs, as train.py's
            *st.acc.get_mut(&name).expect("a gradient per parameter") += &g;
        }
        if ni - st.counters.last_opt_step >= at.accumulate as i64 {
            st.optimizer.step(&mut st.params, &st.acc, at.lr, at.momentum);
            for a in st.acc.values_mut() {
                a.fill(0.0);
            }
            st.ema.update(&st.params);
            st.counters.last_opt_step = ni;
            if let Some(name) = st.params.first_non_finite() {
                bail!(diverged(epoch, i, &format!("the optimizer step made `{name}` non-finite"), false, &at, opts));
            }
        }
        for k in 0..3 {
            mloss[k] = (mloss[k] * i as f64 + l[k] as f64) / (i + 1) as f64;
        }
        bar.set_message(format!("box {:.4} obj {:.4} cls {:.4}", mloss[0], mloss[1], mloss[2]));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(mloss)
}

/// Loss parts `[box, obj, cls]` (not × bs) of one batch and the gradient of
/// each parameter, by name.
pub fn step(params: &ParamStore, batch: Batch, cfg: &LossConfig, grids: &[(usize, usize)], layout: &HeadLayout) -> ([f32; 3], Tensors) {
    let mut t = Tape::new();
    let mut vars = BTreeMap::new();
    for (w, b) in layout.weights.iter().zip(&layout.biases) {
        for name in [w, b] {
            let p = params.get(name).expect("the head's parameters are in the store");
            vars.insert(name.clone(), t.param(p.value.clone()));
        }
    }
    let feats: Vec<_> = batch.feats.into_iter().map(|f| t.input(f)).collect();
    let weights: Vec<_> = layout.weights.iter().map(|n| vars[n]).collect();
    let biases: Vec<_> = layout.biases.iter().map(|n| vars[n]).collect();
    let parts = compute_loss_on_features(&mut t, cfg, &feats, &weights, &biases, grids, batch.bs, batch.targets.view());
    let losses = [t.scalar(parts.lbox), t.scalar(parts.lobj), t.scalar(parts.lcls)];
    let mut g = t.backward(parts.total);
    let grads = vars.into_iter().map(|(n, v)| (n, g.take(v).unwrap_or_else(|| ArrayD::zeros(t.value(v).raw_dim())))).collect();
    (losses, grads)
}

/// The message for a run that diverged (or started from bad values).
fn diverged(epoch: usize, batch: usize, what: &str, before_any_step: bool, at: &At, opts: &TrainOptions) -> String {
    let cause = if before_any_step {
        "the cached features of this batch hold NaN or infinite values (delete the cache directory --cache-dir to rebuild it)".to_string()
    } else {
        format!(
            "the updates diverged: lr0 {} (this batch at {:.3e}) with the row multipliers --lr-box {} --lr-obj {} --lr-cls {} is too high for --batch-size {} (the loss is summed over the batch); lower lr0 or the multipliers",
            opts.hyp.lr0, at.lr[1], opts.lr_box, opts.lr_obj, opts.lr_cls, opts.batch_size
        )
    };
    format!("training stopped at epoch {epoch}, batch {batch}: {what}; nothing of this epoch was saved. Likely cause: {cause}")
}

fn progress_bar(opts: &TrainOptions, nb: usize, epoch: usize) -> ProgressBar {
    let bar = if opts.progress { ProgressBar::with_draw_target(Some(nb as u64), ProgressDrawTarget::stderr()) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {per_sec} {msg}").unwrap().progress_chars("=> "));
    bar.set_prefix(format!("{:>5}", format!("{}/{}", epoch, opts.epochs - 1)));
    bar
}

/// `head` on the val split: P, R, mAP50, mAP50-95 and the mean per-batch val
/// losses with the run's loss settings (train.py validates with its own
/// ComputeLoss); zeros and NaN without a val split.
pub fn evaluate(run: &Run, head: &Head, values: &Tensors) -> Result<([f64; 4], [f32; 3])> {
    if run.val_items.is_empty() {
        return Ok(([0.0; 4], [f32::NAN; 3]));
    }
    if let Some(sp) = &run.sparse {
        let s = run.validate_sparse(&sp.val_cands, head).summary;
        return Ok(([s.mp, s.mr, s.map50, s.map], super::sparse::mean_losses(head, &sp.val, run.val_opts.batch_size, &run.cfg)));
    }
    let items = run.val_items_for(values)?;
    let r = run.validate(head, &items)?;
    let bs = run.val_opts.batch_size;
    let mut sum = [0f64; 3];
    let mut batches = 0usize;
    for (items, samples) in items.chunks(bs).zip(run.val.samples.chunks(bs)) {
        let entries: Vec<_> = items.iter().map(|it| crate::cache::Entry::open_verified_before(&it.entry).map(std::sync::Arc::new)).collect::<Result<_>>()?;
        let targets: Vec<Array2<f32>> = samples.iter().map(|s| Array2::from_shape_vec((s.targets.len(), 5), s.targets.concat()).expect("5 values a target")).collect();
        let views: Vec<_> = targets.iter().map(|t| t.view()).collect();
        let l = crate::val::loss::batch_loss_with(head, &run.loss_hyp, &entries, &views)?;
        for k in 0..3 {
            sum[k] += l[k] as f64;
        }
        batches += 1;
    }
    let s = &r.summary;
    Ok(([s.mp, s.mr, s.map50, s.map], sum.map(|v| (v / batches as f64) as f32)))
}
