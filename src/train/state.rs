//! Everything an exact resume needs, in and out of `weights/last_state.*`:
//! the parameters, the EMA, the optimizer buffers, the gradients accumulated
//! since the last optimizer step, and the counters. Written atomically after
//! each epoch, so a kill at any moment leaves the previous epoch's state.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counters {
    /// Epochs completed.
    pub epoch: usize,
    pub ema_updates: u64,
    pub opt_steps: u64,
    /// YOLOv5's `last_opt_step` (batch index `ni` of the last step; -1 at start).
    pub last_opt_step: i64,
    pub best_fitness: f64,
}

pub struct TrainState {
    pub counters: Counters,
    pub tensors: BTreeMap<String, ArrayD<f32>>,
}

pub fn save(stem: &Path, state: &TrainState) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = state
        .tensors
        .iter()
        .map(|(k, v)| {
            let s = v.as_slice().context("state tensors are contiguous")?;
            Ok((k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, v.shape().to_vec(), bytemuck::cast_slice(s))?))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None)?;
    // tensors first, counters last: the counters name a complete tensor file
    crate::fsutil::write_atomic(&stem.with_extension("safetensors"), &bytes)?;
    crate::fsutil::write_atomic(&stem.with_extension("json"), &serde_json::to_vec_pretty(&state.counters)?)?;
    Ok(())
}

pub fn load(stem: &Path) -> Result<TrainState> {
    let jp = stem.with_extension("json");
    let counters: Counters = serde_json::from_slice(&std::fs::read(&jp).with_context(|| format!("cannot read {}: is this a run directory with at least one finished epoch?", jp.display()))?)
        .with_context(|| format!("{} is damaged", jp.display()))?;
    let sp = stem.with_extension("safetensors");
    let bytes = std::fs::read(&sp).with_context(|| format!("cannot read {}", sp.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is damaged", sp.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::Dtype::F32 {
            bail!("{}: tensor {name} is not f32", sp.display());
        }
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        tensors.insert(name.to_string(), ArrayD::from_shape_vec(IxDyn(t.shape()), v)?);
    }
    Ok(TrainState { counters, tensors })
}
