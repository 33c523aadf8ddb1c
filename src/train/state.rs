//! The training checkpoint, `weights/last_state.safetensors`: everything an
//! exact resume needs in one file, written atomically after each epoch. In:
//! the components' state dicts (parameters, EMA, optimizer buffers, the
//! gradients accumulated since the last optimizer step, the best head), the
//! trainer's counters and results.csv's text; out: the same, read back.
//!
//! The counters and results.csv travel in the safetensors metadata, so they
//! can never disagree with the tensors: a kill at any moment leaves the
//! previous epoch's checkpoint or this one, and a resume rewrites results.csv
//! and the last/best heads from it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use super::params::Tensors;
use super::schedule::Stopper;

const FORMAT: &str = "freezesplit-train-state-2";

/// A component's resumable state: tensors and counters by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    pub tensors: Tensors,
    pub counts: BTreeMap<String, u64>,
}

impl StateDict {
    pub fn count(&self, name: &str) -> Result<u64> {
        self.counts.get(name).copied().with_context(|| format!("no counter `{name}`"))
    }

    /// The tensors under `prefix`, the prefix taken off.
    pub fn tensors_under(&self, prefix: &str) -> Tensors {
        self.tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone()))).collect()
    }
}

/// The trainer's own counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// Epochs finished.
    pub epoch: usize,
    /// YOLOv5's `last_opt_step` (batch index `ni` of the last step; -1 at start).
    pub last_opt_step: i64,
    /// The best fitness so far and its epoch (None before the first epoch).
    pub best_fitness: Option<f64>,
    pub best_epoch: Option<usize>,
    pub stopper: Stopper,
    /// Stopped early by `--patience`.
    pub stopped: bool,
}

/// What travels in the safetensors metadata.
#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    counters: Counters,
    counts: BTreeMap<String, u64>,
    results_csv: String,
}

pub struct Checkpoint {
    pub counters: Counters,
    pub state: StateDict,
    pub results_csv: String,
}

pub fn save(path: &Path, c: &Checkpoint) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = c
        .state
        .tensors
        .iter()
        .map(|(k, v)| {
            let s = v.as_slice().context("state tensors are contiguous")?;
            Ok((k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, v.shape().to_vec(), bytemuck::cast_slice(s))?))
        })
        .collect::<Result<_>>()?;
    // one metadata entry: a HashMap's order would make the bytes differ run to run
    let meta = Meta { format: FORMAT.to_string(), counters: c.counters.clone(), counts: c.state.counts.clone(), results_csv: c.results_csv.clone() };
    let meta = HashMap::from([("freezesplit".to_string(), serde_json::to_string(&meta)?)]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    crate::fsutil::write_atomic(path, &bytes)
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}: is this a run directory with at least one finished epoch?", path.display()))?;
    let damaged = || format!("{} is damaged or not a freezesplit training state", path.display());
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(damaged)?;
    let text = header.metadata().as_ref().and_then(|m| m.get("freezesplit")).with_context(|| format!("{} is not a training state this version can resume (no freezesplit metadata); start a new run", path.display()))?;
    let meta: Meta = serde_json::from_str(text).with_context(damaged)?;
    if meta.format != FORMAT {
        bail!("{} is a training state of format {}, this version reads {FORMAT}; start a new run", path.display(), meta.format);
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(damaged)?;
    let mut tensors = BTreeMap::new();
    for (name, t) in st.tensors() {
        if t.dtype() != safetensors::Dtype::F32 {
            bail!("{}: tensor {name} is not f32", path.display());
        }
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        tensors.insert(name.to_string(), ArrayD::from_shape_vec(IxDyn(t.shape()), v)?);
    }
    Ok(Checkpoint { counters: meta.counters, state: StateDict { tensors, counts: meta.counts }, results_csv: meta.results_csv })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_holds_tensors_counters_and_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last_state.safetensors");
        let mut state = StateDict::default();
        state.tensors.insert("ema.m.0.weight".into(), ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![1.5, -2.0]).unwrap());
        state.counts.insert("ema.updates".into(), 12);
        let counters = Counters { epoch: 3, last_opt_step: 41, best_fitness: Some(0.25), best_epoch: Some(2), stopper: Stopper::new(5), stopped: false };
        save(&path, &Checkpoint { counters: counters.clone(), state: state.clone(), results_csv: "epoch\n0\n".into() }).unwrap();
        let back = load(&path).unwrap();
        assert_eq!((&back.counters, &back.state, back.results_csv.as_str()), (&counters, &state, "epoch\n0\n"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "one file, nothing beside it");
        let bytes = std::fs::read(&path).unwrap();
        save(&path, &Checkpoint { counters: back.counters, state: back.state, results_csv: back.results_csv }).unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes, "the same state gives the same bytes");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(format!("{:#}", load(&path).err().unwrap()).contains("damaged"));
    }
}
