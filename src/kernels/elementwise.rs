// Elementwise f32 kernels of the tail's activations: a fast exp, sigmoid,
// SiLU (x·σ(x)) forward and backward, and the parallel drivers that run them.
// In: plain slices. Out: a fresh `Vec` written once (its spare capacity is
// filled, never zero-filled first), or the gradient slice updated in place.
//
// Why: the exported SiLU runs on every conv output of the tail (up to
// [16, 64, 80, 80]); libm's expf is a scalar call per element, and the
// portable build targets baseline x86-64 (SSE2), where LLVM cannot use wide
// vectors. The bodies here are branch-free plain Rust (selects, bit casts,
// no calls), so LLVM vectorises them; each is compiled three times, for
// AVX-512F, AVX2 and the baseline, chosen once at run time. No mul_add and
// no reassociation: every version computes bit-identical results, and
// chunking over threads does not change them either (no reductions).

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Elements per parallel task: 64 KiB of f32, so a task is worth a thread.
pub const CHUNK: usize = 1 << 14;

/// e^x, within 2 ulp of the correctly rounded value over the whole f32 range
/// (denormal results included); +inf above ~88.72, 0 below ~-103.97, NaN
/// stays NaN. Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-7
/// polynomial, 2^n applied as two exponent-only factors so a denormal result
/// is rounded once.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so n·LN2_HI is exact for |n| ≤ 2^14
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer (ties to even) and leaves
    // that integer in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-104.0, 89.0);
    let kr = xc * LOG2E + MAGIC;
    let n = kr - MAGIC;
    // wrapping ops: the values never overflow, but the dev profile's
    // overflow checks would be branches that stop vectorisation
    let ni = (kr.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // n in [-150, 128]: both halves are normal powers of two
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let y = y * f32::from_bits((n1.wrapping_add(127) << 23) as u32) * f32::from_bits((n2.wrapping_add(127) << 23) as u32);
    let y = if x < -104.0 { 0.0 } else { y };
    if x.is_nan() { x } else { y }
}

/// 1 / (1 + e^-x), computed from e^-|x| so it never overflows and keeps
/// the relative accuracy of tiny results (x ≪ 0).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let d = 1.0 + e;
    if x >= 0.0 { 1.0 / d } else { e / d }
}

/// SiLU forward, x·σ(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// SiLU backward: the upstream gradient `g` times d(x·σ(x))/dx =
/// σ + x·σ(1-σ), written as `autograd::binary`'s unfused SiLU backward does.
#[inline(always)]
pub fn silu_grad(g: f32, x: f32) -> f32 {
    let s = sigmoid(x);
    g * s + (g * x) * (s * (1.0 - s))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Avx512,
    Avx2,
    Base,
}

fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        static L: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *L.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Level::Avx512
            } else if is_x86_feature_detected!("avx2") {
                Level::Avx2
            } else {
                Level::Base
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Base
}

#[inline(always)]
fn map_body(x: &[f32], o: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32) {
    for (o, &x) in o.iter_mut().zip(x) {
        o.write(f(x));
    }
}

#[inline(always)]
fn zip_body(g: &mut [f32], x: &[f32], f: impl Fn(f32, f32) -> f32) {
    for (g, &x) in g.iter_mut().zip(x) {
        *g = f(*g, x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn map_avx512(x: &[f32], o: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32) {
    map_body(x, o, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn map_avx2(x: &[f32], o: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32) {
    map_body(x, o, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn zip_avx512(g: &mut [f32], x: &[f32], f: impl Fn(f32, f32) -> f32) {
    zip_body(g, x, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn zip_avx2(g: &mut [f32], x: &[f32], f: impl Fn(f32, f32) -> f32) {
    zip_body(g, x, f)
}

fn map_chunk(lv: Level, x: &[f32], o: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32) {
    match lv {
        // SAFETY: `level` found the feature on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { map_avx512(x, o, f) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { map_avx2(x, o, f) },
        _ => map_body(x, o, f),
    }
}

fn zip_chunk(lv: Level, g: &mut [f32], x: &[f32], f: impl Fn(f32, f32) -> f32) {
    match lv {
        // SAFETY: `level` found the feature on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { zip_avx512(g, x, f) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { zip_avx2(g, x, f) },
        _ => zip_body(g, x, f),
    }
}

/// `f` of every element into a new vector (chunks of `CHUNK` in parallel
/// when there are several). `f` must be plain arithmetic (`#[inline(always)]`
/// kernels above) for the wide versions to vectorise.
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send + Copy) -> Vec<f32> {
    let lv = level();
    let mut out = Vec::with_capacity(x.len());
    let spare = &mut out.spare_capacity_mut()[..x.len()];
    if x.len() > CHUNK {
        spare.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| map_chunk(lv, x, o, f));
    } else {
        map_chunk(lv, x, spare, f);
    }
    // SAFETY: every one of the first x.len() slots was written above.
    unsafe { out.set_len(x.len()) };
    out
}

/// `g[i] = f(g[i], x[i])` in place (chunks in parallel as `map`).
pub fn zip_in_place(g: &mut [f32], x: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send + Copy) {
    assert_eq!(g.len(), x.len(), "zip_in_place: lengths differ");
    let lv = level();
    if g.len() > CHUNK {
        g.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(g, x)| zip_chunk(lv, g, x, f));
    } else {
        zip_chunk(lv, g, x, f);
    }
}

/// A vector of `n` elements whose `chunk`-sized pieces are written by
/// `fill(piece index, piece)` (in parallel when `n > CHUNK`). For outputs
/// that are copies (Concat, MaxPool): no zero-fill first, which for a reused
/// heap block would be a full memset.
///
/// # Safety
/// `fill` must write every slot of the piece it is given (`copy_into`
/// helps): the vector is returned as initialised.
pub unsafe fn filled(n: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if n > 0 {
        assert!(chunk > 0 && n % chunk == 0, "filled: {n} elements are not whole chunks of {chunk}");
        if n > CHUNK {
            spare.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
        } else {
            spare.chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
        }
    }
    // SAFETY: `fill` wrote every slot (the caller's promise).
    unsafe { out.set_len(n) };
    out
}

/// `dst` ← `src` (same length) for `filled`.
#[inline]
pub fn copy_into(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_into: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in representable f32 values (same-sign finite values).
    fn ulps(a: f32, b: f64) -> u32 {
        let b = b as f32;
        if a == b {
            return 0;
        }
        assert!(a.is_finite() && b.is_finite() && a.signum() == b.signum(), "{a} vs {b}");
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_within_two_ulp_over_the_whole_range() {
        // every 61st f32 from -110 to 90 (about 35M values), against f64 exp
        let mut worst = 0;
        for bits in (0u32..=110f32.to_bits()).step_by(61).chain((0u32..=90f32.to_bits()).step_by(61).map(|b| b | 0x8000_0000)) {
            let x = -f32::from_bits(bits);
            let want = (x as f64).exp();
            let got = exp(x);
            if want > f32::MAX as f64 * (1.0 + f32::EPSILON as f64 / 2.0) {
                assert_eq!(got, f32::INFINITY, "exp({x})");
                continue;
            }
            let u = ulps(got, want);
            assert!(u <= 2, "exp({x}) = {got}, want {want} ({u} ulp)");
            worst = worst.max(u);
        }
        assert!(worst >= 1, "the test should see rounding error somewhere");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::MAX), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(-f32::MAX), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-103.0) > 0.0 && exp(-103.0) < f32::MIN_POSITIVE, "denormal results are kept");
    }

    #[test]
    fn sigmoid_within_three_ulp_and_stable() {
        let mut worst = 0;
        for i in -2_000_000..=2_000_000 {
            let x = i as f32 * 6e-5; // [-120, 120]
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let got = sigmoid(x);
            if want < 1e-45 {
                assert!(got <= 1.5e-45, "sigmoid({x}) = {got}");
                continue;
            }
            let u = ulps(got, want);
            assert!(u <= 3, "sigmoid({x}) = {got}, want {want} ({u} ulp)");
            worst = worst.max(u);
        }
        assert!(worst >= 1);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn silu_and_its_gradient_match_f64() {
        for i in -4000..=4000 {
            let x = i as f32 * 5e-3;
            let xd = x as f64;
            let s = 1.0 / (1.0 + (-xd).exp());
            assert!((silu(x) as f64 - xd * s).abs() <= 4e-7 * (xd * s).abs().max(1e-6), "silu({x})");
            let d = s + xd * s * (1.0 - s);
            assert!((silu_grad(0.7, x) as f64 - 0.7 * d).abs() <= 1e-6 * (1.0 + d.abs()), "silu'({x})");
        }
    }

    #[test]
    fn every_level_and_the_parallel_split_give_the_same_bits() {
        // one length below CHUNK, one spanning several chunks with a ragged end
        for n in [1000, 3 * CHUNK + 17] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 20011) as f32 * 1e-3 - 10.0).collect();
            let scalar: Vec<f32> = x.iter().map(|&v| sigmoid(v)).collect();
            let mut o = Vec::with_capacity(n);
            map_body(&x, &mut o.spare_capacity_mut()[..n], sigmoid);
            unsafe { o.set_len(n) };
            assert_eq!(o, scalar);
            assert_eq!(map(&x, sigmoid), scalar, "map at the detected level {:?}", level());
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                let mut o = Vec::with_capacity(n);
                unsafe { map_avx2(&x, &mut o.spare_capacity_mut()[..n], sigmoid) };
                unsafe { o.set_len(n) };
                assert_eq!(o, scalar, "avx2");
            }
            let mut g = vec![0.3f32; n];
            zip_in_place(&mut g, &x, silu_grad);
            assert!(g.iter().zip(&x).all(|(&g, &x)| g == silu_grad(0.3, x)));
        }
    }
}
