// Dense f32 loops under the head's 1x1 convs (autograd::conv1x1 for training,
// Head::decode_above for validation), with AVX2/FMA versions
// chosen at run time.
// In/out: plain slices. `conv_rows`: out[j][s] = b[j] + Σ_c w[j][c]·x[c][s] for
// x [cin, S] row-major; `dots`: out[j] = Σ_s g[j][s]·x[s]; `dot`; `axpy`. The
// features x may be f32 or f16 (the cache's dtype, read without converting the
// whole batch first: half the memory traffic).
// Why here: the portable build targets baseline x86-64 (SSE2) and LLVM does not
// vectorise float reductions by itself (no reassociation); these loops are
// nearly all of a training step. The scalar versions define the results; the
// AVX2 versions differ only in summation order.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
}

/// A feature element: f32, or f16 as cached.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// AVX2 `conv_rows` for up to 4 output rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn conv_rows4(w: &[&[f32]], b: &[f32], x: &[Self], sp: usize, out: &mut [f32]);
    /// AVX2 `dots` for up to 4 rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots4(g: &[&[f32]], x: &[Self], out: &mut [f32]);
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn conv_rows4(w: &[&[f32]], b: &[f32], x: &[f32], sp: usize, out: &mut [f32]) {
        // SAFETY: the caller checked the CPU features and the shapes.
        unsafe { conv_rows4_f32(w, b, x, sp, out) }
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
    #[cfg(target_arch = "x86_64")]
    unsafe fn conv_rows4(w: &[&[f32]], b: &[f32], x: &[f16], sp: usize, out: &mut [f32]) {
        // SAFETY: as for f32.
        unsafe { conv_rows4_f16(w, b, x, sp, out) }
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

/// `out[j*S + s] = b[j] + Σ_c w[j][c] · x[c*S + s]`: output rows of a 1x1
/// conv on one image's features `x` [cin, S].
pub fn conv_rows<T: Elem>(w: &[&[f32]], b: &[f32], x: &[T], sp: usize, out: &mut [f32]) {
    let cin = x.len() / sp;
    assert!(w.len() == b.len() && out.len() == w.len() * sp && x.len() == cin * sp && w.iter().all(|r| r.len() == cin));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        for ((wc, bc), oc) in w.chunks(4).zip(b.chunks(4)).zip(out.chunks_mut(4 * sp)) {
            // SAFETY: AVX2/FMA/F16C present; shapes checked above.
            unsafe { T::conv_rows4(wc, bc, x, sp, oc) };
        }
        return;
    }
    for ((wj, bj), oj) in w.iter().zip(b).zip(out.chunks_exact_mut(sp)) {
        oj.fill(*bj);
        for (c, xr) in x.chunks_exact(sp).enumerate() {
            for (o, xv) in oj.iter_mut().zip(xr) {
                *o += wj[c] * xv.to_f32();
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
const PREFETCH_TILES: usize = 8;

macro_rules! avx2_kernels {
    ($t:ty, $load:ident, $dots:ident, $conv:ident) => {
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

/// Up to 4 output rows of `conv_rows`, 16 positions at a time kept in
/// registers while the loop runs over the input channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn $conv(w: &[&[f32]], b: &[f32], x: &[$t], sp: usize, out: &mut [f32]) {
    let (k, cin) = (w.len(), x.len() / sp);
    let px = x.as_ptr();
    let po = out.as_mut_ptr();
    let mut s = 0;
    // SAFETY: s + 16 <= sp for every load/store; c < cin; j < k <= 4 rows of out.
    unsafe {
        while s + 16 <= sp {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for j in 0..k {
                acc[j] = [_mm256_set1_ps(b[j]); 2];
            }
            for c in 0..cin {
                // 64 rows are read in step, too many streams for the hardware
                // prefetcher: ask for each row's next tiles explicitly
                if s + 16 * PREFETCH_TILES < sp {
                    _mm_prefetch::<_MM_HINT_T0>(px.add(c * sp + s + 16 * PREFETCH_TILES) as *const i8);
                }
                let x0 = $load(px.add(c * sp + s));
                let x1 = $load(px.add(c * sp + s + 8));
                for j in 0..k {
                    let wj = _mm256_set1_ps(*w[j].get_unchecked(c));
                    acc[j][0] = _mm256_fmadd_ps(wj, x0, acc[j][0]);
                    acc[j][1] = _mm256_fmadd_ps(wj, x1, acc[j][1]);
                }
            }
            for j in 0..k {
                _mm256_storeu_ps(po.add(j * sp + s), acc[j][0]);
                _mm256_storeu_ps(po.add(j * sp + s + 8), acc[j][1]);
            }
            s += 16;
        }
    }
    for j in 0..k {
        for s in s..sp {
            out[j * sp + s] = b[j] + (0..cin).map(|c| w[j][c] * x[c * sp + s].to_f32()).sum::<f32>();
        }
    }
}
    };
}

#[cfg(target_arch = "x86_64")]
avx2_kernels!(f32, load8_f32, dots4_f32, conv_rows4_f32);
#[cfg(target_arch = "x86_64")]
avx2_kernels!(f16, load8_f16, dots4_f16, conv_rows4_f16);

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
}
