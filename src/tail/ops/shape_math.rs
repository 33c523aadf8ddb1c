// The shape arithmetic exports put in front of Resize -> ShapeMathSpec, and
// its evaluation.
// In: a Shape, Gather, Slice, Cast, Floor, Unsqueeze, Constant node, or a
// Concat/Add/Sub/Mul/Div whose inputs are all constant; at evaluation, its
// inputs as values (or, for Shape, only the shape of a feature map). Out: a
// small tensor (`ShapeValue`), evaluated once at the input size the cache was
// made for and never trained.
//
// Why: torch exports `nn.Upsample` as Resize(x, sizes) with
// sizes = Concat(Slice(Shape(x), 0, 2), Cast(Concat(Unsqueeze(Floor(c)), ..)))
// (yolov5n.onnx, opset 17). With a fixed input size these are constants;
// evaluating them gives the Resize its output size.
//
// The ONNX conventions pinned here: Shape's start/end (opset 15) clamp like
// Python slices; Gather and Slice take negative indices from the end; Slice
// clamps starts/ends to the axis and steps may be negative; integer Div
// truncates toward zero; Cast to an integer type truncates toward zero.
// Only 0-D and 1-D values are supported (shape tensors are).

use anyhow::{Result, anyhow, bail};

use super::{attr, attr_int, node_err};
use crate::graph::onnx::{pb, tensor_values};

/// A small constant tensor; `int` records whether ONNX holds it as an
/// integer type (it decides Div and Cast).
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeValue {
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
    pub int: bool,
}

impl ShapeValue {
    pub fn ints(v: &[i64]) -> Self {
        ShapeValue { dims: vec![v.len()], values: v.iter().map(|&x| x as f64).collect(), int: true }
    }

    pub fn scalar(v: f64, int: bool) -> Self {
        ShapeValue { dims: vec![], values: vec![v], int }
    }

    /// The values as sizes (e.g. a Resize's `sizes`), None if any is negative
    /// or fractional.
    pub fn as_usizes(&self) -> Option<Vec<usize>> {
        self.values.iter().map(|&v| (v >= 0.0 && v.fract() == 0.0).then_some(v as usize)).collect()
    }
}

/// Whether an ONNX element type is an integer (or bool) type.
pub fn is_int_type(data_type: i32) -> bool {
    matches!(data_type, 2..=7 | 9 | 12 | 13)
}

/// An input at evaluation time.
#[derive(Clone, Debug, PartialEq)]
pub enum ShapeArg {
    Value(ShapeValue),
    /// A feature map of which only the shape is known (Shape's input).
    ShapeOf(Vec<usize>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ShapeOp {
    Shape { start: i64, end: Option<i64> },
    Gather { axis: i64 },
    /// `attrs`: opset < 10 passes (starts, ends, axes) as attributes.
    Slice { attrs: Option<(Vec<i64>, Vec<i64>, Option<Vec<i64>>)> },
    Cast { to_int: bool },
    Floor,
    /// `axes`: opset < 13 passes them as an attribute.
    Unsqueeze { axes: Option<Vec<i64>> },
    Concat { axis: i64 },
    Constant(ShapeValue),
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShapeMathSpec {
    /// The node's name, for evaluation errors.
    pub name: String,
    pub op: ShapeOp,
}

/// The op types that are always shape arithmetic in a tail.
pub const OPS: [&str; 7] = ["Shape", "Gather", "Slice", "Cast", "Floor", "Unsqueeze", "Constant"];

fn constant_value(node: &pb::NodeProto) -> Result<ShapeValue> {
    for a in &node.attribute {
        let v = match a.name.as_str() {
            "value" => {
                let t = a.t.as_ref().ok_or_else(|| node_err(node, "Constant value holds no tensor"))?;
                let c = tensor_values(t).map_err(|e| node_err(node, e))?;
                ShapeValue { dims: c.dims, values: c.values, int: is_int_type(t.data_type) }
            }
            "value_float" => ShapeValue::scalar(a.f as f64, false),
            "value_floats" => ShapeValue { dims: vec![a.floats.len()], values: a.floats.iter().map(|&v| v as f64).collect(), int: false },
            "value_int" => ShapeValue::scalar(a.i as f64, true),
            "value_ints" => ShapeValue::ints(&a.ints),
            other => return Err(node_err(node, format!("Constant with attribute {other} is not supported"))),
        };
        return Ok(v);
    }
    Err(node_err(node, "Constant has no value"))
}

/// See the file header.
pub fn parse(node: &pb::NodeProto) -> Result<ShapeMathSpec> {
    let ints = |name: &str| attr(node, name).map(|a| a.ints.clone());
    let op = match node.op_type.as_str() {
        "Shape" => ShapeOp::Shape { start: attr_int(node, "start", 0), end: attr(node, "end").map(|a| a.i) },
        "Gather" => ShapeOp::Gather { axis: attr_int(node, "axis", 0) },
        "Slice" => ShapeOp::Slice {
            attrs: match (ints("starts"), ints("ends")) {
                (Some(s), Some(e)) => Some((s, e, ints("axes"))),
                _ => None,
            },
        },
        "Cast" => {
            let Some(to) = attr(node, "to") else { return Err(node_err(node, "Cast has no `to` attribute")) };
            ShapeOp::Cast { to_int: is_int_type(to.i as i32) }
        }
        "Floor" => ShapeOp::Floor,
        "Unsqueeze" => ShapeOp::Unsqueeze { axes: ints("axes") },
        "Concat" => ShapeOp::Concat { axis: attr(node, "axis").ok_or_else(|| node_err(node, "Concat has no axis attribute"))?.i },
        "Constant" => ShapeOp::Constant(constant_value(node)?),
        "Add" => ShapeOp::Add,
        "Sub" => ShapeOp::Sub,
        "Mul" => ShapeOp::Mul,
        "Div" => ShapeOp::Div,
        other => return Err(node_err(node, format!("{other} is not shape arithmetic"))),
    };
    Ok(ShapeMathSpec { name: node.name.clone(), op })
}

/// A possibly negative index into `n` items.
fn index(i: f64, n: usize) -> Option<usize> {
    let i = if i < 0.0 { i + n as f64 } else { i };
    (i >= 0.0 && i < n as f64).then_some(i as usize)
}

/// The indices a 1-D Slice selects from `n` items (ONNX/Python clamping).
fn slice_range(start: i64, end: i64, step: i64, n: usize) -> Vec<usize> {
    let n = n as i64;
    let norm = |v: i64| if v < 0 { v + n } else { v };
    let mut out = Vec::new();
    if step > 0 {
        let (s, e) = (norm(start).clamp(0, n), norm(end).clamp(0, n));
        let mut i = s;
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else {
        let (s, e) = (norm(start).clamp(-1, n - 1), norm(end).clamp(-1, n - 1));
        let mut i = s;
        while i > e {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

impl ShapeMathSpec {
    /// Evaluates the node on its inputs (see the file header).
    pub fn eval(&self, args: &[ShapeArg]) -> Result<ShapeValue> {
        let err = |m: String| anyhow!("node {}: {m}", self.name);
        let value = |i: usize| -> Result<&ShapeValue> {
            match args.get(i) {
                Some(ShapeArg::Value(v)) if v.dims.len() <= 1 => Ok(v),
                Some(ShapeArg::Value(v)) => Err(err(format!("input {i} has shape {:?}; only 0-D and 1-D shape values are supported", v.dims))),
                Some(ShapeArg::ShapeOf(_)) => Err(err(format!("input {i} is a feature map, not a constant"))),
                None => Err(err(format!("input {i} is missing"))),
            }
        };
        let ints = |i: usize| -> Result<Vec<i64>> { Ok(value(i)?.values.iter().map(|&v| v as i64).collect()) };
        Ok(match &self.op {
            ShapeOp::Shape { start, end } => {
                let dims: Vec<usize> = match args.first() {
                    Some(ShapeArg::ShapeOf(d)) => d.clone(),
                    Some(ShapeArg::Value(v)) => v.dims.clone(),
                    None => bail!("node {}: Shape has no input", self.name),
                };
                let r = slice_range(*start, end.unwrap_or(dims.len() as i64), 1, dims.len());
                ShapeValue { dims: vec![r.len()], values: r.iter().map(|&i| dims[i] as f64).collect(), int: true }
            }
            ShapeOp::Gather { axis } => {
                let (data, idx) = (value(0)?, value(1)?);
                if data.dims.len() != 1 || !(*axis == 0 || *axis == -1) {
                    return Err(err("Gather is supported on 1-D data along axis 0 only".into()));
                }
                let n = data.values.len();
                let values = idx.values.iter().map(|&i| index(i, n).map(|i| data.values[i]).ok_or_else(|| err(format!("Gather index {i} is out of range for {n} values")))).collect::<Result<_>>()?;
                ShapeValue { dims: idx.dims.clone(), values, int: data.int }
            }
            ShapeOp::Slice { attrs } => {
                let data = value(0)?;
                let (starts, ends, axes, steps) = match attrs {
                    Some((s, e, a)) => (s.clone(), e.clone(), a.clone(), None),
                    None => (ints(1)?, ints(2)?, if args.len() > 3 { Some(ints(3)?) } else { None }, if args.len() > 4 { Some(ints(4)?) } else { None }),
                };
                if data.dims.len() != 1 || starts.len() != 1 || ends.len() != 1 || axes.as_ref().is_some_and(|a| !matches!(a.as_slice(), [0] | [-1])) {
                    return Err(err("Slice is supported on 1-D data along axis 0 only".into()));
                }
                let step = steps.map(|s| s[0]).unwrap_or(1);
                if step == 0 {
                    return Err(err("Slice step is 0".into()));
                }
                let r = slice_range(starts[0], ends[0], step, data.values.len());
                ShapeValue { dims: vec![r.len()], values: r.iter().map(|&i| data.values[i]).collect(), int: data.int }
            }
            ShapeOp::Cast { to_int } => {
                let v = value(0)?;
                let values = if *to_int { v.values.iter().map(|x| x.trunc()).collect() } else { v.values.clone() };
                ShapeValue { dims: v.dims.clone(), values, int: *to_int }
            }
            ShapeOp::Floor => {
                let v = value(0)?;
                ShapeValue { dims: v.dims.clone(), values: v.values.iter().map(|x| x.floor()).collect(), int: v.int }
            }
            ShapeOp::Unsqueeze { axes } => {
                let v = value(0)?;
                let axes = match axes {
                    Some(a) => a.clone(),
                    None => ints(1)?,
                };
                let rank = v.dims.len() + axes.len();
                let mut norm: Vec<usize> = axes.iter().map(|&a| index(a as f64, rank).ok_or_else(|| err(format!("Unsqueeze axis {a} out of range")))).collect::<Result<_>>()?;
                norm.sort_unstable();
                let mut dims = v.dims.clone();
                for a in norm {
                    dims.insert(a, 1);
                }
                ShapeValue { dims, values: v.values.clone(), int: v.int }
            }
            ShapeOp::Concat { axis } => {
                if !(*axis == 0 || *axis == -1) {
                    return Err(err(format!("Concat of shape values along axis {axis} is not supported (only 0)")));
                }
                let mut values = Vec::new();
                let mut int = true;
                for i in 0..args.len() {
                    let v = value(i)?;
                    if v.dims.len() != 1 {
                        return Err(err(format!("Concat input {i} is not 1-D")));
                    }
                    values.extend_from_slice(&v.values);
                    int &= v.int;
                }
                ShapeValue { dims: vec![values.len()], values, int }
            }
            ShapeOp::Constant(v) => v.clone(),
            ShapeOp::Add | ShapeOp::Sub | ShapeOp::Mul | ShapeOp::Div => {
                let (a, b) = (value(0)?, value(1)?);
                let (na, nb) = (a.values.len(), b.values.len());
                if na != nb && na != 1 && nb != 1 {
                    return Err(err(format!("cannot broadcast shape values {:?} and {:?}", a.dims, b.dims)));
                }
                let int = a.int && b.int;
                let n = na.max(nb);
                let values = (0..n)
                    .map(|i| {
                        let (x, y) = (a.values[i % na], b.values[i % nb]);
                        match self.op {
                            ShapeOp::Add => x + y,
                            ShapeOp::Sub => x - y,
                            ShapeOp::Mul => x * y,
                            _ if int => (x / y).trunc(),
                            _ => x / y,
                        }
                    })
                    .collect();
                let dims = if a.dims.len() >= b.dims.len() && na == n { a.dims.clone() } else { b.dims.clone() };
                ShapeValue { dims, values, int }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn v(x: &[i64]) -> ShapeArg {
        ShapeArg::Value(ShapeValue::ints(x))
    }
    fn f(x: f64) -> ShapeArg {
        ShapeArg::Value(ShapeValue::scalar(x, false))
    }
    fn run(n: pb::NodeProto, args: &[ShapeArg]) -> Result<ShapeValue> {
        parse(&n)?.eval(args)
    }

    #[test]
    fn yolov5_resize_sizes_chain() {
        // /model.11: Concat(Slice(Shape(x), 0, 2), Cast(Concat(Unsqueeze(Floor(40.0)), ..), int64))
        let shape = run(node("Shape", "/model.11/Shape", &["x"], vec![]), &[ShapeArg::ShapeOf(vec![16, 128, 20, 20])]).unwrap();
        let nc = run(node("Slice", "/model.11/Slice", &["s", "a", "b", "c"], vec![]), &[ShapeArg::Value(shape), v(&[0]), v(&[2]), v(&[0])]).unwrap();
        assert_eq!(nc, ShapeValue::ints(&[16, 128]));
        let fl = run(node("Floor", "/model.11/Floor", &["c"], vec![]), &[f(40.0)]).unwrap();
        let un = run(node("Unsqueeze", "/model.11/Unsqueeze", &["f", "ax"], vec![]), &[ShapeArg::Value(fl), v(&[0])]).unwrap();
        assert_eq!((un.dims.clone(), un.int), (vec![1], false));
        let hw = run(node("Concat", "/model.11/Concat", &["a", "b"], vec![int("axis", 0)]), &[ShapeArg::Value(un.clone()), ShapeArg::Value(un)]).unwrap();
        let hw = run(node("Cast", "/model.11/Cast", &["c"], vec![int("to", 7)]), &[ShapeArg::Value(hw)]).unwrap();
        let sizes = run(node("Concat", "/model.11/Concat_1", &["a", "b"], vec![int("axis", 0)]), &[ShapeArg::Value(nc), ShapeArg::Value(hw)]).unwrap();
        assert_eq!(sizes, ShapeValue::ints(&[16, 128, 40, 40]));
        assert_eq!(sizes.as_usizes(), Some(vec![16, 128, 40, 40]));
    }

    #[test]
    fn onnx_index_conventions() {
        let s = ShapeArg::ShapeOf(vec![2, 3, 40, 50]);
        // Shape start/end (opset 15), negative like Python
        assert_eq!(run(node("Shape", "s", &["x"], vec![int("start", -2)]), std::slice::from_ref(&s)).unwrap(), ShapeValue::ints(&[40, 50]));
        assert_eq!(run(node("Shape", "s", &["x"], vec![int("start", 1), int("end", -1)]), std::slice::from_ref(&s)).unwrap(), ShapeValue::ints(&[3, 40]));
        // Gather: a scalar index gives a scalar, negative from the end
        let g = run(node("Gather", "g", &["d", "i"], vec![int("axis", 0)]), &[v(&[2, 3, 40, 50]), ShapeArg::Value(ShapeValue::scalar(-1.0, true))]).unwrap();
        assert_eq!(g, ShapeValue::scalar(50.0, true));
        assert!(run(node("Gather", "/g", &["d", "i"], vec![]), &[v(&[2, 3]), v(&[2])]).unwrap_err().to_string().starts_with("node /g: Gather index 2"));
        // Slice clamps ends (INT64_MAX), negative starts and steps
        let sl = |args: &[ShapeArg]| run(node("Slice", "sl", &["d", "s", "e", "a", "t"], vec![]), args).unwrap().values;
        assert_eq!(sl(&[v(&[2, 3, 40, 50]), v(&[2]), v(&[i64::MAX]), v(&[0]), v(&[1])]), vec![40.0, 50.0]);
        assert_eq!(sl(&[v(&[2, 3, 40, 50]), v(&[-1]), v(&[i64::MIN]), v(&[0]), v(&[-2])]), vec![50.0, 3.0]);
        // opset-1 Slice attributes
        let old = node("Slice", "sl1", &["d"], vec![ints("starts", &[1]), ints("ends", &[3]), ints("axes", &[0])]);
        assert_eq!(run(old, &[v(&[2, 3, 40, 50])]).unwrap().values, vec![3.0, 40.0]);
        // integer Div truncates, float Div does not; Cast to int truncates toward zero
        let div = |a: ShapeArg, b: ShapeArg| run(node("Div", "d", &["a", "b"], vec![]), &[a, b]).unwrap().values;
        assert_eq!(div(v(&[7, -7]), v(&[2])), vec![3.0, -3.0]);
        assert_eq!(div(f(7.0), f(2.0)), vec![3.5]);
        assert_eq!(run(node("Cast", "c", &["a"], vec![int("to", 7)]), &[f(-2.7)]).unwrap(), ShapeValue::scalar(-2.0, true));
        let mul = run(node("Mul", "m", &["a", "b"], vec![]), &[v(&[20, 30]), ShapeArg::Value(ShapeValue::scalar(2.0, false))]).unwrap();
        assert_eq!((mul.values, mul.int), (vec![40.0, 60.0], false));
        // Unsqueeze with the opset-11 attribute
        let u = run(node("Unsqueeze", "u", &["a"], vec![ints("axes", &[0])]), &[ShapeArg::Value(ShapeValue::scalar(3.0, true))]).unwrap();
        assert_eq!(u, ShapeValue::ints(&[3]));
    }

    #[test]
    fn constants_and_refusals() {
        let t = crate::graph::onnx::float_tensor("c", &[2], &[1.5, 2.0]);
        let c = pb::NodeProto { op_type: "Constant".into(), name: "k".into(), attribute: vec![pb::AttributeProto { name: "value".into(), t: Some(t), r#type: 4, ..Default::default() }], ..Default::default() };
        assert_eq!(run(c, &[]).unwrap(), ShapeValue { dims: vec![2], values: vec![1.5, 2.0], int: false });
        assert_eq!(run(node("Constant", "k", &[], vec![ints("value_ints", &[1, 2])]), &[]).unwrap(), ShapeValue::ints(&[1, 2]));
        let e = run(node("Floor", "/model.11/Floor", &["x"], vec![]), &[ShapeArg::ShapeOf(vec![1, 2])]).unwrap_err().to_string();
        assert!(e.starts_with("node /model.11/Floor: input 0 is a feature map"), "{e}");
        assert!(parse(&node("Cast", "/c", &["x"], vec![])).unwrap_err().to_string().starts_with("node /c: Cast has no `to`"));
    }
}
