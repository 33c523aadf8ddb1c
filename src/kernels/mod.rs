// Dense f32 loops under the head's 1x1 convs (autograd::fused::conv1x1 and
// autograd::fused::obj_bce for training, Head::decode_above for validation), with
// AVX2/FMA versions chosen at run time; `bce` holds the objectness loss's
// elementwise loop.
// In/out: plain slices. `conv_rows`: out[j][s] = b[j] + Σ_c w[j][c]·x[c][s] for
// x [cin, S] row-major (`conv_rows_window`: over a range of positions);
// `dots`: out[j] = Σ_s g[j][s]·x[s]; `dots_lanes`: the same over a window of
// each input channel, kept as 8 partial sums; `dot`; `axpy`. The features x
// may be f32 or f16 (the cache's dtype, read without converting the whole
// batch first: half the memory traffic).
// Why here: the portable build targets baseline x86-64 (SSE2) and LLVM does not
// vectorise float reductions by itself (no reassociation); these loops are
// nearly all of a training step. The scalar versions define the results; the
// AVX2 versions differ only in summation order. They are specialised on the
// number of output rows (YOLOv5 has 3 anchors, so 3 objectness rows): with a
// run-time count the accumulators spilled to the stack.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

pub mod alloc;
pub mod bce;
pub mod conv;
pub mod elementwise;

use std::ops::Range;

use half::f16;

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
}

/// A feature element: f32, or f16 as cached.
///
/// # Safety (of the `*4` methods)
/// The CPU must have AVX2, FMA and F16C, and the slices the shapes their
/// safe wrappers (`conv_rows_window`, `dots_lanes`, `dots`) check.
#[allow(clippy::missing_safety_doc)]
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i]` as f32 (vectorised for f16).
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    /// AVX2 `conv_rows_window` for up to 4 output rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn conv_rows4(w: &[&[f32]], b: &[f32], x: &[Self], sp: usize, win: Range<usize>, out: &mut [f32]);
    /// AVX2 `dots_lanes` for up to 4 rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots_lanes4(g: &[&[f32]], x: &[Self], sp: usize, win: Range<usize>, acc: &mut [[f32; 8]]);
    /// AVX2 `dots` for up to 4 rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots4(g: &[&[f32]], x: &[Self], out: &mut [f32]);
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f32_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn conv_rows4(w: &[&[f32]], b: &[f32], x: &[f32], sp: usize, win: Range<usize>, out: &mut [f32]) {
        // SAFETY: the caller checked the CPU features and the shapes.
        unsafe { conv_rows4_f32(w, b, x, sp, win, out) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots_lanes4(g: &[&[f32]], x: &[f32], sp: usize, win: Range<usize>, acc: &mut [[f32; 8]]) {
        // SAFETY: as for conv_rows4.
        unsafe { dots_lanes4_f32(g, x, sp, win, acc) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots4(g: &[&[f32]], x: &[f32], out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { dots4_f32(g, x, out) }
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn to_f32_slice(src: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn conv_rows4(w: &[&[f32]], b: &[f32], x: &[f16], sp: usize, win: Range<usize>, out: &mut [f32]) {
        // SAFETY: as for f32.
        unsafe { conv_rows4_f16(w, b, x, sp, win, out) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots_lanes4(g: &[&[f32]], x: &[f16], sp: usize, win: Range<usize>, acc: &mut [[f32; 8]]) {
        // SAFETY: as for conv_rows4.
        unsafe { dots_lanes4_f16(g, x, sp, win, acc) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots4(g: &[&[f32]], x: &[f16], out: &mut [f32]) {
        // SAFETY: as for f32.
        unsafe { dots4_f16(g, x, out) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f32(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 8 readable floats.
    unsafe { _mm256_loadu_ps(p) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f16(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable halves.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; lengths are equal.
        return unsafe { dot_avx2(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as in `dot`.
        return unsafe { axpy_avx2(y, a, x) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `out[j] = Σ_s g[j][s] · x[s]` for every row `g[j]` (each as long as `x`):
/// one pass over `x` serves all rows.
pub fn dots<T: Elem>(g: &[&[f32]], x: &[T], out: &mut [f32]) {
    assert!(g.len() == out.len() && g.iter().all(|r| r.len() == x.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        for (gc, oc) in g.chunks(4).zip(out.chunks_mut(4)) {
            // SAFETY: AVX2/FMA/F16C present; every row has x's length.
            unsafe { T::dots4(gc, x, oc) };
        }
        return;
    }
    for (r, o) in g.iter().zip(out) {
        *o = r.iter().zip(x).map(|(a, b)| a * b.to_f32()).sum();
    }
}

/// `col[c] = x[c*S + p]` as f32: one position's input channels, as a conv's
/// outputs at a single position need them (f16 converted eight at a time).
pub fn gather_col<T: Elem>(x: &[T], sp: usize, p: usize, col: &mut [f32]) {
    assert!(col.len() * sp <= x.len() && p < sp);
    let mut raw = [x[p]; 8];
    for (i, out) in col.chunks_mut(8).enumerate() {
        let raw = &mut raw[..out.len()];
        for (k, r) in raw.iter_mut().enumerate() {
            *r = x[(i * 8 + k) * sp + p];
        }
        T::to_f32_slice(raw, out);
    }
}

/// `out[j*S + s] = b[j] + Σ_c w[j][c] · x[c*S + s]`: output rows of a 1x1
/// conv on one image's features `x` [cin, S].
pub fn conv_rows<T: Elem>(w: &[&[f32]], b: &[f32], x: &[T], sp: usize, out: &mut [f32]) {
    conv_rows_window(w, b, x, sp, 0..sp, out)
}

/// `conv_rows` on the positions `win` only: `out[j*len + i] = b[j] + Σ_c
/// w[j][c] · x[c*S + win.start + i]`, `len = win.len()`.
pub fn conv_rows_window<T: Elem>(w: &[&[f32]], b: &[f32], x: &[T], sp: usize, win: Range<usize>, out: &mut [f32]) {
    let cin = x.len() / sp;
    let len = win.len();
    assert!(w.len() == b.len() && out.len() == w.len() * len && x.len() == cin * sp && win.end <= sp && w.iter().all(|r| r.len() == cin));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        for ((wc, bc), oc) in w.chunks(4).zip(b.chunks(4)).zip(out.chunks_mut(4 * len)) {
            // SAFETY: AVX2/FMA/F16C present; shapes checked above.
            unsafe { T::conv_rows4(wc, bc, x, sp, win.clone(), oc) };
        }
        return;
    }
    for ((wj, bj), oj) in w.iter().zip(b).zip(out.chunks_exact_mut(len)) {
        oj.fill(*bj);
        for (c, xr) in x.chunks_exact(sp).enumerate() {
            for (o, xv) in oj.iter_mut().zip(&xr[win.clone()]) {
                *o += wj[c] * xv.to_f32();
            }
        }
    }
}

/// `acc[j*cin + c][l] += Σ_{i ≡ l (mod 8)} g[j][i] · x[c*S + win.start + i]`:
/// the weight gradient of a 1x1 conv over a window of positions, kept as 8
/// partial sums per weight so that a loop over windows never reduces
/// horizontally (sum the lanes once at the end).
pub fn dots_lanes<T: Elem>(g: &[&[f32]], x: &[T], sp: usize, win: Range<usize>, acc: &mut [[f32; 8]]) {
    let cin = x.len() / sp;
    let len = win.len();
    assert!(g.iter().all(|r| r.len() == len) && acc.len() == g.len() * cin && x.len() == cin * sp && win.end <= sp);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        for (gc, ac) in g.chunks(4).zip(acc.chunks_mut(4 * cin)) {
            // SAFETY: AVX2/FMA/F16C present; shapes checked above.
            unsafe { T::dots_lanes4(gc, x, sp, win.clone(), ac) };
        }
        return;
    }
    for (j, gj) in g.iter().enumerate() {
        for (c, xr) in x.chunks_exact(sp).enumerate() {
            let a = &mut acc[j * cin + c];
            for (i, (gv, xv)) in gj.iter().zip(&xr[win.clone()]).enumerate() {
                a[i % 8] += gv * xv.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let mut lanes = [0.0f32; 8];
    // SAFETY: lanes holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY (all loads): i + 8 <= n for every 8-wide load.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * k)), _mm256_loadu_ps(pb.add(i + 8 * k)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(s) + a[i..].iter().zip(&b[i..]).map(|(x, y)| x * y).sum::<f32>()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len();
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: i + 8 <= n for every 8-wide load and store.
    unsafe {
        let va = _mm256_set1_ps(a);
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
    }
    for (y, x) in y[i..].iter_mut().zip(&x[i..]) {
        *y += a * x;
    }
}

#[cfg(target_arch = "x86_64")]
const PREFETCH_TILES: usize = 4;

macro_rules! avx2_kernels {
    ($t:ty, $load:ident, $dots:ident, $conv:ident, $convk:ident, $convstep:ident, $lanes:ident, $lanesk:ident) => {
/// Up to 4 rows of `dots`, two 8-wide accumulators per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn $dots(g: &[&[f32]], x: &[$t], out: &mut [f32]) {
    let (k, n) = (g.len(), x.len());
    let px = x.as_ptr();
    let mut i = 0;
    // SAFETY: i + 16 <= n for every load; k <= 4 rows, each of length n.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        while i + 16 <= n {
            let x0 = $load(px.add(i));
            let x1 = $load(px.add(i + 8));
            for j in 0..k {
                let pg = g[j].as_ptr();
                acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(pg.add(i)), x0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(pg.add(i + 8)), x1, acc[j][1]);
            }
            i += 16;
        }
        for j in 0..k {
            out[j] = hsum(_mm256_add_ps(acc[j][0], acc[j][1])) + g[j][i..].iter().zip(&x[i..]).map(|(a, b)| a * b.to_f32()).sum::<f32>();
        }
    }
}

/// Up to 4 output rows of `conv_rows_window`.
/// (`$convstep` reads `len`-wide windows of rows `sp` apart starting at px.)
#[cfg(target_arch = "x86_64")]
unsafe fn $conv(w: &[&[f32]], b: &[f32], x: &[$t], sp: usize, win: Range<usize>, out: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match w.len() {
            1 => $convk::<1, 4>(w, b, x, sp, win, out),
            2 => $convk::<2, 4>(w, b, x, sp, win, out),
            3 => $convk::<3, 4>(w, b, x, sp, win, out),
            _ => $convk::<4, 2>(w, b, x, sp, win, out),
        }
    }
}

/// K output rows, 8·NV positions at a time kept in registers while the loop
/// runs over the input channels (K·NV ≤ 12 accumulators: enough independent
/// FMA chains to cover their latency, few enough not to spill).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn $convk<const K: usize, const NV: usize>(w: &[&[f32]], b: &[f32], x: &[$t], sp: usize, win: Range<usize>, out: &mut [f32]) {
    let (cin, len) = (x.len() / sp, win.len());
    let mut s = 0;
    // SAFETY: s + 8·NV <= len for every step; c < cin; K rows of out, each len long.
    unsafe {
        let px = x.as_ptr().add(win.start);
        while s + 8 * NV <= len {
            $convstep::<K, NV>(w, b, px, sp, cin, s, len, sp - win.start, out.as_mut_ptr());
            s += 8 * NV;
        }
        while s + 8 <= len {
            $convstep::<K, 1>(w, b, px, sp, cin, s, len, sp - win.start, out.as_mut_ptr());
            s += 8;
        }
    }
    for j in 0..K {
        for s in s..len {
            out[j * len + s] = b[j] + (0..cin).map(|c| w[j][c] * x[c * sp + win.start + s].to_f32()).sum::<f32>();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn $convstep<const K: usize, const NV: usize>(w: &[&[f32]], b: &[f32], px: *const $t, sp: usize, cin: usize, s: usize, len: usize, room: usize, po: *mut f32) {
    // SAFETY: the caller checked s + 8·NV <= len and the shapes.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; K];
        for j in 0..K {
            acc[j] = [_mm256_set1_ps(b[j]); NV];
        }
        for c in 0..cin {
            let row = px.add(c * sp + s);
            // 64 rows are read in step, too many streams for the hardware
            // prefetcher: ask for each row's next tiles explicitly, past the
            // window's end too (`room`: positions left in the row from px)
            if s + 8 * NV * PREFETCH_TILES < room {
                _mm_prefetch::<_MM_HINT_T0>(row.add(8 * NV * PREFETCH_TILES) as *const i8);
            }
            let mut wv = [_mm256_setzero_ps(); K];
            for j in 0..K {
                wv[j] = _mm256_set1_ps(*w[j].get_unchecked(c));
            }
            for v in 0..NV {
                let xv = $load(row.add(8 * v));
                for j in 0..K {
                    acc[j][v] = _mm256_fmadd_ps(wv[j], xv, acc[j][v]);
                }
            }
        }
        for j in 0..K {
            for v in 0..NV {
                _mm256_storeu_ps(po.add(j * len + s + 8 * v), acc[j][v]);
            }
        }
    }
}

/// Up to 4 rows of `dots_lanes`.
#[cfg(target_arch = "x86_64")]
unsafe fn $lanes(g: &[&[f32]], x: &[$t], sp: usize, win: Range<usize>, acc: &mut [[f32; 8]]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match g.len() {
            1 => $lanesk::<1>(g, x, sp, win, acc),
            2 => $lanesk::<2>(g, x, sp, win, acc),
            3 => $lanesk::<3>(g, x, sp, win, acc),
            _ => $lanesk::<4>(g, x, sp, win, acc),
        }
    }
}

/// K rows of `dots_lanes`: per input channel, the window is read once for
/// all rows, 16 positions at a time, two accumulators per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn $lanesk<const K: usize>(g: &[&[f32]], x: &[$t], sp: usize, win: Range<usize>, acc: &mut [[f32; 8]]) {
    let (cin, len) = (x.len() / sp, win.len());
    // SAFETY: i + 8 <= len for every load; c < cin; acc holds K·cin lanes.
    unsafe {
        let px = x.as_ptr().add(win.start);
        let gp: [*const f32; K] = std::array::from_fn(|j| g[j].as_ptr());
        for c in 0..cin {
            let row = px.add(c * sp);
            let mut a = [[_mm256_setzero_ps(); 2]; K];
            let mut i = 0;
            while i + 16 <= len {
                let x0 = $load(row.add(i));
                let x1 = $load(row.add(i + 8));
                for j in 0..K {
                    a[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(gp[j].add(i)), x0, a[j][0]);
                    a[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(gp[j].add(i + 8)), x1, a[j][1]);
                }
                i += 16;
            }
            if i + 8 <= len {
                let x0 = $load(row.add(i));
                for j in 0..K {
                    a[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(gp[j].add(i)), x0, a[j][0]);
                }
                i += 8;
            }
            for j in 0..K {
                let dst = acc.get_unchecked_mut(j * cin + c);
                _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_add_ps(_mm256_loadu_ps(dst.as_ptr()), _mm256_add_ps(a[j][0], a[j][1])));
                for i in i..len {
                    dst[i % 8] += g[j][i] * x[c * sp + win.start + i].to_f32();
                }
            }
        }
    }
}
    };
}

#[cfg(target_arch = "x86_64")]
avx2_kernels!(f32, load8_f32, dots4_f32, conv_rows4_f32, conv_rows_k_f32, conv_step_f32, dots_lanes4_f32, dots_lanes_k_f32);
#[cfg(target_arch = "x86_64")]
avx2_kernels!(f16, load8_f16, dots4_f16, conv_rows4_f16, conv_rows_k_f16, conv_step_f16, dots_lanes4_f16, dots_lanes_k_f16);

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn kernels_match_plain_loops() {
        // lengths around the 8/16/32-wide steps and their remainders
        for n in [1usize, 7, 8, 15, 16, 17, 33, 100] {
            let (a, b) = (vals(n, 1), vals(n, 2));
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-4);
            let mut y = vals(n, 3);
            let want_y: Vec<f32> = y.iter().zip(&a).map(|(y, x)| y + 0.5 * x).collect();
            axpy(&mut y, 0.5, &a);
            assert!(y.iter().zip(&want_y).all(|(p, q)| (p - q).abs() < 1e-6));
            let rows: Vec<Vec<f32>> = (0..5).map(|j| vals(n, 10 + j)).collect();
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let mut out = vec![0.0; 5];
            dots(&refs, &a, &mut out);
            for (r, o) in rows.iter().zip(&out) {
                assert!((r.iter().zip(&a).map(|(p, q)| p * q).sum::<f32>() - o).abs() < 1e-4);
            }
        }
        let (cin, sp) = (5, 37);
        let x = vals(cin * sp, 4);
        let w: Vec<Vec<f32>> = (0..6).map(|j| vals(cin, 20 + j)).collect();
        let wr: Vec<&[f32]> = w.iter().map(|r| r.as_slice()).collect();
        let b = vals(6, 5);
        let mut out = vec![0.0; 6 * sp];
        conv_rows(&wr, &b, &x, sp, &mut out);
        for j in 0..6 {
            for s in 0..sp {
                let want = b[j] + (0..cin).map(|c| w[j][c] * x[c * sp + s]).sum::<f32>();
                assert!((out[j * sp + s] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn windowed_conv_and_lane_dots_match_plain_loops() {
        // every row count the AVX2 dispatch specialises (1..4, and 4 + 1),
        // windows with 32-, 8- and 1-wide remainders
        let (cin, sp) = (7, 100);
        let x = vals(cin * sp, 6);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        for k in 1..=5 {
            let w: Vec<Vec<f32>> = (0..k).map(|j| vals(cin, 30 + j as u32)).collect();
            let wr: Vec<&[f32]> = w.iter().map(|r| r.as_slice()).collect();
            let b = vals(k, 7);
            for win in [0..100, 3..60, 40..49, 99..100] {
                let len = win.len();
                let mut out = vec![0.0; k * len];
                conv_rows_window(&wr, &b, &x, sp, win.clone(), &mut out);
                let mut outh = vec![0.0; k * len];
                conv_rows_window(&wr, &b, &xh, sp, win.clone(), &mut outh);
                let g: Vec<Vec<f32>> = (0..k).map(|j| vals(len, 50 + j as u32)).collect();
                let gr: Vec<&[f32]> = g.iter().map(|r| r.as_slice()).collect();
                let mut acc = vec![[0.5f32; 8]; k * cin];
                dots_lanes(&gr, &x, sp, win.clone(), &mut acc);
                for j in 0..k {
                    for i in 0..len {
                        let want = b[j] + (0..cin).map(|c| w[j][c] * x[c * sp + win.start + i]).sum::<f32>();
                        assert!((out[j * len + i] - want).abs() < 1e-5);
                        let wanth = b[j] + (0..cin).map(|c| w[j][c] * xh[c * sp + win.start + i].to_f32()).sum::<f32>();
                        assert!((outh[j * len + i] - wanth).abs() < 1e-5);
                    }
                    for c in 0..cin {
                        let want: f32 = (0..len).map(|i| g[j][i] * x[c * sp + win.start + i]).sum::<f32>() + 4.0;
                        let got: f32 = acc[j * cin + c].iter().sum();
                        assert!((got - want).abs() < 1e-4, "k {k} win {win:?} j {j} c {c}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
