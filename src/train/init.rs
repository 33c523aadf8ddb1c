//! A pretrained head in, the head to start training from out: unchanged, with
//! a new class set, or re-initialised as YOLOv5 would.
//!
//! YOLOv5 throws the whole head away when nc changes. Here the box and
//! objectness rows of every anchor are kept from the pretrained head, since
//! the frozen features and those rows already localise objects; only the class
//! rows start from YOLOv5's initialisation: PyTorch's default conv init
//! (uniform ±1/√fan_in for weights and bias) plus the class prior
//! `log(0.6 / (nc − 0.99))` on the bias (`Detect._initialize_biases`).

use ndarray::{Array1, Array2};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::head::Head;

fn uniform(rng: &mut ChaCha8Rng, bound: f32) -> f32 {
    rng.random_range(-bound..bound)
}

/// Replaces the class set: box/objectness rows kept, class rows initialised.
pub fn new_class_head(pre: &Head, names: &[String], rng: &mut ChaCha8Rng) -> Head {
    with_class_rows(pre, names.to_vec(), |k| k < 5, rng)
}

/// A head of `names.len()` classes: row k of each anchor's block is `pre`'s
/// row k where `kept(k)`, else a fresh class row as YOLOv5 initialises one
/// (uniform ±1/√fan_in, bias plus `log(0.6 / (nc − 0.99))`), drawn in row order.
pub fn with_class_rows(pre: &Head, names: Vec<String>, kept: impl Fn(usize) -> bool, rng: &mut ChaCha8Rng) -> Head {
    let nc = names.len();
    let (na, old_no, no) = (pre.na(), pre.no(), nc + 5);
    let prior = (0.6 / (nc as f64 - 0.99)).ln() as f32;
    let mut weights = Vec::new();
    let mut biases = Vec::new();
    for (w, b) in pre.weights.iter().zip(&pre.biases) {
        let cin = w.ncols();
        let bound = 1.0 / (cin as f32).sqrt();
        let mut nw = Array2::<f32>::zeros((na * no, cin));
        let mut nb = Array1::<f32>::zeros(na * no);
        for a in 0..na {
            for k in 0..no {
                let row = a * no + k;
                if kept(k) {
                    nw.row_mut(row).assign(&w.row(a * old_no + k));
                    nb[row] = b[a * old_no + k];
                } else {
                    nw.row_mut(row).mapv_inplace(|_| uniform(rng, bound));
                    nb[row] = uniform(rng, bound) + prior;
                }
            }
        }
        weights.push(nw);
        biases.push(nb);
    }
    Head { nc, names, strides: pre.strides.clone(), anchors: pre.anchors.clone(), weights, biases }
}

/// `--reinit-head`: every row re-initialised as YOLOv5 does for a new model,
/// objectness bias `log(8 / (640 / s)²)`.
pub fn reinit_head(pre: &Head, names: &[String], rng: &mut ChaCha8Rng) -> Head {
    let mut h = new_class_head(pre, names, rng);
    let no = h.no();
    for (l, (w, b)) in h.weights.iter_mut().zip(h.biases.iter_mut()).enumerate() {
        let bound = 1.0 / (w.ncols() as f32).sqrt();
        let obj = (8.0 / (640.0 / pre.strides[l] as f64).powi(2)).ln() as f32;
        for row in 0..w.nrows() {
            let k = row % no;
            if k < 5 {
                w.row_mut(row).mapv_inplace(|_| uniform(rng, bound));
                b[row] = uniform(rng, bound) + if k == 4 { obj } else { 0.0 };
            }
        }
    }
    h
}
