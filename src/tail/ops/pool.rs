// ONNX MaxPool (2-D, NCHW) -> PoolSpec.
// In: a MaxPool node. Out: the window geometry the tape's `max_pool2d` runs,
// or an error naming the node (ceil_mode 1, auto_pad SAME_*, the Indices
// output).
//
// The ONNX convention: windows of kernel_shape, `pads` [top, left, bottom,
// right] of -inf (a padded cell never wins), output
// H' = floor((H + top + bottom - dilation·(kH - 1) - 1) / stride) + 1 with
// ceil_mode 0. YOLOv5's SPPF pools k=5, s=1, p=2 three times (same size).

use anyhow::Result;

use super::conv::ConvSpec;
use super::{attr_hw, attr_int, attr_pads, check_auto_pad, node_err};
use crate::graph::onnx::pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
}

impl PoolSpec {
    /// A `k`x`k` window, stride `s`, padding `p` on every side.
    pub fn square(k: usize, s: usize, p: usize) -> Self {
        PoolSpec { kernel: [k, k], strides: [s, s], pads: [p; 4], dilations: [1, 1] }
    }

    /// Output `[h, w]`, None when the window does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<[usize; 2]> {
        ConvSpec { kernel: self.kernel, strides: self.strides, pads: self.pads, dilations: self.dilations, groups: 1, bias: false }.out_hw(h, w)
    }
}

/// See the file header.
pub fn parse(node: &pb::NodeProto) -> Result<PoolSpec> {
    if node.output.len() > 1 && !node.output[1].is_empty() {
        return Err(node_err(node, "MaxPool's Indices output is not supported"));
    }
    if attr_int(node, "ceil_mode", 0) != 0 {
        return Err(node_err(node, "MaxPool with ceil_mode 1 is not supported (only floor output sizes, as YOLOv5 exports)"));
    }
    let kernel = attr_hw(node, "kernel_shape", [0, 0], 1)?;
    if kernel == [0, 0] {
        return Err(node_err(node, "MaxPool has no kernel_shape (only 2-D pools are supported)"));
    }
    let pads = attr_pads(node)?;
    check_auto_pad(node, pads)?;
    let spec = PoolSpec { kernel, strides: attr_hw(node, "strides", [1, 1], 1)?, pads, dilations: attr_hw(node, "dilations", [1, 1], 1)? };
    // a pad as wide as the window could give an output that sees only padding
    if spec.pads[0].max(spec.pads[2]) >= kernel[0] || spec.pads[1].max(spec.pads[3]) >= kernel[1] {
        return Err(node_err(node, format!("MaxPool pads {:?} must be smaller than the kernel {kernel:?}", spec.pads)));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn sppf_pool_keeps_the_size() {
        let n = node("MaxPool", "/model.9/m/MaxPool", &["x"], vec![int("ceil_mode", 0), ints("dilations", &[1, 1]), ints("kernel_shape", &[5, 5]), ints("pads", &[2, 2, 2, 2]), ints("strides", &[1, 1])]);
        let s = parse(&n).unwrap();
        assert_eq!(s, PoolSpec::square(5, 1, 2));
        assert_eq!(s.out_hw(20, 20), Some([20, 20]));
        // floor: (7 - 2) / 2 + 1 = 3
        assert_eq!(PoolSpec::square(2, 2, 0).out_hw(7, 8), Some([3, 4]));
    }

    #[test]
    fn refusals_name_the_node() {
        let ceil = node("MaxPool", "/model.9/m/MaxPool", &["x"], vec![ints("kernel_shape", &[2, 2]), int("ceil_mode", 1)]);
        let e = parse(&ceil).unwrap_err().to_string();
        assert!(e.starts_with("node /model.9/m/MaxPool: MaxPool with ceil_mode 1"), "{e}");
        let mut idx = node("MaxPool", "/p", &["x"], vec![ints("kernel_shape", &[2, 2])]);
        idx.output.push("indices".into());
        assert!(parse(&idx).unwrap_err().to_string().contains("Indices"));
        let wide = node("MaxPool", "/p", &["x"], vec![ints("kernel_shape", &[3, 3]), ints("pads", &[3, 0, 0, 0])]);
        assert!(parse(&wide).unwrap_err().to_string().contains("smaller than the kernel"));
        assert!(parse(&node("MaxPool", "/p", &["x"], vec![])).unwrap_err().to_string().contains("kernel_shape"));
    }
}
