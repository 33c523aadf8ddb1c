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
//!
//! What an epoch does not redo: the candidates' columns are kept as the
//! entry stores them (f16 stays f16: half the bytes to stream, the same f32
//! after the exact conversion), each candidate's box in original pixels is
//! scaled once (scale_boxes works box by box), and NMS sorts only the prefix
//! of the score order it walks. With `FREEZESPLIT_PROFILE=1` each call
//! prints where its time went.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use half::f16;
use ndarray::{Array2, s};
use rayon::prelude::*;

use super::fixed_nms::FixedNms;
use super::{SkippedLabel, ValItem, ValOptions, ValReport, evaluate_image, postprocess};
use crate::cache::Entry;
use crate::features::FeatSlice;
use crate::head::{Head, sigmoid};
use crate::kernels::{Elem, conv_rows_window, dots};
use crate::metrics::nms::MAX_NMS;
use crate::metrics::{ValStats, scale_boxes};
use crate::preprocess::LetterboxMeta;

/// `Head::decode_above`'s objectness tile: the same windows give the same sums.
const TILE: usize = 256;

/// The candidates' feature columns, in the entry's element type.
enum Cols {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

struct Image {
    meta: LetterboxMeta,
    /// `[n, 5 + nc]` decoded rows of the starting head: xywh and objectness
    /// are every epoch's; the class columns only serve the fallback's copy.
    rows: Array2<f32>,
    /// Per candidate: level, anchor, and where its column starts in `cols`.
    cand: Vec<(u8, u8, usize)>,
    cols: Cols,
    /// Each candidate's xyxy box in original pixels (scale_boxes, once).
    boxes0: Vec<[f32; 4]>,
    /// Per candidate, a class logit at or below which obj·sigmoid cannot
    /// pass the build's conf_thres (`class_logit_floor`).
    z_lo: Vec<f32>,
    /// The conf_thres `z_lo` is for.
    conf_thres: f64,
    /// NMS with the candidates' fixed boxes.
    nms: FixedNms,
    labelsn: Array2<f32>,
    targets: Array2<f32>,
    skipped_labels: Vec<SkippedLabel>,
    segments: usize,
}

pub struct SparseVal {
    images: Vec<Image>,
    nc: usize,
}

/// The candidates `(level, anchor, position)` of `decode_above` on one
/// level, in its row order (anchor, then position), with their columns.
fn candidates<T: Elem>(head: &Head, li: usize, x: &[T], sp: usize, min_obj: f64, out: &mut Vec<(u8, u8, usize)>, cols: &mut Vec<T>) {
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
    for (a, f) in found.iter().enumerate() {
        for &p in f {
            out.push((li as u8, a as u8, cols.len()));
            cols.extend((0..cin).map(|c| x[c * sp + p]));
        }
    }
}

fn build_image(head: &Head, it: &ValItem, opts: &ValOptions) -> Result<Image> {
    let e = Entry::open_verified_before(&it.entry)?;
    let n = e.header.shapes.len();
    let hw = |i: usize| (e.header.shapes[i][1], e.header.shapes[i][2]);
    let mut cand = Vec::new();
    let (mut c16, mut c32) = (Vec::new(), Vec::new());
    // q8 levels are read dequantised, as f32 ones
    let q8 = super::dequantised_q8_levels(&e);
    let (mut halves, mut floats) = (Vec::new(), Vec::new());
    for i in 0..n {
        let sp = hw(i).0 * hw(i).1;
        match e.level_raw(i) {
            FeatSlice::Q8(_) => {
                candidates(head, i, &q8[i][..], sp, opts.conf_thres, &mut cand, &mut c32);
                floats.push((&q8[i][..], hw(i).0, hw(i).1));
            }
            FeatSlice::F16(x) => {
                candidates(head, i, x, sp, opts.conf_thres, &mut cand, &mut c16);
                halves.push((x, hw(i).0, hw(i).1));
            }
            FeatSlice::F32(x) => {
                candidates(head, i, x, sp, opts.conf_thres, &mut cand, &mut c32);
                floats.push((x, hw(i).0, hw(i).1));
            }
        }
    }
    if !halves.is_empty() && !floats.is_empty() {
        bail!("the cache entry of {} mixes f16 and f32 levels; delete it (or the cache directory) to rebuild it", it.image.display());
    }
    let (rows, cols) = if halves.is_empty() { (head.decode_above(&floats, opts.conf_thres), Cols::F32(c32)) } else { (head.decode_above(&halves, opts.conf_thres), Cols::F16(c16)) };
    if rows.nrows() != cand.len() {
        bail!("sparse validation found {} candidates in {} where the decode found {}; validate with --dense", cand.len(), it.image.display(), rows.nrows());
    }
    let r = evaluate_image(rows.view(), &e.header.letterbox, &it.image, head.nc, opts)?;
    let nms = FixedNms::build(rows.view(), head.nc, opts.iou_thres);
    let lb = e.header.letterbox;
    let mut b = Array2::from_shape_fn((rows.nrows(), 4), |(i, k)| nms.boxes()[i][k]);
    scale_boxes([lb.imgsz, lb.imgsz], b.view_mut(), lb.shape0, Some(super::ratio_pad(&lb)));
    let boxes0 = b.rows().into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect();
    let z_lo = rows.column(4).iter().map(|&obj| class_logit_floor(obj, opts.conf_thres)).collect();
    Ok(Image { meta: lb, nms, rows, cand, cols, boxes0, z_lo, conf_thres: opts.conf_thres, labelsn: r.labelsn, targets: r.targets, skipped_labels: r.skipped_labels, segments: r.segments })
}

/// A logit `lo` such that no class logit `z <= lo` gives `sigmoid(z) · obj
/// > conf_thres` in f32: `logit(q)`, q = conf_thres / obj, less 1e-3, which
/// lowers the sigmoid by the factor 1 − (1 − q)·1e-3 ≤ 1 − 1e-5, twenty
/// times the f32 rounding of the sigmoid and the product; no floor (−∞)
/// where obj is within 1% of the threshold, where that would not hold.
fn class_logit_floor(obj: f32, conf_thres: f64) -> f32 {
    let q = conf_thres / obj as f64;
    if !(q > 0.0 && q < 0.99) {
        return f32::NEG_INFINITY;
    }
    ((q / (1.0 - q)).ln() - 1e-3) as f32
}

/// Per-call CPU time by part (nanoseconds summed over the threads) and
/// counts. CPU, not wall: on a loaded machine a thread's wall time holds
/// the time it waited for a core.
#[derive(Default)]
struct Profile {
    scores: AtomicU64,
    nms: AtomicU64,
    stats: AtomicU64,
    keys: AtomicUsize,
    kept: AtomicUsize,
    fallbacks: AtomicUsize,
}

impl Profile {
    fn add(at: &AtomicU64, since: u64) {
        at.fetch_add(cpu_ns(CpuClock::Thread).saturating_sub(since), Ordering::Relaxed);
    }
    fn ms(at: &AtomicU64) -> f64 {
        at.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[derive(Clone, Copy)]
enum CpuClock {
    Thread,
    Process,
}

/// CPU nanoseconds of the calling thread or of the process (0 where the
/// platform has no such clock: the profile then reads 0).
fn cpu_ns(clock: CpuClock) -> u64 {
    #[cfg(unix)]
    {
        let id = match clock {
            CpuClock::Thread => libc::CLOCK_THREAD_CPUTIME_ID,
            CpuClock::Process => libc::CLOCK_PROCESS_CPUTIME_ID,
        };
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: ts is a valid timespec to write into.
        if unsafe { libc::clock_gettime(id, &mut ts) } == 0 {
            return ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        }
    }
    let _ = clock;
    0
}

/// The class rows and biases of each level and anchor of `head`: rows
/// `a·no + 5 ..` of a level's `[na·no, cin]` weights are one contiguous
/// `[nc, cin]` block, which `class_dots` reads as it lies.
struct ClassRows<'a> {
    rows: Vec<Vec<&'a [f32]>>,
    bias: Vec<Vec<&'a [f32]>>,
}

impl<'a> ClassRows<'a> {
    fn of(head: &'a Head) -> ClassRows<'a> {
        let (na, no, nc) = (head.na(), head.no(), head.nc);
        let rows = head
            .weights
            .iter()
            .map(|w| {
                let (cin, flat) = (w.ncols(), w.as_slice().expect("a head in standard layout"));
                (0..na).map(|a| &flat[(a * no + 5) * cin..(a * no + 5 + nc) * cin]).collect()
            })
            .collect();
        let bias = head.biases.iter().map(|b| (0..na).map(|a| &b.as_slice().unwrap()[a * no + 5..(a + 1) * no]).collect()).collect();
        ClassRows { rows, bias }
    }
}

/// `out[j] = Σ_i w[j·n + i] · x[i]` for the `out.len()` rows of `w`, each
/// sum bit for bit `kernels::dots`' (the dense decode's): the same two
/// 8-lane FMA chains per row over 16 elements at a time, the same lane sum
/// and tail. Only the rows share their pass over `x` (up to six at once,
/// twelve accumulators) where `dots` makes one pass per four rows: with
/// vehicles' 5 classes that was two passes per candidate, and the column
/// is converted from f16 once per pass.
fn class_dots(w: &[f32], x: &[f16], out: &mut [f32]) {
    let n = x.len();
    assert_eq!(w.len(), out.len() * n);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let mut j = 0;
        while j < out.len() {
            let k = (out.len() - j).min(6);
            let (wj, oj) = (&w[j * n..(j + k) * n], &mut out[j..j + k]);
            // SAFETY: AVX2/FMA/F16C present; wj holds k rows of x's length.
            unsafe {
                match k {
                    1 => class_dots_k::<1>(wj, x, oj),
                    2 => class_dots_k::<2>(wj, x, oj),
                    3 => class_dots_k::<3>(wj, x, oj),
                    4 => class_dots_k::<4>(wj, x, oj),
                    5 => class_dots_k::<5>(wj, x, oj),
                    _ => class_dots_k::<6>(wj, x, oj),
                }
            }
            j += k;
        }
        return;
    }
    let rows: Vec<&[f32]> = w.chunks_exact(n.max(1)).take(out.len()).collect();
    if n == 0 {
        out.fill(0.0);
        return;
    }
    dots(&rows, x, out);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
}

/// K rows of `class_dots`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn class_dots_k<const K: usize>(w: &[f32], x: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let (px, pw) = (x.as_ptr(), w.as_ptr());
    let mut i = 0;
    // SAFETY: i + 16 <= n for every load; w holds K rows of n floats.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; K];
        while i + 16 <= n {
            let x0 = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
            let x1 = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i + 8) as *const __m128i));
            for (j, a) in acc.iter_mut().enumerate() {
                let pg = pw.add(j * n);
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pg.add(i)), x0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(pg.add(i + 8)), x1, a[1]);
            }
            i += 16;
        }
        for (j, a) in acc.iter().enumerate() {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a[0], a[1]));
            // kernels::dots' hsum and tail, in its order
            let hs: f32 = lanes.iter().sum();
            out[j] = hs + w[j * n + i..(j + 1) * n].iter().zip(&x[i..]).map(|(a, b)| a * b.to_f32()).sum::<f32>();
        }
    }
}

impl Image {
    /// Candidate `r`'s class logits into `out`, as decode_above computes
    /// them: the dot kernel's sums (`class_dots`; its f16 loads convert
    /// exactly, as the decode's gather does), then the bias.
    fn logits(&self, cr: &ClassRows, r: usize, out: &mut [f32]) {
        let (l, a, at) = self.cand[r];
        let g = cr.rows[l as usize][a as usize];
        let cin = g.len() / out.len().max(1);
        match &self.cols {
            Cols::F32(c) => dots(&g.chunks_exact(cin.max(1)).collect::<Vec<_>>(), &c[at..at + cin], out),
            Cols::F16(c) => class_dots(g, &c[at..at + cin], out),
        }
        for (o, b) in out.iter_mut().zip(cr.bias[l as usize][a as usize]) {
            *o += b;
        }
    }

    /// This image's detections `[n, 6]` in original pixels under the class
    /// rows `cr`: non_max_suppression's, by `FixedNms` where it applies.
    fn detections(&self, cr: &ClassRows, nc: usize, opts: &ValOptions, prof: &Profile) -> Array2<f32> {
        let t = cpu_ns(CpuClock::Thread);
        let conf_t = opts.conf_thres as f32;
        let z_lo = |r: usize| if opts.conf_thres == self.conf_thres { self.z_lo[r] } else { f32::NEG_INFINITY };
        let mut z = vec![0f32; nc];
        let mut keys: Vec<u64> = Vec::with_capacity(self.cand.len() * nc);
        for r in 0..self.cand.len() {
            // non_max_suppression's filters, in its f32 arithmetic
            let obj = self.rows[[r, 4]];
            if !(obj > conf_t) {
                continue;
            }
            self.logits(cr, r, &mut z);
            let lo = z_lo(r);
            for (j, &zj) in z.iter().enumerate() {
                // below lo the sigmoid cannot pass: most pairs end here
                if zj <= lo {
                    continue;
                }
                let conf = sigmoid(zj) * obj;
                if conf > conf_t {
                    keys.push(FixedNms::key(conf, r, j, nc));
                }
            }
        }
        Profile::add(&prof.scores, t);
        let t = cpu_ns(CpuClock::Thread);
        prof.keys.fetch_add(keys.len(), Ordering::Relaxed);
        let det = if self.nms.separable() && keys.len() <= MAX_NMS {
            let kept = self.nms.keep(&mut keys, opts.max_det);
            prof.kept.fetch_add(kept.len(), Ordering::Relaxed);
            let mut det = Vec::with_capacity(kept.len() * 6);
            for &(conf, r, c) in &kept {
                let b = self.boxes0[r];
                det.extend_from_slice(&[b[0], b[1], b[2], b[3], conf, c as f32]);
            }
            Array2::from_shape_vec((kept.len(), 6), det).expect("6 values a detection")
        } else {
            prof.fallbacks.fetch_add(1, Ordering::Relaxed);
            let mut pred = self.rows.clone();
            for r in 0..self.cand.len() {
                self.logits(cr, r, &mut z);
                pred.slice_mut(s![r, 5..]).iter_mut().zip(&z).for_each(|(p, &v)| *p = sigmoid(v));
            }
            postprocess(pred.view(), &self.meta, opts.conf_thres, opts.iou_thres, true, opts.max_det)
        };
        Profile::add(&prof.nms, t);
        det
    }
}

impl SparseVal {
    /// The candidates of `items` under `head`'s box and objectness rows;
    /// `head`'s classes are the ones `validate` scores (and the labels'
    /// class ids index them).
    pub fn build(head: &Head, items: &[ValItem], opts: &ValOptions) -> Result<SparseVal> {
        let images = items.par_iter().map(|it| build_image(head, it, opts)).collect::<Result<_>>()?;
        Ok(SparseVal { images, nc: head.nc })
    }

    /// Candidate rows over all images.
    pub fn candidates(&self) -> usize {
        self.images.iter().map(|i| i.cand.len()).sum()
    }

    /// Bytes held for the candidates: their columns, decoded rows, boxes and
    /// suppression lists.
    pub fn bytes(&self) -> usize {
        let cols = |c: &Cols| match c {
            Cols::F16(v) => v.len() * 2,
            Cols::F32(v) => v.len() * 4,
        };
        self.images.iter().map(|i| cols(&i.cols) + i.rows.len() * 4 + i.boxes0.len() * 16 + i.cand.len() * std::mem::size_of::<(u8, u8, usize)>() + i.nms.bytes()).sum()
    }

    /// The letterboxed targets `[m, 5]` of each image, in order.
    pub fn targets(&self) -> impl Iterator<Item = &Array2<f32>> {
        self.images.iter().map(|i| &i.targets)
    }

    /// `head` on the split: its class rows, the starting head's boxes and
    /// objectness. No losses (the trainer's come from `train::sparse`).
    /// `head` has the classes `build` was given, in the same order.
    pub fn validate(&self, head: &Head, opts: &ValOptions) -> ValReport {
        assert_eq!(head.nc, self.nc, "sparse validation was built for {} classes", self.nc);
        let start = Instant::now();
        let cpu0 = cpu_ns(CpuClock::Process);
        let prof = Profile::default();
        let cr = ClassRows::of(head);
        // each image's detections and its share of the stats on its thread;
        // merged in image order, they are what sequential updates give
        let per: Vec<ValStats> = self
            .images
            .par_iter()
            .map(|im| {
                let predn = im.detections(&cr, head.nc, opts, &prof);
                let t = cpu_ns(CpuClock::Thread);
                let mut s = ValStats::new(head.nc);
                s.update(predn.view(), im.labelsn.view());
                Profile::add(&prof.stats, t);
                s
            })
            .collect();
        let per_image = start.elapsed();
        let mut stats = ValStats::new(head.nc);
        for s in per {
            stats.merge(s);
        }
        let t = cpu_ns(CpuClock::Thread);
        let report = ValReport {
            names: head.names.clone(),
            summary: stats.finish(),
            losses: None,
            skipped_images: Vec::new(),
            skipped_labels: self.images.iter().flat_map(|i| i.skipped_labels.iter().cloned()).collect(),
            segments: self.images.iter().map(|i| i.segments).sum(),
            seconds: start.elapsed().as_secs_f64(),
            groups: None,
        };
        if crate::autograd::profile::enabled() {
            eprintln!(
                "sparse val: {:.1} ms wall, {:.1} ms CPU = per image ({:.1} ms wall) class scores {:.1} + NMS {:.1} + stats.update {:.1} ms CPU over the threads ({} keys, {} kept, {} fallbacks) + finish (AP) {:.1} ms CPU",
                start.elapsed().as_secs_f64() * 1e3,
                cpu_ns(CpuClock::Process).saturating_sub(cpu0) as f64 / 1e6,
                per_image.as_secs_f64() * 1e3,
                Profile::ms(&prof.scores),
                Profile::ms(&prof.nms),
                Profile::ms(&prof.stats),
                prof.keys.load(Ordering::Relaxed),
                prof.kept.load(Ordering::Relaxed),
                prof.fallbacks.load(Ordering::Relaxed),
                cpu_ns(CpuClock::Thread).saturating_sub(t) as f64 / 1e6
            );
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn class_dots_are_the_dot_kernels_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in [0, 5, 16, 24, 64, 130, 256] {
            for rows in [1, 3, 4, 5, 6, 7, 13, 81] {
                let w: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let x: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.random_range(-4.0..4.0))).collect();
                let mut got = vec![f32::NAN; rows];
                class_dots(&w, &x, &mut got);
                // the dense decode: f32 columns through kernels::dots
                let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                let g: Vec<&[f32]> = (0..rows).map(|j| &w[j * n..(j + 1) * n]).collect();
                let mut want = vec![0f32; rows];
                dots(&g, &x32, &mut want);
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "n {n} rows {rows}");
            }
        }
    }
}
