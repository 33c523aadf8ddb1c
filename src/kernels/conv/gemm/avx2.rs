// The AVX2+FMA tile kernels under `blocked`'s loops, for CPUs without
// AVX-512 (AMD Zen 2/3, older Intel): 16 ymm registers, two 256-bit FMA
// units, L1d 32 KiB and L2 512 KiB per core on the Zen 3 these were tuned on.
// In/out: see `super::sgemm_on` / `super::sgemm_nt_acc_on`.
// `gemm`: a 6x16 register tile (12 accumulators, 2 loads + 6 broadcasts per
// 12 FMAs, the BLIS Haswell shape) over k blocks of 256: a B micro-panel
// (16 KiB) stays in L1, an A block (144 rows x 256) in L2.
// `gemm_nt_acc`: a 3x4 tile of dot products, 8 lanes wide (12 accumulators,
// 7 loads per 12 FMAs).

use std::arch::x86_64::*;

use super::{Mat, blocked};

/// The register tile; B panels packed by `blocked::pack_b`.
const KERNELS: blocked::Kernels = blocked::Kernels { tile: kernel, rows: None };

const MR: usize = 6;
const NR: usize = 16;
const KC: usize = 256;
/// Row block: MC x KC of A (144 KiB) in L2, as BLIS's Zen 3 configuration.
const MC: usize = 24 * MR;
/// Column block: the B block (KC x NC, 256 KiB) and the A block share L2;
/// C is written in runs of NC floats.
const NC: usize = 16 * NR;
/// Reduction chunk of `gemm_nt_acc` (a multiple of 8): a 3x4 tile's rows
/// (7·PC floats, 14 KiB) stay in L1.
const PC: usize = 512;
/// `gemm_nt_acc`'s column block: this many 4-row b tiles share one pass
/// over a's chunk (m·PC floats, from L2).
const JB: usize = 8;

// As in avx512.rs: offsets use `wrapping_add`, and the unaligned loads a
// masked load with every lane on (LLVM emits a plain vmovups), because the
// dev profile's debug assertions put `_mm256_loadu_ps`'s overlap check (and
// a trip through the stack) on every load.

/// 8 floats from p.
///
/// # Safety
/// AVX2; p has 8 floats after it.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn ld(p: *const f32) -> __m256 {
    // SAFETY: as the caller promises.
    unsafe { _mm256_maskload_ps(p, _mm256_set1_epi32(-1)) }
}

/// C = alpha·A·B + beta·C (see `super::sgemm_on`).
///
/// # Safety
/// The CPU must have AVX2 and FMA and the operands the sizes `sgemm_on` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    // SAFETY: as the caller promises.
    unsafe { blocked::gemm::<MR, NR>(KERNELS, [MC, KC, NC], m, k, n, alpha, a, b, beta, c) }
}

/// A [m, k] packed for `gemm_packed`.
pub fn pack_a(m: usize, k: usize, a: &Mat) -> Vec<f32> {
    blocked::packed_a::<MR>(a, m, k, KC)
}

/// `gemm` with A from `pack_a`.
///
/// # Safety
/// As `gemm`; ap from `pack_a(m, k, ..)`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_packed(m: usize, k: usize, n: usize, alpha: f32, ap: &[f32], b: Mat, beta: f32, c: &mut [f32]) {
    // SAFETY: as the caller promises.
    unsafe { blocked::gemm_packed::<MR, NR>(KERNELS, [MC, KC, NC], ap, m, k, n, alpha, b, beta, c) }
}

/// One MR x NR tile (see `blocked::TileKernel`).
///
/// # Safety
/// AVX2+FMA; a: kc·MR floats, b: kc·NR floats, 32-byte aligned; c: rows
/// rows `ldc` apart of at least cols floats.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    // C's tile is read (beta) and written after the loop: fetched now, its
    // misses overlap the FMAs (with a short k, as dX's, they would not)
    for r in 0..rows {
        let p = c.wrapping_add(r * ldc) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * cols - 1));
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for kk in 0..kc {
        // SAFETY: kk < kc, within the panels; B's panel rows are 64 bytes
        // from a 64-byte aligned start.
        unsafe {
            let bk = b.wrapping_add(kk * NR);
            let (b0, b1) = (_mm256_load_ps(bk), _mm256_load_ps(bk.wrapping_add(8)));
            let ak = a.wrapping_add(kk * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcastss_ps(_mm_load_ss(ak.wrapping_add(r)));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
    }
    let (va, vb) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (t, &v) in acc.iter().enumerate() {
            let w = cols.saturating_sub(8 * t).min(8);
            if w == 0 {
                continue;
            }
            // SAFETY: row r of C has cols floats from c + r·ldc; lanes
            // 8t..8t+w of them are read and written.
            unsafe {
                let p = c.wrapping_add(r * ldc + 8 * t);
                let mut v = _mm256_mul_ps(v, va);
                if w == 8 {
                    if beta != 0.0 {
                        v = _mm256_fmadd_ps(ld(p), vb, v);
                    }
                    _mm256_storeu_ps(p, v);
                } else {
                    // an edge tile: through a buffer (AMD's masked stores are slow)
                    let mut t = [0.0f32; 8];
                    let part = std::slice::from_raw_parts_mut(p, w);
                    if beta != 0.0 {
                        t[..w].copy_from_slice(part);
                        v = _mm256_fmadd_ps(_mm256_loadu_ps(t.as_ptr()), vb, v);
                    }
                    _mm256_storeu_ps(t.as_mut_ptr(), v);
                    part.copy_from_slice(&t[..w]);
                }
            }
        }
    }
}

/// C += A·Bᵀ (see `super::sgemm_nt_acc_on`).
///
/// # Safety
/// AVX2+FMA and the sizes `sgemm_nt_acc_on` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_nt_acc(m: usize, n: usize, len: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32]) {
    // SAFETY: as the caller promises.
    unsafe { blocked::nt_acc::<3, 4, 8, f32>(dot_tile, reduce, PC, JB, m, n, len, a, lda, b, ldb, c) }
}

/// The sum of 8 lane partials, as a fixed tree.
fn reduce(v: &[f32]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Adds the 3x4 lane-wise products of a's and b's rows over len floats
/// to `part` (12 vectors, row-major [3][4][8]).
///
/// # Safety
/// AVX2+FMA; every pointer has len floats after it; part 96 floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_tile(len: usize, a: [*const f32; 3], b: [*const f32; 4], part: &mut [f32], first: bool) {
    assert!(part.len() >= 96);
    let pp = part.as_mut_ptr();
    // SAFETY: part holds 12 vectors (read only after a first chunk).
    let mut acc: [[__m256; 4]; 3] = std::array::from_fn(|r| std::array::from_fn(|t| if first { _mm256_setzero_ps() } else { unsafe { ld(pp.wrapping_add((r * 4 + t) * 8)) } }));
    let full = len / 8;
    for s in 0..full {
        // SAFETY: 8·s + 8 <= len.
        unsafe {
            let o = 8 * s;
            let av = [ld(a[0].wrapping_add(o)), ld(a[1].wrapping_add(o)), ld(a[2].wrapping_add(o))];
            for t in 0..4 {
                let bv = ld(b[t].wrapping_add(o));
                for r in 0..3 {
                    acc[r][t] = _mm256_fmadd_ps(av[r], bv, acc[r][t]);
                }
            }
        }
    }
    if len % 8 != 0 {
        // the last len % 8 floats, zero-padded in a buffer (the rows end there)
        let (o, w) = (8 * full, len % 8);
        let pad = |p: *const f32| -> __m256 {
            let mut t = [0.0f32; 8];
            // SAFETY: p + o has w floats before the row's end.
            t[..w].copy_from_slice(unsafe { std::slice::from_raw_parts(p.wrapping_add(o), w) });
            // SAFETY: t holds 8 floats.
            unsafe { _mm256_loadu_ps(t.as_ptr()) }
        };
        let av = [pad(a[0]), pad(a[1]), pad(a[2])];
        for t in 0..4 {
            let bv = pad(b[t]);
            for r in 0..3 {
                acc[r][t] = _mm256_fmadd_ps(av[r], bv, acc[r][t]);
            }
        }
    }
    for r in 0..3 {
        for t in 0..4 {
            // SAFETY: within part's 12 vectors.
            unsafe { _mm256_storeu_ps(pp.wrapping_add((r * 4 + t) * 8), acc[r][t]) };
        }
    }
}
