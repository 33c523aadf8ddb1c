//! One Detect level in, ONNX nodes out: the head's 1x1 `Conv` on a head-input
//! feature map followed by YOLOv5 v7.0's export-mode decode, as
//! `Detect.forward` traces it:
//!
//! ```text
//! Conv → Reshape [bs, na, no, ny, nx] → Transpose(0,1,3,4,2) → Sigmoid
//!      → Split([2, 2, nc+1], axis 4) → xy = (2σ + grid) · stride
//!                                      wh = (2σ)² · anchor_grid
//!      → Concat(axis 4) → Reshape [bs, na·ny·nx, no]
//! ```
//!
//! where `grid` already holds the `- 0.5`. With a static spatial size the grid
//! and anchor grid are `[1, na, ny, nx, 2]` constants (as static exports hold
//! them); with a dynamic one the grid is built at run time from `Shape(conv)`
//! (Gather → Cast → Range → Reshape → Expand → Concat → Sub) and the anchors are
//! a `[1, na, 1, 1, 2]` constant that `Mul` broadcasts, as dynamic exports do.
//! The arithmetic is the same op for op, so outputs match YOLOv5's bit for bit
//! up to the runtime's kernels.
//!
//! Every op emitted is valid unchanged in opsets 12 through 18+, except `Split`,
//! whose sizes moved from an attribute to an input in opset 13. `Unsqueeze`
//! (same move) is avoided: 1-element Gathers give 1-D shape pieces directly.

use std::collections::HashSet;

use crate::graph::onnx::pb;
use pb::attribute_proto::AttributeType;
use pb::tensor_proto::DataType;

/// Emits nodes and initializers with names that cannot clash with the graph
/// they are appended to.
pub struct Builder {
    taken: HashSet<String>,
    pub nodes: Vec<pb::NodeProto>,
    pub initializers: Vec<pb::TensorProto>,
    /// Name prefix, torch style (`/model.24`).
    pub prefix: String,
    pub opset: i64,
}

impl Builder {
    /// `taken`: every tensor and node name already in the graph.
    pub fn new(taken: HashSet<String>, prefix: &str, opset: i64) -> Builder {
        Builder { taken, nodes: Vec::new(), initializers: Vec::new(), prefix: prefix.to_string(), opset }
    }

    /// `base`, or `base_1`, `base_2`, ... whichever is free; then reserved.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 0;
        while self.taken.contains(&name) {
            i += 1;
            name = format!("{base}_{i}");
        }
        self.taken.insert(name.clone());
        name
    }

    /// Adds a node with `n_out` outputs named after the node.
    pub fn node_n(&mut self, op: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>, n_out: usize) -> Vec<String> {
        let name = self.fresh(&format!("{}/{op}", self.prefix));
        let output: Vec<String> = (0..n_out).map(|i| self.fresh(&format!("{name}_output_{i}"))).collect();
        self.nodes.push(pb::NodeProto {
            name,
            op_type: op.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: output.clone(),
            attribute,
            ..Default::default()
        });
        output
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>) -> String {
        self.node_n(op, inputs, attribute, 1).remove(0)
    }

    /// An initializer under exactly `name` (the caller made it unique).
    pub fn add_initializer(&mut self, t: pb::TensorProto) -> String {
        self.taken.insert(t.name.clone());
        let name = t.name.clone();
        self.initializers.push(t);
        name
    }

    pub fn f32_const(&mut self, base: &str, dims: &[usize], data: &[f32]) -> String {
        let name = self.fresh(&format!("{}/{base}", self.prefix));
        self.add_initializer(crate::graph::onnx::float_tensor(&name, dims, data))
    }

    pub fn i64_const(&mut self, base: &str, dims: &[usize], data: &[i64]) -> String {
        let name = self.fresh(&format!("{}/{base}", self.prefix));
        self.add_initializer(pb::TensorProto {
            name,
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Int64 as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        })
    }
}

pub fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}

pub fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}

/// Constants shared by all levels.
pub struct Shared {
    two: String,
    split: Option<String>,
    split_sizes: [i64; 3],
    /// Pieces of the run-time grid, only for a dynamic size (an unused
    /// initializer would draw warnings from ONNX Runtime).
    dynamic: Option<DynamicShared>,
}

struct DynamicShared {
    half: String,
    idx_h: String,
    idx_w: String,
    scalar_h: String,
    scalar_w: String,
    one_1d: String,
    zero_f: String,
    one_f: String,
    row_shape: String,
    col_shape: String,
}

impl Shared {
    pub fn new(b: &mut Builder, nc: usize, dynamic_size: bool) -> Shared {
        let two = b.f32_const("Constant_two", &[], &[2.0]);
        let split_sizes = [2, 2, nc as i64 + 1];
        let split = (b.opset >= 13).then(|| b.i64_const("Constant_split", &[3], &split_sizes));
        let dynamic = dynamic_size.then(|| DynamicShared {
            half: b.f32_const("Constant_half", &[], &[0.5]),
            idx_h: b.i64_const("Constant_idx_h", &[1], &[2]),
            idx_w: b.i64_const("Constant_idx_w", &[1], &[3]),
            scalar_h: b.i64_const("Constant_scalar_h", &[], &[2]),
            scalar_w: b.i64_const("Constant_scalar_w", &[], &[3]),
            one_1d: b.i64_const("Constant_one", &[1], &[1]),
            zero_f: b.f32_const("Constant_zero_f", &[], &[0.0]),
            one_f: b.f32_const("Constant_one_f", &[], &[1.0]),
            // x varies along the last grid axis, y along the first
            row_shape: b.i64_const("Constant_row_shape", &[3], &[1, -1, 1]),
            col_shape: b.i64_const("Constant_col_shape", &[3], &[-1, 1, 1]),
        });
        Shared { two, split, split_sizes, dynamic }
    }
}

/// What one level needs to know.
pub struct Level<'a> {
    pub index: usize,
    /// The head-input feature map `[bs, cin, ny, nx]`.
    pub input: &'a str,
    pub weight: &'a str,
    pub bias: &'a str,
    pub stride: f32,
    pub anchors: &'a [[f32; 2]],
    pub no: usize,
    /// `Some([ny, nx])` for a static spatial size.
    pub grid: Option<[usize; 2]>,
    /// The batch entry of the Reshape shapes: the fixed batch, or 0 (copy the
    /// input's dimension, which keeps any batch working without Shape ops).
    pub batch: i64,
}

/// Emits one level; returns its `[bs, na·ny·nx, no]` output tensor.
pub fn emit_level(b: &mut Builder, sh: &Shared, l: &Level) -> String {
    let na = l.anchors.len();
    let (na_i, no_i) = (na as i64, l.no as i64);
    let conv_attrs = vec![
        attr_ints("dilations", &[1, 1]),
        attr_int("group", 1),
        attr_ints("kernel_shape", &[1, 1]),
        attr_ints("pads", &[0, 0, 0, 0]),
        attr_ints("strides", &[1, 1]),
    ];
    let conv_prefix = format!("{}/m.{}", b.prefix, l.index);
    let saved = std::mem::replace(&mut b.prefix, conv_prefix);
    let conv = b.node("Conv", &[l.input, l.weight, l.bias], conv_attrs);
    b.prefix = saved;

    // Shape of the 5-D view, and the grid (with its -0.5) to add to 2σ_xy.
    let (shape5, grid) = match (l.grid, &sh.dynamic) {
        (Some([ny, nx]), _) => {
            let shape5 = b.i64_const("Constant_shape5", &[5], &[l.batch, na_i, no_i, ny as i64, nx as i64]);
            let mut g = Vec::with_capacity(na * ny * nx * 2);
            for _ in 0..na {
                for y in 0..ny {
                    for x in 0..nx {
                        g.push(x as f32 - 0.5);
                        g.push(y as f32 - 0.5);
                    }
                }
            }
            (shape5, b.f32_const("Constant_grid", &[1, na, ny, nx, 2], &g))
        }
        (None, Some(d)) => {
            let shp = b.node("Shape", &[&conv], vec![]);
            let ny1 = b.node("Gather", &[&shp, &d.idx_h], vec![attr_int("axis", 0)]);
            let nx1 = b.node("Gather", &[&shp, &d.idx_w], vec![attr_int("axis", 0)]);
            let head = b.i64_const("Constant_shape_head", &[3], &[l.batch, na_i, no_i]);
            let shape5 = b.node("Concat", &[&head, &ny1, &nx1], vec![attr_int("axis", 0)]);
            // Range needs scalars; YOLOv5 ranges over floats.
            let mut axis_range = |scalar: &str| {
                let n = b.node("Gather", &[&shp, scalar], vec![attr_int("axis", 0)]);
                let nf = b.node("Cast", &[&n], vec![attr_int("to", DataType::Float as i64)]);
                b.node("Range", &[&d.zero_f, &nf, &d.one_f], vec![])
            };
            let ys = axis_range(&d.scalar_h);
            let xs = axis_range(&d.scalar_w);
            let grid_shape = b.node("Concat", &[&ny1, &nx1, &d.one_1d], vec![attr_int("axis", 0)]);
            let xr = b.node("Reshape", &[&xs, &d.row_shape], vec![]);
            let yr = b.node("Reshape", &[&ys, &d.col_shape], vec![]);
            let xg = b.node("Expand", &[&xr, &grid_shape], vec![]);
            let yg = b.node("Expand", &[&yr, &grid_shape], vec![]);
            // [ny, nx, 2]; Add broadcasts it over batch and anchors
            let g = b.node("Concat", &[&xg, &yg], vec![attr_int("axis", 2)]);
            (shape5, b.node("Sub", &[&g, &d.half], vec![]))
        }
        (None, None) => unreachable!("Shared::new(dynamic_size) decides whether dynamic pieces exist"),
    };
    let anchor_grid = match l.grid {
        Some([ny, nx]) => {
            let mut a = Vec::with_capacity(na * ny * nx * 2);
            for [w, h] in l.anchors {
                for _ in 0..ny * nx {
                    a.push(*w);
                    a.push(*h);
                }
            }
            b.f32_const("Constant_anchor_grid", &[1, na, ny, nx, 2], &a)
        }
        None => {
            let a: Vec<f32> = l.anchors.iter().flat_map(|[w, h]| [*w, *h]).collect();
            b.f32_const("Constant_anchor_grid", &[1, na, 1, 1, 2], &a)
        }
    };

    let r = b.node("Reshape", &[&conv, &shape5], vec![]);
    let t = b.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 1, 3, 4, 2])]);
    let s = b.node("Sigmoid", &[&t], vec![]);
    let parts = match &sh.split {
        Some(sizes) => b.node_n("Split", &[&s, sizes], vec![attr_int("axis", 4)], 3),
        None => b.node_n("Split", &[&s], vec![attr_int("axis", 4), attr_ints("split", &sh.split_sizes)], 3),
    };
    let stride = b.f32_const("Constant_stride", &[], &[l.stride]);
    let xy2 = b.node("Mul", &[&parts[0], &sh.two], vec![]);
    let xyg = b.node("Add", &[&xy2, &grid], vec![]);
    let xy = b.node("Mul", &[&xyg, &stride], vec![]);
    let wh2 = b.node("Mul", &[&parts[1], &sh.two], vec![]);
    let wh_sq = b.node("Pow", &[&wh2, &sh.two], vec![]);
    let wh = b.node("Mul", &[&wh_sq, &anchor_grid], vec![]);
    let cat = b.node("Concat", &[&xy, &wh, &parts[2]], vec![attr_int("axis", 4)]);
    // -1 rows: na·ny·nx whether or not the size is known
    let shape3 = b.i64_const("Constant_shape3", &[3], &[l.batch, -1, no_i]);
    b.node("Reshape", &[&cat, &shape3], vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_names_never_clash() {
        let taken: HashSet<String> = ["/model.24/Conv".to_string(), "/model.24/Conv_1".to_string()].into();
        let mut b = Builder::new(taken, "/model.24", 17);
        assert_eq!(b.fresh("/model.24/Conv"), "/model.24/Conv_2");
        assert_eq!(b.fresh("/model.24/Conv"), "/model.24/Conv_3");
        let out = b.node("Sigmoid", &["x"], vec![]);
        assert_ne!(out, b.nodes[0].name);
    }

    #[test]
    fn split_sizes_follow_the_opset() {
        for (opset, as_input) in [(12, false), (13, true), (17, true)] {
            let mut b = Builder::new(HashSet::new(), "/m", opset);
            let sh = Shared::new(&mut b, 2, false);
            let l = Level { index: 0, input: "f", weight: "w", bias: "b", stride: 8.0, anchors: &[[10.0, 13.0]], no: 7, grid: Some([2, 3]), batch: 1 };
            emit_level(&mut b, &sh, &l);
            let split = b.nodes.iter().find(|n| n.op_type == "Split").unwrap();
            assert_eq!(split.input.len() == 2, as_input, "opset {opset}");
            assert_eq!(split.attribute.iter().any(|a| a.name == "split"), !as_input, "opset {opset}");
        }
    }
}
