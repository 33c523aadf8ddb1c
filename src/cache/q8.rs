//! `--dtype q8`: one level `[C, H·W]` of f32 features in; per channel a scale,
//! an offset and one byte per value out, such that value ≈ offset[c] +
//! scale[c]·q (`features::Q8Slice` reads it back).
//!
//! Why affine (a zero point, here the channel's minimum as `offset`) and not
//! symmetric: the crossing tensors are SiLU outputs, bounded below by -0.28
//! and skewed positive, so a symmetric code spends half its 256 steps on
//! values that never occur. On real vehicles features the affine code's RMS
//! error is about half the symmetric one's (`q8_error` in tools/, README);
//! `Q8Mode::Symmetric` stays for that comparison.

/// How a channel's 256 codes cover its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Mode {
    /// `[min, max]` in 255 steps: offset = min, scale = (max − min)/255.
    Affine,
    /// `[−a, a]` with a = max |x| in ±127 steps (code 128 is 0): scale =
    /// a/127, offset = −128·scale.
    Symmetric,
}

/// Quantises `x` (`[C, sp]` row-major) channel by channel into `scale`,
/// `offset` (`[C]`) and `q` (`[C·sp]`).
pub fn quantise(x: &[f32], sp: usize, mode: Q8Mode, scale: &mut [f32], offset: &mut [f32], q: &mut [u8]) {
    assert!(sp > 0 && x.len() == scale.len() * sp && scale.len() == offset.len() && q.len() == x.len(), "quantise: shapes differ");
    for (c, (xr, qr)) in x.chunks_exact(sp).zip(q.chunks_exact_mut(sp)).enumerate() {
        let (lo, hi) = xr.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (s, z) = match mode {
            Q8Mode::Affine => ((hi - lo) / 255.0, lo),
            Q8Mode::Symmetric => {
                let s = lo.abs().max(hi.abs()) / 127.0;
                (s, -128.0 * s)
            }
        };
        // a constant channel (or one without finite values) is all offset
        let (s, z) = if s.is_finite() && s > 0.0 { (s, z) } else { (0.0, if lo.is_finite() { lo } else { 0.0 }) };
        scale[c] = s;
        offset[c] = z;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        // v ≥ 0 up to rounding; `as u8` saturates (and maps NaN to 0), so
        // +0.5 then truncation rounds to the nearest code
        for (o, &v) in qr.iter_mut().zip(xr) {
            *o = ((v - z) * inv + 0.5) as u8;
        }
    }
}

/// Bytes a q8 level `[c, h, w]` takes in an entry: the scales and offsets
/// (f32 each) and one byte a value.
pub fn level_bytes(c: usize, h: usize, w: usize) -> usize {
    8 * c + c * h * w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Q8Slice;

    /// Channels of different ranges, one constant, one SiLU-like.
    fn sample(c: usize, sp: usize) -> Vec<f32> {
        (0..c * sp)
            .map(|i| {
                let (ch, s) = (i / sp, (i % sp) as f32);
                match ch % 4 {
                    0 => 0.75,
                    1 => (s * 0.37).sin() * 40.0,
                    2 => {
                        let v = (s * 0.11).cos() * 3.0;
                        v / (1.0 + (-v).exp())
                    }
                    _ => s * 1e-3 - 0.01,
                }
            })
            .collect()
    }

    #[test]
    fn dequantised_values_are_within_half_a_step_per_channel() {
        let (c, sp) = (8, 97);
        let x = sample(c, sp);
        for mode in [Q8Mode::Affine, Q8Mode::Symmetric] {
            let (mut s, mut z, mut q) = (vec![0.0; c], vec![0.0; c], vec![0u8; c * sp]);
            quantise(&x, sp, mode, &mut s, &mut z, &mut q);
            let mut back = vec![0.0; c * sp];
            Q8Slice { q: &q, scale: &s, offset: &z }.dequantise_into(&mut back);
            for ch in 0..c {
                let r = ch * sp..(ch + 1) * sp;
                let amax = x[r.clone()].iter().fold(0f32, |a, v| a.max(v.abs()));
                for (a, b) in x[r.clone()].iter().zip(&back[r]) {
                    let bound = s[ch] * 0.5 * (1.0 + 1e-4) + amax * 1e-6;
                    assert!((a - b).abs() <= bound, "{mode:?} channel {ch}: {a} came back as {b} (step {})", s[ch]);
                }
            }
            // the constant channel comes back exactly
            assert!(back[..sp].iter().all(|&v| v == 0.75), "{mode:?}");
            // the step is the channel's range over the codes it has
            let r = sp..2 * sp;
            let (lo, hi) = x[r].iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            let want = if mode == Q8Mode::Affine { (hi - lo) / 255.0 } else { lo.abs().max(hi) / 127.0 };
            assert!((s[1] - want).abs() <= want * 1e-6);
        }
    }

    #[test]
    fn affine_is_finer_than_symmetric_on_one_signed_features() {
        // SiLU outputs: the case the cache holds
        let (c, sp) = (4, 200);
        let x: Vec<f32> = (0..c * sp).map(|i| (i as f32 * 0.05).sin() * 4.0).map(|v| v / (1.0 + (-v).exp())).collect();
        let err = |mode| {
            let (mut s, mut z, mut q) = (vec![0.0; c], vec![0.0; c], vec![0u8; c * sp]);
            quantise(&x, sp, mode, &mut s, &mut z, &mut q);
            let mut back = vec![0.0; c * sp];
            Q8Slice { q: &q, scale: &s, offset: &z }.dequantise_into(&mut back);
            x.iter().zip(&back).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>()
        };
        assert!(err(Q8Mode::Affine) < 0.6 * err(Q8Mode::Symmetric));
    }
}
