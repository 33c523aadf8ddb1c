//! The Detect head as plain Rust data: three 1x1 convolutions (weights and
//! biases), anchors, strides, nc and names. In: a `Model` (or a saved head);
//! out: raw conv outputs, YOLOv5's decoded `output0`, and safetensors + JSON on
//! disk.
//!
//! Layout follows YOLOv5: conv output channel `a * no + k` is anchor `a`,
//! field `k` (x, y, w, h, obj, cls...); decoded rows run level by level, then
//! anchor, then grid row `y`, then column `x`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use serde::{Deserialize, Serialize};

use crate::graph::Model;
use crate::kernels::{Elem, conv_rows_window, dots, gather_col};

/// Positions per objectness tile in `decode_above`.
const DECODE_TILE: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub nc: usize,
    pub names: Vec<String>,
    pub strides: Vec<f32>,
    /// Anchors in pixels per level, `[w, h]`.
    pub anchors: Vec<Vec<[f32; 2]>>,
    /// Per level `[na * no, in_channels]`.
    pub weights: Vec<Array2<f32>>,
    /// Per level `[na * no]`.
    pub biases: Vec<Array1<f32>>,
}

/// The small JSON that travels next to the safetensors file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadMeta {
    pub nc: usize,
    pub names: Vec<String>,
    pub strides: Vec<f32>,
    pub anchors: Vec<Vec<[f32; 2]>>,
    /// Free-form provenance: source model, cache key, run.
    #[serde(default)]
    pub source: HashMap<String, String>,
}

impl Head {
    pub fn from_model(model: &Model) -> Result<Head> {
        let spec = &model.spec;
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for l in &spec.levels {
            let (wd, w) = model.initializer_f32(&l.weight)?;
            let (_, b) = model.initializer_f32(&l.bias)?;
            weights.push(Array2::from_shape_vec((wd[0], wd[1]), w)?);
            biases.push(Array1::from_vec(b));
        }
        Ok(Head {
            nc: spec.nc,
            names: spec.names.clone(),
            strides: spec.strides(),
            anchors: spec.levels.iter().map(|l| l.anchors.clone()).collect(),
            weights,
            biases,
        })
    }

    pub fn na(&self) -> usize {
        self.anchors[0].len()
    }
    pub fn no(&self) -> usize {
        self.nc + 5
    }
    pub fn nl(&self) -> usize {
        self.weights.len()
    }
    pub fn in_channels(&self) -> Vec<usize> {
        self.weights.iter().map(|w| w.ncols()).collect()
    }

    /// The raw 1x1 conv of one level on one image: features `[C, H*W]` in,
    /// `[na*no, H*W]` out.
    pub fn conv(&self, level: usize, features: ArrayView2<f32>) -> Array2<f32> {
        let mut out = self.weights[level].dot(&features);
        out += &self.biases[level].view().insert_axis(Axis(1));
        out
    }

    /// YOLOv5's inference output for one image: features per level as
    /// `([C, H*W], H, W)`, out `[sum(na*H*W), no]` with xywh in input pixels and
    /// sigmoid confidences, exactly as the exported `output0`.
    pub fn decode(&self, levels: &[(ArrayView2<f32>, usize, usize)]) -> Array2<f32> {
        let (na, no) = (self.na(), self.no());
        let rows: usize = levels.iter().map(|(_, h, w)| na * h * w).sum();
        let mut out = Array2::<f32>::zeros((rows, no));
        let mut row = 0;
        for (li, (feat, ny, nx)) in levels.iter().enumerate() {
            let raw = self.conv(li, *feat);
            let stride = self.strides[li];
            for a in 0..na {
                let [aw, ah] = self.anchors[li][a];
                let block = raw.slice(s![a * no..(a + 1) * no, ..]);
                for y in 0..*ny {
                    for x in 0..*nx {
                        let p = y * nx + x;
                        let mut o = out.row_mut(row);
                        for k in 0..no {
                            o[k] = block[[k, p]];
                        }
                        decode_row(o.as_slice_mut().unwrap(), x, y, stride, [aw, ah]);
                        row += 1;
                    }
                }
            }
        }
        out
    }

    /// The rows of `decode` whose objectness exceeds `min_obj`, in the same
    /// order. NMS drops every other row first (`obj > conf_thres`), so
    /// validation computes the objectness channels everywhere and the other
    /// channels only at the surviving rows. Features per level `([C*H*W] as
    /// cached, f32 or f16, H, W)`.
    pub fn decode_above<T: Elem>(&self, levels: &[(&[T], usize, usize)], min_obj: f64) -> Array2<f32> {
        let (na, no) = (self.na(), self.no());
        // a logit below this cannot pass (the exact test on the sigmoid follows)
        let z_lo = if min_obj > 0.0 && min_obj < 1.0 { (min_obj / (1.0 - min_obj)).ln() as f32 - 1e-3 } else { f32::NEG_INFINITY };
        let mut rows: Vec<f32> = Vec::new();
        for (li, (x, ny, nx)) in levels.iter().enumerate() {
            let sp = ny * nx;
            let cin = x.len() / sp;
            let w = &self.weights[li];
            let bias = self.biases[li].as_slice().unwrap();
            let wrow = |r: usize| w.row(r).to_slice().unwrap();
            let wobj: Vec<&[f32]> = (0..na).map(|a| wrow(a * no + 4)).collect();
            let bobj: Vec<f32> = (0..na).map(|a| bias[a * no + 4]).collect();
            let wanchor: Vec<Vec<&[f32]>> = (0..na).map(|a| (0..no).map(|k| wrow(a * no + k)).collect()).collect();
            // rows per anchor: decode's order is anchor, then position
            let mut found: Vec<Vec<f32>> = vec![Vec::new(); na];
            let mut obj = vec![0.0f32; na * DECODE_TILE];
            let mut col = vec![0.0f32; cin];
            for s0 in (0..sp).step_by(DECODE_TILE) {
                let len = DECODE_TILE.min(sp - s0);
                let obj = &mut obj[..na * len];
                conv_rows_window(&wobj, &bobj, x, sp, s0..s0 + len, obj);
                // the tile's features are still in cache for the gathers
                for a in 0..na {
                    for i in 0..len {
                        let z = obj[a * len + i];
                        // f64 as the NMS compares it
                        if z <= z_lo || (sigmoid(z) as f64) <= min_obj {
                            continue;
                        }
                        let p = s0 + i;
                        gather_col(x, sp, p, &mut col);
                        let out = &mut found[a];
                        let start = out.len();
                        out.resize(start + no, 0.0);
                        dots(&wanchor[a], &col, &mut out[start..]);
                        for (o, b) in out[start..].iter_mut().zip(&bias[a * no..(a + 1) * no]) {
                            *o += b;
                        }
                        decode_row(&mut out[start..], p % nx, p / nx, self.strides[li], self.anchors[li][a]);
                    }
                }
            }
            for f in found {
                rows.extend(f);
            }
        }
        let n = rows.len() / no;
        Array2::from_shape_vec((n, no), rows).unwrap()
    }

    pub fn meta(&self, source: HashMap<String, String>) -> HeadMeta {
        HeadMeta { nc: self.nc, names: self.names.clone(), strides: self.strides.clone(), anchors: self.anchors.clone(), source }
    }

    /// Writes `<stem>.safetensors` and `<stem>.json` atomically.
    pub fn save(&self, stem: &Path, source: HashMap<String, String>) -> Result<()> {
        self.save_with(stem, source, crate::fsutil::write_atomic)
    }

    /// `save` by `write` (`fsutil::write_atomic`, or its unsynced form for
    /// files that a synced one can rewrite: a run's weights/last and best,
    /// derived from its checkpoint).
    pub fn save_with(&self, stem: &Path, source: HashMap<String, String>, write: fn(&Path, &[u8]) -> Result<()>) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, (w, b)) in self.weights.iter().zip(&self.biases).enumerate() {
            let w = w.as_standard_layout();
            tensors.push((format!("m.{i}.weight"), vec![w.nrows(), w.ncols(), 1, 1], bytemuck::cast_slice(w.as_slice().unwrap()).to_vec()));
            tensors.push((format!("m.{i}.bias"), vec![b.len()], bytemuck::cast_slice(b.as_slice().unwrap()).to_vec()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, shape, data)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?)))
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, None)?;
        write(&stem.with_extension("safetensors"), &bytes)?;
        let meta = serde_json::to_vec_pretty(&self.meta(source))?;
        write(&stem.with_extension("json"), &meta)?;
        Ok(())
    }

    pub fn load(stem: &Path) -> Result<Head> {
        let st_path = stem.with_extension("safetensors");
        let json_path = stem.with_extension("json");
        let meta: HeadMeta = serde_json::from_slice(&std::fs::read(&json_path).with_context(|| format!("cannot read {}", json_path.display()))?)
            .with_context(|| format!("{} is not a head metadata file", json_path.display()))?;
        let bytes = std::fs::read(&st_path).with_context(|| format!("cannot read {}", st_path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", st_path.display()))?;
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for i in 0..meta.strides.len() {
            let w = st.tensor(&format!("m.{i}.weight")).with_context(|| format!("{}: no m.{i}.weight", st_path.display()))?;
            let b = st.tensor(&format!("m.{i}.bias")).with_context(|| format!("{}: no m.{i}.bias", st_path.display()))?;
            if w.dtype() != safetensors::Dtype::F32 || b.dtype() != safetensors::Dtype::F32 || w.shape().len() != 4 {
                bail!("{}: level {i} is not an f32 1x1 convolution", st_path.display());
            }
            let wv: Vec<f32> = w.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let bv: Vec<f32> = b.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            weights.push(Array2::from_shape_vec((w.shape()[0], w.shape()[1]), wv)?);
            biases.push(Array1::from_vec(bv));
        }
        Ok(Head { nc: meta.nc, names: meta.names, strides: meta.strides, anchors: meta.anchors, weights, biases })
    }
}

#[inline]
/// YOLOv5's Detect decode of one output row in place: raw conv outputs in,
/// `[x, y, w, h]` in input pixels and sigmoid scores out.
fn decode_row(o: &mut [f32], gx: usize, gy: usize, stride: f32, [aw, ah]: [f32; 2]) {
    for v in o.iter_mut() {
        *v = sigmoid(*v);
    }
    // (2σ - 0.5 + grid) * stride; (2σ)² * anchor
    o[0] = (o[0] * 2.0 - 0.5 + gx as f32) * stride;
    o[1] = (o[1] * 2.0 - 0.5 + gy as f32) * stride;
    o[2] = (o[2] * 2.0).powi(2) * aw;
    o[3] = (o[3] * 2.0).powi(2) * ah;
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_head() -> Head {
        let no = 6;
        Head {
            nc: 1,
            names: vec!["thing".into()],
            strides: vec![8.0],
            anchors: vec![vec![[10.0, 13.0]]],
            weights: vec![Array2::from_shape_fn((no, 2), |(i, j)| (i as f32 - j as f32) * 0.1)],
            biases: vec![Array1::from_shape_fn(no, |i| i as f32 * 0.01)],
        }
    }

    #[test]
    fn decode_above_keeps_exactly_the_confident_rows_in_order() {
        let no = 7;
        let head = Head {
            nc: 2,
            names: vec!["a".into(), "b".into()],
            strides: vec![8.0, 16.0],
            anchors: vec![vec![[10.0, 13.0], [16.0, 30.0]], vec![[30.0, 61.0], [62.0, 45.0]]],
            weights: vec![Array2::from_shape_fn((2 * no, 3), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.3 - 1.5), Array2::from_shape_fn((2 * no, 3), |(i, j)| ((i * 5 + j) % 9) as f32 * 0.4 - 1.6)],
            biases: vec![Array1::from_shape_fn(2 * no, |i| i as f32 * 0.05 - 0.3), Array1::from_shape_fn(2 * no, |i| 0.2 - i as f32 * 0.03)],
        };
        let f0 = Array2::from_shape_fn((3, 4 * 5), |(c, p)| ((c * 13 + p * 7) % 17) as f32 * 0.25 - 2.0);
        let f1 = Array2::from_shape_fn((3, 2 * 3), |(c, p)| ((c * 3 + p * 11) % 7) as f32 * 0.5 - 1.5);
        let levels = [(f0.view(), 4, 5), (f1.view(), 2, 3)];
        let full = head.decode(&levels);
        let min_obj = 0.5;
        let kept: Vec<usize> = (0..full.nrows()).filter(|&r| full[[r, 4]] as f64 > min_obj).collect();
        assert!(!kept.is_empty() && kept.len() < full.nrows());
        let raw = [(f0.as_slice().unwrap(), 4, 5), (f1.as_slice().unwrap(), 2, 3)];
        let some = head.decode_above(&raw, min_obj);
        assert_eq!(some.nrows(), kept.len());
        for (i, &r) in kept.iter().enumerate() {
            for k in 0..no {
                assert!((some[[i, k]] - full[[r, k]]).abs() < 1e-4, "row {r} field {k}");
            }
        }
    }

    #[test]
    fn decode_is_yolov5s_formula() {
        let h = tiny_head();
        // one image, 2 channels, 1x2 grid
        let feat = Array2::from_shape_vec((2, 2), vec![0.5, -1.0, 2.0, 0.0]).unwrap();
        let out = h.decode(&[(feat.view(), 1, 2)]);
        let raw = h.conv(0, feat.view());
        let x = 1; // second cell
        let sx = sigmoid(raw[[0, x]]);
        assert!((out[[1, 0]] - (sx * 2.0 - 0.5 + 1.0) * 8.0).abs() < 1e-6);
        let sw = sigmoid(raw[[2, x]]);
        assert!((out[[1, 2]] - (2.0 * sw).powi(2) * 10.0).abs() < 1e-6);
        assert!((out[[1, 5]] - sigmoid(raw[[5, x]])).abs() < 1e-7);
    }

    #[test]
    fn save_load_round_trip() {
        let h = tiny_head();
        let dir = tempfile::tempdir().unwrap();
        h.save(&dir.path().join("head"), HashMap::new()).unwrap();
        assert_eq!(Head::load(&dir.path().join("head")).unwrap(), h);
    }
}
