//! ONNX graph in, `DetectSpec` out: where YOLOv5's Detect head sits and what it
//! decodes with (anchors, strides, nc, names, input size).
//!
//! Node names are not reliable across exporters (`/model.24/m.0/Conv`,
//! `Conv_198`, `conv2d_60`), so the head is found by structure: the graph output
//! is a Concat over levels; walking back from each level, the first Conv reached
//! whose output goes Reshape → Transpose(0,1,3,4,2) → Sigmoid is that level's
//! head convolution. The decode after the Sigmoid is YOLOv5's
//! `xy = (2σ + grid') · stride`, `wh = (2σ)² · anchor_grid`; the anchors are read
//! from the constant multiplied into the `Pow` result and the stride from the
//! scalar multiplied into the xy branch. Static exports hold `anchor_grid` as a
//! `[1, na, ny, nx, 2]` constant; dynamic ones Expand a `[1, na, 1, 1, 2]` one.

use std::collections::{HashSet, VecDeque};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::onnx::{self, Dim, GraphIndex, pb};

/// One detection level (P3, P4, P5, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelSpec {
    /// Name of the head Conv node (may be empty in stripped exports).
    pub conv_node: String,
    /// The feature map this level's head conv reads: an output of the frozen graph.
    pub input_tensor: String,
    pub in_channels: usize,
    pub weight: String,
    pub bias: String,
    pub stride: f32,
    /// Anchors in pixels, `[w, h]` per anchor.
    pub anchors: Vec<[f32; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectSpec {
    pub input_name: String,
    pub output_name: String,
    /// `[height, width]` when the export is static, `None` when dynamic.
    pub imgsz: Option<[usize; 2]>,
    pub batch: Dim,
    pub nc: usize,
    pub na: usize,
    pub names: Vec<String>,
    /// Whether `names` came from the model's metadata.
    pub names_from_metadata: bool,
    pub levels: Vec<LevelSpec>,
    pub opset: i64,
}

impl DetectSpec {
    pub fn no(&self) -> usize {
        self.nc + 5
    }
    pub fn strides(&self) -> Vec<f32> {
        self.levels.iter().map(|l| l.stride).collect()
    }
}

/// Finds the Detect head. The error explains why the graph is not a YOLOv5 detector.
pub fn find_detect(model: &pb::ModelProto) -> Result<DetectSpec> {
    let graph = model.graph.as_ref().expect("decode_model checked the graph");
    let ix = GraphIndex::new(graph);
    let initializer_names: HashSet<&str> = ix.initializers.keys().copied().collect();

    let input = graph
        .input
        .iter()
        .find(|i| !initializer_names.contains(i.name.as_str()))
        .ok_or_else(|| anyhow::anyhow!("the graph has no image input"))?;
    let in_shape = onnx::value_info_shape(input).unwrap_or_default();
    if in_shape.len() != 4 || in_shape[1] != Dim::Fixed(3) {
        bail!("its input `{}` is not an image batch [N, 3, H, W] (shape {:?}), so it is not a YOLOv5 detector", input.name, in_shape);
    }
    let imgsz = match (in_shape[2].fixed(), in_shape[3].fixed()) {
        (Some(h), Some(w)) => Some([h as usize, w as usize]),
        _ => None,
    };

    let output = graph.output.first().ok_or_else(|| anyhow::anyhow!("the graph has no output"))?;
    let concat = ix
        .producer_of(&output.name)
        .map(|i| ix.node(i))
        .filter(|n| n.op_type == "Concat")
        .ok_or_else(|| anyhow::anyhow!("its output `{}` is not a Concat over detection levels, so it is not a YOLOv5 Detect export", output.name))?;

    let mut levels = Vec::new();
    let mut na_seen = None;
    let mut out_channels = None;
    for (li, level_out) in concat.input.iter().enumerate() {
        let conv_i = head_conv_of_level(&ix, level_out).ok_or_else(|| {
            anyhow::anyhow!("no Detect convolution (Conv → Reshape → Transpose → Sigmoid) feeds detection level {li} of `{}`: not a YOLOv5 Detect export", output.name)
        })?;
        let conv = ix.node(conv_i);
        let feature = conv.input.first().map(String::as_str).unwrap_or("");
        if !is_available(&ix, feature) {
            bail!("the Detect convolution `{}` of level {li} reads `{feature}`, which no node of the graph produces (a damaged or hand-edited export; export it again)", conv.name);
        }
        let (weight, bias) = match (conv.input.get(1), conv.input.get(2)) {
            (Some(w), Some(b)) => (w.clone(), b.clone()),
            _ => bail!("the head convolution `{}` has no bias input", conv.name),
        };
        let wt = ix.initializers.get(weight.as_str()).ok_or_else(|| anyhow::anyhow!("the head convolution weight `{weight}` is not an initializer"))?;
        if wt.dims.len() != 4 || wt.dims[2] != 1 || wt.dims[3] != 1 {
            bail!("the head convolution `{}` is not 1x1 (weight shape {:?})", conv.name, wt.dims);
        }
        let (oc, ic) = (wt.dims[0] as usize, wt.dims[1] as usize);

        let sigmoid = decode_sigmoid(&ix, conv_i).expect("checked by head_conv_of_level");
        let cone = forward_cone(&ix, sigmoid, level_out);
        let anchors = read_anchors(&ix, &cone).ok_or_else(|| anyhow::anyhow!("cannot read the anchors of detection level {li} (no constant multiplies the (2σ)² term)"))?;
        let na = anchors.len();
        if na == 0 || oc % na != 0 || oc / na < 6 {
            bail!("the head convolution `{}` has {oc} output channels, which does not fit {na} anchors × (5 + nc)", conv.name);
        }
        if *na_seen.get_or_insert(na) != na || *out_channels.get_or_insert(oc) != oc {
            bail!("detection levels disagree on anchors per level or output channels");
        }
        let stride = read_stride(&ix, &cone)
            .or_else(|| imgsz.and_then(|[h, _]| grid_rows(&ix, &cone).map(|ny| (h / ny) as f32)))
            .unwrap_or_else(|| 8.0 * 2f32.powi(li as i32));
        levels.push(LevelSpec {
            conv_node: conv.name.clone(),
            input_tensor: conv.input[0].clone(),
            in_channels: ic,
            weight,
            bias,
            stride,
            anchors,
        });
    }
    if levels.is_empty() {
        bail!("its output Concat has no inputs");
    }
    // a dangling input anywhere would only surface inside an engine
    for n in &graph.node {
        if let Some(t) = n.input.iter().find(|t| !t.is_empty() && !is_available(&ix, t)) {
            bail!("node `{}` ({}) reads `{t}`, which no node, initializer or graph input provides (a damaged or hand-edited export; export it again)", n.name, n.op_type);
        }
    }
    let na = na_seen.unwrap();
    let nc = out_channels.unwrap() / na - 5;
    let (names, names_from_metadata) = match onnx::metadata(model, "names").and_then(parse_names) {
        Some(n) if n.len() == nc => (n, true),
        _ => ((0..nc).map(|i| format!("class{i}")).collect(), false),
    };
    Ok(DetectSpec {
        input_name: input.name.clone(),
        output_name: output.name.clone(),
        imgsz,
        batch: in_shape[0].clone(),
        nc,
        na,
        names,
        names_from_metadata,
        levels,
        opset: onnx::opset(model),
    })
}

/// Whether a tensor exists in the graph: a node output, initializer or input.
fn is_available(ix: &GraphIndex, t: &str) -> bool {
    ix.producer_of(t).is_some() || ix.initializers.contains_key(t) || ix.graph.input.iter().any(|i| i.name == t)
}

/// Walks back from a level's output through non-Conv nodes and returns the
/// first Conv whose output is decoded as a Detect level.
fn head_conv_of_level(ix: &GraphIndex, level_out: &str) -> Option<usize> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([level_out.to_string()]);
    while let Some(t) = queue.pop_front() {
        let Some(ni) = ix.producer_of(&t) else { continue };
        if !seen.insert(ni) {
            continue;
        }
        let node = ix.node(ni);
        if node.op_type == "Conv" {
            if decode_sigmoid(ix, ni).is_some() {
                return Some(ni);
            }
            continue;
        }
        queue.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
    }
    None
}

/// The Sigmoid of `Conv → Reshape → Transpose(0,1,3,4,2) → Sigmoid`, if present.
fn decode_sigmoid(ix: &GraphIndex, conv: usize) -> Option<usize> {
    let follow = |from: usize, op: &str| -> Option<usize> {
        let out = ix.node(from).output.first()?;
        ix.consumers_of(out).iter().copied().find(|&c| ix.node(c).op_type == op)
    };
    let reshape = follow(conv, "Reshape")?;
    let transpose = follow(reshape, "Transpose")?;
    if onnx::attr_ints(ix.node(transpose), "perm")? != [0, 1, 3, 4, 2] {
        return None;
    }
    follow(transpose, "Sigmoid")
}

/// Nodes reachable forward from `start` that lie before the level output.
fn forward_cone(ix: &GraphIndex, start: usize, level_out: &str) -> Vec<usize> {
    let mut seen = HashSet::from([start]);
    let mut order = vec![start];
    let mut queue = VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for out in &ix.node(n).output {
            if out == level_out {
                continue;
            }
            for &c in ix.consumers_of(out) {
                if seen.insert(c) {
                    order.push(c);
                    queue.push_back(c);
                }
            }
        }
    }
    order
}

/// Anchors from `Mul(Pow(2σ, 2), anchor_grid)`: the anchor grid holds one
/// `[w, h]` pair per anchor, repeated over the grid in static exports.
fn read_anchors(ix: &GraphIndex, cone: &[usize]) -> Option<Vec<[f32; 2]>> {
    for &p in cone {
        let pow = ix.node(p);
        if pow.op_type != "Pow" {
            continue;
        }
        for &m in ix.consumers_of(&pow.output[0]) {
            let mul = ix.node(m);
            if mul.op_type != "Mul" {
                continue;
            }
            let other = mul.input.iter().find(|i| **i != pow.output[0])?;
            let c = ix.constant(other)?;
            if c.dims.len() != 5 || c.dims[4] != 2 {
                return None;
            }
            let per_anchor: usize = c.dims[2] * c.dims[3] * 2;
            return Some((0..c.dims[1]).map(|a| [c.values[a * per_anchor] as f32, c.values[a * per_anchor + 1] as f32]).collect());
        }
    }
    None
}

/// The stride: the scalar constant multiplied into the xy branch, i.e. a Mul
/// whose input comes from an Add (`2σ + grid'`).
fn read_stride(ix: &GraphIndex, cone: &[usize]) -> Option<f32> {
    for &n in cone {
        let node = ix.node(n);
        if node.op_type != "Mul" {
            continue;
        }
        let from_add = node.input.iter().any(|i| ix.producer_of(i).is_some_and(|p| ix.node(p).op_type == "Add"));
        if !from_add {
            continue;
        }
        for i in &node.input {
            if let Some(v) = ix.constant(i).and_then(|c| c.scalar())
                && v > 0.0
            {
                return Some(v as f32);
            }
        }
    }
    None
}

/// Grid rows from the static grid constant added in the xy branch.
fn grid_rows(ix: &GraphIndex, cone: &[usize]) -> Option<usize> {
    cone.iter().map(|&n| ix.node(n)).filter(|n| n.op_type == "Add").find_map(|n| {
        n.input.iter().find_map(|i| ix.constant(i).filter(|c| c.dims.len() == 5).map(|c| c.dims[2]))
    })
}

/// Parses YOLOv5's `names` metadata: a Python dict `{0: 'person', ...}` or a
/// list `['person', ...]`, as `str()` writes it.
pub fn parse_names(s: &str) -> Option<Vec<String>> {
    let strings = python_strings(s)?;
    let t = s.trim();
    if t.starts_with('[') {
        return Some(strings);
    }
    if !t.starts_with('{') {
        return None;
    }
    // Dict: keys must be 0..n in order for the values to be the class list.
    let mut keys = Vec::new();
    let mut rest = t;
    for v in &strings {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim().trim_start_matches(['{', ',']).trim();
        keys.push(key.parse::<usize>().ok()?);
        let after = &rest[colon + 1..];
        // skip past this value's closing quote
        let start = after.find(['\'', '"'])?;
        let q = after.as_bytes()[start] as char;
        let mut i = start + 1;
        let b = after.as_bytes();
        while i < b.len() && b[i] as char != q {
            if b[i] == b'\\' {
                i += 1;
            }
            i += 1;
        }
        rest = &after[(i + 1).min(after.len())..];
        let _ = v;
    }
    (keys.iter().enumerate().all(|(i, &k)| i == k)).then_some(strings)
}

/// All quoted string literals of a Python literal, unescaped.
fn python_strings(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\'' || c == '"' {
            let mut cur = String::new();
            loop {
                match chars.next()? {
                    '\\' => cur.push(chars.next()?),
                    ch if ch == c => break,
                    ch => cur.push(ch),
                }
            }
            out.push(cur);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_python_dict_and_list() {
        assert_eq!(parse_names("{0: 'person', 1: \"it's\", 2: 'traffic light'}").unwrap(), vec!["person", "it's", "traffic light"]);
        assert_eq!(parse_names("['a', 'b']").unwrap(), vec!["a", "b"]);
        assert!(parse_names("{1: 'a'}").is_none());
        assert!(parse_names("not names").is_none());
    }
}
