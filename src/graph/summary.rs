//! A YOLOv5-style layer table, like the model summary that `train.py` prints
//! and from which a user picks a freeze boundary. In: a `Model`; out: one row
//! per `model.N` (backbone 0–9, neck 10–23, head 24 in YOLOv5s-style configs)
//! with its module kind, output shape at the model's input size and parameter
//! count (of the exported, BatchNorm-fused weights).
//!
//! Layer indices come from node names (`/model.N/...`) or initializer names
//! (`model.N.*`). When an exporter stripped both, nodes are grouped by
//! structure (a Conv with its activation, a Concat, a pooling block, an
//! upsample) and the table says so.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::Model;
use super::onnx::{self, GraphIndex};

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

const ACTIVATIONS: &[&str] = &["Sigmoid", "Mul", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Silu", "Add", "Clip", "Div"];

pub fn summarize(model: &Model) -> Summary {
    let graph = model.proto.graph.as_ref().unwrap();
    let ix = GraphIndex::new(graph);
    let spec = &model.spec;
    let imgsz = spec.imgsz.unwrap_or([640, 640]);
    let shapes = infer_shapes(&ix, &spec.input_name, imgsz);

    let head_convs: Vec<&str> = spec.levels.iter().map(|l| l.weight.as_str()).collect();
    let is_head = |n: &onnx::pb::NodeProto| n.op_type == "Conv" && n.input.get(1).is_some_and(|w| head_convs.contains(&w.as_str()));
    let first_head = graph.node.iter().position(is_head).unwrap_or(graph.node.len());

    // Layer index per node: from its name, else from its weights' names.
    let named_index = |n: &onnx::pb::NodeProto| layer_index(&n.name).or_else(|| n.input.iter().find_map(|i| ix.initializers.contains_key(i.as_str()).then(|| layer_index(i)).flatten()));
    let named = graph.node[..first_head].iter().filter(|n| n.op_type == "Conv").all(|n| named_index(n).is_some());

    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let detect_index;
    if named {
        let mut last = 0;
        // Constants carry no parameters and simplifiers hoist them out of
        // their layer, so they are left out of the grouping.
        for (i, n) in graph.node[..first_head].iter().enumerate().filter(|(_, n)| n.op_type != "Constant") {
            let k = named_index(n).unwrap_or(last);
            last = k;
            groups.entry(k).or_default().push(i);
        }
        detect_index = groups.keys().last().map_or(0, |k| k + 1);
    } else {
        // Structural units: a new unit starts at each Conv/pool/resize/concat;
        // activations and shape plumbing join the unit before them. Consecutive
        // MaxPools with their Concat and convs are one SPPF-like unit only when
        // named, so here each is its own row.
        let mut k = 0usize;
        for (i, n) in graph.node[..first_head].iter().enumerate().filter(|(_, n)| n.op_type != "Constant") {
            let starts = !ACTIVATIONS.contains(&n.op_type.as_str()) && !["Constant", "Shape", "Gather", "Unsqueeze", "Cast", "Slice", "Floor"].contains(&n.op_type.as_str());
            if starts && !groups.is_empty() {
                k += 1;
            }
            groups.entry(k).or_default().push(i);
        }
        detect_index = k + 1;
    }

    let params_of = |nodes: &[usize]| -> usize {
        nodes
            .iter()
            .flat_map(|&i| ix.node(i).input.iter())
            .filter_map(|t| ix.initializers.get(t.as_str()))
            .filter(|t| t.data_type == onnx::pb::tensor_proto::DataType::Float as i32 && t.dims.len() != 1 || t.name.ends_with("bias"))
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum()
    };

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

    let head_nodes: Vec<usize> = (first_head..graph.node.len()).collect();
    let rows: usize = spec.levels.iter().map(|l| spec.na * (imgsz[0] / l.stride as usize) * (imgsz[1] / l.stride as usize)).sum();
    layers.push(LayerRow { index: detect_index, part: "head", module: "Detect".into(), params: params_of(&head_nodes), output_shape: Some(vec![1, rows, spec.no()]), nodes: head_nodes.len() });

    // Backbone ends at the first upsample's predecessor (SPPF in YOLOv5 v6+).
    let first_up = layers.iter().position(|l| l.module == "Upsample" || l.module == "ConvTranspose").unwrap_or(layers.len());
    let backbone_end = first_up.saturating_sub(1);
    let n = layers.len();
    for (i, l) in layers.iter_mut().enumerate() {
        l.part = if i == n - 1 { "head" } else if i < backbone_end { "backbone" } else { "neck" };
    }
    let total_params = layers.iter().map(|l| l.params).sum();
    let head_params = layers.last().map_or(0, |l| l.params);
    Summary { layers, total_params, head_params, imgsz, named }
}

/// `model.N` from `/model.N/...`, `model.N.weight` or `model_N_...`.
fn layer_index(name: &str) -> Option<usize> {
    let i = name.find("model")? + 5;
    let rest = name[i..].strip_prefix(['.', '_'])?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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

/// Shapes of image-like tensors `[1, C, H, W]`, propagated through the ops of
/// a YOLOv5 backbone and neck. Resizes whose scale is computed at run time
/// (dynamic exports) are taken as YOLOv5's ×2 nearest upsample.
fn infer_shapes<'g>(ix: &GraphIndex<'g>, input: &str, imgsz: [usize; 2]) -> HashMap<&'g str, Vec<usize>> {
    let mut shapes: HashMap<&str, Vec<usize>> = HashMap::new();
    let input_name = ix.graph.input.iter().find(|i| i.name == input).map(|i| i.name.as_str());
    if let Some(n) = input_name {
        shapes.insert(n, vec![1, 3, imgsz[0], imgsz[1]]);
    }
    for node in &ix.graph.node {
        let Some(first) = node.input.first().and_then(|i| shapes.get(i.as_str())).cloned() else { continue };
        let conv_like = |s: &Vec<usize>, k: &[i64], channels: usize| -> Vec<usize> {
            let strides = onnx::attr_ints(node, "strides").unwrap_or(vec![1, 1]);
            let pads = onnx::attr_ints(node, "pads").unwrap_or(vec![0, 0, 0, 0]);
            let dil = onnx::attr_ints(node, "dilations").unwrap_or(vec![1, 1]);
            let out = |i: usize| ((s[2 + i] as i64 + pads[i] + pads[i + 2] - dil[i] * (k[i] - 1) - 1) / strides[i] + 1).max(0) as usize;
            vec![s[0], channels, out(0), out(1)]
        };
        let out = match node.op_type.as_str() {
            "Conv" => node.input.get(1).and_then(|w| ix.initializers.get(w.as_str())).map(|w| {
                let k: Vec<i64> = w.dims[2..].to_vec();
                conv_like(&first, &k, w.dims[0] as usize)
            }),
            "MaxPool" => onnx::attr_ints(node, "kernel_shape").map(|k| conv_like(&first, &k, first[1])),
            "Concat" => {
                let all: Option<Vec<_>> = node.input.iter().map(|i| shapes.get(i.as_str())).collect();
                all.map(|a| {
                    let mut s = first.clone();
                    s[1] = a.iter().map(|x| x[1]).sum();
                    s
                })
            }
            "Resize" | "Upsample" => {
                let scales = node.input.get(2).or(node.input.get(1)).and_then(|i| ix.constant(i)).filter(|c| c.values.len() == 4);
                let sizes = node.input.get(3).and_then(|i| ix.constant(i)).filter(|c| c.values.len() == 4);
                match (sizes, scales) {
                    (Some(sz), _) => Some(vec![first[0], first[1], sz.values[2] as usize, sz.values[3] as usize]),
                    (None, Some(sc)) => Some(vec![first[0], first[1], (first[2] as f64 * sc.values[2]) as usize, (first[3] as f64 * sc.values[3]) as usize]),
                    _ => Some(vec![first[0], first[1], first[2] * 2, first[3] * 2]),
                }
            }
            op if ACTIVATIONS.contains(&op) || op == "Identity" || op == "BatchNormalization" => Some(first),
            _ => None,
        };
        if let (Some(s), Some(o)) = (out, node.output.first()) {
            shapes.insert(o.as_str(), s);
        }
    }
    shapes
}

/// The table as text, aligned like YOLOv5's summary.
pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:>4}  {:<9} {:<14} {:>10}  {}\n", "", "part", "module", "params", "output shape"));
    for l in &s.layers {
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
    fn layer_index_reads_common_exporter_names() {
        assert_eq!(layer_index("/model.24/m.0/Conv"), Some(24));
        assert_eq!(layer_index("model.3.conv.weight"), Some(3));
        assert_eq!(layer_index("Conv_198"), None);
    }

    #[test]
    fn module_kinds() {
        assert_eq!(module_kind(&["Conv", "Sigmoid", "Mul"]), "Conv");
        assert_eq!(module_kind(&["Conv", "Sigmoid", "Mul", "MaxPool", "MaxPool", "MaxPool", "Concat", "Conv"]), "SPPF");
        assert_eq!(module_kind(&["Conv", "Conv", "Conv", "Conv", "Add", "Concat", "Conv"]), "C3");
        assert_eq!(module_kind(&["Resize"]), "Upsample");
        assert_eq!(module_kind(&["Concat"]), "Concat");
    }
}
