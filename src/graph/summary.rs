//! A YOLOv5-style layer table, like the model summary that `train.py` prints
//! and from which a user picks a freeze boundary. In: a `Model`; out: one row
//! per `model.N` (backbone 0–9, neck 10–23, head 24 in YOLOv5s-style configs)
//! with its module kind, output shape at the model's input size and parameter
//! count (of the exported, BatchNorm-fused weights).
//!
//! The rows are the layer partition (`layers`); when an exporter stripped
//! the names, nodes are grouped by structure and the table says so.

use serde::Serialize;

use super::Model;
use super::layers::{self, Layers};
use super::onnx::GraphIndex;

#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    /// `model.N` index, or a running number when grouped by structure.
    pub index: usize,
    pub part: &'static str,
    pub module: String,
    pub params: usize,
    /// `[N, C, H, W]` (or `[N, rows, no]` for Detect); `None` where unknown.
    pub output_shape: Option<Vec<usize>>,
    pub nodes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub layers: Vec<LayerRow>,
    pub total_params: usize,
    pub head_params: usize,
    pub imgsz: [usize; 2],
    /// True when names carried `model.N`; false when grouped by structure.
    pub named: bool,
}

pub fn summarize(model: &Model) -> Summary {
    let graph = model.proto.graph.as_ref().unwrap();
    let ix = GraphIndex::new(graph);
    let spec = &model.spec;
    let imgsz = spec.imgsz.unwrap_or([640, 640]);
    let shapes = layers::infer_shapes(&ix, &spec.input_name, imgsz);
    let partition = Layers::of(model);
    let groups = partition.groups(graph);
    let params_of = |nodes: &[usize]| layers::params_of(&ix, nodes);

    let mut layers: Vec<LayerRow> = groups
        .iter()
        .map(|(&k, nodes)| {
            let ops: Vec<&str> = nodes.iter().map(|&i| ix.node(i).op_type.as_str()).collect();
            let last_out = nodes.iter().rev().find(|&&i| ix.node(i).op_type != "Constant").and_then(|&i| ix.node(i).output.first());
            LayerRow {
                index: k,
                part: "",
                module: module_kind(&ops).to_string(),
                params: params_of(nodes),
                output_shape: last_out.and_then(|o| shapes.get(o.as_str()).cloned()),
                nodes: nodes.len(),
            }
        })
        .collect();

    let head_nodes: Vec<usize> = (partition.first_head..graph.node.len()).collect();
    let rows: usize = spec.levels.iter().map(|l| spec.na * (imgsz[0] / l.stride as usize) * (imgsz[1] / l.stride as usize)).sum();
    layers.push(LayerRow { index: partition.detect, part: "head", module: "Detect".into(), params: params_of(&head_nodes), output_shape: Some(vec![1, rows, spec.no()]), nodes: head_nodes.len() });

    // Backbone ends at the first upsample's predecessor (SPPF in YOLOv5 v6+).
    let first_up = layers.iter().position(|l| l.module == "Upsample" || l.module == "ConvTranspose").unwrap_or(layers.len());
    let backbone_end = first_up.saturating_sub(1);
    let n = layers.len();
    for (i, l) in layers.iter_mut().enumerate() {
        l.part = if i == n - 1 { "head" } else if i < backbone_end { "backbone" } else { "neck" };
    }
    let total_params = layers.iter().map(|l| l.params).sum();
    let head_params = layers.last().map_or(0, |l| l.params);
    Summary { layers, total_params, head_params, imgsz, named: partition.named }
}

fn module_kind(ops: &[&str]) -> &'static str {
    let count = |op: &str| ops.iter().filter(|o| **o == op).count();
    let convs = count("Conv");
    if count("MaxPool") >= 3 && convs >= 2 {
        "SPPF"
    } else if count("MaxPool") > 0 {
        if convs > 0 { "SPP" } else { "MaxPool" }
    } else if count("ConvTranspose") > 0 {
        "ConvTranspose"
    } else if count("Resize") > 0 || count("Upsample") > 0 {
        "Upsample"
    } else if convs == 0 && count("Concat") > 0 {
        "Concat"
    } else if convs == 1 && count("Slice") >= 4 {
        "Focus"
    } else if convs >= 3 && count("Concat") > 0 {
        "C3"
    } else if convs == 1 {
        "Conv"
    } else if convs > 1 {
        "Block"
    } else {
        "Other"
    }
}

/// The table as text, aligned like YOLOv5's summary.
pub fn render(s: &Summary) -> String {
    render_at(s, None)
}

/// The table with a line marking the freeze boundary N (YOLOv5's
/// `--freeze N`: the rows above it are frozen, the rows below it train).
pub fn render_at(s: &Summary, freeze: Option<usize>) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:>4}  {:<9} {:<14} {:>10}  {}\n", "", "part", "module", "params", "output shape"));
    let mut marked = false;
    for l in &s.layers {
        if let Some(n) = freeze
            && !marked
            && l.index >= n
        {
            let last = s.layers.last().map_or(n, |l| l.index);
            let below = if last > n { format!("{n}-{last} below train") } else { format!("{n} below trains") };
            out.push_str(&format!("{:-<4}  --freeze {n}: layers 0-{} above are frozen (cached), {below}\n", "", n.saturating_sub(1)));
            marked = true;
        }
        let shape = l.output_shape.as_ref().map_or("?".to_string(), |v| format!("{v:?}"));
        out.push_str(&format!("{:>4}  {:<9} {:<14} {:>10}  {}\n", l.index, l.part, l.module, l.params, shape));
    }
    out.push_str(&format!(
        "{} layers, {} parameters (BatchNorm fused), head {} parameters; shapes at {}x{}\n",
        s.layers.len(),
        s.total_params,
        s.head_params,
        s.imgsz[0],
        s.imgsz[1]
    ));
    if !s.named {
        out.push_str("note: node and weight names carry no model.N index, so layers are grouped by structure and numbered in graph order; YOLOv5's own numbering may differ\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_kinds() {
        assert_eq!(module_kind(&["Conv", "Sigmoid", "Mul"]), "Conv");
        assert_eq!(module_kind(&["Conv", "Sigmoid", "Mul", "MaxPool", "MaxPool", "MaxPool", "Concat", "Conv"]), "SPPF");
        assert_eq!(module_kind(&["Conv", "Conv", "Conv", "Conv", "Add", "Concat", "Conv"]), "C3");
        assert_eq!(module_kind(&["Resize"]), "Upsample");
        assert_eq!(module_kind(&["Concat"]), "Concat");
    }
}
