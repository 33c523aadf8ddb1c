// The AVX-512 BF16 GEMMs: f32 operands rounded to bfloat16 (round to
// nearest even) and multiplied with `vdpbf16ps`, which adds two bf16
// products into each f32 lane: twice the multiply-adds per instruction of
// f32 FMA (measured on Zen 4: 230 against 116 GFLOP/s on one core), with
// exact products and f32 sums. What the training step of a tail below
// --freeze 24 runs when the CPU has AVX512-BF16 (train's --precision);
// validation, export and the parity tests stay on the f32 kernels.
// In/out: as `super::sgemm_on` / `super::sgemm_nt_acc_on` (f32 in, f32 out).
// `gemm`: `blocked`'s loops over u32 elements, each a pair of bf16 along k
// (A's pair (A[i, 2q], A[i, 2q+1]), B's (B[2q, j], B[2q+1, j]); an odd k
// gets a zero partner), with the 8x48 tile of avx512.rs (24 accumulators,
// 3 loads + 8 broadcasts per 24 `vdpbf16ps`) over k blocks of 128 pairs.
// `gemm_nt_acc`: both operands' rows rounded to bf16 once per call (zero
// padded to 32), then the 4x6 dot tile of avx512.rs with `vdpbf16ps`: lane l
// sums positions 2l and 2l+1 mod 32. Sums run in a fixed order set by the
// shapes, as in the f32 kernels.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::avx512::{self, MR, NR};
use super::{Mat, blocked};

/// k block in pairs: a B micro-panel (128 x 48 u32, 24 KiB) stays in L1.
const KCP: usize = 128;
const NC: usize = 16 * NR;
/// `gemm_nt_acc`'s reduction chunk in bf16 elements (6 b rows: 12 KiB) and
/// column block, as the f32 kernel's.
const PC: usize = 1024;
const JB: usize = 8;

thread_local! {
    /// B panels, and `gemm_nt_acc`'s rows in bf16 (a, b), per thread.
    static BUFS: RefCell<(Vec<u32>, Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Whether this CPU runs these kernels (AVX-512 F, BW and BF16).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16")
}

/// x rounded to bfloat16 as `vcvtneps2bf16` does: to nearest even, a NaN
/// kept quiet, denormal inputs as zeros of their sign.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else if b & 0x7f80_0000 == 0 {
        ((b >> 16) & 0x8000) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// The f32 a bf16 stands for.
#[cfg(test)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two values as one pair element: `lo` in the low half (the even k).
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// A [m, k] as pair panels for `gemm_packed` (k / 2 rounded up pairs).
pub fn pack_a(m: usize, k: usize, a: &Mat) -> Vec<u32> {
    let kp = k.div_ceil(2);
    if (a.cs != 1 && a.rs != 1) || !available() {
        let at = |i: usize, kk: usize| if kk < k { a.at(i, kk) } else { 0.0 };
        return blocked::pack_a_with::<MR, u32>(m, kp, KCP, |i, q| pair(at(i, 2 * q), at(i, 2 * q + 1)));
    }
    // blocked::pack_a_with's layout: per k block, the row panels one after another
    let mp = m.div_ceil(MR);
    let mut ap = vec![0u32; mp * MR * kp];
    for pc in (0..kp).step_by(KCP) {
        let kc = KCP.min(kp - pc);
        let dst = ap[pc * mp * MR..].as_mut_ptr();
        // SAFETY: available() checked; A [m, k] holds what sgemm_on checks,
        // read from k index 2pc on; dst holds mp panels of kc·MR.
        unsafe {
            if a.cs == 1 {
                // a row-major A (dY in a small map's weight gradient): pairs along its rows
                pack_cols::<MR>(a.data.as_ptr().wrapping_add(2 * pc), a.rs, m, k - 2 * pc, kc, dst)
            } else {
                // a transposed A (Wᵀ in dX): a pair is two of its rows' same column
                pack_rows::<MR>(a.data.as_ptr().wrapping_add(2 * pc * a.cs), a.cs, kc, k - 2 * pc, m, dst)
            }
        }
    }
    ap
}

/// C = alpha·A·B + beta·C (see `super::sgemm_on`), A and B rounded to bf16.
///
/// # Safety
/// `available()`; the operands the sizes `sgemm_on` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    let ap = pack_a(m, k, &a);
    // SAFETY: as the caller promises; ap is pack_a of A.
    unsafe { gemm_packed(m, k, n, alpha, &ap, b, beta, c) }
}

/// `gemm` with A from `pack_a(m, k, ..)`.
///
/// # Safety
/// As `gemm`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_packed(m: usize, k: usize, n: usize, alpha: f32, ap: &[u32], b: Mat, beta: f32, c: &mut [f32]) {
    let kp = k.div_ceil(2);
    assert!(ap.len() >= m.div_ceil(MR) * MR * kp, "bf16::gemm_packed: packed A too small");
    let mut pack = |pc: usize, kc: usize, jc: usize, nc: usize, bp: &mut [u32]| {
        if b.cs == 1 {
            // SAFETY: rows 2pc..min(2(pc+kc), k) of B hold columns jc..jc+nc
            // (sgemm_on checked B's extent); bp holds kc·NR per panel.
            unsafe { pack_rows::<NR>(b.data.as_ptr().wrapping_add(2 * pc * b.rs + jc), b.rs, kc, (k - 2 * pc).min(2 * kc), nc, bp.as_mut_ptr()) }
        } else if b.rs == 1 {
            // a transposed B (the col matrix in a small map's weight
            // gradient): each column's pairs are adjacent floats
            // SAFETY: columns jc..jc+nc of B hold rows 2pc..k; as above.
            unsafe { pack_cols::<NR>(b.data.as_ptr().wrapping_add(jc * b.cs + 2 * pc), b.cs, nc, k - 2 * pc, kc, bp.as_mut_ptr()) }
        } else {
            pack_b_any(&b, k, n, pc, kc, jc, nc, bp)
        }
    };
    BUFS.with(|bufs| {
        let bv = &mut bufs.borrow_mut().0;
        // SAFETY: `available()` (the caller); ap and `pack` hold the panels
        // `tile` reads; c as sgemm_on checks.
        unsafe { blocked::body::<MR, NR, u32>(tile, &mut pack, [usize::MAX, KCP, NC], ap, m, kp, n, alpha, beta, c, bv) }
    })
}

/// Pair panels of a B of any strides (the transposed col matrix of a small
/// map's weight gradient), element by element.
#[allow(clippy::too_many_arguments)]
fn pack_b_any(b: &Mat, k: usize, n: usize, pc: usize, kc: usize, jc: usize, nc: usize, bp: &mut [u32]) {
    let at = |kk: usize, j: usize| if kk < k && j < n { b.at(kk, j) } else { 0.0 };
    for jp in 0..nc.div_ceil(NR) {
        let dst = &mut bp[jp * kc * NR..][..kc * NR];
        for (q, d) in dst.chunks_exact_mut(NR).enumerate() {
            let kk = 2 * (pc + q);
            for (jj, v) in d.iter_mut().enumerate() {
                let j = jc + jp * NR + jj;
                *v = if j < jc + nc { pair(at(kk, j), at(kk + 1, j)) } else { 0 };
            }
        }
    }
}

/// Pair panels from pairs of source rows: `rows` (≤ 2·kcp) rows of nc
/// floats, `stride` apart, as kcp pair rows of W-column panels (zero pairs
/// past the rows and columns): per 16 columns, two rows rounded in one
/// `vcvtne2ps2bf16` and interleaved by a word permutation. B row-major
/// (W = NR), or A transposed (W = MR: its rows are the columns here).
///
/// # Safety
/// `available()`; src has `rows` rows of nc floats; dst holds
/// ceil(nc / W) panels of kcp·W u32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows<const W: usize>(src: *const f32, stride: usize, kcp: usize, rows: usize, nc: usize, dst: *mut u32) {
    // word 2i <- word i (row 0's column i), word 2i+1 <- word 16+i (row 1's)
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
    );
    for q in 0..kcp {
        let r0 = src.wrapping_add(2 * q * stride);
        let r1 = r0.wrapping_add(stride);
        let (has0, has1) = (2 * q < rows, 2 * q + 1 < rows);
        for jp in 0..nc.div_ceil(W) {
            let d = dst.wrapping_add((jp * kcp + q) * W);
            for t in (0..W).step_by(16) {
                let j = jp * W + t;
                let (w, lanes) = (nc.saturating_sub(j).min(16).min(W - t), (W - t).min(16));
                let (mask, smask) = (((1u32 << w) - 1) as __mmask16, ((1u32 << lanes) - 1) as __mmask16);
                // SAFETY: only the w columns left in rows that exist are
                // read; the panel row of dst is written whole.
                unsafe {
                    let lo = if has0 { _mm512_maskz_loadu_ps(mask, r0.wrapping_add(j)) } else { _mm512_setzero_ps() };
                    let hi = if has1 { _mm512_maskz_loadu_ps(mask, r1.wrapping_add(j)) } else { _mm512_setzero_ps() };
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_mask_storeu_epi32(d.wrapping_add(t) as *mut i32, smask, _mm512_permutexvar_epi16(idx, both));
                }
            }
        }
    }
}

/// Pair panels from source rows that hold their pairs as adjacent floats:
/// n rows (`ld` apart) of kf floats, row r becoming column r mod W of panel
/// r / W, as kcp pair rows (zero past n rows and kf floats): per 16 rows x
/// 16 pairs, each row's 32 floats rounded in one `vcvtne2ps2bf16` (pair q
/// lands in 32-bit lane q), then a 16x16 transpose. B transposed (W = NR),
/// or A row-major (W = MR).
///
/// # Safety
/// `available()`; src has n rows of min(kf, 2·kcp) floats; dst holds
/// ceil(n / W) panels of kcp·W u32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_cols<const W: usize>(src: *const f32, ld: usize, n: usize, kf: usize, kcp: usize, dst: *mut u32) {
    let kf = kf.min(2 * kcp);
    let mask = |w: usize| ((1u32 << w.min(16)) - 1) as __mmask16;
    for p in 0..n.div_ceil(W) {
        let panel = dst.wrapping_add(p * kcp * W);
        for rb in (0..W).step_by(16) {
            let lanes = (W - rb).min(16);
            for q0 in (0..kcp).step_by(16) {
                let rem = kf.saturating_sub(2 * q0);
                let (mlo, mhi) = (mask(rem), mask(rem.saturating_sub(16)));
                let mut v = [_mm512_setzero_si512(); 16];
                for (i, vi) in v.iter_mut().enumerate().take(lanes) {
                    let r = p * W + rb + i;
                    if r < n {
                        let s = src.wrapping_add(r * ld + 2 * q0);
                        // SAFETY: the masked lanes lie within row r's kf floats.
                        unsafe { *vi = std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mhi, s.wrapping_add(16)), _mm512_maskz_loadu_ps(mlo, s))) };
                    }
                }
                transpose16(&mut v);
                for (e, ve) in v.iter().enumerate().take((kcp - q0).min(16)) {
                    // SAFETY: pair row q0 + e < kcp of the panel, lanes rb..rb+lanes < W.
                    unsafe { _mm512_mask_storeu_epi32(panel.wrapping_add((q0 + e) * W + rb) as *mut i32, mask(lanes), *ve) };
                }
            }
        }
    }
}

/// Transposes a 16x16 matrix of 32-bit lanes (row i in v[i]) in place:
/// 32-bit, then 64-bit interleaves within 128-bit lanes, then two rounds of
/// 128-bit lane shuffles.
#[target_feature(enable = "avx512f")]
fn transpose16(v: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    // v[4i + m]: in 128-bit lane l, element 4l + m of rows 4i..4i+4
    for i in 0..4 {
        v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for i in 0..2 {
        for j in 0..4 {
            t[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(v[8 * i + j], v[8 * i + j + 4]);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4::<0xdd>(v[8 * i + j], v[8 * i + j + 4]);
        }
    }
    for j in 0..8 {
        v[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[j + 8]);
        v[j + 8] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[j + 8]);
    }
}

/// 64 bytes from p (16 pairs, or 32 bf16) as a bf16 vector; a masked load
/// with every lane on, for the reason avx512.rs's `ld` gives.
///
/// # Safety
/// `available()`; p has 64 bytes after it.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn ldw<T>(p: *const T) -> __m512bh {
    // SAFETY: as the caller promises; any bits are a bf16 vector.
    unsafe { std::mem::transmute(_mm512_maskz_loadu_epi32(0xffff, p as *const i32)) }
}

/// One MR x NR tile over kc pairs (see `blocked::TileKernel`).
///
/// # Safety
/// `available()`; a: kc·MR u32, b: kc·NR u32; c: rows rows `ldc` apart of
/// at least cols floats.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(kc: usize, a: *const u32, b: *const u32, alpha: f32, beta: f32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for q in 0..kc {
        // SAFETY: q < kc, within the panels; a u32 pair is read as the f32
        // of the same bits and broadcast (the bits are what vdpbf16ps reads).
        unsafe {
            let bq = b.wrapping_add(q * NR);
            let bv = [ldw(bq), ldw(bq.wrapping_add(16)), ldw(bq.wrapping_add(32))];
            let aq = a.wrapping_add(q * MR) as *const f32;
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_broadcastss_ps(_mm_load_ss(aq.wrapping_add(r))));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, bv[0]);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, bv[1]);
                acc[2] = _mm512_dpbf16_ps(acc[2], av, bv[2]);
            }
        }
    }
    // SAFETY: as the caller promises.
    unsafe { avx512::store_tile(&acc, alpha, beta, c, ldc, rows, cols) }
}

/// C += A·Bᵀ (see `super::sgemm_nt_acc_on`), both rounded to bf16.
///
/// # Safety
/// `available()` and the sizes `sgemm_nt_acc_on` checks.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_nt_acc(m: usize, n: usize, len: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32]) {
    let lp = len.next_multiple_of(32);
    BUFS.with(|bufs| {
        let (_, ah, bh) = &mut *bufs.borrow_mut();
        let ah = blocked::aligned(ah, m * lp);
        let bh = blocked::aligned(bh, n * lp);
        // SAFETY: `available()`; the rows hold len floats (checked by the
        // caller), the buffers m·lp and n·lp.
        unsafe {
            rows_to_bf16(a, lda, m, len, lp, ah);
            rows_to_bf16(b, ldb, n, len, lp, bh);
            blocked::nt_acc::<4, 6, 16, u16>(dot_tile, avx512::reduce, PC, JB, m, n, lp, ah, lp, bh, lp, c)
        }
    })
}

/// `rows` rows of len floats (`ld` apart) rounded to bf16, each zero padded
/// to lp (a multiple of 32) in dst, 32 at a time in order.
///
/// # Safety
/// `available()`; src holds the rows, dst rows·lp.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn rows_to_bf16(src: &[f32], ld: usize, rows: usize, len: usize, lp: usize, dst: &mut [u16]) {
    for r in 0..rows {
        let (s, d) = (src[r * ld..].as_ptr(), dst[r * lp..].as_mut_ptr());
        for o in (0..lp).step_by(32) {
            let m = |from: usize| ((1u32 << len.saturating_sub(from).min(16)) as u64 - 1) as __mmask16;
            // SAFETY: the masked lanes lie within the row's len floats; the
            // 32 words o..o+32 within dst's row.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(m(o), s.wrapping_add(o));
                let hi = _mm512_maskz_loadu_ps(m(o + 16), s.wrapping_add(o + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(d.wrapping_add(o) as *mut i32, 0xffff, v);
            }
        }
    }
}

/// Adds the 4x6 pairwise products of a's and b's bf16 rows over len
/// (a multiple of 32) to `part` (see `blocked::DotTile`).
///
/// # Safety
/// `available()`; every pointer has len u16 after it; part 384 floats.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_tile(len: usize, a: [*const u16; 4], b: [*const u16; 6], part: &mut [f32], first: bool) {
    // SAFETY: part holds 24 vectors.
    let mut acc = unsafe { avx512::load_parts(part, first) };
    for o in (0..len).step_by(32) {
        // SAFETY: o + 32 <= len words after every pointer.
        unsafe {
            let av = [ldw(a[0].wrapping_add(o)), ldw(a[1].wrapping_add(o)), ldw(a[2].wrapping_add(o)), ldw(a[3].wrapping_add(o))];
            for t in 0..6 {
                let bv = ldw(b[t].wrapping_add(o));
                for r in 0..4 {
                    acc[r][t] = _mm512_dpbf16_ps(acc[r][t], av[r], bv);
                }
            }
        }
    }
    // SAFETY: part holds 24 vectors.
    unsafe { avx512::store_parts(part, &acc) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `to_bf16` (the scalar packers) rounds as `vcvtne2ps2bf16` (the row
    /// packers): ties to even, carries into the exponent, infinities, NaN,
    /// denormals, and a sweep of bit patterns.
    #[test]
    fn to_bf16_rounds_as_the_instruction() {
        if !available() {
            eprintln!("skipping to_bf16_rounds_as_the_instruction: this CPU has no AVX512-BF16");
            return;
        }
        let mut xs: Vec<f32> = [1.0f32, -1.0, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-40, -1e-40, f32::NAN]
            .into_iter()
            .chain([0x3f80_8000u32, 0x3f81_8000, 0x3f80_7fff, 0x3f80_8001, 0x3fff_ffff, 0x7f7f_ffff].map(f32::from_bits))
            .collect();
        xs.extend((0..4000u32).map(|i| f32::from_bits(i.wrapping_mul(2654435761))));
        let len = xs.len();
        let lp = len.next_multiple_of(32);
        let mut got = vec![0u16; lp];
        // SAFETY: available() checked; xs holds len floats, got lp words.
        unsafe { rows_to_bf16(&xs, len, 1, len, lp, &mut got) };
        for (x, g) in xs.iter().zip(&got) {
            let want = to_bf16(*x);
            let same = if x.is_nan() { from_bf16(*g).is_nan() } else { *g == want };
            assert!(same, "{x:e} ({:#010x}): instruction {g:#06x}, to_bf16 {want:#06x}", x.to_bits());
        }
        assert!(got[len..].iter().all(|&g| g == 0), "padding not zero");
    }
}
