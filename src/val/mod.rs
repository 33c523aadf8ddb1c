//! Validation, as YOLOv5 v7.0 val.py computes it.
//!
//! In: a head, the cached frozen features of a split (fast path) or decoded
//! outputs of a complete model (full path, `full.rs`), and the split's labels.
//! Out: a `ValReport`: P, R, mAP50, mAP50-95, the per-class table, confusion
//! matrix, class-agnostic mAP50, matched-box class accuracy and the three val
//! losses.
//!
//! Per image: `Head::decode` on the cached levels → non_max_suppression
//! (multi-label) → scale_boxes to the original image with the entry's
//! letterbox gain and pad → `ValStats::update` with the labels. The labels take
//! val.py's route: normalised xywh → letterboxed pixels, clipped (the
//! dataloader's `xyxy2xywhn(clip=True)`), normalised by imgsz (these are the
//! loss targets), then back through xywh2xyxy + scale_boxes to original pixels.
//!
//! `validate` is the core the trainer calls each epoch; `cached_items` +
//! `validate_items` let it skip re-hashing the image files every epoch.

pub mod classes;
pub mod full;
pub mod loss;
pub mod report;
pub mod fixed_nms;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use ndarray::{Array2, ArrayView2, s};
use rayon::prelude::*;
use serde::Serialize;

use crate::cache::build::SkippedImage;
use crate::cache::{Dtype, Entry, FeatureCache, image_key};
use crate::data::{self, Dataset};
use crate::graph::Model;
use crate::head::Head;
use crate::metrics::{ValStats, ValSummary, non_max_suppression, scale_boxes, xywh2xyxy};
use crate::preprocess::LetterboxMeta;

/// val.py's defaults (`--conf-thres 0.001 --iou-thres 0.6 --max-det 300`,
/// batch 32), features read as f16.
#[derive(Debug, Clone)]
pub struct ValOptions {
    pub conf_thres: f64,
    pub iou_thres: f64,
    pub max_det: usize,
    /// Images per loss batch (val.py's dataloader batch).
    pub batch_size: usize,
    /// Which cached copy of the features to read.
    pub dtype: Dtype,
    /// Compute box/obj/cls losses (the fast path only).
    pub losses: bool,
    pub progress: bool,
    /// Print each skipped label line. Off by default: the trainer validates
    /// every epoch and has printed them once already.
    pub warn_labels: bool,
}

impl Default for ValOptions {
    fn default() -> Self {
        ValOptions { conf_thres: 0.001, iou_thres: 0.6, max_det: 300, batch_size: 32, dtype: Dtype::F16, losses: true, progress: false, warn_labels: false }
    }
}

/// A label line that was not used.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedLabel {
    pub file: PathBuf,
    /// 0: the whole file.
    pub line: usize,
    pub reason: String,
}

/// Everything one validation run measured.
#[derive(Debug, Clone)]
pub struct ValReport {
    pub names: Vec<String>,
    pub summary: ValSummary,
    /// Mean per-batch `(lbox, lobj, lcls)`; None on the full path.
    pub losses: Option<[f64; 3]>,
    pub skipped_images: Vec<SkippedImage>,
    pub skipped_labels: Vec<SkippedLabel>,
    /// Polygon labels read as their bounding boxes.
    pub segments: usize,
    pub seconds: f64,
    /// The model classes behind the report's classes, for a dataset matched
    /// by name or an extended model (old and new classes reported apart).
    pub groups: Option<classes::ClassGroups>,
}

/// An image with the path of its verified cache entry. The entry is mapped
/// only while its batch is validated: a map held across a training run dies
/// of SIGBUS when another process truncates the file; a fresh one is checked
/// against the header, as training maps its batches.
#[derive(Debug, Clone)]
pub struct ValItem {
    pub image: PathBuf,
    pub entry: PathBuf,
}

/// The entries of `images` in `cache`; images without one (unreadable, never
/// cached, or skipped by the fill as undecodable) come back as skipped.
pub fn cached_items(cache: &FeatureCache, images: &[PathBuf], dtype: Dtype) -> (Vec<ValItem>, Vec<SkippedImage>) {
    let found: Vec<std::result::Result<ValItem, SkippedImage>> = images
        .par_iter()
        .map(|p| {
            let bytes = crate::fsutil::read_regular(p).map_err(|e| SkippedImage { path: p.clone(), reason: format!("cannot read it ({e})") })?;
            let key = image_key(&bytes);
            match cache.get(&key, dtype) {
                Some(_) => Ok(ValItem { image: p.clone(), entry: cache.entry_path(&key, dtype) }),
                None => Err(SkippedImage { path: p.clone(), reason: format!("no {} features in the cache {}", dtype.name(), cache.dir.display()) }),
            }
        })
        .collect();
    let (mut items, mut skipped) = (Vec::new(), Vec::new());
    for f in found {
        match f {
            Ok(i) => items.push(i),
            Err(s) => skipped.push(s),
        }
    }
    (items, skipped)
}

/// Validates `head` on the cached features of `split`; every image must have
/// been cached already (`cache::build::fill`), else it is skipped and counted.
pub fn validate(model: &Model, head: &Head, dataset: &Dataset, split: &str, opts: &ValOptions, cache: &FeatureCache) -> Result<ValReport> {
    crate::weights::check_fits(model, head)?;
    let images = dataset.labelled_images(split)?;
    let (items, skipped) = cached_items(cache, &images, opts.dtype);
    for s in &skipped {
        eprintln!("warning: skipping {}: {}", s.path.display(), s.reason);
    }
    let mut report = validate_items(head, &items, opts)?;
    report.skipped_images.extend(skipped);
    Ok(report)
}

/// The fast path on already-opened entries, in order.
pub fn validate_items(head: &Head, items: &[ValItem], opts: &ValOptions) -> Result<ValReport> {
    let start = Instant::now();
    let mut acc = Accumulator::new(head);
    let mut loss_sum = [0f64; 3];
    let mut batches = 0usize;
    let bar = progress_bar(opts.progress, items.len(), "validating");
    for chunk in items.chunks(opts.batch_size.max(1)) {
        let entries: Vec<Arc<Entry>> = chunk.par_iter().map(|it| Entry::open_verified_before(&it.entry).map(Arc::new)).collect::<Result<_>>()?;
        for (it, e) in chunk.iter().zip(&entries) {
            check_entry(head, &it.image, e)?;
        }
        let results: Vec<Result<ImageResult>> = chunk
            .par_iter()
            .zip(&entries)
            .map(|(it, e)| {
                let pred = decode_entry(head, e, opts.conf_thres);
                evaluate_image(pred.view(), &e.header.letterbox, &it.image, head.nc, opts)
            })
            .collect();
        let results: Vec<ImageResult> = results.into_iter().collect::<Result<_>>()?;
        if opts.losses {
            let l = loss::batch_loss(head, &entries, &results.iter().map(|r| r.targets.view()).collect::<Vec<_>>())?;
            for k in 0..3 {
                loss_sum[k] += l[k] as f64;
            }
        }
        batches += 1;
        for r in results {
            acc.add(r, opts.warn_labels.then_some(&bar));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let losses = opts.losses.then(|| loss_sum.map(|v| if batches > 0 { v / batches as f64 } else { 0.0 }));
    Ok(acc.finish(head, losses, start))
}

fn check_entry(head: &Head, image: &Path, entry: &Entry) -> Result<()> {
    let shapes = &entry.header.shapes;
    let got: Vec<usize> = shapes.iter().map(|s| s[0]).collect();
    if got != head.in_channels() {
        bail!("the cached features of {} have channels {got:?}, the head reads {:?}; the cache belongs to another model", image.display(), head.in_channels());
    }
    for (l, &s) in shapes.iter().zip(&head.strides) {
        let want = entry.header.letterbox.imgsz / s as usize;
        if l[1] != want || l[2] != want {
            bail!("the cached features of {} are {}x{} at stride {s}, expected {want}x{want}", image.display(), l[1], l[2]);
        }
    }
    Ok(())
}

/// `Head::decode_above` on an entry's levels as stored (f16 stays f16).
pub fn decode_entry(head: &Head, e: &Entry, min_obj: f64) -> Array2<f32> {
    use crate::features::FeatSlice;
    let hw = |i: usize| (e.header.shapes[i][1], e.header.shapes[i][2]);
    let n = e.header.shapes.len();
    // one dtype per entry (its header's); q8 is dequantised first
    let q8 = dequantised_q8_levels(e);
    let (mut halves, mut floats) = (Vec::new(), Vec::new());
    for i in 0..n {
        match e.level_raw(i) {
            FeatSlice::F16(x) => halves.push((x, hw(i).0, hw(i).1)),
            FeatSlice::F32(x) => floats.push((x, hw(i).0, hw(i).1)),
            FeatSlice::Q8(_) => floats.push((&q8[i][..], hw(i).0, hw(i).1)),
        }
    }
    if halves.is_empty() { head.decode_above(&floats, min_obj) } else { head.decode_above(&halves, min_obj) }
}

/// One image's contribution: detections and labels in original pixels, and
/// the loss targets.
pub struct ImageResult {
    /// `[n, 6]` x1 y1 x2 y2 conf cls, original pixels.
    pub predn: Array2<f32>,
    /// `[m, 5]` cls x1 y1 x2 y2, original pixels (val.py's labelsn).
    pub labelsn: Array2<f32>,
    /// `[m, 5]` cls x y w h, letterboxed and normalised by imgsz.
    pub targets: Array2<f32>,
    pub skipped_labels: Vec<SkippedLabel>,
    pub segments: usize,
}

/// A bar on stderr over `len` images, or a hidden one (as the fill's).
pub fn progress_bar(show: bool, len: usize, msg: &'static str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = if show { ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr()) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}").unwrap().progress_chars("=> "));
    bar.set_message(msg);
    bar
}

/// NMS on one image's decoded rows, then back to original pixels.
pub fn postprocess(pred: ArrayView2<f32>, meta: &LetterboxMeta, conf_thres: f64, iou_thres: f64, multi_label: bool, max_det: usize) -> Array2<f32> {
    let mut det = non_max_suppression(pred, conf_thres, iou_thres, None, false, multi_label, max_det);
    scale_boxes([meta.imgsz, meta.imgsz], det.slice_mut(s![.., ..4]), meta.shape0, Some(ratio_pad(meta)));
    det
}

/// val.py's `shapes[si][1]`: `((h / h0, w / w0), pad)`.
/// Each q8 level of an entry dequantised to f32 (empty for other dtypes):
/// validation's decode reads q8 as f32.
pub(crate) fn dequantised_q8_levels(e: &Entry) -> Vec<Vec<f32>> {
    (0..e.header.shapes.len()).map(|i| if let q @ crate::features::FeatSlice::Q8(_) = e.level_raw(i) { q.to_f32_vec() } else { Vec::new() }).collect()
}

pub(crate) fn ratio_pad(meta: &LetterboxMeta) -> ([f64; 2], [f64; 2]) {
    let [h0, w0] = meta.shape0;
    let [h, w] = meta.resized;
    ([h as f64 / h0 as f64, w as f64 / w0 as f64], [meta.pad[0] as f64, meta.pad[1] as f64])
}

pub fn evaluate_image(pred: ArrayView2<f32>, meta: &LetterboxMeta, image: &Path, nc: usize, opts: &ValOptions) -> Result<ImageResult> {
    let predn = postprocess(pred, meta, opts.conf_thres, opts.iou_thres, true, opts.max_det);
    let lp = data::label_path(image);
    let labels = data::read_labels(&lp, nc)?;
    let skipped_labels = labels.skipped.iter().map(|(line, reason)| SkippedLabel { file: lp.clone(), line: *line, reason: reason.clone() }).collect();
    let targets = letterboxed_targets(&labels.boxes, meta);
    let labelsn = labels_in_original(targets.view(), meta);
    Ok(ImageResult { predn, labelsn, targets, skipped_labels, segments: labels.segments })
}

/// The dataloader's labels: normalised xywh of the original image →
/// letterboxed xyxy pixels (`xywhn2xyxy` with the resized size and pad) →
/// clipped to `imgsz - 1e-3` → xywh normalised by imgsz. f32 throughout, as
/// numpy computes it on float32 labels.
pub fn letterboxed_targets(boxes: &[data::Label], meta: &LetterboxMeta) -> Array2<f32> {
    let [h, w] = [meta.resized[0] as f32, meta.resized[1] as f32];
    let [padw, padh] = meta.pad;
    let s = meta.imgsz as f32;
    let lim = s - 1e-3;
    let mut t = Array2::zeros((boxes.len(), 5));
    for (i, b) in boxes.iter().enumerate() {
        let [x, y, bw, bh] = b.xywh;
        let x1 = (w * (x - bw / 2.0) + padw).clamp(0.0, lim);
        let y1 = (h * (y - bh / 2.0) + padh).clamp(0.0, lim);
        let x2 = (w * (x + bw / 2.0) + padw).clamp(0.0, lim);
        let y2 = (h * (y + bh / 2.0) + padh).clamp(0.0, lim);
        t[[i, 0]] = b.class as f32;
        t[[i, 1]] = ((x1 + x2) / 2.0) / s;
        t[[i, 2]] = ((y1 + y2) / 2.0) / s;
        t[[i, 3]] = (x2 - x1) / s;
        t[[i, 4]] = (y2 - y1) / s;
    }
    t
}

/// val.py: targets × imgsz → xywh2xyxy → scale_boxes to the original image.
fn labels_in_original(targets: ArrayView2<f32>, meta: &LetterboxMeta) -> Array2<f32> {
    let s = meta.imgsz as f32;
    let px = targets.slice(s![.., 1..5]).mapv(|v| v * s);
    let mut tbox = xywh2xyxy(px.view());
    scale_boxes([meta.imgsz, meta.imgsz], tbox.view_mut(), meta.shape0, Some(ratio_pad(meta)));
    let mut out = Array2::zeros((targets.nrows(), 5));
    out.column_mut(0).assign(&targets.column(0));
    out.slice_mut(s![.., 1..5]).assign(&tbox);
    out
}

/// ValStats plus the counts that travel with it.
pub struct Accumulator {
    stats: ValStats,
    skipped_labels: Vec<SkippedLabel>,
    segments: usize,
}

impl Accumulator {
    pub fn new(head: &Head) -> Accumulator {
        Accumulator { stats: ValStats::new(head.nc), skipped_labels: Vec::new(), segments: 0 }
    }

    /// Adds one image; with a bar, its label warnings print above it.
    pub fn add(&mut self, r: ImageResult, warn_above: Option<&indicatif::ProgressBar>) {
        if let Some(bar) = warn_above {
            for s in &r.skipped_labels {
                bar.suspend(|| eprintln!("{}", data::skip_message(&s.file, s.line, &s.reason)));
            }
        }
        self.skipped_labels.extend(r.skipped_labels);
        self.segments += r.segments;
        self.stats.update(r.predn.view(), r.labelsn.view());
    }

    pub fn finish(self, head: &Head, losses: Option<[f64; 3]>, start: Instant) -> ValReport {
        ValReport {
            names: head.names.clone(),
            summary: self.stats.finish(),
            losses,
            skipped_images: Vec::new(),
            skipped_labels: self.skipped_labels,
            segments: self.segments,
            seconds: start.elapsed().as_secs_f64(),
            groups: None,
        }
    }
}
