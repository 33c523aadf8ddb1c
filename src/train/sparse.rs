//! Class-only training on the sparse cache (`--train cls`, sparse by
//! default; `--dense` keeps the dense path).
//!
//! In: a split's samples (their dense entries and letterboxed labels), the
//! starting head and the loss configuration. Out: `SparseSplit`, the
//! positives of every image in memory (from `cache::sparse`, built once per
//! image from the dense entry when absent; below `--freeze 24` the dense
//! entry holds the crossing tensors and the frozen tail runs on it once to
//! give the head inputs), and per batch the loss parts and
//! the head's gradients (`step`), or the losses alone (`losses`).
//!
//! Why this is exact: build_targets' positives depend on the labels, anchors
//! and grids only, never on predictions, and with the box and objectness rows
//! frozen (row lr 0) the only part of ComputeLoss with a gradient is lcls,
//! the BCE of the class logits at the positives. The box and objectness
//! losses are constants of each image, stored with its positives (`Σ 1-CIoU`
//! per positive and the objectness BCE summed over the cells), so the logged
//! train and val losses are YOLOv5's batch losses, only summed in another
//! order. With fl_gamma 0 (the hyps' default) the class term is a plain
//! mean BCE and its gradient is written out (`class_loss_direct`) instead of
//! taped; with focal loss the tape runs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use half::f16;
use ndarray::{Array2, ArrayD, IxDyn};
use rayon::prelude::*;

use super::batches::Sample;
use super::params::{HeadLayout, ParamStore, Tensors};
use crate::autograd::{Features, Tape, Var};
use crate::cache::entry::Entry;
use crate::cache::sparse::{self, SparseEntry, SparseHeader, SparseLevel};
use crate::cache::{Dtype, FeatureCache};
use crate::features::FeatSlice;
use crate::head::Head;
use crate::loss::{LossConfig, build_targets, smooth_bce};
use crate::tail::TailNet;

/// One level's positives of one image, classes applied.
#[derive(Debug, Clone, Default)]
pub struct Positives {
    /// `[n, C]` as f32 (converted once from the stored f16).
    pub feats: Vec<f32>,
    pub anchor: Vec<u32>,
    pub cls: Vec<u32>,
    pub one_minus_iou: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct SparseImage {
    pub levels: Vec<Positives>,
    pub obj_bce_sum: Vec<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct SparseSplit {
    pub images: Vec<SparseImage>,
    pub channels: Vec<usize>,
    /// Per level na·ny·nx.
    pub cells: Vec<usize>,
    /// Bytes of the split's sparse files.
    pub bytes: usize,
    /// Images whose sparse file this call wrote.
    pub built: usize,
}

/// What the sparse key hashes besides the image and its boxes: the loss
/// settings the positives and constant losses depend on, the frozen box and
/// objectness rows and, below `--freeze 24`, every tensor of the frozen tail
/// that turns the cached crossing tensors into head inputs (the cache
/// directory is the frozen graph's, which a fine-tuned tail leaves unchanged).
fn key_context(head: &Head, cfg: &LossConfig, dtype: Dtype, tail: Option<&TailNet>) -> Vec<u8> {
    let mut c = Vec::new();
    let h = &cfg.hyp;
    for v in [h.anchor_t, h.obj_pw, h.fl_gamma, cfg.gr] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    c.extend_from_slice(dtype.name().as_bytes());
    for (l, a) in cfg.anchors.iter().enumerate() {
        a.iter().flatten().for_each(|v| c.extend_from_slice(&v.to_le_bytes()));
        let no = head.no();
        for r in (0..head.na() * no).filter(|r| r % no < 5) {
            head.weights[l].row(r).iter().for_each(|v| c.extend_from_slice(&v.to_le_bytes()));
            c.extend_from_slice(&head.biases[l][r].to_le_bytes());
        }
    }
    if let Some(net) = tail {
        let mut th = blake3::Hasher::new();
        for (name, v) in &net.params {
            th.update(name.as_bytes());
            v.iter().for_each(|x| {
                th.update(&x.to_le_bytes());
            });
        }
        c.extend_from_slice(b"tail");
        c.extend_from_slice(th.finalize().as_bytes());
    }
    c
}

/// What a run's sparse data is built from besides the samples.
pub struct SparseSource<'a> {
    pub cache: &'a FeatureCache,
    /// The starting head: its frozen box and objectness rows.
    pub head: &'a Head,
    /// `head` with the classes validation scores (the dataset's, with
    /// `--add-classes`).
    pub val_head: &'a Head,
    pub cfg: &'a LossConfig,
    pub dtype: Dtype,
    pub val_opts: &'a crate::val::ValOptions,
    /// Below `--freeze 24`: the frozen tail that makes head inputs of the
    /// cached crossing tensors (run once per image here, instead of every
    /// batch of every epoch), with the crossing shapes.
    pub tail: Option<(&'a TailNet, &'a [[usize; 3]])>,
}

/// One image's head inputs as the sparse build reads them: f16 `[C, H*W]`
/// per level, what the N = 24 cache holds.
pub struct HeadInputs {
    pub letterbox: crate::preprocess::LetterboxMeta,
    pub shapes: Vec<[usize; 3]>,
    pub levels: Vec<Vec<f16>>,
}

impl HeadInputs {
    /// The levels of a head-input cache entry.
    pub fn of_entry(e: &Entry) -> HeadInputs {
        let levels = (0..e.header.shapes.len())
            .map(|l| match e.level_raw(l) {
                FeatSlice::F16(x) => x.to_vec(),
                FeatSlice::F32(x) => x.iter().map(|&v| f16::from_f32(v)).collect(),
                q8 @ FeatSlice::Q8(_) => q8.to_f32_vec().into_iter().map(f16::from_f32).collect(),
            })
            .collect();
        HeadInputs { letterbox: e.header.letterbox, shapes: e.header.shapes.clone(), levels }
    }

    /// The head inputs of `samples` (their crossing entries) through the
    /// frozen `net`, as one batch, rounded to f16 as the N = 24 cache
    /// stores them.
    fn of_tail(net: &TailNet, samples: &[&Sample], shapes: &[[usize; 3]]) -> Result<Vec<HeadInputs>> {
        let entries: Vec<Entry> = samples.par_iter().map(|s| Entry::open_verified_before(&s.entry)).collect::<Result<_>>()?;
        let feats = net.eval(super::tail::dense(&entries, shapes))?;
        let shapes: Vec<[usize; 3]> = feats.iter().map(|f| [f.shape()[1], f.shape()[2], f.shape()[3]]).collect();
        Ok(entries
            .iter()
            .enumerate()
            .map(|(b, e)| {
                let levels = feats.iter().map(|f| f.index_axis(ndarray::Axis(0), b).iter().map(|&v| f16::from_f32(v)).collect()).collect();
                HeadInputs { letterbox: e.header.letterbox, shapes: shapes.clone(), levels }
            })
            .collect())
    }
}

/// The sparse data of `samples`: read from the cache where there, else built
/// from the dense entries (through the frozen tail below N = 24) and written.
pub fn prepare(src: &SparseSource, samples: &[Sample]) -> Result<SparseSplit> {
    let (cache, head, cfg) = (src.cache, src.head, src.cfg);
    sparse::remove_orphans(cache);
    let ctx = key_context(head, cfg, src.dtype, src.tail.map(|t| t.0));
    let paths: Vec<PathBuf> = samples
        .iter()
        .map(|s| -> Result<PathBuf> {
            let image_key = s.entry.file_stem().and_then(|k| k.to_str()).context("a cache entry without a key")?;
            let boxes: Vec<[f32; 4]> = s.targets.iter().map(|t| [t[1], t[2], t[3], t[4]]).collect();
            Ok(sparse::sparse_path(cache, &sparse::sparse_key(image_key, &boxes, &ctx)))
        })
        .collect::<Result<_>>()?;
    let mut got: Vec<Option<(SparseEntry, usize)>> = paths.par_iter().map(|p| sparse::read(p).map(|e| (e, std::fs::metadata(p).map_or(0, |m| m.len() as usize)))).collect();
    let missing: Vec<usize> = (0..samples.len()).filter(|&i| got[i].is_none()).collect();
    // a batch at a time: the head inputs of a whole split would not fit
    for chunk in missing.chunks(src.val_opts.batch_size.max(1)) {
        let inputs: Vec<HeadInputs> = match src.tail {
            None => chunk.par_iter().map(|&i| Entry::open_verified_before(&samples[i].entry).map(|e| HeadInputs::of_entry(&e))).collect::<Result<_>>()?,
            Some((net, shapes)) => HeadInputs::of_tail(net, &chunk.iter().map(|&i| &samples[i]).collect::<Vec<_>>(), shapes)?,
        };
        let built: Vec<(SparseEntry, usize)> = chunk
            .par_iter()
            .zip(inputs)
            .map(|(&i, x)| -> Result<(SparseEntry, usize)> {
                let e = build_entry(&x, &samples[i].targets, head, cfg);
                let n = sparse::write(&paths[i], &e)?;
                Ok((e, n))
            })
            .collect::<Result<_>>()?;
        for (&i, b) in chunk.iter().zip(built) {
            got[i] = Some(b);
        }
    }
    let mut out = SparseSplit { built: missing.len(), ..Default::default() };
    for (g, s) in got.into_iter().zip(samples) {
        let (e, n) = g.expect("every image read or built");
        out.bytes += n;
        if out.channels.is_empty() {
            out.channels = e.header.channels.clone();
            out.cells = e.header.cells.clone();
        }
        let levels = e
            .levels
            .into_iter()
            .map(|l| Positives {
                feats: l.feats.iter().map(|v| v.to_f32()).collect(),
                cls: l.target.iter().map(|&t| s.targets[t as usize][0] as u32).collect(),
                anchor: l.anchor,
                one_minus_iou: l.one_minus_iou,
            })
            .collect();
        out.images.push(SparseImage { levels, obj_bce_sum: e.header.obj_bce_sum });
    }
    Ok(out)
}

/// torch's BCEWithLogits(pos_weight) of one element, times YOLOv5's focal
/// factor when `gamma > 0`.
fn bce(x: f64, y: f64, pw: f64, gamma: f64) -> f64 {
    let l = (1.0 - y) * x + (1.0 + (pw - 1.0) * y) * ((-x.abs()).exp().ln_1p() + (-x).max(0.0));
    if gamma <= 0.0 {
        return l;
    }
    let p = 1.0 / (1.0 + (-x).exp());
    let p_t = y * p + (1.0 - y) * (1.0 - p);
    let af = y * 0.25 + (1.0 - y) * 0.75;
    l * af * (1.0 - p_t).powf(gamma)
}

/// One image's sparse entry from its head inputs and letterboxed targets
/// `[class, x, y, w, h]`.
pub fn build_entry(e: &HeadInputs, targets: &[[f32; 5]], head: &Head, cfg: &LossConfig) -> SparseEntry {
    let (na, no) = (head.na(), head.no());
    let grids: Vec<(usize, usize)> = e.shapes.iter().map(|s| (s[1], s[2])).collect();
    // the label row stands in for the class: positives do not depend on it
    let t6 = Array2::from_shape_fn((targets.len(), 6), |(r, k)| match k {
        0 => 0.0,
        1 => r as f32,
        _ => targets[r][k - 1],
    });
    let tg = build_targets(t6.view(), &cfg.anchors, &grids, cfg.hyp.anchor_t);
    let mut header = SparseHeader { letterbox: e.letterbox, channels: vec![], counts: vec![], obj_bce_sum: vec![], cells: vec![] };
    let mut levels = Vec::new();
    for (l, lt) in tg.iter().enumerate() {
        let [c, ny, nx] = e.shapes[l];
        let sp = ny * nx;
        let x16 = &e.levels[l];
        let n = lt.len();
        let mut lvl = SparseLevel { feats: Vec::with_capacity(n * c), anchor: lt.a.iter().map(|&a| a as u32).collect(), target: lt.tcls.iter().map(|&t| t as u32).collect(), one_minus_iou: vec![] };
        let mut pbox = Array2::<f32>::zeros((n, 4));
        for k in 0..n {
            let p = lt.gj[k] * nx + lt.gi[k];
            let col: Vec<f16> = (0..c).map(|ch| x16[ch * sp + p]).collect();
            for j in 0..4 {
                let r = lt.a[k] * no + j;
                pbox[[k, j]] = head.biases[l][r] + head.weights[l].row(r).iter().zip(&col).map(|(w, v)| w * v.to_f32()).sum::<f32>();
            }
            lvl.feats.extend(col);
        }
        let iou = ciou(&pbox, lt);
        lvl.one_minus_iou = iou.iter().map(|v| 1.0 - v).collect();
        // objectness targets: the last duplicate in build_targets order wins
        let mut tobj = vec![0f32; na * sp];
        for (k, &v) in iou.iter().enumerate() {
            let v = v.max(0.0);
            tobj[lt.a[k] * sp + lt.gj[k] * nx + lt.gi[k]] = if cfg.gr < 1.0 { (1.0 - cfg.gr) + cfg.gr * v } else { v };
        }
        let x32 = Array2::from_shape_vec((c, sp), x16.iter().map(|v| v.to_f32()).collect()).expect("[C, H*W]");
        let wobj = Array2::from_shape_fn((na, c), |(a, ch)| head.weights[l][[a * no + 4, ch]]);
        let z = wobj.dot(&x32);
        let (pw, gamma) = (cfg.hyp.obj_pw as f64, cfg.hyp.fl_gamma as f64);
        let sum = (0..na).map(|a| (0..sp).map(|p| bce((z[[a, p]] + head.biases[l][a * no + 4]) as f64, tobj[a * sp + p] as f64, pw, gamma)).sum::<f64>()).sum();
        header.channels.push(c);
        header.counts.push(n);
        header.obj_bce_sum.push(sum);
        header.cells.push(na * sp);
        levels.push(lvl);
    }
    SparseEntry { header, levels }
}

/// CIoU of the box logits `[n, 4]` at a level's positives, as ComputeLoss
/// computes it.
fn ciou(pbox: &Array2<f32>, lt: &crate::loss::LevelTargets) -> Vec<f32> {
    let n = lt.len();
    if n == 0 {
        return vec![];
    }
    let mut t = Tape::new();
    let ps = t.constant(pbox.clone().into_dyn());
    let iou = crate::loss::compute::positives_ciou(&mut t, ps, lt);
    t.value(iou).iter().copied().collect()
}

/// `[lbox, lobj]` of the images `idx` as one batch, hyp gains applied.
fn constant_losses(cfg: &LossConfig, split: &SparseSplit, idx: &[usize]) -> [f32; 2] {
    let (mut lbox, mut lobj) = (0f64, 0f64);
    for l in 0..split.cells.len() {
        let n: usize = idx.iter().map(|&i| split.images[i].levels[l].anchor.len()).sum();
        if n > 0 {
            lbox += idx.iter().map(|&i| split.images[i].levels[l].one_minus_iou.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / n as f64;
        }
        let obj: f64 = idx.iter().map(|&i| split.images[i].obj_bce_sum[l]).sum();
        lobj += cfg.balance[l] as f64 * obj / (idx.len() * split.cells[l]) as f64;
    }
    [(lbox * cfg.hyp.box_ as f64) as f32, (lobj * cfg.hyp.obj as f64) as f32]
}

/// ComputeLoss's lcls (before the cls gain) of the images `idx` on the tape,
/// None without positives or with one class.
fn class_loss(t: &mut Tape, cfg: &LossConfig, split: &SparseSplit, idx: &[usize], w: &[Var], b: &[Var]) -> Option<Var> {
    let (na, no, nc) = (cfg.na(), cfg.no(), cfg.nc);
    if nc < 2 {
        return None;
    }
    let (cp, cn) = smooth_bce(cfg.hyp.label_smoothing);
    let mut lcls: Option<Var> = None;
    for (l, &c) in split.channels.iter().enumerate() {
        let pos: Vec<&Positives> = idx.iter().map(|&i| &split.images[i].levels[l]).collect();
        let n: usize = pos.iter().map(|p| p.anchor.len()).sum();
        if n == 0 {
            continue;
        }
        // [1, C, n]: the positives as the columns of one image
        let mut x = vec![0f32; c * n];
        let (mut k, mut picks, mut tc) = (0, Vec::with_capacity(n), Array2::<f32>::from_elem((n, nc), cn));
        for p in &pos {
            for j in 0..p.anchor.len() {
                for (ch, v) in p.feats[j * c..(j + 1) * c].iter().enumerate() {
                    x[ch * n + k] = *v;
                }
                picks.push((0u32, k as u32, p.anchor[j]));
                tc[[k, p.cls[j] as usize]] = cp;
                k += 1;
            }
        }
        let f = t.input(Features::from_array(ArrayD::from_shape_vec(IxDyn(&[1, c, 1, n]), x).expect("[1, C, 1, n]")));
        let ps = t.conv1x1_at(f, w[l], b[l], &picks, na);
        let pcls = t.slice_cols(ps, 5, no);
        let lc = crate::loss::compute::bce_mean(t, pcls, tc.into_dyn(), cfg.hyp.cls_pw, cfg.hyp.fl_gamma);
        lcls = Some(match lcls {
            Some(s) => t.add(s, lc),
            None => lc,
        });
    }
    lcls
}

/// Each level's flat weight `[na·no, C]` and bias `[na·no]`, and with
/// `grads` their gradients to add to: what `class_loss_direct` reads.
struct HeadSlices<'a> {
    w: Vec<&'a [f32]>,
    b: Vec<&'a [f32]>,
}

/// Gradients to add into: each level's flat weight and bias gradient, and
/// which rows `a·no + k` train (a row at lr multiplier 0 is left out of the
/// optimizer, so its gradient is never read and is not computed).
type GradsInto<'a> = (&'a mut [Vec<f32>], &'a mut [Vec<f32>], &'a [bool]);

/// `class_loss` without the tape where ComputeLoss's class term is a plain
/// mean BCE (fl_gamma 0): lcls (before the cls gain) of the images `idx`,
/// and with `grads` the gradient of `gain · lcls` added into the weight and
/// bias rows of the classes that train. The same logits (dots on the
/// positives' columns), the same BCE, only the bookkeeping of a tape is
/// gone: it cost most of a class-only epoch's training. None as `class_loss`.
fn class_loss_direct(cfg: &LossConfig, split: &SparseSplit, idx: &[usize], h: &HeadSlices, gain: f32, mut grads: Option<GradsInto>) -> Option<f32> {
    let (na, no, nc) = (cfg.na(), cfg.no(), cfg.nc);
    if nc < 2 {
        return None;
    }
    let (cp, cn) = smooth_bce(cfg.hyp.label_smoothing);
    let mut lcls: Option<f32> = None;
    for (l, &c) in split.channels.iter().enumerate() {
        let n: usize = idx.iter().map(|&i| split.images[i].levels[l].anchor.len()).sum();
        if n == 0 {
            continue;
        }
        let rows: Vec<Vec<&[f32]>> = (0..na).map(|a| (a * no + 5..(a + 1) * no).map(|r| &h.w[l][r * c..(r + 1) * c]).collect()).collect();
        let (mut z, mut tc) = (vec![0f32; n * nc], vec![cn; n * nc]);
        let mut k = 0;
        for &i in idx {
            let p = &split.images[i].levels[l];
            for (j, &a) in p.anchor.iter().enumerate() {
                let out = &mut z[k * nc..(k + 1) * nc];
                crate::kernels::dots(&rows[a as usize], &p.feats[j * c..(j + 1) * c], out);
                for (o, b) in out.iter_mut().zip(&h.b[l][a as usize * no + 5..]) {
                    *o += b;
                }
                tc[k * nc + p.cls[j] as usize] = cp;
                k += 1;
            }
        }
        let m = (n * nc) as f32;
        let sum = match grads.as_mut() {
            None => crate::kernels::bce::bce_logits_sum(&z, &tc, cfg.hyp.cls_pw),
            Some((gw, gb, trains)) => {
                let mut dz = vec![0f32; n * nc];
                let sum = crate::kernels::bce::bce_logits_grad(&z, &tc, cfg.hyp.cls_pw, gain / m, &mut dz);
                let mut k = 0;
                for &i in idx {
                    let p = &split.images[i].levels[l];
                    for (j, &a) in p.anchor.iter().enumerate() {
                        for (cl, &g) in dz[k * nc..(k + 1) * nc].iter().enumerate() {
                            let r = a as usize * no + 5 + cl;
                            if !trains[r] {
                                continue;
                            }
                            crate::kernels::axpy(&mut gw[l][r * c..(r + 1) * c], g, &p.feats[j * c..(j + 1) * c]);
                            gb[l][r] += g;
                        }
                        k += 1;
                    }
                }
                sum
            }
        };
        let lc = (sum / m as f64) as f32;
        lcls = Some(lcls.map_or(lc, |s| s + lc));
    }
    lcls
}

/// Loss parts `[box, obj, cls]` (not × bs) of the images `idx` as one batch
/// and the gradient of each head parameter by name (zero but for the class
/// rows; without the focal term, zero also for rows at lr multiplier 0).
pub fn step(params: &ParamStore, split: &SparseSplit, idx: &[usize], cfg: &LossConfig, layout: &HeadLayout) -> ([f32; 3], Tensors) {
    let _timed = StepTimer(std::time::Instant::now());
    let [lbox, lobj] = constant_losses(cfg, split, idx);
    if cfg.hyp.fl_gamma <= 0.0 {
        return step_direct(params, split, idx, cfg, layout, [lbox, lobj]);
    }
    let mut t = Tape::new();
    let mut vars = BTreeMap::new();
    for name in layout.weights.iter().chain(&layout.biases) {
        let p = params.get(name).expect("the head's parameters are in the store");
        vars.insert(name.clone(), t.param(p.value.clone()));
    }
    let w: Vec<Var> = layout.weights.iter().map(|n| vars[n]).collect();
    let b: Vec<Var> = layout.biases.iter().map(|n| vars[n]).collect();
    let Some(lcls) = class_loss(&mut t, cfg, split, idx, &w, &b) else {
        let grads = vars.into_iter().map(|(n, v)| (n, ArrayD::zeros(t.value(v).raw_dim()))).collect();
        return ([lbox, lobj, 0.0], grads);
    };
    let lcls = t.mul_scalar(lcls, cfg.hyp.cls);
    // train.py's loss is × bs; the constant parts add no gradient
    let total = t.mul_scalar(lcls, idx.len() as f32);
    let losses = [lbox, lobj, t.scalar(lcls)];
    let mut g = t.backward(total);
    let grads = vars.into_iter().map(|(n, v)| (n, g.take(v).unwrap_or_else(|| ArrayD::zeros(t.value(v).raw_dim())))).collect();
    (losses, grads)
}

/// Nanoseconds spent in `step` since the last `mean_losses` (profiling).
static STEP_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Adds its lifetime to STEP_NS.
struct StepTimer(std::time::Instant);

impl Drop for StepTimer {
    fn drop(&mut self) {
        STEP_NS.fetch_add(self.0.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `step` by `class_loss_direct`.
fn step_direct(params: &ParamStore, split: &SparseSplit, idx: &[usize], cfg: &LossConfig, layout: &HeadLayout, [lbox, lobj]: [f32; 2]) -> ([f32; 3], Tensors) {
    let value = |n: &String| &params.get(n).expect("the head's parameters are in the store").value;
    let flat = |n: &String| value(n).as_slice().expect("a parameter in standard layout");
    let h = HeadSlices { w: layout.weights.iter().map(flat).collect(), b: layout.biases.iter().map(flat).collect() };
    let mut gw: Vec<Vec<f32>> = h.w.iter().map(|w| vec![0f32; w.len()]).collect();
    let mut gb: Vec<Vec<f32>> = h.b.iter().map(|b| vec![0f32; b.len()]).collect();
    // the rows the optimizer updates (with --add-classes, the new classes')
    let p0 = params.get(&layout.weights[0]).expect("the head's parameters are in the store");
    let trains: Vec<bool> = match &p0.row_lr {
        Some(m) => m.iter().map(|&v| v != 0.0).collect(),
        None => vec![true; p0.value.shape()[0]],
    };
    // train.py's loss is × bs; the constant parts add no gradient
    let gain = cfg.hyp.cls * idx.len() as f32;
    let lcls = class_loss_direct(cfg, split, idx, &h, gain, Some((&mut gw, &mut gb, &trains))).map_or(0.0, |v| v * cfg.hyp.cls);
    let mut grads = Tensors::new();
    for (names, gs) in [(&layout.weights, gw), (&layout.biases, gb)] {
        for (n, g) in names.iter().zip(gs) {
            grads.insert(n.clone(), ArrayD::from_shape_vec(value(n).raw_dim(), g).expect("a gradient of its parameter's shape"));
        }
    }
    ([lbox, lobj, lcls], grads)
}

/// Loss parts `[box, obj, cls]` of `head` on the images `idx` as one batch.
pub fn losses(head: &Head, split: &SparseSplit, idx: &[usize], cfg: &LossConfig) -> [f32; 3] {
    if cfg.hyp.fl_gamma <= 0.0 {
        let h = HeadSlices { w: head.weights.iter().map(|w| w.as_slice().expect("a head in standard layout")).collect(), b: head.biases.iter().map(|b| b.as_slice().expect("a head in standard layout")).collect() };
        let [lbox, lobj] = constant_losses(cfg, split, idx);
        return [lbox, lobj, class_loss_direct(cfg, split, idx, &h, 0.0, None).map_or(0.0, |v| v * cfg.hyp.cls)];
    }
    let mut t = Tape::new();
    let w: Vec<Var> = head.weights.iter().map(|w| t.constant(w.clone().into_dyn())).collect();
    let b: Vec<Var> = head.biases.iter().map(|b| t.constant(b.clone().into_dyn())).collect();
    let [lbox, lobj] = constant_losses(cfg, split, idx);
    let lcls = class_loss(&mut t, cfg, split, idx, &w, &b).map_or(0.0, |v| t.scalar(v) * cfg.hyp.cls);
    [lbox, lobj, lcls]
}

/// Mean per-batch val losses of `head` in batches of `bs` images, as
/// `epoch::evaluate` computes them densely.
pub fn mean_losses(head: &Head, split: &SparseSplit, bs: usize, cfg: &LossConfig) -> [f32; 3] {
    let start = std::time::Instant::now();
    let idx: Vec<usize> = (0..split.images.len()).collect();
    let mut sum = [0f64; 3];
    let chunks: Vec<&[usize]> = idx.chunks(bs.max(1)).collect();
    for c in &chunks {
        let l = losses(head, split, c, cfg);
        for k in 0..3 {
            sum[k] += l[k] as f64;
        }
    }
    if crate::autograd::profile::enabled() {
        let steps = STEP_NS.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
        eprintln!("sparse train: steps {steps:.1} ms since the last val losses; val losses {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    }
    sum.map(|v| (v / chunks.len().max(1) as f64) as f32)
}

/// Whether a run is sparse: `--sparse` / `--dense` as given, else sparse
/// exactly for `--train cls`, at every `--freeze`. Refused with a sentence where
/// sparse cannot apply. Also what `--add-classes` calls for its default.
pub fn resolve(train: super::TrainWhat, sparse: bool, dense: bool) -> Result<bool> {
    use super::TrainWhat;
    if sparse && dense {
        anyhow::bail!("--sparse and --dense exclude each other; give one of them");
    }
    if sparse && train != TrainWhat::Cls {
        anyhow::bail!("--sparse trains the class rows only: add --train cls, or drop --sparse to train the whole head densely");
    }
    // class-only training freezes everything before the head whatever
    // --freeze says: below 24 the frozen tail runs once per image
    Ok(!dense && (sparse || train == TrainWhat::Cls))
}

/// Everything the sparse epochs read: the positives of both splits and the
/// val candidates.
pub struct SparseRun {
    pub train: SparseSplit,
    pub val: SparseSplit,
    pub val_cands: crate::val::sparse::SparseVal,
}

/// Builds (or reads) the sparse data of a run and says what it holds.
/// `head_val` are the val images' head inputs (below N = 24 the frozen
/// tail's, `TailRun::freeze_val`), where the val candidates come from.
pub fn prepare_run(src: &SparseSource, train: &[Sample], val: &[Sample], head_val: &[crate::val::ValItem]) -> Result<SparseRun> {
    let start = std::time::Instant::now();
    let tr = prepare(src, train)?;
    let va = prepare(src, val)?;
    let val_cands = crate::val::sparse::SparseVal::build(src.val_head, head_val, src.val_opts)?;
    let dense: u64 = train.iter().filter_map(|s| std::fs::metadata(&s.entry).ok()).map(|m| m.len()).sum();
    let npos: usize = tr.images.iter().flat_map(|i| &i.levels).map(|l| l.anchor.len()).sum();
    eprintln!(
        "sparse: train {} positives in {} bytes (dense entries {} bytes, 1/{:.0}; {} of {} images built now), val {} bytes of positives and {} candidate rows in {} bytes ({:.2}s)",
        npos,
        tr.bytes,
        dense,
        dense as f64 / tr.bytes.max(1) as f64,
        tr.built,
        train.len(),
        va.bytes,
        val_cands.candidates(),
        val_cands.bytes(),
        start.elapsed().as_secs_f64()
    );
    Ok(SparseRun { train: tr, val: va, val_cands })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Two images' positives on two levels (C 16 and 24, 2 anchors, 3 classes).
    fn split(rng: &mut rand_chacha::ChaCha8Rng) -> SparseSplit {
        let channels = vec![16, 24];
        let images = (0..2)
            .map(|i| SparseImage {
                levels: channels
                    .iter()
                    .map(|&c| {
                        let n = 3 + i * 2;
                        Positives { feats: (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect(), anchor: (0..n).map(|k| (k % 2) as u32).collect(), cls: (0..n).map(|k| (k % 3) as u32).collect(), one_minus_iou: vec![0.5; n] }
                    })
                    .collect(),
                obj_bce_sum: vec![1.0, 2.0],
            })
            .collect();
        SparseSplit { images, cells: vec![2 * 16, 2 * 4], channels, ..Default::default() }
    }

    #[test]
    fn the_written_out_class_gradient_is_the_tapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let sp = split(&mut rng);
        let mut hyp = crate::loss::Hyp::scratch_low();
        hyp.label_smoothing = 0.1;
        hyp.cls_pw = 1.5;
        let cfg = LossConfig::new(hyp, 3, vec![vec![[1.0, 2.0], [2.0, 1.0]]; 2]);
        let no = cfg.no();
        let w: Vec<Array2<f32>> = sp.channels.iter().map(|&c| Array2::from_shape_fn((2 * no, c), |_| rng.random_range(-0.5..0.5))).collect();
        let b: Vec<ndarray::Array1<f32>> = (0..2).map(|_| ndarray::Array1::from_shape_fn(2 * no, |_| rng.random_range(-2.0..1.0))).collect();
        let idx = [1, 0];
        let gain = 0.7;

        let mut t = Tape::new();
        let wv: Vec<Var> = w.iter().map(|w| t.param(w.clone().into_dyn())).collect();
        let bv: Vec<Var> = b.iter().map(|b| t.param(b.clone().into_dyn())).collect();
        let lc = class_loss(&mut t, &cfg, &sp, &idx, &wv, &bv).unwrap();
        let want = t.scalar(lc);
        let total = t.mul_scalar(lc, gain);
        let mut g = t.backward(total);

        let h = HeadSlices { w: w.iter().map(|w| w.as_slice().unwrap()).collect(), b: b.iter().map(|b| b.as_slice().unwrap()).collect() };
        let mut gw: Vec<Vec<f32>> = w.iter().map(|w| vec![0.0; w.len()]).collect();
        let mut gb: Vec<Vec<f32>> = b.iter().map(|b| vec![0.0; b.len()]).collect();
        let all = vec![true; 2 * no];
        let got = class_loss_direct(&cfg, &sp, &idx, &h, gain, Some((&mut gw, &mut gb, &all))).unwrap();
        assert!((got - want).abs() <= 1e-6 * want.abs(), "lcls: tape {want} written out {got}");
        assert_eq!(class_loss_direct(&cfg, &sp, &idx, &h, 0.0, None), Some(got));
        for l in 0..2 {
            for (v, mine) in [(wv[l], &gw[l]), (bv[l], &gb[l])] {
                let tape = g.take(v).unwrap();
                let scale = tape.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(scale > 1e-3);
                for (k, (a, m)) in tape.iter().zip(mine.iter()).enumerate() {
                    assert!((a - m).abs() <= 1e-5 * scale, "level {l} element {k}: tape {a} written out {m}");
                    // box and objectness rows get nothing
                    if (k / (tape.len() / (2 * no))) % no < 5 {
                        assert_eq!(*m, 0.0);
                    }
                }
            }
        }
        // a frozen row gets no gradient, the others the same
        let some: Vec<bool> = (0..2 * no).map(|r| r % no != 6).collect();
        let mut gw2: Vec<Vec<f32>> = w.iter().map(|w| vec![0.0; w.len()]).collect();
        let mut gb2: Vec<Vec<f32>> = b.iter().map(|b| vec![0.0; b.len()]).collect();
        assert_eq!(class_loss_direct(&cfg, &sp, &idx, &h, gain, Some((&mut gw2, &mut gb2, &some))), Some(got));
        for l in 0..2 {
            let c = sp.channels[l];
            for r in 0..2 * no {
                let want = if some[r] { gb[l][r] } else { 0.0 };
                assert_eq!((gb2[l][r], &gw2[l][r * c..(r + 1) * c]), (want, &(if some[r] { gw[l][r * c..(r + 1) * c].to_vec() } else { vec![0.0; c] })[..]));
            }
        }
    }
}
