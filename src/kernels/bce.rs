// BCE-with-logits over a run of logits, summed, with its gradient: the inner
// loop of the objectness loss, which visits every anchor at every position
// (76,800 logits per 640 image).
// In: logits z, targets t (same length), pos_weight pw, a gradient scale.
// Out: Σ_i bce(z_i, t_i) (f64) and, when asked, dz_i = scale · ∂bce/∂z_i, with
//   bce(z, t) = (1 − t)·z + (1 + (pw − 1)·t)·(log1p(e^−|z|) + max(−z, 0)),
// torch's `binary_cross_entropy_with_logits(pos_weight=pw)` formula.
// Why: libm's expf and log1pf are scalar calls, and they were a sixth of a
// training step. Here exp and log1p are Cephes' single-precision polynomials
// (≤ 3 ulp on the ranges used), evaluated eight at a time with AVX2; the
// portable loop is the same arithmetic one element at a time.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cephes): the first part has few mantissa bits, so n·C1 is exact.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
const SQRT2_M1: f32 = std::f32::consts::SQRT_2 - 1.0;

/// Cephes expf's polynomial, highest power first.
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// Cephes logf's polynomial, highest power first.
const LOG_P: [f32; 9] = [7.037_683_6e-2, -1.151_461e-1, 1.167_699_9e-1, -1.242_014_1e-1, 1.424_932_3e-1, -1.666_805_8e-1, 2.000_071_4e-1, -2.499_999_4e-1, 3.333_333e-1];

fn horner(coef: &[f32], x: f32) -> f32 {
    coef[1..].iter().fold(coef[0], |p, &c| p * x + c)
}

/// e^x for x ≤ 0 (clamped at −87, where e^x is ~1e-38 and below any loss term).
fn exp_nonpos(x: f32) -> f32 {
    let x = x.max(-87.0);
    // round(x·log2 e) for a non-positive argument, by truncation
    let n = (x * LOG2E - 0.5) as i32;
    let nf = n as f32;
    let r = x - nf * C1 - nf * C2;
    let p = horner(&EXP_P, r) * r * r + r + 1.0;
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// ln(1 + e) for 0 ≤ e ≤ 1, exact in the small-e limit (no 1 + e rounding).
fn log1p_01(e: f32) -> f32 {
    // 1 + e = 2^k (1 + f) with f in [√½ − 1, √2 − 1]
    let big = e > SQRT2_M1;
    let f = if big { (e - 1.0) * 0.5 } else { e };
    let k = if big { 1.0 } else { 0.0 };
    let z = f * f;
    let y = horner(&LOG_P, f) * f * z + C2 * k - 0.5 * z;
    f + y + C1 * k
}

/// One element: its loss, and its scaled gradient into `dz` when given.
fn one(x: f32, y: f32, pw: f32, scale: f32, dz: Option<&mut f32>) -> f64 {
    let e = exp_nonpos(-x.abs());
    let lw = (pw - 1.0) * y + 1.0;
    if let Some(d) = dz {
        let inv = 1.0 / (1.0 + e);
        let sig_neg = if x >= 0.0 { e * inv } else { inv };
        *d = scale * ((1.0 - y) - lw * sig_neg);
    }
    ((1.0 - y) * x + lw * (log1p_01(e) + (-x).max(0.0))) as f64
}

fn body<const GRAD: bool>(z: &[f32], t: &[f32], pw: f32, scale: f32, dz: &mut [f32]) -> f64 {
    (0..z.len()).map(|i| one(z[i], t[i], pw, scale, dz.get_mut(i).filter(|_| GRAD))).sum()
}

/// `body` eight lanes at a time (LLVM leaves the portable loop scalar).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn body_avx2<const GRAD: bool>(z: &[f32], t: &[f32], pw: f32, scale: f32, dz: &mut [f32]) -> f64 {
    use std::arch::x86_64::*;
    let n8 = z.len() / 8 * 8;
    // SAFETY: i + 8 <= n8 <= len of z, t (and dz when GRAD) for every load/store.
    let lanes = unsafe {
        let (one, zero, sign) = (_mm256_set1_ps(1.0), _mm256_setzero_ps(), _mm256_set1_ps(-0.0));
        let (pwm1, sc) = (_mm256_set1_ps(pw - 1.0), _mm256_set1_ps(scale));
        let poly = |coef: &[f32], x: __m256| coef[1..].iter().fold(_mm256_set1_ps(coef[0]), |p, &c| _mm256_fmadd_ps(p, x, _mm256_set1_ps(c)));
        let mut acc = zero;
        let mut i = 0;
        while i < n8 {
            let x = _mm256_loadu_ps(z.as_ptr().add(i));
            let y = _mm256_loadu_ps(t.as_ptr().add(i));
            // e = exp(−|x|)
            let a = _mm256_max_ps(_mm256_or_ps(x, sign), _mm256_set1_ps(-87.0));
            let n = _mm256_cvttps_epi32(_mm256_fmsub_ps(a, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5)));
            let nf = _mm256_cvtepi32_ps(n);
            let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(C2), _mm256_fnmadd_ps(nf, _mm256_set1_ps(C1), a));
            let p = poly(&EXP_P, r);
            let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));
            let e = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)))));
            // log1p(e)
            let big = _mm256_cmp_ps::<_CMP_GT_OQ>(e, _mm256_set1_ps(SQRT2_M1));
            let f = _mm256_blendv_ps(e, _mm256_mul_ps(_mm256_sub_ps(e, one), _mm256_set1_ps(0.5)), big);
            let k = _mm256_and_ps(big, one);
            let zz = _mm256_mul_ps(f, f);
            let q = _mm256_mul_ps(_mm256_mul_ps(poly(&LOG_P, f), f), zz);
            let q = _mm256_fmadd_ps(_mm256_set1_ps(-0.5), zz, _mm256_fmadd_ps(_mm256_set1_ps(C2), k, q));
            let lp = _mm256_fmadd_ps(_mm256_set1_ps(C1), k, _mm256_add_ps(f, q));
            // (1 − y)·x + lw·(log1p(e) + max(−x, 0))
            let lw = _mm256_fmadd_ps(pwm1, y, one);
            let omy = _mm256_sub_ps(one, y);
            let negx = _mm256_max_ps(_mm256_sub_ps(zero, x), zero);
            acc = _mm256_add_ps(acc, _mm256_fmadd_ps(omy, x, _mm256_mul_ps(lw, _mm256_add_ps(lp, negx))));
            if GRAD {
                let inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
                let sig_neg = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), _mm256_cmp_ps::<_CMP_GE_OQ>(x, zero));
                _mm256_storeu_ps(dz.as_mut_ptr().add(i), _mm256_mul_ps(sc, _mm256_fnmadd_ps(lw, sig_neg, omy)));
            }
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes
    };
    let mut sum: f64 = lanes.iter().map(|&v| v as f64).sum();
    for i in n8..z.len() {
        sum += one(z[i], t[i], pw, scale, dz.get_mut(i).filter(|_| GRAD));
    }
    sum
}

fn run<const GRAD: bool>(z: &[f32], t: &[f32], pw: f32, scale: f32, dz: &mut [f32]) -> f64 {
    assert!(z.len() == t.len() && (!GRAD || dz.len() == z.len()));
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { body_avx2::<GRAD>(z, t, pw, scale, dz) };
    }
    body::<GRAD>(z, t, pw, scale, dz)
}

/// Σ bce(z_i, t_i); `dz_i = scale · ∂bce/∂z_i`.
pub fn bce_logits_grad(z: &[f32], t: &[f32], pw: f32, scale: f32, dz: &mut [f32]) -> f64 {
    run::<true>(z, t, pw, scale, dz)
}

/// Σ bce(z_i, t_i) only.
pub fn bce_logits_sum(z: &[f32], t: &[f32], pw: f32) -> f64 {
    run::<false>(z, t, pw, 0.0, &mut [])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_log1p_match_libm() {
        for i in 0..=20000 {
            let x = -(i as f32) * 0.0045; // 0 .. -90
            let (got, want) = (exp_nonpos(x), x.max(-87.0).exp());
            assert!((got - want).abs() <= 3.0 * f32::EPSILON * want, "exp({x}) = {got}, libm {want}");
            let e = i as f32 / 20000.0;
            let (got, want) = (log1p_01(e), (e as f64).ln_1p() as f32);
            assert!((got - want).abs() <= 2.0 * f32::EPSILON * want.max(1e-30), "log1p({e}) = {got}, want {want}");
        }
        assert_eq!(log1p_01(1e-30), 1e-30);
    }

    #[test]
    fn loss_and_gradient_match_the_plain_formula() {
        let z: Vec<f32> = (0..101).map(|i| (i as f32 - 50.0) * 0.37).collect();
        let t: Vec<f32> = (0..101).map(|i| if i % 7 == 0 { (i % 10) as f32 / 10.0 } else { 0.0 }).collect();
        for pw in [1.0f32, 2.5] {
            let mut dz = vec![0.0; z.len()];
            let sum = bce_logits_grad(&z, &t, pw, 0.5, &mut dz);
            assert_eq!(sum, bce_logits_sum(&z, &t, pw));
            let mut want = 0.0f64;
            for i in 0..z.len() {
                let (x, y) = (z[i] as f64, t[i] as f64);
                let s = 1.0 / (1.0 + (-x).exp());
                let lw = (pw as f64 - 1.0) * y + 1.0;
                // -(pw·y·log σ + (1 − y)·log(1 − σ)), stable via softplus
                let sp = |v: f64| v.max(0.0) + (-v.abs()).exp().ln_1p();
                want += (pw as f64) * y * sp(-x) + (1.0 - y) * sp(x);
                let g = 0.5 * ((1.0 - y) - lw * (1.0 - s));
                assert!((dz[i] as f64 - g).abs() < 1e-6, "dz at {x}: {} vs {g}", dz[i]);
            }
            assert!((sum - want).abs() < 1e-5 * want, "{sum} vs {want}");
        }
    }
}
