// The loops under the tail's convolutions (autograd::conv): one image's
// im2col / col2im and the single-threaded f32 GEMM they feed.
// In/out: plain row-major slices. `Geom` is one image's convolution geometry
// (input [c, h, w], kernel, strides, pads, dilations -> output [oh, ow]);
// `im2col` writes col [c*kh*kw, oh*ow] (row (ci, ki, kj), zeros in the
// padding), `col2im` adds such a col back into an input-shaped buffer (the
// adjoint of im2col: conv's input gradient, conv-transpose's forward);
// `sgemm` is C = alpha·A·B + beta·C on strided operands and `sgemm_nt_acc`
// C += A·Bᵀ along rows (both in `gemm`: AVX-512 or AVX2 chosen at run time).
// Why here: the convolution and both of its gradients are three GEMMs around
// these two copies (candle's backprop.rs composes them the same way); the
// callers parallelise over images with rayon, so the GEMM stays serial.

mod gemm;

pub use gemm::{Mat, PackedA, Path, bf16_path, fast_paths, has_avx2_fma, has_avx512, has_bf16, pack_a, pack_a_on, path, sgemm, sgemm_nt_acc, sgemm_nt_acc_on, sgemm_on, sgemm_packed};

/// One image's convolution geometry (ONNX Conv, NCHW, no batch, one group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    /// Input channels (of one group), height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// Padding at the top and the left (the bottom/right pads only change oh/ow).
    pub pt: usize,
    pub pl: usize,
    pub dh: usize,
    pub dw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geom {
    /// Rows of the col matrix: c * kh * kw.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions: oh * ow.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1x1, stride-1, unpadded conv: the input already is its col matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.pt == 0 && self.pl == 0 && self.oh == self.h && self.ow == self.w
    }

    /// For output column `o` and kernel offset `k` (one axis): the input
    /// columns `o*s - pad + k*d` that fall inside `0..len`, as the output range
    /// `o0..o1` they belong to (the rest read padding).
    fn valid(out: usize, len: usize, s: usize, pad: usize, kd: usize) -> (usize, usize) {
        // i = o*s + kd - pad must satisfy 0 <= i < len
        let o0 = if kd >= pad { 0 } else { (pad - kd).div_ceil(s) };
        let o1 = if len + pad > kd { ((len + pad - kd - 1) / s + 1).min(out) } else { 0 };
        (o0.min(o1), o1)
    }
}

/// col[(ci*kh + ki)*kw + kj][oy*ow + ox] = x[ci][oy*sh - pt + ki*dh][ox*sw - pl + kj*dw]
/// (0 outside the input).
pub fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
    assert!(x.len() == g.c * g.h * g.w && col.len() == g.k() * g.p(), "im2col: buffer sizes");
    let (ow, p) = (g.ow, g.p());
    let mut rows = col.chunks_exact_mut(p);
    for ci in 0..g.c {
        let xc = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (y0, y1) = Geom::valid(g.oh, g.h, g.sh, g.pt, ki * g.dh);
            for kj in 0..g.kw {
                let row = rows.next().unwrap();
                let (x0, x1) = Geom::valid(g.ow, g.w, g.sw, g.pl, kj * g.dw);
                row[..y0 * ow].fill(0.0);
                row[y1 * ow..].fill(0.0);
                for oy in y0..y1 {
                    let iy = oy * g.sh + ki * g.dh - g.pt;
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    dst[..x0].fill(0.0);
                    dst[x1..].fill(0.0);
                    let src = &xc[iy * g.w..(iy + 1) * g.w];
                    let ix0 = x0 * g.sw + kj * g.dw - g.pl;
                    if g.sw == 1 {
                        dst[x0..x1].copy_from_slice(&src[ix0..ix0 + (x1 - x0)]);
                    } else {
                        for (d, s) in dst[x0..x1].iter_mut().zip(src[ix0..].iter().step_by(g.sw)) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col`: x[ci][iy][ix] += every col entry that im2col
/// would have read from there (padding entries are dropped).
pub fn col2im(g: &Geom, col: &[f32], x: &mut [f32]) {
    assert!(x.len() == g.c * g.h * g.w && col.len() == g.k() * g.p(), "col2im: buffer sizes");
    let (ow, p) = (g.ow, g.p());
    let mut rows = col.chunks_exact(p);
    for ci in 0..g.c {
        let xc = &mut x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (y0, y1) = Geom::valid(g.oh, g.h, g.sh, g.pt, ki * g.dh);
            for kj in 0..g.kw {
                let row = rows.next().unwrap();
                let (x0, x1) = Geom::valid(g.ow, g.w, g.sw, g.pl, kj * g.dw);
                for oy in y0..y1 {
                    let iy = oy * g.sh + ki * g.dh - g.pt;
                    let src = &row[oy * ow + x0..oy * ow + x1];
                    let dst = &mut xc[iy * g.w..(iy + 1) * g.w];
                    let ix0 = x0 * g.sw + kj * g.dw - g.pl;
                    if g.sw == 1 {
                        for (d, s) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                            *d += s;
                        }
                    } else {
                        for (d, s) in dst[ix0..].iter_mut().step_by(g.sw).zip(src) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    /// Straight from the definition, padding included.
    fn im2col_ref(g: &Geom, x: &[f32]) -> Vec<f32> {
        let mut col = vec![0.0; g.k() * g.p()];
        for ci in 0..g.c {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let r = (ci * g.kh + ki) * g.kw + kj;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let iy = (oy * g.sh + ki * g.dh) as isize - g.pt as isize;
                            let ix = (ox * g.sw + kj * g.dw) as isize - g.pl as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                col[r * g.p() + oy * g.ow + ox] = x[(ci * g.h + iy as usize) * g.w + ix as usize];
                            }
                        }
                    }
                }
            }
        }
        col
    }

    fn geom(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize, d: usize) -> Geom {
        let out = |n: usize| (n + 2 * p - d * (k - 1) - 1) / s + 1;
        Geom { c, h, w, kh: k, kw: k, sh: s, sw: s, pt: p, pl: p, dh: d, dw: d, oh: out(h), ow: out(w) }
    }

    #[test]
    fn im2col_matches_the_definition_and_col2im_is_its_adjoint() {
        for g in [geom(2, 5, 6, 3, 1, 1, 1), geom(3, 7, 6, 3, 2, 1, 1), geom(1, 7, 7, 3, 1, 2, 2), geom(2, 4, 4, 2, 2, 0, 1), geom(1, 5, 5, 5, 1, 2, 1), geom(2, 3, 3, 1, 1, 0, 1)] {
            let x = vals(g.c * g.h * g.w, 1);
            let mut col = vec![7.0; g.k() * g.p()];
            im2col(&g, &x, &mut col);
            assert_eq!(col, im2col_ref(&g, &x), "{g:?}");
            // <im2col(x), y> == <x, col2im(y)> for any y
            let y = vals(col.len(), 2);
            let mut xt = vec![0.0; x.len()];
            col2im(&g, &y, &mut xt);
            let lhs: f64 = col.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&xt).map(|(a, b)| (a * b) as f64).sum();
            assert!((lhs - rhs).abs() < 1e-4, "{g:?}: {lhs} vs {rhs}");
        }
    }

    /// Each packed path's kernels against matrixmultiply on the same
    /// operands: every stride layout, edges in all three dimensions (sizes
    /// off every tile: 6, 8, 16, 48 and the 3x4 / 4x6 dot tiles), several k
    /// blocks (and, for the row dot products, several chunks and column
    /// blocks and lengths off the 8 and 16 lanes).
    #[test]
    fn packed_gemm_matches_the_fallback() {
        let paths = fast_paths();
        if paths.is_empty() {
            eprintln!("skipping packed_gemm_matches_the_fallback: this CPU runs neither AVX-512 nor AVX2+FMA");
            return;
        }
        if !paths.contains(&Path::Avx512) {
            eprintln!("packed_gemm_matches_the_fallback: this CPU has no AVX-512; its path is not checked here");
        }
        let shapes = [(1, 1, 1), (3, 5, 7), (8, 128, 48), (9, 129, 49), (17, 300, 100), (32, 288, 800), (64, 40, 1601), (9, 1100, 53), (13, 515, 131), (7, 77, 17)];
        for path in paths {
            for (m, k, n) in shapes {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (a, b, c0) = (vals(m * k, 1), vals(k * n, 2), vals(m * n, 3));
                    let am = if ta { Mat::t(&a, m) } else { Mat::rows(&a, k) };
                    let bm = if tb { Mat::t(&b, k) } else { Mat::rows(&b, n) };
                    for beta in [0.0, 0.3] {
                        let (mut c1, mut c2) = (c0.clone(), c0.clone());
                        sgemm_on(path, m, k, n, 0.7, am, bm, beta, &mut c1);
                        sgemm_on(Path::Fallback, m, k, n, 0.7, am, bm, beta, &mut c2);
                        let e = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                        assert!(e < 1e-4 * (k as f32).sqrt().max(1.0), "{path:?} sgemm {m}x{k}x{n} ta {ta} tb {tb} beta {beta}: max diff {e}");
                        // A packed once: the same kernel on the same panels, so the same bits
                        let mut c3 = c0.clone();
                        sgemm_packed(&pack_a_on(path, m, k, am), n, 0.7, bm, beta, &mut c3);
                        assert!(c3 == c1, "{path:?} sgemm_packed {m}x{k}x{n} ta {ta} tb {tb} beta {beta} differs from sgemm");
                    }
                }
                // c [m, n] += a [m, k] · b [n, k]ᵀ, rows one float longer than used
                let (a, b, c0) = (vals(m * (k + 1), 4), vals(n * (k + 1), 5), vals(m * n, 6));
                let (mut c1, mut c2) = (c0.clone(), c0.clone());
                sgemm_nt_acc_on(path, m, n, k, &a, k + 1, &b, k + 1, &mut c1);
                sgemm_nt_acc_on(Path::Fallback, m, n, k, &a, k + 1, &b, k + 1, &mut c2);
                let e = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(e < 1e-4 * (k as f32).sqrt().max(1.0), "{path:?} sgemm_nt_acc {m}x{k}x{n}: max diff {e}");
            }
        }
    }

    /// The bf16 path computes the product of the operands rounded to bf16
    /// (to nearest even), summed in f32: against that product in f64, on
    /// every stride layout (each packer: row-major, transposed, general), odd k (a zero partner in the last pair), edges
    /// off the 8x48 and 4x6 tiles, several k blocks, chunks and column
    /// blocks; packing A once gives the same bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn bf16_gemm_is_the_product_of_the_rounded_operands() {
        let Some(path) = bf16_path() else {
            eprintln!("skipping bf16_gemm_is_the_product_of_the_rounded_operands: this CPU has no AVX512-BF16");
            return;
        };
        let r = |v: f32| gemm::from_bf16(gemm::to_bf16(v)) as f64;
        // within f32 summation error of the exact sum of the rounded products
        let close = |got: f32, want: f64, mag: f64| (got as f64 - want).abs() <= 1e-5 * mag + 1e-30;
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (8, 256, 48), (9, 257, 49), (17, 301, 100), (32, 288, 800), (64, 40, 1601), (9, 1100, 53), (13, 515, 131), (7, 77, 17)] {
            // st: both operands with neither stride 1 (every other float), the packers' general path
            for (ta, tb, st) in [(false, false, false), (true, false, false), (false, true, false), (true, true, false), (false, false, true)] {
                let s = if st { 2 } else { 1 };
                let (a, b, c0) = (vals(s * m * k, 1), vals(s * k * n, 2), vals(m * n, 3));
                let am = if st { Mat { data: &a, rs: 2 * k, cs: 2 } } else if ta { Mat::t(&a, m) } else { Mat::rows(&a, k) };
                let bm = if st { Mat { data: &b, rs: 2 * n, cs: 2 } } else if tb { Mat::t(&b, k) } else { Mat::rows(&b, n) };
                for beta in [0.0, 0.3] {
                    let mut c1 = c0.clone();
                    sgemm_on(path, m, k, n, 0.7, am, bm, beta, &mut c1);
                    for i in 0..m {
                        for j in 0..n {
                            let terms = (0..k).map(|l| r(am.data[i * am.rs + l * am.cs]) * r(bm.data[l * bm.rs + j * bm.cs]));
                            let (s, mag) = terms.fold((0.0, 0.0), |(s, g), t| (s + t, g + t.abs()));
                            let want = 0.7 * s + beta as f64 * c0[i * n + j] as f64;
                            assert!(close(c1[i * n + j], want, mag + c0[i * n + j].abs() as f64), "bf16 sgemm {m}x{k}x{n} ta {ta} tb {tb} st {st} beta {beta} [{i}, {j}]: {} vs {want}", c1[i * n + j]);
                        }
                    }
                    let mut c3 = c0.clone();
                    sgemm_packed(&pack_a_on(path, m, k, am), n, 0.7, bm, beta, &mut c3);
                    assert!(c3 == c1, "bf16 sgemm_packed {m}x{k}x{n} ta {ta} tb {tb} st {st} beta {beta} differs from sgemm");
                }
            }
            // c [m, n] += a [m, k] · b [n, k]ᵀ, rows one float longer than used
            let (a, b, c0) = (vals(m * (k + 1), 4), vals(n * (k + 1), 5), vals(m * n, 6));
            let mut c1 = c0.clone();
            sgemm_nt_acc_on(path, m, n, k, &a, k + 1, &b, k + 1, &mut c1);
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|l| r(a[i * (k + 1) + l]) * r(b[j * (k + 1) + l]));
                    let (s, mag) = terms.fold((0.0, 0.0), |(s, g), t| (s + t, g + t.abs()));
                    let want = c0[i * n + j] as f64 + s;
                    assert!(close(c1[i * n + j], want, mag + c0[i * n + j].abs() as f64), "bf16 sgemm_nt_acc {m}x{k}x{n} [{i}, {j}]: {} vs {want}", c1[i * n + j]);
                }
            }
        }
    }

    #[test]
    fn sgemm_with_transposed_operands() {
        let (m, k, n) = (3, 4, 5);
        let a = vals(m * k, 3);
        let bt = vals(n * k, 4); // b stored transposed: [n, k]
        let mut c = vec![1.0; m * n];
        sgemm(m, k, n, 2.0, Mat::rows(&a, k), Mat::t(&bt, k), 0.5, &mut c);
        for i in 0..m {
            for j in 0..n {
                let want = 0.5 + 2.0 * (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
