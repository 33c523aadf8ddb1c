// ONNX nodes of the trainable tail -> plain op specs (tract's discipline:
// one file per op family, `parse(node) -> Result<Spec>`, the computation kept
// apart in `autograd`).
// In: a `NodeProto` and a lookup of the constant tensors known so far
// (initializers, Constant nodes, shape arithmetic already evaluated at the
// cached input size). Out: an `OpSpec`, or an error naming the node for any
// op type or attribute this crate does not implement.

pub mod concat;
pub mod conv;
pub mod conv_transpose;
pub mod elementwise;
pub mod pool;
pub mod resize;
pub mod shape_math;

use anyhow::{Result, anyhow, bail};

use crate::graph::onnx::{ConstTensor, attr, pb};

pub use concat::ConcatSpec;
pub use conv::ConvSpec;
pub use conv_transpose::ConvTransposeSpec;
pub use elementwise::ElementwiseOp;
pub use pool::PoolSpec;
pub use resize::ResizeSpec;
pub use shape_math::{ShapeArg, ShapeMathSpec, ShapeValue};

/// What one tail node computes.
#[derive(Clone, Debug, PartialEq)]
pub enum OpSpec {
    Conv(ConvSpec),
    ConvTranspose(ConvTransposeSpec),
    MaxPool(PoolSpec),
    Resize(ResizeSpec),
    Concat(ConcatSpec),
    Elementwise(ElementwiseOp),
    /// Arithmetic on shapes, evaluated once at the cached input size and
    /// never trained (see `shape_math`).
    ShapeMath(ShapeMathSpec),
}

/// Parses one tail node. `consts` returns the value of a tensor when it is
/// constant at the cached input size (an initializer, a Constant node's
/// output, or shape arithmetic evaluated before this node): Concat, Add, Mul
/// and Div whose inputs are all constant are shape arithmetic, otherwise
/// they are ops on feature maps.
pub fn parse(node: &pb::NodeProto, consts: &dyn Fn(&str) -> Option<ConstTensor>) -> Result<OpSpec> {
    let all_const = !node.input.is_empty() && node.input.iter().all(|i| !i.is_empty() && consts(i).is_some());
    Ok(match node.op_type.as_str() {
        "Conv" => OpSpec::Conv(conv::parse(node, consts)?),
        "ConvTranspose" => OpSpec::ConvTranspose(conv_transpose::parse(node, consts)?),
        "MaxPool" => OpSpec::MaxPool(pool::parse(node)?),
        "Resize" | "Upsample" => OpSpec::Resize(resize::parse(node, consts)?),
        "Concat" | "Add" | "Mul" | "Div" | "Sub" if all_const => OpSpec::ShapeMath(shape_math::parse(node)?),
        "Concat" => OpSpec::Concat(concat::parse(node)?),
        "Add" | "Mul" | "Sigmoid" => OpSpec::Elementwise(elementwise::parse(node)?),
        op if shape_math::OPS.contains(&op) => OpSpec::ShapeMath(shape_math::parse(node)?),
        other => bail!(
            "{}: op type {other} is not supported in the trainable tail (supported: Conv, ConvTranspose, MaxPool, Resize, Upsample, Concat, Add, Mul, Sigmoid and shape arithmetic); choose a larger --freeze",
            who(node)
        ),
    })
}

/// `node NAME` (or the op type and first output when the export left the
/// node unnamed), the prefix of every parse error.
pub fn who(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        format!("node {} (unnamed, output {})", node.op_type, node.output.first().map(String::as_str).unwrap_or("?"))
    } else {
        format!("node {}", node.name)
    }
}

/// An error about `node`: "node NAME: msg".
pub(crate) fn node_err(node: &pb::NodeProto, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}: {msg}", who(node))
}

/// Integer attribute, or `default` when absent.
pub(crate) fn attr_int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map(|a| a.i).unwrap_or(default)
}

/// String attribute, or `default` when absent.
pub(crate) fn attr_str(node: &pb::NodeProto, name: &str, default: &str) -> String {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned()).unwrap_or_else(|| default.to_string())
}

/// A 2-D spatial integer attribute (`kernel_shape`, `strides`, `dilations`)
/// as `[h, w]`, `default` when absent; each value must be >= `min`.
pub(crate) fn attr_hw(node: &pb::NodeProto, name: &str, default: [usize; 2], min: i64) -> Result<[usize; 2]> {
    let Some(a) = attr(node, name) else { return Ok(default) };
    match a.ints.as_slice() {
        &[h, w] if h >= min && w >= min => Ok([h as usize, w as usize]),
        v => Err(node_err(node, format!("attribute {name} = {v:?} is not two values >= {min} (only 2-D NCHW ops are supported)"))),
    }
}

/// ONNX `pads` for 2-D ops, `[top, left, bottom, right]` (ONNX order:
/// all begins, then all ends); zeros when absent.
pub(crate) fn attr_pads(node: &pb::NodeProto) -> Result<[usize; 4]> {
    let Some(a) = attr(node, "pads") else { return Ok([0; 4]) };
    match a.ints.as_slice() {
        &[t, l, b, r] if t >= 0 && l >= 0 && b >= 0 && r >= 0 => Ok([t as usize, l as usize, b as usize, r as usize]),
        v => Err(node_err(node, format!("attribute pads = {v:?} is not four values >= 0 (only 2-D NCHW ops are supported)"))),
    }
}

/// Refuses `auto_pad` other than NOTSET/VALID (VALID means zero pads, which
/// `pads` then must agree with); YOLOv5 exports write explicit pads.
pub(crate) fn check_auto_pad(node: &pb::NodeProto, pads: [usize; 4]) -> Result<()> {
    match attr_str(node, "auto_pad", "NOTSET").as_str() {
        "NOTSET" => Ok(()),
        "VALID" if pads == [0; 4] => Ok(()),
        other => Err(node_err(node, format!("auto_pad {other} is not supported (only explicit pads); re-export with explicit padding"))),
    }
}

/// The checks and attributes of a Conv or ConvTranspose node: inputs X, W and
/// an optional B; a constant W is 4-D, gives `kernel_shape` when that is
/// absent and must agree with it when present, and its first dimension
/// (Conv: output channels, ConvTranspose: input channels) splits into
/// `group`s; explicit pads only. A Conv's spec is this geometry itself; a
/// ConvTranspose adds `output_padding`.
pub(crate) fn conv_geometry(node: &pb::NodeProto, consts: &dyn Fn(&str) -> Option<ConstTensor>) -> Result<ConvSpec> {
    let op = node.op_type.as_str();
    let (what, dim0) = if op == "ConvTranspose" { ("transposed convolutions", "input") } else { ("convolutions", "output") };
    if node.input.len() < 2 || node.input.len() > 3 {
        return Err(node_err(node, format!("{op} has {} inputs, expected X, W and an optional B", node.input.len())));
    }
    let wdims = consts(&node.input[1]).map(|w| w.dims);
    if let Some(d) = &wdims
        && d.len() != 4
    {
        return Err(node_err(node, format!("weight {} has shape {d:?}; only 2-D {what} (a 4-D weight) are supported", node.input[1])));
    }
    let kernel = match (attr_hw(node, "kernel_shape", [0, 0], 1)?, &wdims) {
        ([0, 0], Some(d)) => [d[2], d[3]],
        ([0, 0], None) => return Err(node_err(node, "kernel_shape is absent and the weight is not a constant")),
        (k, Some(d)) if k != [d[2], d[3]] => return Err(node_err(node, format!("kernel_shape {k:?} disagrees with the weight's shape {d:?}"))),
        (k, _) => k,
    };
    let pads = attr_pads(node)?;
    check_auto_pad(node, pads)?;
    let groups = attr_int(node, "group", 1);
    if groups < 1 {
        return Err(node_err(node, format!("group = {groups} is not >= 1")));
    }
    if let Some(d) = &wdims
        && d[0] % groups as usize != 0
    {
        return Err(node_err(node, format!("{} {dim0} channels do not split into {groups} groups", d[0])));
    }
    Ok(ConvSpec {
        kernel,
        strides: attr_hw(node, "strides", [1, 1], 1)?,
        pads,
        dilations: attr_hw(node, "dilations", [1, 1], 1)?,
        groups: groups as usize,
        bias: node.input.len() == 3 && !node.input[2].is_empty(),
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), ints: v.to_vec(), r#type: 7, ..Default::default() }
    }
    pub fn int(name: &str, v: i64) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), i: v, r#type: 2, ..Default::default() }
    }
    pub fn string(name: &str, v: &str) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), s: v.as_bytes().to_vec(), r#type: 3, ..Default::default() }
    }
    pub fn floats(name: &str, v: &[f32]) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), floats: v.to_vec(), r#type: 6, ..Default::default() }
    }
    pub fn node(op: &str, name: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![format!("{name}_output_0")],
            attribute: attrs,
            ..Default::default()
        }
    }
    pub fn none(_: &str) -> Option<ConstTensor> {
        None
    }
    /// A constants lookup that knows one tensor, "w", of shape `dims`.
    pub fn weight(dims: &[usize]) -> impl Fn(&str) -> Option<ConstTensor> + '_ {
        move |n: &str| (n == "w").then(|| ConstTensor { dims: dims.to_vec(), values: vec![0.0; dims.iter().product()] })
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn conv_geometry_reads_attributes_and_takes_the_kernel_from_the_weight() {
        let n = node("Conv", "c", &["x", "w", "b"], vec![ints("pads", &[0, 1, 2, 3]), ints("strides", &[2, 1]), ints("dilations", &[1, 2]), int("group", 2)]);
        let g = conv_geometry(&n, &weight(&[4, 3, 3, 2])).unwrap();
        assert_eq!(g, ConvSpec { kernel: [3, 2], strides: [2, 1], pads: [0, 1, 2, 3], dilations: [1, 2], groups: 2, bias: true });
        // a dynamic weight needs kernel_shape; an empty B input is no bias
        let n = node("ConvTranspose", "t", &["x", "w", ""], vec![ints("kernel_shape", &[2, 2])]);
        let g = conv_geometry(&n, &none).unwrap();
        assert_eq!((g.kernel, g.strides, g.pads, g.groups, g.bias), ([2, 2], [1, 1], [0; 4], 1, false));
    }

    #[test]
    fn conv_geometry_refusals_name_the_node_and_the_op() {
        let err = |op: &str, inputs: &[&str], attrs, dims: &[usize]| conv_geometry(&node(op, "n", inputs, attrs), &weight(dims)).unwrap_err().to_string();
        assert_eq!(err("ConvTranspose", &["x"], vec![], &[1, 1, 1, 1]), "node n: ConvTranspose has 1 inputs, expected X, W and an optional B");
        assert!(err("Conv", &["x", "w"], vec![], &[4, 3, 3]).contains("only 2-D convolutions (a 4-D weight)"));
        assert!(err("ConvTranspose", &["x", "w"], vec![], &[4, 3, 3]).contains("only 2-D transposed convolutions (a 4-D weight)"));
        assert!(err("Conv", &["x", "w"], vec![ints("kernel_shape", &[3, 3])], &[4, 3, 1, 1]).contains("disagrees with the weight's shape"));
        assert!(err("Conv", &["x", "q"], vec![], &[4, 3, 1, 1]).ends_with("kernel_shape is absent and the weight is not a constant"));
        assert!(err("Conv", &["x", "w"], vec![int("group", 0)], &[4, 3, 1, 1]).ends_with("group = 0 is not >= 1"));
        assert!(err("Conv", &["x", "w"], vec![int("group", 3)], &[4, 3, 1, 1]).ends_with("4 output channels do not split into 3 groups"));
        assert!(err("ConvTranspose", &["x", "w"], vec![int("group", 3)], &[4, 3, 1, 1]).ends_with("4 input channels do not split into 3 groups"));
        assert!(err("Conv", &["x", "w"], vec![string("auto_pad", "SAME_UPPER")], &[4, 3, 1, 1]).contains("auto_pad SAME_UPPER is not supported"));
    }

    #[test]
    fn unknown_ops_are_refused_naming_the_node() {
        let n = node("LeakyRelu", "/model.13/act/LeakyRelu", &["x"], vec![]);
        let e = parse(&n, &none).unwrap_err().to_string();
        assert!(e.starts_with("node /model.13/act/LeakyRelu: op type LeakyRelu is not supported"), "{e}");
        let mut un = node("Softmax", "", &["x"], vec![]);
        un.output = vec!["y".into()];
        assert!(parse(&un, &none).unwrap_err().to_string().starts_with("node Softmax (unnamed, output y):"));
    }

    #[test]
    fn concat_and_mul_are_shape_math_only_on_constants() {
        let c = |name: &str| (name != "x").then(|| ConstTensor { dims: vec![1], values: vec![2.0] });
        let on_maps = node("Concat", "/model.12/Concat", &["x", "a"], vec![int("axis", 1)]);
        assert_eq!(parse(&on_maps, &c).unwrap(), OpSpec::Concat(ConcatSpec { axis: 1 }));
        let on_shapes = node("Concat", "/model.11/Concat", &["a", "b"], vec![int("axis", 0)]);
        assert!(matches!(parse(&on_shapes, &c).unwrap(), OpSpec::ShapeMath(_)));
        let mul = node("Mul", "/model.10/act/Mul", &["x", "s"], vec![]);
        assert_eq!(parse(&mul, &c).unwrap(), OpSpec::Elementwise(ElementwiseOp::Mul));
    }
}
