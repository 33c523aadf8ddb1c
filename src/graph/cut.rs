//! The freeze boundary: a `Model` and YOLOv5's `--freeze N` in (layers
//! 0..N-1 frozen, N in 10..=24); the `Cut` out: the tensors that cross the
//! boundary (what the frozen graph outputs and the cache holds, including
//! skip connections into later Concat layers, e.g. layers 4 and 6 for
//! N = 10) and the tail's nodes (layers N..=23, which train).
//!
//! A tensor crosses when a node of a layer < N makes it from the image and a
//! node of a layer >= N (the Detect head convolutions included) reads it.
//! Tensors that do not depend on the image (constants, and shape arithmetic
//! on them) never cross: the tail evaluates them itself. At N = 24 the
//! crossing tensors are exactly the head inputs in level order, so the
//! frozen graph, cache keys and results of `--freeze 24` are today's.

use std::collections::HashSet;
use std::ops::RangeInclusive;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::Model;
use super::detect::DetectSpec;
use super::layers::{self, Layers};
use super::onnx::GraphIndex;
use crate::cache::Dtype;

/// The boundaries `--freeze` accepts, YOLOv5's meaning: 10 freezes the
/// backbone, 24 everything but the Detect head.
pub const FREEZE_RANGE: RangeInclusive<usize> = 10..=24;
/// `--freeze 24`: only the Detect head trains.
pub const HEAD_ONLY: usize = 24;

/// One tensor that crosses the boundary, `[C, imgsz/stride, imgsz/stride]`
/// per image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crossing {
    pub name: String,
    /// The layer that produces it; `None` when the model's layer numbering
    /// is unknown (names stripped; only at N = 24).
    pub layer: Option<usize>,
    pub channels: usize,
    pub stride: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cut {
    /// N: layers 0..N-1 frozen.
    pub freeze: usize,
    /// The frozen graph's outputs = the cache's tensors, in this order: at
    /// N = 24 the head inputs in level order; else by producing layer, then
    /// name.
    pub crossing: Vec<Crossing>,
    /// `graph.node` indices of what turns the crossing tensors into the head
    /// inputs (layers N..=23 with their constants and shape arithmetic), in
    /// graph (topological) order; not the head convolutions nor the decode.
    pub tail_nodes: Vec<usize>,
    /// `spec.levels[i].input_tensor`.
    pub head_inputs: Vec<String>,
}

impl Cut {
    /// The cut of `--freeze 24`, which needs no layer numbering.
    pub fn head_only(spec: &DetectSpec) -> Cut {
        Cut {
            freeze: HEAD_ONLY,
            crossing: spec.levels.iter().map(|l| Crossing { name: l.input_tensor.clone(), layer: None, channels: l.in_channels, stride: l.stride as usize }).collect(),
            tail_nodes: Vec::new(),
            head_inputs: spec.levels.iter().map(|l| l.input_tensor.clone()).collect(),
        }
    }

    /// `[C, H, W]` of crossing tensor `i` for a square input of `imgsz`.
    pub fn shape(&self, i: usize, imgsz: usize) -> [usize; 3] {
        let c = &self.crossing[i];
        [c.channels, imgsz / c.stride, imgsz / c.stride]
    }

    /// Bytes of feature data one cache entry holds at `imgsz` (the entry file
    /// adds a header of a few hundred bytes).
    pub fn bytes_per_image(&self, imgsz: usize, dtype: Dtype) -> usize {
        (0..self.crossing.len()).map(|i| self.shape(i, imgsz)).map(|[c, h, w]| dtype.level_bytes(c, h, w)).sum()
    }

    /// Parameters that train at this cut: the tail's weights and the head
    /// convolutions' (BatchNorm-fused).
    pub fn trainable_params(&self, model: &Model) -> usize {
        let graph = model.proto.graph.as_ref().expect("decode_model checked the graph");
        let ix = GraphIndex::new(graph);
        let tail = layers::params_of(&ix, &self.tail_nodes);
        let head: usize = model
            .spec
            .levels
            .iter()
            .flat_map(|l| [&l.weight, &l.bias])
            .filter_map(|w| ix.initializers.get(w.as_str()))
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum();
        tail + head
    }
}

/// The cut at `--freeze freeze`. Errors are one sentence naming the flag or
/// the model file and the way out.
pub fn cut(model: &Model, freeze: usize) -> Result<Cut> {
    if !FREEZE_RANGE.contains(&freeze) {
        bail!(
            "--freeze {freeze} is out of range: use N in {}..={} (layers 0..N-1 frozen; 10 freezes the backbone, 24 trains only the Detect head)",
            FREEZE_RANGE.start(),
            FREEZE_RANGE.end()
        );
    }
    let layers = Layers::of(model);
    let spec = &model.spec;
    if freeze == HEAD_ONLY {
        let mut cut = Cut::head_only(spec);
        if layers.named {
            let graph = model.proto.graph.as_ref().unwrap();
            let ix = GraphIndex::new(graph);
            for c in &mut cut.crossing {
                c.layer = ix.producer_of(&c.name).map(|p| layers.of_node[p]);
            }
        }
        return Ok(cut);
    }
    if !layers.named {
        bail!(
            "{} carries no model.N names (its node and weight names were stripped), so its layer numbering cannot be recovered and only --freeze 24 (the Detect head) can be used",
            model.path.display()
        );
    }
    if !layers.complete(model.proto.graph.as_ref().unwrap()) {
        bail!(
            "{} names its weights by model.N but not its nodes, so the layers without weights (Upsample, Concat) cannot be told apart and only --freeze 24 (the Detect head) can be used; re-export it with torch >= 1.13 for scoped node names",
            model.path.display()
        );
    }
    if layers.detect != HEAD_ONLY {
        bail!(
            "{} has its Detect head at layer {}, not 24 as in yolov5n/s/m/l/x.yaml, so --freeze {freeze} would not mean what it means in YOLOv5; only --freeze 24 can be used with it",
            model.path.display(),
            layers.detect
        );
    }
    cut_named(model, &layers, freeze).with_context(|| format!("cannot cut {} at --freeze {freeze}", model.path.display()))
}

fn cut_named(model: &Model, layers: &Layers, freeze: usize) -> Result<Cut> {
    let graph = model.proto.graph.as_ref().expect("decode_model checked the graph");
    let ix = GraphIndex::new(graph);
    let spec = &model.spec;

    // tensors computed from the image (the rest are constants)
    let mut from_image: HashSet<&str> = HashSet::from([spec.input_name.as_str()]);
    for n in &graph.node {
        if n.input.iter().any(|i| from_image.contains(i.as_str())) {
            from_image.extend(n.output.iter().map(String::as_str));
        }
    }
    let frozen = |t: &str| from_image.contains(t) && ix.producer_of(t).is_none_or(|p| layers.of_node[p] < freeze);

    // walk back from the head inputs, stopping at frozen tensors
    let mut crossing: Vec<&str> = Vec::new();
    let mut tail: HashSet<usize> = HashSet::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack: Vec<&str> = spec.levels.iter().map(|l| l.input_tensor.as_str()).collect();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) || ix.initializers.contains_key(t) {
            continue;
        }
        if frozen(t) {
            crossing.push(t);
            continue;
        }
        let p = ix.producer_of(t).with_context(|| format!("tensor `{t}` is neither computed by a node nor an initializer"))?;
        if layers.of_node[p] >= layers.detect {
            bail!("node `{}` of the Detect layer feeds a head input", ix.node(p).name);
        }
        if tail.insert(p) {
            stack.extend(ix.node(p).input.iter().filter(|s| !s.is_empty()).map(String::as_str));
        }
    }
    if crossing.contains(&spec.input_name.as_str()) {
        bail!("the image input itself would cross the boundary");
    }

    let imgsz = spec.imgsz.unwrap_or([640, 640]);
    let shapes = layers::infer_shapes(&ix, &spec.input_name, imgsz);
    let mut out = crossing
        .iter()
        .map(|&t| {
            let s = shapes.get(t).with_context(|| format!("the shape of the crossing tensor `{t}` cannot be inferred"))?;
            let stride = if s.len() == 4 { imgsz[0] / s[2].max(1) } else { 0 };
            if s.len() != 4 || stride == 0 || s[2] * stride != imgsz[0] || s[3] * stride != imgsz[1] {
                bail!("the crossing tensor `{t}` has shape {s:?}, not an image-like [1, C, H, W] at a whole stride of the {}x{} input", imgsz[0], imgsz[1]);
            }
            Ok(Crossing { name: t.to_string(), layer: ix.producer_of(t).map(|p| layers.of_node[p]), channels: s[1], stride })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| (a.layer, &a.name).cmp(&(b.layer, &b.name)));
    let mut tail_nodes: Vec<usize> = tail.into_iter().collect();
    tail_nodes.sort_unstable();
    Ok(Cut { freeze, crossing: out, tail_nodes, head_inputs: spec.levels.iter().map(|l| l.input_tensor.clone()).collect() })
}
