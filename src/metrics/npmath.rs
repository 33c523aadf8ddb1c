// numpy numerics that YOLOv5's metrics lean on, reproduced operation by operation.
// In: f64 slices. Out: the values numpy 2.x's np.linspace, np.interp, add.reduce
// (pairwise summation, hence np.sum/np.mean on 1-D float64) and np.trapezoid give,
// bit for bit, so AP numbers match val.py exactly rather than "to 1e-12".

/// `np.linspace(start, stop, num)` (endpoint=True): `arange(num) * step + start`, last
/// element forced to `stop` (numpy does the same; `k * step` alone can miss it).
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|k| k as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            // numpy's denormal branch: divide first, then scale
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// numpy's `binary_search_with_guess` result, without the guess (the guess only
/// speeds it up): -1 if key < xp[0], len if key > xp[len-1], else
/// (number of xp <= key) - 1, i.e. the LAST of equal xp values.
fn search(key: f64, xp: &[f64]) -> isize {
    let len = xp.len();
    if key > xp[len - 1] {
        return len as isize;
    }
    if key < xp[0] {
        return -1;
    }
    // partition_point = first index with xp[i] > key (xp is sorted)
    let first_greater = xp.partition_point(|&v| key >= v);
    first_greater as isize - 1
}

/// `np.interp(x, xp, fp, left, right)`. `left`/`right` default to fp[0] / fp[-1].
/// xp must be non-decreasing (numpy does not check either). Panics if xp is empty
/// (numpy raises ValueError).
pub fn interp(
    x: &[f64],
    xp: &[f64],
    fp: &[f64],
    left: Option<f64>,
    right: Option<f64>,
) -> Vec<f64> {
    assert!(!xp.is_empty(), "interp: xp must not be empty");
    assert_eq!(
        xp.len(),
        fp.len(),
        "interp: xp and fp must have the same length"
    );
    let n = xp.len();
    let lval = left.unwrap_or(fp[0]);
    let rval = right.unwrap_or(fp[n - 1]);
    if n == 1 {
        // numpy's single-point branch: NaN x falls through to fp[0]
        return x
            .iter()
            .map(|&xv| {
                if xv < xp[0] {
                    lval
                } else if xv > xp[0] {
                    rval
                } else {
                    fp[0]
                }
            })
            .collect();
    }
    x.iter()
        .map(|&xv| {
            if xv.is_nan() {
                return xv;
            }
            let j = search(xv, xp);
            if j == -1 {
                return lval;
            }
            if j == n as isize {
                return rval;
            }
            let j = j as usize;
            if j == n - 1 || xp[j] == xv {
                return fp[j];
            }
            let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
            let mut v = slope * (xv - xp[j]) + fp[j];
            if v.is_nan() {
                // numpy retries from the right end point, then falls back to a flat segment
                v = slope * (xv - xp[j + 1]) + fp[j + 1];
                if v.is_nan() && fp[j] == fp[j + 1] {
                    v = fp[j];
                }
            }
            v
        })
        .collect()
}

/// numpy's `DOUBLE_pairwise_sum`: 8 accumulators up to 128 elements, recursive halving
/// above. This is what `np.sum`/`np.mean` do along a contiguous 1-D axis.
pub fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for k in 0..8 {
                r[k] += a[i + k];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// `np.sum` of a 1-D float64 array (reduction starts from the identity 0).
pub fn sum(a: &[f64]) -> f64 {
    0.0 + pairwise_sum(a)
}

/// `np.mean` of a 1-D float64 array; NaN for an empty one, as numpy (which also warns).
pub fn mean(a: &[f64]) -> f64 {
    sum(a) / a.len() as f64
}

/// `np.trapezoid(y, x)` (the old `np.trapz`): `sum(diff(x) * (y[1:] + y[:-1]) / 2.0)`.
pub fn trapz(y: &[f64], x: &[f64]) -> f64 {
    assert_eq!(y.len(), x.len());
    if y.len() < 2 {
        return 0.0;
    }
    let terms: Vec<f64> = (0..y.len() - 1)
        .map(|k| (x[k + 1] - x[k]) * (y[k + 1] + y[k]) / 2.0)
        .collect();
    sum(&terms)
}

/// `np.argmax` on a 1-D float array: first maximum, or the first NaN if there is one.
/// Panics on an empty slice (numpy raises).
pub fn argmax(a: &[f64]) -> usize {
    assert!(!a.is_empty(), "argmax of an empty sequence");
    let mut best = 0;
    for (i, &v) in a.iter().enumerate() {
        if v.is_nan() {
            return i;
        }
        if v > a[best] {
            best = i;
        }
    }
    best
}

/// `np.maximum` for one pair: NaN wins, as numpy.
pub fn np_maximum(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_formula() {
        let x = linspace(0.0, 1.0, 101);
        assert_eq!(x.len(), 101);
        assert_eq!(x[0], 0.0);
        assert_eq!(x[100], 1.0);
        // numpy: 3 * 0.01 (not 3 / 100)
        assert_eq!(x[3], 3.0 * 0.01);
        assert_eq!(linspace(2.0, 5.0, 1), vec![2.0]);
        assert!(linspace(0.0, 1.0, 0).is_empty());
    }

    #[test]
    fn interp_edges_and_duplicates() {
        let xp = [0.0, 1.0, 1.0, 2.0];
        let fp = [0.0, 10.0, 20.0, 30.0];
        let y = interp(&[-1.0, 0.5, 1.0, 1.5, 2.0, 3.0], &xp, &fp, Some(-5.0), None);
        // x == duplicated xp takes the LAST duplicate; between, interpolate from it
        assert_eq!(y, vec![-5.0, 5.0, 20.0, 25.0, 30.0, 30.0]);
        let y1 = interp(
            &[0.0, 1.0, 2.0, f64::NAN],
            &[1.0],
            &[7.0],
            Some(1.0),
            Some(2.0),
        );
        assert_eq!(&y1[..3], &[1.0, 7.0, 2.0]);
        assert_eq!(y1[3], 7.0);
        assert!(interp(&[f64::NAN], &xp, &fp, None, None)[0].is_nan());
    }

    #[test]
    fn pairwise_sum_order() {
        let a: Vec<f64> = (0..10).map(|k| k as f64 * 0.1).collect();
        let r: f64 =
            ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + a[8] + a[9];
        assert_eq!(pairwise_sum(&a), r);
        let big: Vec<f64> = (0..1000).map(|k| 1.0 / (k as f64 + 1.0)).collect();
        let naive: f64 = big.iter().sum();
        assert!((pairwise_sum(&big) - naive).abs() < 1e-12);
        assert_eq!(pairwise_sum(&[]), 0.0);
    }

    #[test]
    fn trapz_and_argmax() {
        assert_eq!(trapz(&[1.0, 1.0, 1.0], &[0.0, 0.5, 1.0]), 1.0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0, f64::NAN, 3.0]), 1);
        assert!(np_maximum(1.0, f64::NAN).is_nan());
    }
}
