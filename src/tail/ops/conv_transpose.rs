// ONNX ConvTranspose (2-D, NCHW) -> ConvTransposeSpec.
// In: a ConvTranspose node (inputs X, W, optional B) and the constants lookup
// (for W's shape). Out: the geometry the tape's `conv_transpose2d` runs, or an
// error naming the node for what is not implemented (auto_pad SAME_*,
// output_shape).
//
// The ONNX convention: W is [C, M/group, kH, kW] (input channels first, the
// transpose of Conv's); output
// H' = stride·(H - 1) + output_padding + dilation·(kH - 1) + 1 - top - bottom,
// pads [top, left, bottom, right] crop the full output. YOLOv5's
// `nn.ConvTranspose2d(c, c, 2, 2)` upsample is k=2, s=2, no pads: H' = 2H.
// It is the adjoint of the Conv with the same kernel, strides, pads and
// dilations run from the H' map to the H one (`conv_geom`).

use anyhow::Result;

use super::conv::ConvSpec;
use super::{attr, attr_hw, conv_geometry, node_err};
use crate::graph::onnx::{ConstTensor, pb};
use crate::kernels::conv::Geom;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTransposeSpec {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`, cropped from the full output.
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
    /// Extra rows/columns at the bottom/right (each < its stride).
    pub output_padding: [usize; 2],
    pub groups: usize,
    pub bias: bool,
}

impl ConvTransposeSpec {
    /// YOLOv5's upsample: k = s = `k`, no pads, one group, a bias.
    pub fn upsample(k: usize) -> Self {
        ConvTransposeSpec { kernel: [k, k], strides: [k, k], pads: [0; 4], dilations: [1, 1], output_padding: [0, 0], groups: 1, bias: true }
    }

    /// Output `[h, w]` for an input `[h, w]`, None when the pads crop everything.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<[usize; 2]> {
        let o = |n: usize, i: usize| {
            let full = self.strides[i] * (n.max(1) - 1) + self.output_padding[i] + self.dilations[i] * (self.kernel[i] - 1) + 1;
            let crop = self.pads[i] + self.pads[i + 2];
            (n > 0 && full > crop).then(|| full - crop)
        };
        Some([o(h, 0)?, o(w, 1)?])
    }

    /// The Conv whose adjoint this is: from the output map (`cout/groups`
    /// channels per group, size `out_hw`) back to the input's `[h, w]`.
    pub fn conv_geom(&self, cout: usize, h: usize, w: usize) -> Option<Geom> {
        let [oh, ow] = self.out_hw(h, w)?;
        let conv = ConvSpec { kernel: self.kernel, strides: self.strides, pads: self.pads, dilations: self.dilations, groups: 1, bias: false };
        let g = conv.geom(cout / self.groups, oh, ow)?;
        // output_padding < stride keeps the conv's own output size at the input's
        (g.oh == h && g.ow == w).then_some(g)
    }
}

/// See the file header.
pub fn parse(node: &pb::NodeProto, consts: &dyn Fn(&str) -> Option<ConstTensor>) -> Result<ConvTransposeSpec> {
    if attr(node, "output_shape").is_some() {
        return Err(node_err(node, "ConvTranspose with output_shape is not supported (only explicit pads); re-export without it"));
    }
    let ConvSpec { kernel, strides, pads, dilations, groups, bias } = conv_geometry(node, consts)?;
    let output_padding = attr_hw(node, "output_padding", [0, 0], 0)?;
    for i in 0..2 {
        if output_padding[i] >= strides[i].max(dilations[i]) {
            return Err(node_err(node, format!("output_padding {output_padding:?} must be smaller than the strides {strides:?}")));
        }
    }
    Ok(ConvTransposeSpec { kernel, strides, pads, dilations, output_padding, groups, bias })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn yolov5_upsample_doubles() {
        let n = node("ConvTranspose", "/model.11/ConvTranspose", &["x", "w", "b"], vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2]), ints("pads", &[0, 0, 0, 0]), ints("dilations", &[1, 1]), int("group", 1)]);
        let s = parse(&n, &weight(&[128, 128, 2, 2])).unwrap();
        assert_eq!(s, ConvTransposeSpec::upsample(2));
        assert_eq!(s.out_hw(20, 20), Some([40, 40]));
        let g = s.conv_geom(128, 20, 20).unwrap();
        assert_eq!((g.c, g.h, g.w, g.oh, g.ow), (128, 40, 40, 20, 20));
    }

    #[test]
    fn pads_crop_and_output_padding_extends() {
        // k3 s2 p1 op1: 2*(5-1) + 1 + 3 - 2 = 10 (torch's "same-size x2" upsample)
        let n = node("ConvTranspose", "t", &["x", "w"], vec![ints("strides", &[2, 2]), ints("pads", &[1, 1, 1, 1]), ints("output_padding", &[1, 1]), int("group", 2)]);
        let s = parse(&n, &weight(&[4, 3, 3, 3])).unwrap();
        assert_eq!((s.kernel, s.groups, s.bias), ([3, 3], 2, false));
        assert_eq!(s.out_hw(5, 6), Some([10, 12]));
        let g = s.conv_geom(6, 5, 6).unwrap();
        assert_eq!((g.c, g.oh, g.ow), (3, 5, 6));
    }

    #[test]
    fn refusals_name_the_node() {
        let shaped = node("ConvTranspose", "/model.11/ConvTranspose", &["x", "w"], vec![ints("output_shape", &[40, 40])]);
        let e = parse(&shaped, &weight(&[4, 4, 2, 2])).unwrap_err().to_string();
        assert!(e.starts_with("node /model.11/ConvTranspose: ConvTranspose with output_shape"), "{e}");
        let op = node("ConvTranspose", "/u", &["x", "w"], vec![ints("strides", &[2, 2]), ints("output_padding", &[2, 0])]);
        assert!(parse(&op, &weight(&[4, 4, 2, 2])).unwrap_err().to_string().contains("output_padding"));
        let same = node("ConvTranspose", "/u", &["x", "w"], vec![string("auto_pad", "SAME_LOWER")]);
        assert!(parse(&same, &weight(&[4, 4, 2, 2])).unwrap_err().to_string().contains("auto_pad SAME_LOWER"));
    }
}
