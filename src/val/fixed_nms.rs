//! YOLOv5's non_max_suppression (metrics::nms, multi-label) on rows whose
//! boxes never change, only their class scores: the decoded candidate rows of
//! one image in, once (`FixedNms::build`); then per epoch the rows with new
//! class scores in, the same `[n, 6]` detections as `non_max_suppression`
//! out (`FixedNms::run`), or None where that function must run itself.
//!
//! Why it is the same: with boxes of different classes kept apart by YOLOv5's
//! class offset (the separable case of metrics::nms), NMS is greedy per class
//! over the candidates in score order, and which box suppresses which depends
//! only on the IoU of their offset boxes, fixed here. So every pair's
//! decision (f32 IoU of the offset boxes > iou_thres in f64, torchvision's
//! arithmetic) is computed once per class, and an epoch only sorts by the new
//! confidences and walks the suppression lists. The walk stops at max_det
//! kept, so only the prefix it reaches is sorted (`keep`). Pairs whose boxes
//! are apart by more than the offset's rounding can suppress nothing and are
//! skipped.

use ndarray::{Array2, ArrayView2};

use crate::metrics::nms::{MAX_NMS, MAX_WH};

pub struct FixedNms {
    nc: usize,
    /// xyxy in input pixels, as non_max_suppression computes them.
    boxes: Vec<[f32; 4]>,
    /// CSR over rows: the rows each row suppresses, and for which classes.
    start: Vec<usize>,
    nbr: Vec<u32>,
    /// `words` u64 class bits per neighbour.
    mask: Vec<u64>,
    words: usize,
    /// Whether the class-separable path of metrics::nms applies to every
    /// subset of the rows (else `run` declines).
    separable: bool,
}

fn cmax(a: f32, b: f32) -> f32 {
    if a < b { b } else { a }
}
fn cmin(a: f32, b: f32) -> f32 {
    if b < a { b } else { a }
}

/// torchvision's decision for two (offset) boxes.
fn suppresses(bi: [f32; 4], bj: [f32; 4], iou_thres: f64) -> bool {
    let area = |b: [f32; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let w = cmax(0.0, cmin(bi[2], bj[2]) - cmax(bi[0], bj[0]));
    let h = cmax(0.0, cmin(bi[3], bj[3]) - cmax(bi[1], bj[1]));
    let inter = w * h;
    let ovr = inter / (area(bi) + area(bj) - inter);
    ovr as f64 > iou_thres
}

impl FixedNms {
    /// `rows` `[n, 5 + nc]` decoded (xywh, obj, scores); only xywh is read.
    pub fn build(rows: ArrayView2<f32>, nc: usize, iou_thres: f64) -> FixedNms {
        let n = rows.nrows();
        // same arithmetic as metrics::nms
        let boxes: Vec<[f32; 4]> = rows.rows().into_iter().map(|r| [r[0] - r[2] / 2.0, r[1] - r[3] / 2.0, r[0] + r[2] / 2.0, r[1] + r[3] / 2.0]).collect();
        let finite = boxes.iter().flatten().all(|v| v.is_finite());
        let span = |axis: usize| {
            let lo = boxes.iter().map(|b| b[axis]).fold(f32::INFINITY, f32::min);
            let hi = boxes.iter().map(|b| b[axis + 2]).fold(f32::NEG_INFINITY, f32::max);
            hi as f64 - lo as f64
        };
        // a subset spans no more than the whole
        let separable = finite && nc > 1 && (n == 0 || span(0) <= MAX_WH as f64 || span(1) <= MAX_WH as f64);
        let widest = if n == 0 { 0.0 } else { span(0).max(span(1)) as f32 };
        let words = nc.div_ceil(64).max(1);
        let mut out = FixedNms { nc, boxes, start: vec![0], nbr: vec![], mask: vec![], words, separable };
        if !separable {
            return out;
        }
        // the offset moves a coordinate by its rounding at most: boxes farther
        // apart than this never overlap under any class offset
        let slack = 4.0 * f32::EPSILON * (nc as f32 * MAX_WH + widest + 1.0);
        // sweep in x1 order: only boxes whose x ranges meet can overlap
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| out.boxes[a][0].total_cmp(&out.boxes[b][0]));
        let mut lists: Vec<Vec<(u32, Vec<u64>)>> = vec![Vec::new(); n];
        let mut bits = vec![0u64; words];
        for (k, &i) in order.iter().enumerate() {
            let bi = out.boxes[i];
            for &j in &order[k + 1..] {
                let bj = out.boxes[j];
                if bj[0] > bi[2] + slack {
                    break;
                }
                if bj[1] > bi[3] + slack || bi[1] > bj[3] + slack {
                    continue;
                }
                for (a, b, ba, bb) in [(i, j, bi, bj), (j, i, bj, bi)] {
                    // one buffer for every pair: a fresh one each was most of the set-up
                    bits.iter_mut().for_each(|w| *w = 0);
                    for c in 0..nc {
                        let off = c as f32 * MAX_WH;
                        let o = |b: [f32; 4]| [b[0] + off, b[1] + off, b[2] + off, b[3] + off];
                        if suppresses(o(ba), o(bb), iou_thres) {
                            bits[c / 64] |= 1 << (c % 64);
                        }
                    }
                    if bits.iter().any(|&w| w != 0) {
                        lists[a].push((b as u32, bits.clone()));
                    }
                }
            }
        }
        for l in lists {
            for (j, bits) in l {
                out.nbr.push(j);
                out.mask.extend_from_slice(&bits);
            }
            out.start.push(out.nbr.len());
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.boxes.len() * 16 + self.start.len() * 8 + self.nbr.len() * 4 + self.mask.len() * 8
    }

    /// Whether `keep` applies (else non_max_suppression has to run).
    pub fn separable(&self) -> bool {
        self.separable
    }

    /// Each row's xyxy box in input pixels, as non_max_suppression makes it.
    pub fn boxes(&self) -> &[[f32; 4]] {
        &self.boxes
    }

    /// The sort key of a candidate: confidence descending, then (row, class)
    /// ascending, as one u64 (a positive f32's bits order as its value).
    pub fn key(conf: f32, row: usize, class: usize, nc: usize) -> u64 {
        ((!conf.to_bits()) as u64) << 32 | (row * nc + class) as u64
    }

    /// The detections `(conf, row, class)` of non_max_suppression, in its
    /// order, from the candidates' keys (`key`, conf > conf_thres, at most
    /// MAX_NMS of them; `separable()` true). The keys are reordered.
    pub fn keep(&self, keys: &mut [u64], max_det: usize) -> Vec<(f32, usize, usize)> {
        let nc = self.nc;
        let mut suppressed = vec![false; self.boxes.len() * nc];
        let mut out = Vec::new();
        // greedy NMS stops at max_det kept: only a prefix of the score order is
        // ever walked, so it is sorted in growing chunks, not the whole list
        let (mut done, mut upto) = (0, (4 * max_det).max(64));
        while done < keys.len() && out.len() < max_det {
            if upto < keys.len() {
                keys[done..].select_nth_unstable(upto - done);
            } else {
                upto = keys.len();
            }
            keys[done..upto].sort_unstable();
            for &k in &keys[done..upto] {
                let (conf, idx) = (f32::from_bits(!((k >> 32) as u32)), (k & 0xffff_ffff) as usize);
                let (r, c) = (idx / nc, idx % nc);
                if suppressed[idx] {
                    continue;
                }
                out.push((conf, r, c));
                if out.len() == max_det {
                    break;
                }
                for k in self.start[r]..self.start[r + 1] {
                    if self.mask[k * self.words + c / 64] >> (c % 64) & 1 == 1 {
                        suppressed[self.nbr[k] as usize * nc + c] = true;
                    }
                }
            }
            done = upto;
            upto = upto.saturating_mul(4);
        }
        out
    }

    /// `non_max_suppression(rows, conf_thres, iou_thres, None, false, true,
    /// max_det)` for the rows `build` saw with new class scores; None where
    /// that function has to run (not separable, or over MAX_NMS candidates).
    pub fn run(&self, rows: ArrayView2<f32>, conf_thres: f64, max_det: usize) -> Option<Array2<f32>> {
        if !self.separable {
            return None;
        }
        let (nc, conf_t) = (self.nc, conf_thres as f32);
        let mut keys: Vec<u64> = Vec::new();
        for (r, row) in rows.rows().into_iter().enumerate() {
            let obj = row[4];
            if !(obj > conf_t) {
                continue;
            }
            for j in 0..nc {
                let conf = row[5 + j] * obj;
                if conf > conf_t {
                    keys.push(Self::key(conf, r, j, nc));
                }
            }
        }
        if keys.len() > MAX_NMS {
            return None;
        }
        let mut out = Vec::new();
        for (conf, r, c) in self.keep(&mut keys, max_det) {
            let b = self.boxes[r];
            out.extend_from_slice(&[b[0], b[1], b[2], b[3], conf, c as f32]);
        }
        let n = out.len() / 6;
        Some(Array2::from_shape_vec((n, 6), out).expect("6 values a detection"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::non_max_suppression;
    use rand::{Rng, SeedableRng};

    /// Clustered boxes (many overlaps near the threshold), random scores.
    fn rows(rng: &mut rand_chacha::ChaCha8Rng, n: usize, nc: usize) -> Array2<f32> {
        Array2::from_shape_fn((n, 5 + nc), |(r, k)| match k {
            0 | 1 => ((r % 7) * 90) as f32 + rng.random_range(0.0..12.0),
            2 | 3 => 20.0 + rng.random_range(0.0..10.0),
            _ => rng.random_range(0.0..1.0f32).powi(3),
        })
    }

    #[test]
    fn equals_non_max_suppression_when_only_the_scores_change() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (nc, n, max_det) in [(5, 400, 300), (80, 150, 300), (3, 300, 20), (4, 1500, 7), (2, 0, 300)] {
            let base = rows(&mut rng, n, nc);
            let nms = FixedNms::build(base.view(), nc, 0.6);
            for _ in 0..3 {
                let mut r = rows(&mut rng, n, nc);
                r.columns_mut().into_iter().take(4).zip(base.columns()).for_each(|(mut a, b)| a.assign(&b));
                let got = nms.run(r.view(), 0.001, max_det).expect("separable boxes");
                let want = non_max_suppression(r.view(), 0.001, 0.6, None, false, true, max_det);
                assert_eq!(got, want, "nc {nc} n {n}");
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do_alike() {
        let mut r = Array2::<f32>::zeros((2, 7));
        r[[0, 0]] = f32::NAN;
        assert!(FixedNms::build(r.view(), 2, 0.6).run(r.view(), 0.001, 300).is_none());
        let one = Array2::<f32>::ones((3, 6));
        assert!(FixedNms::build(one.view(), 1, 0.6).run(one.view(), 0.001, 300).is_none());
    }
}
