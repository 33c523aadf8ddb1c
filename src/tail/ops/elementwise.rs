// ONNX Add, Mul and Sigmoid on feature maps -> ElementwiseOp.
// In: an Add/Mul (two inputs, numpy broadcasting) or Sigmoid (one input)
// node. Out: which of the tape's `add`, `mul`, `sigmoid` runs it, or an error
// naming the node.
//
// The ONNX convention: Add and Mul broadcast multidirectionally (numpy rules,
// trailing axes aligned), as the tape's binary ops do. YOLOv5's SiLU is
// exported as Sigmoid followed by Mul(x, sigmoid(x)); C3's bottleneck
// shortcut is an Add of two maps of one shape.

use anyhow::Result;

use super::node_err;
use crate::graph::onnx::pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementwiseOp {
    Add,
    Mul,
    Sigmoid,
}

/// See the file header.
pub fn parse(node: &pb::NodeProto) -> Result<ElementwiseOp> {
    let (op, arity) = match node.op_type.as_str() {
        "Add" => (ElementwiseOp::Add, 2),
        "Mul" => (ElementwiseOp::Mul, 2),
        "Sigmoid" => (ElementwiseOp::Sigmoid, 1),
        other => return Err(node_err(node, format!("{other} is not an elementwise op of the tail"))),
    };
    if node.input.len() != arity || node.input.iter().any(|i| i.is_empty()) {
        return Err(node_err(node, format!("{} has {} inputs, expected {arity}", node.op_type, node.input.len())));
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn silu_and_shortcut_ops() {
        assert_eq!(parse(&node("Sigmoid", "/model.10/act/Sigmoid", &["x"], vec![])).unwrap(), ElementwiseOp::Sigmoid);
        assert_eq!(parse(&node("Mul", "/model.10/act/Mul", &["x", "s"], vec![])).unwrap(), ElementwiseOp::Mul);
        assert_eq!(parse(&node("Add", "/model.13/m/m.0/Add", &["a", "b"], vec![])).unwrap(), ElementwiseOp::Add);
        let e = parse(&node("Sigmoid", "/model.10/act/Sigmoid", &["x", "y"], vec![])).unwrap_err().to_string();
        assert!(e.starts_with("node /model.10/act/Sigmoid: Sigmoid has 2 inputs"), "{e}");
        assert!(parse(&node("Relu", "/r", &["x"], vec![])).is_err());
    }
}
