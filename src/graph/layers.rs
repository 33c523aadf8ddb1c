//! The layer partition: an exported model in; the `model.N` layer of every
//! graph node out (backbone 0–9, neck 10–23, Detect 24 in YOLOv5 v6 configs),
//! plus the parameter counts and image-tensor shapes that the layer table
//! (`summary`) and the freeze boundary (`cut`) read from it.
//!
//! Layer indices come from node names (`/model.N/...`) or initializer names
//! (`model.N.*`). Nodes that carry neither take a neighbour's layer: an
//! activation the layer of the node before it in graph order (its Conv), a
//! Constant the layer of its first consumer (exporters number constants
//! apart, simplifiers hoist them out of their layer). The Detect layer is
//! the first head convolution and everything after it, since YOLOv5's
//! forward runs the head last. When an exporter stripped every name, nodes
//! are grouped by structure instead (a Conv with its activation, a Concat,
//! a pooling block, an upsample) and `named` is false: that numbering is
//! for display only, never for `--freeze`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Model;
use super::onnx::{self, GraphIndex, pb};

pub struct Layers {
    /// The layer of each node, by node index into `graph.node`.
    pub of_node: Vec<usize>,
    /// Index of the first Detect head node.
    pub first_head: usize,
    /// The Detect layer's index (24 in yolov5n/s/m/l/x.yaml).
    pub detect: usize,
    /// True when names carried `model.N`; false when grouped by structure.
    pub named: bool,
}

/// Ops that join the unit before them when layers are grouped by structure.
pub(super) const ACTIVATIONS: &[&str] = &["Sigmoid", "Mul", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Silu", "Add", "Clip", "Div"];
const SHAPE_PLUMBING: &[&str] = &["Constant", "Shape", "Gather", "Unsqueeze", "Cast", "Slice", "Floor"];

impl Layers {
    pub fn of(model: &Model) -> Layers {
        let graph = model.proto.graph.as_ref().expect("decode_model checked the graph");
        partition(graph, &model.spec)
    }

    /// Whether every layer before the Detect head has a node of its own. Exports
    /// whose node names lack `model.N` (only the weights carry it) fold the
    /// layers without weights (Upsample, Concat) into the layer before them.
    pub fn complete(&self, graph: &pb::GraphProto) -> bool {
        let groups = self.groups(graph);
        (0..self.detect).all(|k| groups.contains_key(&k))
    }

    /// Nodes before the Detect head, grouped by layer, in graph order.
    /// Constants are left out: they carry no parameters, and where a
    /// simplifier hoisted them says nothing about their layer.
    pub fn groups(&self, graph: &pb::GraphProto) -> BTreeMap<usize, Vec<usize>> {
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, _) in graph.node[..self.first_head].iter().enumerate().filter(|(_, n)| n.op_type != "Constant") {
            groups.entry(self.of_node[i]).or_default().push(i);
        }
        groups
    }
}

fn partition(graph: &pb::GraphProto, spec: &super::DetectSpec) -> Layers {
    let ix = GraphIndex::new(graph);
    let head_convs: Vec<&str> = spec.levels.iter().map(|l| l.weight.as_str()).collect();
    let is_head = |n: &pb::NodeProto| n.op_type == "Conv" && n.input.get(1).is_some_and(|w| head_convs.contains(&w.as_str()));
    let first_head = graph.node.iter().position(is_head).unwrap_or(graph.node.len());

    let named_index = |n: &pb::NodeProto| layer_index(&n.name).or_else(|| n.input.iter().find_map(|i| ix.initializers.contains_key(i.as_str()).then(|| layer_index(i)).flatten()));
    let named = graph.node[..first_head].iter().filter(|n| n.op_type == "Conv").all(|n| named_index(n).is_some());

    let mut of_node = vec![0usize; graph.node.len()];
    let mut last = 0usize;
    let mut unit = 0usize;
    let mut seen_any = false;
    for (i, n) in graph.node[..first_head].iter().enumerate().filter(|(_, n)| n.op_type != "Constant") {
        of_node[i] = if named {
            last = named_index(n).unwrap_or(last);
            last
        } else {
            // a new unit starts at each Conv/pool/resize/concat; consecutive
            // MaxPools with their Concat and convs are one SPPF-like unit only
            // when named, so here each is its own row
            let starts = !ACTIVATIONS.contains(&n.op_type.as_str()) && !SHAPE_PLUMBING.contains(&n.op_type.as_str());
            if starts && seen_any {
                unit += 1;
            }
            seen_any = true;
            unit
        };
    }
    let detect = if named {
        graph.node[..first_head].iter().enumerate().filter(|(_, n)| n.op_type != "Constant").map(|(i, _)| of_node[i]).max().map_or(0, |k| k + 1)
    } else {
        unit + 1
    };
    for l in &mut of_node[first_head..] {
        *l = detect;
    }
    // Constants before the head: their own index when named, else their
    // first consumer's layer (consumers come later in graph order).
    for i in (0..first_head).rev() {
        let n = &graph.node[i];
        if n.op_type != "Constant" {
            continue;
        }
        let own = if named { layer_index(&n.name) } else { None };
        let consumer = n.output.iter().flat_map(|o| ix.consumers_of(o)).map(|&c| of_node[c]).min();
        of_node[i] = own.or(consumer).unwrap_or(if i > 0 { of_node[i - 1] } else { 0 });
    }
    Layers { of_node, first_head, detect, named }
}

/// `model.N` from `/model.N/...`, `model.N.weight` or `model_N_...`.
pub fn layer_index(name: &str) -> Option<usize> {
    let i = name.find("model")? + 5;
    let rest = name[i..].strip_prefix(['.', '_'])?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Parameters of the exported (BatchNorm-fused) weights that `nodes` read:
/// float tensors of rank > 1 and biases, each counted once.
pub fn params_of(ix: &GraphIndex, nodes: &[usize]) -> usize {
    let mut seen = HashSet::new();
    nodes
        .iter()
        .flat_map(|&i| ix.node(i).input.iter())
        .filter_map(|t| ix.initializers.get(t.as_str()))
        .filter(|t| seen.insert(t.name.as_str()))
        .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32 && t.dims.len() != 1 || t.name.ends_with("bias"))
        .map(|t| t.dims.iter().product::<i64>() as usize)
        .sum()
}

/// Shapes of image-like tensors `[1, C, H, W]`, propagated through the ops of
/// a YOLOv5 backbone and neck. Resizes whose scale is computed at run time
/// (dynamic exports) are taken as YOLOv5's ×2 nearest upsample.
pub fn infer_shapes<'g>(ix: &GraphIndex<'g>, input: &str, imgsz: [usize; 2]) -> HashMap<&'g str, Vec<usize>> {
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
            // ONNX ConvTranspose: out = stride·(in − 1) + output_padding + dilation·(k − 1) + 1 − pads
            "ConvTranspose" => node.input.get(1).and_then(|w| ix.initializers.get(w.as_str())).map(|w| {
                let group = onnx::attr(node, "group").map_or(1, |a| a.i.max(1)) as usize;
                let strides = onnx::attr_ints(node, "strides").unwrap_or(vec![1, 1]);
                let pads = onnx::attr_ints(node, "pads").unwrap_or(vec![0; 4]);
                let dil = onnx::attr_ints(node, "dilations").unwrap_or(vec![1, 1]);
                let opad = onnx::attr_ints(node, "output_padding").unwrap_or(vec![0, 0]);
                let out = |i: usize| (strides[i] * (first[2 + i] as i64 - 1) + opad[i] + dil[i] * (w.dims[2 + i] - 1) + 1 - pads[i] - pads[i + 2]).max(0) as usize;
                vec![first[0], w.dims[1] as usize * group, out(0), out(1)]
            }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_reads_common_exporter_names() {
        assert_eq!(layer_index("/model.24/m.0/Conv"), Some(24));
        assert_eq!(layer_index("model.3.conv.weight"), Some(3));
        assert_eq!(layer_index("Conv_198"), None);
    }
}
