//! The trainer's side of `--freeze N` below 24: layers N..23 (a `TailNet`
//! built from the ONNX nodes) run and train in front of the head.
//!
//! In: the cache entries of the crossing tensors, the parameter store (tail
//! tensors under their ONNX initializer names next to the head's). Out: the
//! loss and the gradient of every parameter for one batch (`step`), the head
//! inputs of the val split as entries the val code reads (`val_items`), and the
//! trained tail next to a saved head (`save`, read back by `weights::resolve`).
//!
//! The head runs densely here (a 1x1 conv per level on the tape, then
//! YOLOv5's `compute_loss` on p), since its inputs now need gradients; the fused
//! sparse objectness loss of N = 24 reads frozen features only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, ArrayView3, Axis, IxDyn};
use rayon::prelude::*;

use super::batches::Sample;
use super::params::{Group, HeadLayout, Param, ParamStore, Tensors};
use crate::autograd::{Tape, Var};
use crate::cache::{Dtype, Entry, entry};
use crate::loss::{LossConfig, compute_loss};
use crate::tail::TailNet;
use crate::val::ValItem;

/// The tail of a run.
pub struct TailRun {
    pub net: TailNet,
    /// False with `--train cls`: the tail runs but stays frozen.
    pub trains: bool,
    /// The GEMM path of a training step's convolutions (None: f32; see
    /// `Precision`). Validation's forward always runs f32.
    pub gemm: Option<crate::kernels::conv::Path>,
    /// Where each validation writes the val images' head inputs.
    pub val_dir: tempfile::TempDir,
    /// With a frozen tail, the val images' head inputs, computed once
    /// (`freeze_val`) instead of at every validation.
    pub frozen_val: Option<Vec<ValItem>>,
}

impl TailRun {
    /// Computes the head inputs of the val `items` once when the tail does
    /// not train.
    pub fn freeze_val(&mut self, items: &[ValItem], shapes: &[[usize; 3]], batch: usize) -> Result<()> {
        if !self.trains {
            self.frozen_val = Some(val_items(&self.net, items, shapes, batch, self.val_dir.path())?);
        }
        Ok(())
    }
}

/// Adds the tail's tensors to the store: conv weights with weight decay,
/// biases (BatchNorm folded into the conv) without, as YOLOv5 groups them;
/// every row at the hyp's `lr_tail` multiplier (1: YOLOv5's single rate).
pub fn add_params(net: &TailNet, store: &mut ParamStore, lr_tail: f64) {
    for (name, v) in &net.params {
        let group = if v.ndim() > 1 { Group::Decay } else { Group::NoDecay };
        let row_lr = (lr_tail != 1.0).then(|| vec![lr_tail as f32; v.shape()[0]]);
        store.insert(name, Param { value: v.clone(), group, row_lr });
    }
}

/// The crossing tensors of a mini-batch as f32 `[B, C, H, W]` arrays.
pub fn load_dense(samples: &[&Sample], shapes: &[[usize; 3]], dtype: Dtype) -> Result<Vec<ArrayD<f32>>> {
    let entries: Vec<Entry> = samples.par_iter().map(|s| Entry::open_verified_before(&s.entry)).collect::<Result<_>>()?;
    for (e, s) in entries.iter().zip(samples) {
        if e.header.dtype != dtype || e.header.shapes != shapes {
            bail!("cache entry {} holds {} features of shapes {:?}, expected {} {:?}", s.entry.display(), e.header.dtype.name(), e.header.shapes, dtype.name(), shapes);
        }
    }
    Ok(dense(&entries, shapes))
}

/// Tensor `i` of every entry as one f32 `[B, C, H, W]` array per tensor.
pub(crate) fn dense(entries: &[Entry], shapes: &[[usize; 3]]) -> Vec<ArrayD<f32>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, &[c, h, w])| {
            let mut a = ArrayD::<f32>::zeros(IxDyn(&[entries.len(), c, h, w]));
            a.axis_iter_mut(Axis(0)).into_par_iter().zip(entries).for_each(|(mut img, e)| e.level_into(i, img.as_slice_mut().expect("standard layout")));
            a
        })
        .collect()
}

/// The head's raw output p per level, `[B·na·ny·nx, no]` with rows in
/// (b, a, y, x) order, from head inputs `[B, C, ny, nx]` on the tape (the
/// 1x1 conv written straight in that layout: autograd::fused::head_rows).
fn head_p(t: &mut Tape, x: Var, w: Var, b: Var, na: usize) -> Var {
    t.head_rows(x, w, b, na)
}

/// Loss parts `[box, obj, cls]` (not × bs) and the gradient of each
/// parameter by name, through the tail and the head.
pub fn step(params: &ParamStore, crossing: Vec<ArrayD<f32>>, targets: ndarray::ArrayView2<f32>, bs: usize, cfg: &LossConfig, grids: &[(usize, usize)], layout: &HeadLayout, tail: &TailRun) -> ([f32; 3], Tensors) {
    use crate::autograd::profile;
    let t0 = std::time::Instant::now();
    let mut t = tail.gemm.map_or_else(Tape::new, Tape::with_gemm);
    let mut vars: BTreeMap<String, Var> = BTreeMap::new();
    let mut tail_vars: HashMap<String, Var> = HashMap::new();
    for (name, v) in &tail.net.params {
        let var = match params.get(name) {
            Some(p) if tail.trains => {
                let var = t.param(p.value.clone());
                vars.insert(name.clone(), var);
                var
            }
            _ => t.constant(v.clone()),
        };
        tail_vars.insert(name.clone(), var);
    }
    for name in layout.weights.iter().chain(&layout.biases) {
        let p = params.get(name).expect("the head's parameters are in the store");
        vars.insert(name.clone(), t.param(p.value.clone()));
    }
    let xs: Vec<Var> = crossing.into_iter().map(|x| t.constant(x)).collect();
    let feats = tail.net.forward(&mut t, &tail_vars, &xs).expect("the tail was checked when the run was set up");
    let na = cfg.na();
    profile::phase("tail forward", t0);
    let t0 = std::time::Instant::now();
    let p: Vec<Var> = feats.iter().enumerate().map(|(l, &x)| head_p(&mut t, x, vars[&layout.weights[l]], vars[&layout.biases[l]], na)).collect();
    profile::phase("head forward", t0);
    let t0 = std::time::Instant::now();
    let parts = compute_loss(&mut t, cfg, &p, grids, bs, targets);
    let losses = [t.scalar(parts.lbox), t.scalar(parts.lobj), t.scalar(parts.lcls)];
    profile::phase("loss forward", t0);
    let t0 = std::time::Instant::now();
    let mut g = t.backward(parts.total);
    profile::phase("backward", t0);
    let grads = vars.into_iter().map(|(n, v)| (n, g.take(v).unwrap_or_else(|| ArrayD::zeros(t.value(v).raw_dim())))).collect();
    (losses, grads)
}

/// `net` with its parameters taken from `values` where they are there.
pub fn net_with(net: &TailNet, values: &Tensors) -> TailNet {
    let mut n = net.clone();
    for (k, v) in n.params.iter_mut() {
        if let Some(x) = values.get(k) {
            *v = x.clone();
        }
    }
    n
}

/// The head inputs of `items` (their crossing entries) through `net`,
/// written as f16 entries into `dir`, in order: what the val code reads.
pub fn val_items(net: &TailNet, items: &[ValItem], shapes: &[[usize; 3]], batch: usize, dir: &Path) -> Result<Vec<ValItem>> {
    let mut out = Vec::with_capacity(items.len());
    for (ci, chunk) in items.chunks(batch.max(1)).enumerate() {
        let entries: Vec<Entry> = chunk.par_iter().map(|it| Entry::open_verified_before(&it.entry)).collect::<Result<_>>()?;
        let feats = net.eval(dense(&entries, shapes))?;
        let written: Vec<Result<ValItem>> = chunk
            .par_iter()
            .zip(&entries)
            .enumerate()
            .map(|(b, (it, e))| {
                let levels: Vec<ArrayView3<f32>> = feats.iter().map(|f| f.index_axis(Axis(0), b).into_dimensionality().expect("NCHW")).collect();
                let bytes = entry::encode(&levels, e.header.letterbox, Dtype::F16);
                let path: PathBuf = dir.join(format!("{ci}-{b}.feat"));
                crate::fsutil::write_atomic_unsynced(&path, &bytes)?;
                Ok(ValItem { image: it.image.clone(), entry: path })
            })
            .collect();
        for w in written {
            out.push(w?);
        }
    }
    Ok(out)
}

/// The path of the tail tensors saved next to the head `stem`.
pub fn tail_path(stem: &Path) -> PathBuf {
    stem.with_extension("tail.safetensors")
}

/// Writes the tail's tensors (by ONNX initializer name) next to `stem`.
pub fn save(stem: &Path, net: &TailNet, values: &Tensors) -> Result<()> {
    let tensors: Vec<(String, ArrayD<f32>)> = net.params.keys().map(|k| (k.clone(), values.get(k).unwrap_or(&net.params[k]).as_standard_layout().into_owned())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, v)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, v.shape().to_vec(), bytemuck::cast_slice(v.as_slice().expect("standard layout")))?)))
        .collect::<Result<_>>()?;
    crate::fsutil::write_atomic(&tail_path(stem), &safetensors::serialize(views, None)?)
}

/// Reads the tail tensors saved next to `stem`.
pub fn load(stem: &Path) -> Result<BTreeMap<String, ArrayD<f32>>> {
    let p = tail_path(stem);
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read {} (the trained layers of a run with --freeze below 24)", p.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is damaged", p.display()))?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        out.insert(name.to_string(), ArrayD::from_shape_vec(IxDyn(t.shape()), v)?);
    }
    Ok(out)
}
