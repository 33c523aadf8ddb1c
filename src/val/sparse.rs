//! Sparse validation for class-only training: the starting head and the val
//! split's dense entries in, once (`SparseVal::build`); then per epoch a head
//! whose box and objectness rows are the starting head's in, the same
//! `ValReport` as `validate_items` out (`SparseVal::validate`).
//!
//! val.py keeps a row when obj > conf_thres (and then each class with
//! obj·cls > conf_thres). With the box and objectness rows frozen, every
//! box, every objectness and so the set of candidate rows never change: they
//! are decoded once (`Head::decode_above`, the dense path's own code) with
//! the feature column of each candidate. An epoch recomputes only the class
//! scores of the candidates, with the same kernel and summation as the dense
//! decode, then NMS with the pairwise suppressions of the fixed boxes worked
//! out once (`fixed_nms`) and the metrics as the dense path runs them: the
//! metrics are the dense path's (a test checks them within 1e-6).

use std::time::Instant;

use anyhow::{Result, bail};
use ndarray::{Array2, s};

use crate::metrics::scale_boxes;
use rayon::prelude::*;

use super::{Accumulator, ImageResult, SkippedLabel, ValItem, ValOptions, ValReport, evaluate_image, postprocess};
use crate::cache::Entry;
use crate::features::FeatSlice;
use crate::head::{Head, sigmoid};
use crate::kernels::{Elem, conv_rows_window, dots, gather_col};
use crate::preprocess::LetterboxMeta;

/// `Head::decode_above`'s objectness tile: the same windows give the same sums.
const TILE: usize = 256;

struct Image {
    meta: LetterboxMeta,
    /// `[n, no]` decoded rows; the class columns are rewritten each epoch.
    rows: Array2<f32>,
    /// Per candidate: level, anchor, and where its column starts in `cols`.
    cand: Vec<(u8, u8, usize)>,
    cols: Vec<f32>,
    /// NMS with the candidates' fixed boxes.
    nms: super::fixed_nms::FixedNms,
    labelsn: Array2<f32>,
    targets: Array2<f32>,
    skipped_labels: Vec<SkippedLabel>,
    segments: usize,
}

pub struct SparseVal {
    images: Vec<Image>,
}

/// The candidates `(level, anchor, position)` of `decode_above` on one
/// level, in its row order (anchor, then position), with their columns.
fn candidates<T: Elem>(head: &Head, li: usize, x: &[T], sp: usize, min_obj: f64, out: &mut Vec<(u8, u8, usize)>, cols: &mut Vec<f32>) {
    let (na, no) = (head.na(), head.no());
    let cin = x.len() / sp;
    let z_lo = if min_obj > 0.0 && min_obj < 1.0 { (min_obj / (1.0 - min_obj)).ln() as f32 - 1e-3 } else { f32::NEG_INFINITY };
    let w = &head.weights[li];
    let wobj: Vec<&[f32]> = (0..na).map(|a| w.row(a * no + 4).to_slice().unwrap()).collect();
    let bobj: Vec<f32> = (0..na).map(|a| head.biases[li][a * no + 4]).collect();
    let mut found: Vec<Vec<usize>> = vec![Vec::new(); na];
    let mut obj = vec![0f32; na * TILE];
    for s0 in (0..sp).step_by(TILE) {
        let len = TILE.min(sp - s0);
        let obj = &mut obj[..na * len];
        conv_rows_window(&wobj, &bobj, x, sp, s0..s0 + len, obj);
        for (a, f) in found.iter_mut().enumerate() {
            for i in 0..len {
                let z = obj[a * len + i];
                if z > z_lo && (sigmoid(z) as f64) > min_obj {
                    f.push(s0 + i);
                }
            }
        }
    }
    let mut col = vec![0f32; cin];
    for (a, f) in found.iter().enumerate() {
        for &p in f {
            gather_col(x, sp, p, &mut col);
            out.push((li as u8, a as u8, cols.len()));
            cols.extend_from_slice(&col);
        }
    }
}

fn build_image(head: &Head, it: &ValItem, opts: &ValOptions) -> Result<Image> {
    let e = Entry::open_verified_before(&it.entry)?;
    let n = e.header.shapes.len();
    let hw = |i: usize| (e.header.shapes[i][1], e.header.shapes[i][2]);
    let (mut cand, mut cols) = (Vec::new(), Vec::new());
    let q8: Vec<Vec<f32>> = (0..n).map(|i| if let q @ FeatSlice::Q8(_) = e.level_raw(i) { q.to_f32_vec() } else { Vec::new() }).collect();
    let (mut halves, mut floats) = (Vec::new(), Vec::new());
    for i in 0..n {
        let sp = hw(i).0 * hw(i).1;
        match e.level_raw(i) {
            FeatSlice::Q8(_) => {
                candidates(head, i, &q8[i][..], sp, opts.conf_thres, &mut cand, &mut cols);
                floats.push((&q8[i][..], hw(i).0, hw(i).1));
            }
            FeatSlice::F16(x) => {
                candidates(head, i, x, sp, opts.conf_thres, &mut cand, &mut cols);
                halves.push((x, hw(i).0, hw(i).1));
            }
            FeatSlice::F32(x) => {
                candidates(head, i, x, sp, opts.conf_thres, &mut cand, &mut cols);
                floats.push((x, hw(i).0, hw(i).1));
            }
        }
    }
    let rows = if halves.is_empty() { head.decode_above(&floats, opts.conf_thres) } else { head.decode_above(&halves, opts.conf_thres) };
    if rows.nrows() != cand.len() {
        bail!("sparse validation found {} candidates in {} where the decode found {}; validate with --dense", cand.len(), it.image.display(), rows.nrows());
    }
    let r = evaluate_image(rows.view(), &e.header.letterbox, &it.image, head.nc, opts)?;
    let nms = super::fixed_nms::FixedNms::build(rows.view(), head.nc, opts.iou_thres);
    Ok(Image { meta: e.header.letterbox, nms, rows, cand, cols, labelsn: r.labelsn, targets: r.targets, skipped_labels: r.skipped_labels, segments: r.segments })
}

impl SparseVal {
    /// The candidates of `items` under `head`'s box and objectness rows.
    pub fn build(head: &Head, items: &[ValItem], opts: &ValOptions) -> Result<SparseVal> {
        let images = items.par_iter().map(|it| build_image(head, it, opts)).collect::<Result<_>>()?;
        Ok(SparseVal { images })
    }

    /// Candidate rows over all images.
    pub fn candidates(&self) -> usize {
        self.images.iter().map(|i| i.cand.len()).sum()
    }

    /// Bytes held for the candidates: their f32 columns and decoded rows.
    pub fn bytes(&self) -> usize {
        self.images.iter().map(|i| (i.cols.len() + i.rows.len()) * 4 + i.cand.len() * std::mem::size_of::<(u8, u8, usize)>() + i.nms.bytes()).sum()
    }

    /// The letterboxed targets `[m, 5]` of each image, in order.
    pub fn targets(&self) -> impl Iterator<Item = &Array2<f32>> {
        self.images.iter().map(|i| &i.targets)
    }

    /// `head` on the split: its class rows, the starting head's boxes and
    /// objectness. No losses (the trainer's come from `train::sparse`).
    pub fn validate(&self, head: &Head, opts: &ValOptions) -> ValReport {
        let start = Instant::now();
        let no = head.no();
        let results: Vec<ImageResult> = self
            .images
            .par_iter()
            .map(|im| {
                let mut pred = im.rows.clone();
                let mut out = vec![0f32; head.nc];
                for (r, &(l, a, at)) in im.cand.iter().enumerate() {
                    let (l, a) = (l as usize, a as usize);
                    let w = &head.weights[l];
                    let rows: Vec<&[f32]> = (a * no + 5..(a + 1) * no).map(|k| w.row(k).to_slice().unwrap()).collect();
                    let cin = w.ncols();
                    dots(&rows, &im.cols[at..at + cin], &mut out);
                    for (j, o) in out.iter().enumerate() {
                        pred[[r, 5 + j]] = sigmoid(o + head.biases[l][a * no + 5 + j]);
                    }
                }
                let predn = match im.nms.run(pred.view(), opts.conf_thres, opts.max_det) {
                    Some(mut det) => {
                        let lb = &im.meta;
                        scale_boxes([lb.imgsz, lb.imgsz], det.slice_mut(s![.., ..4]), lb.shape0, Some(super::ratio_pad(lb)));
                        det
                    }
                    None => postprocess(pred.view(), &im.meta, opts.conf_thres, opts.iou_thres, true, opts.max_det),
                };
                ImageResult { predn, labelsn: im.labelsn.clone(), targets: im.targets.clone(), skipped_labels: im.skipped_labels.clone(), segments: im.segments }
            })
            .collect();
        let mut acc = Accumulator::new(head);
        for r in results {
            acc.add(r, None);
        }
        acc.finish(head, None, start)
    }
}
