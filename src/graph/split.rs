//! Original model + `DetectSpec` + a `Cut` in; the frozen graph out: the
//! original pruned to exactly what the cut's crossing tensors depend on, with
//! those tensors as its outputs (at `--freeze 24`, the head inputs).
//!
//! The batch dimension of the frozen graph is always symbolic (`batch`), even
//! for static exports: only the Detect decode reshapes with a literal batch of
//! 1, and it is cut away, so the backbone runs batched on any export.

use std::collections::HashSet;

use anyhow::{Result, bail};

use super::cut::Cut;
use super::detect::DetectSpec;
use super::onnx::{self, Dim, GraphIndex, pb};

/// The frozen model of `--freeze 24` (only the Detect head trains).
pub fn frozen_graph(model: &pb::ModelProto, spec: &DetectSpec) -> Result<pb::ModelProto> {
    frozen_graph_at(model, spec, &Cut::head_only(spec))
}

/// Returns the frozen model at `cut`: same IR version, opset and metadata as
/// the original; nodes kept in their original (topological) order; outputs
/// the crossing tensors in the cut's order.
pub fn frozen_graph_at(model: &pb::ModelProto, spec: &DetectSpec, cut: &Cut) -> Result<pb::ModelProto> {
    let graph = model.graph.as_ref().expect("decode_model checked the graph");
    let ix = GraphIndex::new(graph);

    let mut needed_tensors: HashSet<&str> = HashSet::new();
    let mut keep_nodes: HashSet<usize> = HashSet::new();
    let mut stack: Vec<&str> = cut.crossing.iter().map(|c| c.name.as_str()).collect();
    while let Some(t) = stack.pop() {
        if !needed_tensors.insert(t) {
            continue;
        }
        if let Some(n) = ix.producer_of(t)
            && keep_nodes.insert(n)
        {
            stack.extend(ix.node(n).input.iter().filter(|s| !s.is_empty()).map(String::as_str));
        }
    }
    if !needed_tensors.contains(spec.input_name.as_str()) {
        bail!("the tensors that cross the freeze boundary do not depend on the image input `{}`", spec.input_name);
    }

    let batch = Dim::Symbol("batch".into());
    let mut inputs = Vec::new();
    for i in &graph.input {
        if i.name == spec.input_name {
            let mut shape = onnx::value_info_shape(i).unwrap_or_default();
            shape[0] = batch.clone();
            inputs.push(onnx::float_value_info(&i.name, &shape));
        } else if needed_tensors.contains(i.name.as_str()) && !ix.initializers.contains_key(i.name.as_str()) {
            bail!("the frozen part needs a second graph input `{}`, which YOLOv5 exports never have", i.name);
        }
    }
    let outputs = cut.crossing.iter().map(|c| onnx::float_value_info(&c.name, &feature_shape(spec, c.stride as f32, c.channels, &batch))).collect();

    let frozen = pb::GraphProto {
        node: graph.node.iter().enumerate().filter(|(i, _)| keep_nodes.contains(i)).map(|(_, n)| n.clone()).collect(),
        name: format!("{}_frozen", if graph.name.is_empty() { "yolov5" } else { &graph.name }),
        initializer: graph.initializer.iter().filter(|t| needed_tensors.contains(t.name.as_str())).cloned().collect(),
        input: inputs,
        output: outputs,
        // Stale shape annotations of a static export could contradict the
        // symbolic batch; runtimes re-infer shapes anyway.
        value_info: Vec::new(),
        ..Default::default()
    };
    Ok(pb::ModelProto {
        graph: Some(frozen),
        training_info: Vec::new(),
        ..model.clone()
    })
}

/// `[batch, C, H/stride, W/stride]`, with symbols for unknown spatial sizes.
pub fn feature_shape(spec: &DetectSpec, stride: f32, channels: usize, batch: &Dim) -> Vec<Dim> {
    let s = stride as usize;
    let (h, w) = match spec.imgsz {
        Some([h, w]) => (Dim::Fixed((h / s) as i64), Dim::Fixed((w / s) as i64)),
        None => (Dim::Symbol(format!("height_{s}")), Dim::Symbol(format!("width_{s}"))),
    };
    vec![batch.clone(), Dim::Fixed(channels as i64), h, w]
}
