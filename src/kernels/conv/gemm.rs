// The f32 GEMMs under the tail convolutions, with AVX-512 or AVX2+FMA
// kernels chosen at run time and matrixmultiply (AVX2/FMA 8x8) as the
// fallback and reference.
// In/out: `sgemm`: C [m, n] (row-major) = alpha·A·B + beta·C for A [m, k] and
// B [k, n] given as `Mat` (any strides); `sgemm_nt_acc`: C [m, n] += A·Bᵀ for
// row-major A [m, len] and B [n, len] (the weight gradient dY·colᵀ, whose
// reduction runs along both operands' rows). `*_on` take the path explicitly
// (the tests run every path on the same operands).
// Why our own: matrixmultiply has no AVX-512 kernel, its AVX2 8x8 tile keeps
// 8 of the 16 ymm registers accumulating and packs B in 4 KiB-wide strips,
// and the gemm crate did no better on these shapes (M 32..256, K 32..2304,
// N = pixels 400..6400). The loops (packing, cache blocks, row dot products)
// are in `blocked`, one register tile per instruction set in `avx512` and
// `avx2`. Every element's summation order is fixed by the shapes (k blocks /
// lanes in order), never by the thread count.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod bf16;
mod blocked;

#[cfg(target_arch = "x86_64")]
#[cfg(test)]
pub(super) use bf16::{from_bf16, to_bf16};

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
    /// Our packed AVX2+FMA kernels.
    Avx2,
    /// Operands rounded to bfloat16, products summed in f32 (AVX-512 BF16):
    /// not bit-equal to the f32 paths; the training step's choice (see bf16.rs).
    Avx512Bf16,
    /// matrixmultiply's (AVX2/FMA where the CPU has it).
    Fallback,
}

/// The fastest path the CPU runs (AVX-512, else AVX2+FMA), unless
/// FREEZESPLIT_GEMM=fallback.
pub fn path() -> Path {
    static P: OnceLock<Path> = OnceLock::new();
    *P.get_or_init(|| {
        let off = std::env::var("FREEZESPLIT_GEMM").is_ok_and(|v| v == "fallback");
        match fast_paths().first() {
            Some(&p) if !off => p,
            _ => Path::Fallback,
        }
    })
}

/// The packed paths this CPU runs, fastest first.
pub fn fast_paths() -> Vec<Path> {
    [(Path::Avx512, has_avx512()), (Path::Avx2, has_avx2_fma())].into_iter().filter(|p| p.1).map(|p| p.0).collect()
}

/// The bf16 path where the CPU runs it (and FREEZESPLIT_GEMM is not
/// `fallback`).
pub fn bf16_path() -> Option<Path> {
    (path() != Path::Fallback && has_bf16()).then_some(Path::Avx512Bf16)
}

/// Whether this CPU runs the bf16 path (AVX-512 F, BW and BF16).
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bf16::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// Whether this CPU runs the AVX2+FMA path.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
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

/// `sgemm` on the given path (one of `fast_paths()` or `Path::Fallback`).
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
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(has_avx2_fma(), "sgemm: the AVX2 path on a CPU without AVX2 and FMA");
            // SAFETY: as above, for AVX2+FMA.
            unsafe { avx2::gemm(m, k, n, alpha, a, b, beta, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Bf16 => {
            assert!(has_bf16(), "sgemm: the bf16 path on a CPU without AVX512-BF16");
            // SAFETY: as above, for AVX-512 BF16.
            unsafe { bf16::gemm(m, k, n, alpha, a, b, beta, c) }
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

/// A GEMM's left operand [m, k] packed once for several products with
/// different right operands (a conv's weights, the same for every image of
/// a batch: packing them per image cost as much as a small conv's B).
/// `sgemm_packed` with it gives exactly `sgemm`'s result.
pub struct PackedA {
    path: Path,
    m: usize,
    k: usize,
    /// The path's panels (row-major A for the fallback).
    data: Vec<f32>,
    /// The bf16 path's pair panels (its `data` is empty).
    pairs: Vec<u32>,
}

/// Packs a [m, k] for `sgemm_packed` on the fastest path.
pub fn pack_a(m: usize, k: usize, a: Mat) -> PackedA {
    pack_a_on(path(), m, k, a)
}

/// `pack_a` for the given path.
pub fn pack_a_on(path: Path, m: usize, k: usize, a: Mat) -> PackedA {
    assert!(m == 0 || k == 0 || (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(), "pack_a: operand too small");
    let (mut data, mut pairs) = (Vec::new(), Vec::new());
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => data = avx512::pack_a(m, k, &a),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => data = avx2::pack_a(m, k, &a),
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Bf16 if m > 0 && k > 0 => pairs = bf16::pack_a(m, k, &a),
        _ => data = (0..m * k).map(|i| a.at(i / k, i % k)).collect(),
    }
    PackedA { path, m, k, data, pairs }
}

/// c [m, n] = alpha · A · b [k, n] + beta · c for A packed by `pack_a`.
pub fn sgemm_packed(pa: &PackedA, n: usize, alpha: f32, b: Mat, beta: f32, c: &mut [f32]) {
    let (m, k) = (pa.m, pa.k);
    if m == 0 || n == 0 || k == 0 {
        // nothing packed to multiply: sgemm's own edge handling
        return sgemm_on(Path::Fallback, m, k, n, alpha, Mat::rows(&pa.data, k.max(1)), b, beta, c);
    }
    assert!(c.len() >= m * n, "sgemm_packed: c too small");
    assert!((k - 1) * b.rs + (n - 1) * b.cs < b.data.len(), "sgemm_packed: operand too small");
    match pa.path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => {
            assert!(has_avx512(), "sgemm_packed: the AVX-512 path on a CPU without AVX-512");
            // SAFETY: AVX-512F present; data is avx512::pack_a of [m, k];
            // b and c checked above.
            unsafe { avx512::gemm_packed(m, k, n, alpha, &pa.data, b, beta, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(has_avx2_fma(), "sgemm_packed: the AVX2 path on a CPU without AVX2 and FMA");
            // SAFETY: as above, for AVX2+FMA.
            unsafe { avx2::gemm_packed(m, k, n, alpha, &pa.data, b, beta, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Bf16 => {
            assert!(has_bf16(), "sgemm_packed: the bf16 path on a CPU without AVX512-BF16");
            // SAFETY: as above, for AVX-512 BF16; pairs is bf16::pack_a of [m, k].
            unsafe { bf16::gemm_packed(m, k, n, alpha, &pa.pairs, b, beta, c) }
        }
        _ => sgemm_on(Path::Fallback, m, k, n, alpha, Mat::rows(&pa.data, k), b, beta, c),
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
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            assert!(has_avx2_fma(), "sgemm_nt_acc: the AVX2 path on a CPU without AVX2 and FMA");
            // SAFETY: AVX2+FMA present and the sizes checked above.
            unsafe { avx2::gemm_nt_acc(m, n, len, a, lda, b, ldb, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Bf16 => {
            assert!(has_bf16(), "sgemm_nt_acc: the bf16 path on a CPU without AVX512-BF16");
            // SAFETY: AVX-512 BF16 present and the sizes checked above.
            unsafe { bf16::gemm_nt_acc(m, n, len, a, lda, b, ldb, c) }
        }
        _ => sgemm_on(Path::Fallback, m, len, n, 1.0, Mat { data: a, rs: lda, cs: 1 }, Mat { data: b, rs: 1, cs: ldb }, 1.0, c),
    }
}

