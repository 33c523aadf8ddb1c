//! The trainable parameters by name: a head (or, later, any ONNX initializer)
//! in; a `ParamStore` out, that the optimizer, the EMA, checkpoints and resume
//! all address by the parameter's ONNX initializer name; and back to a head.
//!
//! Each parameter is in one of YOLOv5's optimizer groups (biases without
//! weight decay, weights with it) and may carry a learning-rate multiplier per
//! row (output channel): the head's box, objectness and class rows. A
//! parameter without row multipliers (a conv of a layer before the head)
//! trains every row at the group's rate.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use ndarray::ArrayD;

use crate::graph::Model;
use crate::head::Head;

/// Tensors by name: gradients, optimizer buffers, a checkpoint's content.
pub type Tensors = BTreeMap<String, ArrayD<f32>>;

/// YOLOv5's parameter groups, in its order: `param_groups[0]` holds the
/// biases (warmup starts them at `warmup_bias_lr`), the weights decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    NoDecay = 0,
    Decay = 1,
}

/// One trainable tensor, `[rows, ...]`.
#[derive(Debug, Clone)]
pub struct Param {
    pub value: ArrayD<f32>,
    pub group: Group,
    /// A learning-rate multiplier per row; 0 freezes the row exactly. None:
    /// every row at the group's rate.
    pub row_lr: Option<Vec<f32>>,
}

/// The rows of a `row_lr` to update, with their multipliers (frozen rows left
/// out), or None when the whole tensor trains at multiplier 1.
pub fn trained_rows(row_lr: &Option<Vec<f32>>) -> Option<impl Iterator<Item = (usize, f32)> + '_> {
    row_lr.as_ref().map(|m| m.iter().copied().enumerate().filter(|(_, m)| *m != 0.0))
}

#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    params: BTreeMap<String, Param>,
}

impl ParamStore {
    pub fn insert(&mut self, name: &str, p: Param) {
        self.params.insert(name.to_string(), p);
    }
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.params.iter()
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Param)> {
        self.params.iter_mut()
    }
    /// The current values by name.
    pub fn values(&self) -> Tensors {
        self.params.iter().map(|(k, p)| (k.clone(), p.value.clone())).collect()
    }
    /// Zeros shaped like each parameter (gradient accumulators, buffers).
    pub fn zeros(&self) -> Tensors {
        self.params.iter().map(|(k, p)| (k.clone(), ArrayD::zeros(p.value.raw_dim()))).collect()
    }
    /// Replaces every value from `from`, which must hold each name with its shape.
    pub fn set_values(&mut self, from: &Tensors) -> Result<()> {
        for (name, p) in self.params.iter_mut() {
            p.value = take_like(from, name, &p.value)?;
        }
        Ok(())
    }
    /// The first parameter holding a NaN or an infinity.
    pub fn first_non_finite(&self) -> Option<&str> {
        self.params.iter().find(|(_, p)| p.value.iter().any(|v| !v.is_finite())).map(|(k, _)| k.as_str())
    }
}

/// `from[name]`, checked against the shape of `like`.
pub fn take_like(from: &Tensors, name: &str, like: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let v = from.get(name).with_context(|| format!("no tensor `{name}`"))?;
    if v.shape() != like.shape() {
        bail!("tensor `{name}` has shape {:?}, expected {:?}", v.shape(), like.shape());
    }
    Ok(v.clone())
}

/// Where the head's tensors live in the model: the ONNX initializer names of
/// each level's weight and bias (`spec.levels[i].weight` / `.bias`).
#[derive(Debug, Clone)]
pub struct HeadLayout {
    pub weights: Vec<String>,
    pub biases: Vec<String>,
}

impl HeadLayout {
    pub fn of(model: &Model) -> HeadLayout {
        HeadLayout { weights: model.spec.levels.iter().map(|l| l.weight.clone()).collect(), biases: model.spec.levels.iter().map(|l| l.bias.clone()).collect() }
    }

    /// The head's tensors as parameters, each with `row_lr` (one multiplier
    /// per output channel, shared by weight and bias).
    pub fn params(&self, head: &Head, row_lr: &[f32]) -> ParamStore {
        let mut s = ParamStore::default();
        for l in 0..head.nl() {
            s.insert(&self.weights[l], Param { value: head.weights[l].clone().into_dyn(), group: Group::Decay, row_lr: Some(row_lr.to_vec()) });
            s.insert(&self.biases[l], Param { value: head.biases[l].clone().into_dyn(), group: Group::NoDecay, row_lr: Some(row_lr.to_vec()) });
        }
        s
    }

    /// `template` with its tensors taken from `values` by name.
    pub fn head(&self, template: &Head, values: &Tensors) -> Result<Head> {
        let mut h = template.clone();
        for l in 0..h.nl() {
            h.weights[l] = take_like(values, &self.weights[l], &h.weights[l].clone().into_dyn())?.into_dimensionality()?;
            h.biases[l] = take_like(values, &self.biases[l], &h.biases[l].clone().into_dyn())?.into_dimensionality()?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    fn head() -> Head {
        Head {
            nc: 1,
            names: vec!["a".into()],
            strides: vec![8.0, 16.0],
            anchors: vec![vec![[1.0, 2.0]], vec![[3.0, 4.0]]],
            weights: vec![Array2::from_elem((6, 2), 0.5), Array2::from_elem((6, 3), 1.5)],
            biases: vec![Array1::from_elem(6, -1.0), Array1::from_elem(6, 2.0)],
        }
    }

    #[test]
    fn a_head_round_trips_through_the_store_by_initializer_name() {
        let layout = HeadLayout { weights: vec!["m.0.weight".into(), "m.1.weight".into()], biases: vec!["m.0.bias".into(), "m.1.bias".into()] };
        let h = head();
        let mut store = layout.params(&h, &[1.0; 6]);
        assert_eq!(store.get("m.1.bias").unwrap().group, Group::NoDecay);
        assert_eq!(store.get("m.0.weight").unwrap().group, Group::Decay);
        let mut v = store.values();
        v.get_mut("m.1.weight").unwrap()[[2, 1]] = 7.0;
        store.set_values(&v).unwrap();
        let back = layout.head(&h, &store.values()).unwrap();
        assert_eq!(back.weights[1][[2, 1]], 7.0);
        assert_eq!(back.biases, h.biases);
        v.remove("m.0.bias");
        let e = store.set_values(&v).unwrap_err();
        assert!(format!("{e:#}").contains("m.0.bias"), "{e:#}");
        assert_eq!(store.first_non_finite(), None);
        v.insert("m.0.bias".into(), ArrayD::from_elem(ndarray::IxDyn(&[6]), f32::NAN));
        store.set_values(&v).unwrap();
        assert_eq!(store.first_non_finite(), Some("m.0.bias"));
    }
}
