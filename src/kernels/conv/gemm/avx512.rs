// The AVX-512 tile kernels under `blocked`'s loops.
// In/out: see `super::sgemm_on` / `super::sgemm_nt_acc_on`.
// `gemm`: an 8x48 register tile (24 zmm accumulators, 3 loads + 8
// broadcasts per 24 FMAs) over k blocks of 128; each B micro-panel (KC x NR
// = 24 KiB) stays in L1 while every A panel streams past it (one row block).
// `gemm_nt_acc`: a 4x6 tile of dot products, 16 lanes wide.

use std::arch::x86_64::*;

use super::{Mat, blocked};

/// The register tile and the row-major B packer.
const KERNELS: blocked::Kernels = blocked::Kernels { tile: kernel, rows: Some(pack_rows) };

pub(super) const MR: usize = 8;
pub(super) const NR: usize = 48;
const KC: usize = 128;
const NC: usize = 16 * NR;
/// Reduction chunk of `gemm_nt_acc` (a multiple of 16): a 4x6 tile's six
/// b rows (6·PC floats, 12 KiB) stay in L1 while the a rows stream past.
const PC: usize = 512;
/// `gemm_nt_acc`'s column block: this many 6-row b tiles share one pass
/// over a's chunk; their lane partials (m/4 · JB · 24 vectors) stay in L2.
const JB: usize = 8;

// Offsets use `wrapping_add`: the dev profile (tests, benchmarks) keeps
// debug assertions, and `add`'s precondition check in the inner loops
// cost half the speed; every offset stays inside its operand anyway.

/// 16 floats from p. A masked load with every lane on: `_mm512_loadu_ps`
/// goes through `read_unaligned`, whose debug-build overlap check forced
/// each loaded vector through the stack.
///
/// # Safety
/// AVX-512F; p has 16 floats after it.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn ld(p: *const f32) -> __m512 {
    // SAFETY: as the caller promises.
    unsafe { _mm512_maskz_loadu_ps(0xffff, p) }
}

/// C = alpha·A·B + beta·C (see `super::sgemm_on`).
///
/// # Safety
/// The CPU must have AVX-512F and the operands the sizes `sgemm_on` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    // SAFETY: as the caller promises.
    unsafe { blocked::gemm::<MR, NR>(KERNELS, [usize::MAX, KC, NC], m, k, n, alpha, a, b, beta, c) }
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
    unsafe { blocked::gemm_packed::<MR, NR>(KERNELS, [usize::MAX, KC, NC], ap, m, k, n, alpha, b, beta, c) }
}

/// One MR x NR tile (see `blocked::TileKernel`).
///
/// # Safety
/// AVX-512F; a: kc·MR floats, b: kc·NR floats; c: rows rows `ldc` apart
/// of at least cols floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for kk in 0..kc {
        // SAFETY: kk < kc, within the panels.
        unsafe {
            let bk = b.wrapping_add(kk * NR);
            let (b0, b1, b2) = (ld(bk), ld(bk.wrapping_add(16)), ld(bk.wrapping_add(32)));
            let ak = a.wrapping_add(kk * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                // a load + broadcast rather than `set1(*p)`, whose dereference
                // carries the dev profile's null/alignment checks into the loop
                let av = _mm512_broadcastss_ps(_mm_load_ss(ak.wrapping_add(r)));
                acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                acc[2] = _mm512_fmadd_ps(av, b2, acc[2]);
            }
        }
    }
    // SAFETY: as the caller promises.
    unsafe { store_tile(&acc, alpha, beta, c, ldc, rows, cols) }
}

/// Writes an MR x NR tile of accumulators: C[..rows, ..cols] = alpha·acc +
/// beta·C (C not read when beta is 0), the last 16-column group through a mask.
///
/// # Safety
/// AVX-512F; c: rows rows `ldc` apart of at least cols floats.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store_tile(acc: &[[__m512; 3]; MR], alpha: f32, beta: f32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    let mask = |t: usize| -> __mmask16 {
        let w = cols.saturating_sub(16 * t).min(16);
        ((1u32 << w) - 1) as __mmask16
    };
    let masks = [mask(0), mask(1), mask(2)];
    let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for t in 0..3 {
            if masks[t] == 0 {
                continue;
            }
            // SAFETY: the masked lanes are within row r's cols floats.
            unsafe {
                let p = c.wrapping_add(r * ldc + 16 * t);
                let mut v = _mm512_mul_ps(acc[t], va);
                if beta != 0.0 {
                    v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(masks[t], p), vb, v);
                }
                _mm512_mask_storeu_ps(p, masks[t], v);
            }
        }
    }
}

/// kc rows of nc floats (rows `stride` apart) into NR-wide panels, zero past
/// nc (see `blocked::RowPacker`): three 16-float moves per panel row, the
/// last panel's through masks.
///
/// # Safety
/// AVX-512F; src has kc rows `stride` apart of nc floats each; dst holds
/// ceil(nc / NR) panels of kc·NR floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows(src: *const f32, stride: usize, kc: usize, nc: usize, dst: *mut f32) {
    let (full, rem) = (nc / NR, nc % NR);
    let masks: [__mmask16; 3] = std::array::from_fn(|t| {
        let w = rem.saturating_sub(16 * t).min(16);
        ((1u32 << w) - 1) as __mmask16
    });
    for kk in 0..kc {
        let row = src.wrapping_add(kk * stride);
        for jp in 0..full {
            let (s, d) = (row.wrapping_add(jp * NR), dst.wrapping_add(jp * kc * NR + kk * NR));
            for t in 0..3 {
                // SAFETY: columns jp·NR..(jp+1)·NR < nc of row kk; the panel row in dst.
                unsafe { _mm512_mask_storeu_ps(d.wrapping_add(16 * t), 0xffff, ld(s.wrapping_add(16 * t))) };
            }
        }
        if rem > 0 {
            let (s, d) = (row.wrapping_add(full * NR), dst.wrapping_add(full * kc * NR + kk * NR));
            for (t, &mask) in masks.iter().enumerate() {
                // SAFETY: only the rem columns left in the row are read; the
                // whole panel row is written (zeros past nc)
                unsafe { _mm512_mask_storeu_ps(d.wrapping_add(16 * t), 0xffff, _mm512_maskz_loadu_ps(mask, s.wrapping_add(16 * t))) };
            }
        }
    }
}

/// C += A·Bᵀ (see `super::sgemm_nt_acc_on`), lane partials summed by
/// `_mm512_reduce_add_ps`'s fixed tree.
///
/// # Safety
/// AVX-512F and the sizes `sgemm_nt_acc_on` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_nt_acc(m: usize, n: usize, len: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32]) {
    // SAFETY: as the caller promises.
    unsafe { blocked::nt_acc::<4, 6, 16, f32>(dot_tile, reduce, PC, JB, m, n, len, a, lda, b, ldb, c) }
}

/// The sum of 16 lane partials.
pub(super) fn reduce(v: &[f32]) -> f32 {
    assert!(v.len() == 16);
    // SAFETY: the caller of `gemm_nt_acc` (the only user) checked AVX-512F; v holds 16 floats.
    unsafe { reduce16(v.as_ptr()) }
}

/// # Safety
/// AVX-512F; p has 16 floats after it.
#[target_feature(enable = "avx512f")]
unsafe fn reduce16(p: *const f32) -> f32 {
    // SAFETY: as the caller promises.
    _mm512_reduce_add_ps(unsafe { ld(p) })
}

/// Adds the 4x6 lane-wise products of a's and b's rows over len floats
/// to `part` (24 vectors, row-major [4][6][16]).
///
/// # Safety
/// AVX-512F; every pointer has len floats after it; part 384 floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_tile(len: usize, a: [*const f32; 4], b: [*const f32; 6], part: &mut [f32], first: bool) {
    // SAFETY: part holds 24 vectors.
    let mut acc = unsafe { load_parts(part, first) };
    let full = len / 16;
    for s in 0..full {
        // SAFETY: 16·s + 16 <= len.
        unsafe {
            let o = 16 * s;
            let av = [ld(a[0].wrapping_add(o)), ld(a[1].wrapping_add(o)), ld(a[2].wrapping_add(o)), ld(a[3].wrapping_add(o))];
            for t in 0..6 {
                let bv = ld(b[t].wrapping_add(o));
                for r in 0..4 {
                    acc[r][t] = _mm512_fmadd_ps(av[r], bv, acc[r][t]);
                }
            }
        }
    }
    if len % 16 != 0 {
        let (o, mask) = (16 * full, ((1u32 << (len % 16)) - 1) as __mmask16);
        // SAFETY: the masked lanes o..len are within len.
        unsafe {
            let av: [__m512; 4] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask, a[r].wrapping_add(o)));
            for t in 0..6 {
                let bv = _mm512_maskz_loadu_ps(mask, b[t].wrapping_add(o));
                for r in 0..4 {
                    acc[r][t] = _mm512_fmadd_ps(av[r], bv, acc[r][t]);
                }
            }
        }
    }
    // SAFETY: part holds 24 vectors.
    unsafe { store_parts(part, &acc) }
}

/// A 4x6 dot tile's lane partials from `part` ([4][6][16] floats), or
/// zeros on a reduction's first chunk (part not read).
///
/// # Safety
/// AVX-512F; part holds 384 floats.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn load_parts(part: &[f32], first: bool) -> [[__m512; 6]; 4] {
    assert!(part.len() >= 384);
    let pp = part.as_ptr();
    // SAFETY: within part's 24 vectors.
    std::array::from_fn(|r| std::array::from_fn(|t| if first { _mm512_setzero_ps() } else { unsafe { ld(pp.wrapping_add((r * 6 + t) * 16)) } }))
}

/// Writes a 4x6 dot tile's lane partials back to `part`.
///
/// # Safety
/// AVX-512F; part holds 384 floats.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store_parts(part: &mut [f32], acc: &[[__m512; 6]; 4]) {
    assert!(part.len() >= 384);
    let pp = part.as_mut_ptr();
    for r in 0..4 {
        for t in 0..6 {
            // SAFETY: within part's 24 vectors.
            unsafe { _mm512_mask_storeu_ps(pp.wrapping_add((r * 6 + t) * 16), 0xffff, acc[r][t]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 row packer writes what the portable `pack_b` writes, for
    /// full and partial panels and a row stride wider than the rows.
    #[test]
    fn pack_rows_equals_pack_b() {
        if !super::super::has_avx512() {
            eprintln!("skipping pack_rows_equals_pack_b: this CPU has no AVX-512");
            return;
        }
        for (kc, nc, ld) in [(3usize, 48usize, 48usize), (5, 100, 130), (7, 17, 17), (2, 96, 200)] {
            let data: Vec<f32> = (0..(kc + 1) * ld).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b = Mat::rows(&data, ld);
            let panels = nc.div_ceil(NR) * kc * NR;
            let (mut want, mut got) = (vec![f32::NAN; panels], vec![f32::NAN; panels]);
            blocked::pack_b::<NR>(&b, ld, 1, kc, 0, nc, &mut want);
            // SAFETY: AVX-512F checked; rows 1..=kc of data hold nc floats; got holds the panels.
            unsafe { pack_rows(data.as_ptr().wrapping_add(ld), ld, kc, nc, got.as_mut_ptr()) };
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "kc {kc} nc {nc} ld {ld}");
        }
    }
}
