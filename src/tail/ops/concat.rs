// ONNX Concat of feature maps -> ConcatSpec.
// In: a Concat node whose inputs are NCHW feature maps (Concat of constant
// shape tensors is shape arithmetic, see `shape_math`). Out: the axis the
// tape's `concat` joins along, or an error naming the node.
//
// The ONNX convention: `axis` is required and may be negative (counted from
// the end). YOLOv5 joins channels only (axis 1: C3's two branches, the
// neck's skip connections), so only the channel axis of a 4-D map, 1 or -3,
// is accepted.

use anyhow::Result;

use super::{attr, node_err};
use crate::graph::onnx::pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConcatSpec {
    /// Always 1 (channels) for now.
    pub axis: usize,
}

/// See the file header.
pub fn parse(node: &pb::NodeProto) -> Result<ConcatSpec> {
    let Some(a) = attr(node, "axis") else {
        return Err(node_err(node, "Concat has no axis attribute"));
    };
    if node.input.is_empty() || node.input.iter().any(|i| i.is_empty()) {
        return Err(node_err(node, "Concat needs at least one (named) input"));
    }
    match a.i {
        1 | -3 => Ok(ConcatSpec { axis: 1 }),
        other => Err(node_err(node, format!("Concat along axis {other} of feature maps is not supported (only channels, axis 1)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn channel_axis_only() {
        assert_eq!(parse(&node("Concat", "/model.12/Concat", &["a", "b"], vec![int("axis", 1)])).unwrap(), ConcatSpec { axis: 1 });
        assert_eq!(parse(&node("Concat", "c", &["a", "b"], vec![int("axis", -3)])).unwrap(), ConcatSpec { axis: 1 });
        let e = parse(&node("Concat", "/model.24/Concat", &["a", "b"], vec![int("axis", 4)])).unwrap_err().to_string();
        assert!(e.starts_with("node /model.24/Concat: Concat along axis 4"), "{e}");
        assert!(parse(&node("Concat", "c", &["a"], vec![])).unwrap_err().to_string().contains("no axis"));
    }
}
