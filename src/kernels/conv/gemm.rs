// The f32 GEMMs under the tail convolutions, with an AVX-512 path chosen at
// run time and matrixmultiply (AVX2/FMA 8x8) as the fallback and reference.
// In/out: `sgemm`: C [m, n] (row-major) = alpha·A·B + beta·C for A [m, k] and
// B [k, n] given as `Mat` (any strides); `sgemm_nt_acc`: C [m, n] += A·Bᵀ for
// row-major A [m, len] and B [n, len] (the weight gradient dY·colᵀ, whose
// reduction runs along both operands' rows). `*_on` take the path explicitly
// (the tests run both on the same operands).
// Why our own: matrixmultiply has no AVX-512 kernel and the gemm crate did no
// better on these shapes (M 32..256, K 32..2304, N = pixels 400..6400).
// `sgemm` is BLIS-style: A (the weights: small) is packed whole, once per
// call, into MR-row panels per KC block; B in KC x NC blocks of NR-column
// panels; an 8x48 register tile (24 zmm accumulators, 3 loads + 8 broadcasts
// per 24 FMAs); each B micro-panel (KC x NR = 24 KiB) stays in L1 while every
// A panel streams past it. `sgemm_nt_acc` needs no packing: a 4x6 tile of
// dot products along the rows, 16 lanes wide, in PC-long chunks (the tile's
// rows then sit in L1) whose lane partials carry over to the next chunk, so
// each output ends in one horizontal sum. Every element's summation order is
// fixed by the shapes (k blocks / lanes in order), never by the thread count.

use std::sync::OnceLock;

/// A matrix operand: data with row and column strides (in elements), so a
/// transpose is a stride swap rather than a copy.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn t(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }

    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
}

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Our packed AVX-512 kernels.
    Avx512,
    /// matrixmultiply's (AVX2/FMA where the CPU has it).
    Fallback,
}

/// AVX-512 where the CPU has it, unless FREEZESPLIT_GEMM=fallback.
pub fn path() -> Path {
    static P: OnceLock<Path> = OnceLock::new();
    *P.get_or_init(|| {
        let off = std::env::var("FREEZESPLIT_GEMM").is_ok_and(|v| v == "fallback");
        if !off && has_avx512() { Path::Avx512 } else { Path::Fallback }
    })
}

/// Whether this CPU runs the AVX-512 path.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// c [m, n] (row-major, leading dimension n) = alpha · a [m, k] · b [k, n] + beta · c.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    sgemm_on(path(), m, k, n, alpha, a, b, beta, c)
}

/// `sgemm` on the given path (`Path::Avx512` needs `has_avx512()`).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_on(path: Path, m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |x: &Mat, r: usize, cc: usize| (r - 1) * x.rs + (cc - 1) * x.cs;
    assert!(c.len() >= m * n, "sgemm: c too small");
    if k == 0 {
        let c = &mut c[..m * n];
        if beta == 0.0 { c.fill(0.0) } else { c.iter_mut().for_each(|v| *v *= beta) }
        return;
    }
    assert!(last(&a, m, k) < a.data.len() && last(&b, k, n) < b.data.len(), "sgemm: operand too small");
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => {
            assert!(has_avx512(), "sgemm: the AVX-512 path on a CPU without AVX-512");
            // SAFETY: the CPU has AVX-512F (checked above); the operands hold
            // every index their shapes and strides reach (checked above).
            unsafe { avx512::gemm(m, k, n, alpha, a, b, beta, c) }
        }
        _ => {
            // SAFETY: every index the product reads or writes is within the
            // slices, checked above from the shapes and strides.
            unsafe {
                matrixmultiply::sgemm(
                    m, k, n, alpha, a.data.as_ptr(), a.rs as isize, a.cs as isize, b.data.as_ptr(), b.rs as isize, b.cs as isize, beta,
                    c.as_mut_ptr(), n as isize, 1,
                );
            }
        }
    }
}

/// c [m, n] (row-major) += a [m, len] · b [n, len]ᵀ; a's rows `lda` apart, b's `ldb`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_nt_acc(m: usize, n: usize, len: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32]) {
    sgemm_nt_acc_on(path(), m, n, len, a, lda, b, ldb, c)
}

/// `sgemm_nt_acc` on the given path.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_nt_acc_on(path: Path, m: usize, n: usize, len: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32]) {
    if m == 0 || n == 0 || len == 0 {
        return;
    }
    assert!(lda >= len && ldb >= len && a.len() >= (m - 1) * lda + len && b.len() >= (n - 1) * ldb + len && c.len() >= m * n, "sgemm_nt_acc: operand too small");
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => {
            assert!(has_avx512(), "sgemm_nt_acc: the AVX-512 path on a CPU without AVX-512");
            // SAFETY: AVX-512F present and the sizes checked above.
            unsafe { avx512::gemm_nt_acc(m, n, len, a, lda, b, ldb, c) }
        }
        _ => sgemm_on(Path::Fallback, m, len, n, 1.0, Mat { data: a, rs: lda, cs: 1 }, Mat { data: b, rs: 1, cs: ldb }, 1.0, c),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::Mat;

    const MR: usize = 8;
    const NR: usize = 48;
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

    thread_local! {
        /// Packing buffers (A, B), kept per thread so a call allocates nothing.
        static BUFS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// `len` floats of `v` starting on a 64-byte boundary (growing `v` as needed).
    fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
        if v.len() < len + 16 {
            v.resize(len + 16, 0.0);
        }
        let off = v.as_ptr().align_offset(64).min(16);
        &mut v[off..off + len]
    }

    /// A [m, k] as panels: for KC block q, panel ip: kc·MR floats at
    /// q·KC·mp·MR + ip·kc·MR, element (kk, r) = A[ip·MR + r, q·KC + kk]
    /// (0 past row m).
    fn pack_a(a: &Mat, m: usize, k: usize, ap: &mut [f32]) {
        let mp = m.div_ceil(MR);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            for ip in 0..mp {
                let dst = &mut ap[pc * mp * MR + ip * kc * MR..][..kc * MR];
                let i0 = ip * MR;
                if a.rs == 1 && i0 + MR <= m {
                    // a transposed matrix (the conv's Wᵀ in dX): a panel's MR
                    // rows at one kk are MR adjacent floats
                    for (kk, d) in dst.chunks_exact_mut(MR).enumerate() {
                        d.copy_from_slice(&a.data[(pc + kk) * a.cs + i0..][..MR]);
                    }
                    continue;
                }
                for r in 0..MR {
                    let i = i0 + r;
                    if i >= m {
                        dst.iter_mut().skip(r).step_by(MR).for_each(|d| *d = 0.0);
                    } else if a.cs == 1 {
                        let row = &a.data[i * a.rs + pc..][..kc];
                        dst.iter_mut().skip(r).step_by(MR).zip(row).for_each(|(d, &v)| *d = v);
                    } else {
                        (0..kc).for_each(|kk| dst[kk * MR + r] = a.at(i, pc + kk));
                    }
                }
            }
        }
    }

    /// B [pc..pc+kc, jc..jc+nc] as NR-column panels of kc·NR floats, element
    /// (kk, jj) of panel jp = B[pc + kk, jc + jp·NR + jj] (0 past column n).
    fn pack_b(b: &Mat, n: usize, pc: usize, kc: usize, jc: usize, nc: usize, bp: &mut [f32]) {
        for jp in 0..nc.div_ceil(NR) {
            let j0 = jc + jp * NR;
            let w = NR.min(n - j0);
            let dst = &mut bp[jp * kc * NR..][..kc * NR];
            if b.cs == 1 {
                for kk in 0..kc {
                    let d = &mut dst[kk * NR..(kk + 1) * NR];
                    d[..w].copy_from_slice(&b.data[(pc + kk) * b.rs + j0..][..w]);
                    d[w..].fill(0.0);
                }
            } else {
                if w < NR {
                    dst.fill(0.0);
                }
                for jj in 0..w {
                    let col = dst.iter_mut().skip(jj).step_by(NR);
                    if b.rs == 1 {
                        // a transposed matrix (the col matrix in dW): column jj is contiguous
                        col.zip(&b.data[(j0 + jj) * b.cs + pc..][..kc]).for_each(|(d, &v)| *d = v);
                    } else {
                        col.enumerate().for_each(|(kk, d)| *d = b.at(pc + kk, j0 + jj));
                    }
                }
            }
        }
    }

    /// 16 floats from p. A masked load with every lane on: `_mm512_loadu_ps`
    /// goes through `read_unaligned`, whose debug-build overlap check forced
    /// each loaded vector through the stack.
    ///
    /// # Safety
    /// AVX-512F; p has 16 floats after it.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn ld(p: *const f32) -> __m512 {
        // SAFETY: as the caller promises.
        unsafe { _mm512_maskz_loadu_ps(0xffff, p) }
    }

    /// C = alpha·A·B + beta·C (see `super::sgemm_on`).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and the operands the sizes `sgemm_on` checks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32]) {
        let mp = m.div_ceil(MR);
        BUFS.with(|bufs| {
            let (av, bv) = &mut *bufs.borrow_mut();
            let ap = aligned(av, mp * MR * k);
            pack_a(&a, m, k, ap);
            let bp = aligned(bv, KC * NC.min(n.div_ceil(NR) * NR));
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    pack_b(&b, n, pc, kc, jc, nc, bp);
                    let beta = if pc == 0 { beta } else { 1.0 };
                    for jp in 0..nc.div_ceil(NR) {
                        let j0 = jc + jp * NR;
                        for ip in 0..mp {
                            let i0 = ip * MR;
                            // SAFETY: the panels hold kc·MR and kc·NR floats; the
                            // tile's rows i0..i0+rows, columns j0..j0+cols lie in
                            // c [m, n].
                            unsafe {
                                kernel(
                                    kc, ap.as_ptr().wrapping_add(pc * mp * MR + ip * kc * MR), bp.as_ptr().wrapping_add(jp * kc * NR), alpha, beta,
                                    c.as_mut_ptr().wrapping_add(i0 * n + j0), n, MR.min(m - i0), NR.min(n - j0),
                                )
                            };
                        }
                    }
                }
            }
        })
    }

    /// One MR x NR tile: C[..rows, ..cols] = alpha·Apanel·Bpanel + beta·C.
    ///
    /// # Safety
    /// AVX-512F; a: kc·MR floats, b: kc·NR floats; c: rows rows `ldc` apart
    /// of at least cols floats.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for kk in 0..kc {
            // SAFETY: kk < kc, within the panels.
            unsafe {
                let bk = b.wrapping_add(kk * NR);
                let (b0, b1, b2) = (ld(bk), ld(bk.wrapping_add(16)), ld(bk.wrapping_add(32)));
                let ak = a.wrapping_add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ak.wrapping_add(r));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                    acc[2] = _mm512_fmadd_ps(av, b2, acc[2]);
                }
            }
        }
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

    thread_local! {
        /// `gemm_nt_acc`'s 16-lane partial sums, kept per thread.
        static PARTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// C += A·Bᵀ (see `super::sgemm_nt_acc_on`). Each output keeps 16 lane
    /// sums over the whole length (lane l adds positions ≡ l mod 16 in
    /// order), summed by one fixed tree at the end: the order depends on the
    /// shapes alone, and no chunk ends in horizontal sums.
    ///
    /// # Safety
    /// AVX-512F and the sizes `sgemm_nt_acc_on` checks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_nt_acc(m: usize, n: usize, len: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32]) {
        let ti = m.div_ceil(4);
        PARTS.with(|parts| {
            let parts = &mut *parts.borrow_mut();
            let need = ti * JB * 24 * 16;
            if parts.len() < need {
                parts.resize(need, 0.0);
            }
            for jb in (0..n).step_by(6 * JB) {
                let tj = (n - jb).div_ceil(6).min(JB);
                parts[..need].fill(0.0);
                for p0 in (0..len).step_by(PC) {
                    let pl = PC.min(len - p0);
                    for jt in 0..tj {
                        let j0 = jb + 6 * jt;
                        // rows past the edge repeat the first one; their sums are dropped
                        let bj: [*const f32; 6] = std::array::from_fn(|t| b[(if j0 + t < n { j0 + t } else { j0 }) * ldb + p0..].as_ptr());
                        for it in 0..ti {
                            let i0 = 4 * it;
                            let ai: [*const f32; 4] = std::array::from_fn(|t| a[(if i0 + t < m { i0 + t } else { i0 }) * lda + p0..].as_ptr());
                            let part = &mut parts[(it * JB + jt) * 384..][..384];
                            // SAFETY: every row pointer has pl floats after it (checked sizes); part holds 24 vectors.
                            unsafe { dot_tile(pl, ai, bj, part) };
                        }
                    }
                }
                for jt in 0..tj {
                    let j0 = jb + 6 * jt;
                    for it in 0..ti {
                        let i0 = 4 * it;
                        let part = &parts[(it * JB + jt) * 384..][..384];
                        for (r, pr) in part.chunks_exact(96).enumerate().take(m - i0) {
                            for (t, v) in pr.chunks_exact(16).enumerate().take(n - j0) {
                                // SAFETY: v holds 16 floats.
                                c[(i0 + r) * n + j0 + t] += _mm512_reduce_add_ps(unsafe { ld(v.as_ptr()) });
                            }
                        }
                    }
                }
            }
        })
    }

    /// Adds the 4x6 lane-wise products of a's and b's rows over len floats
    /// to `part` (24 vectors, row-major [4][6][16]).
    ///
    /// # Safety
    /// AVX-512F; every pointer has len floats after it; part 384 floats.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot_tile(len: usize, a: [*const f32; 4], b: [*const f32; 6], part: &mut [f32]) {
        let pp = part.as_mut_ptr();
        // SAFETY: part holds 24 vectors.
        let mut acc: [[__m512; 6]; 4] = std::array::from_fn(|r| std::array::from_fn(|t| unsafe { ld(pp.wrapping_add((r * 6 + t) * 16)) }));
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
        for r in 0..4 {
            for t in 0..6 {
                // SAFETY: within part's 24 vectors.
                unsafe { _mm512_mask_storeu_ps(pp.wrapping_add((r * 6 + t) * 16), 0xffff, acc[r][t]) };
            }
        }
    }
}
