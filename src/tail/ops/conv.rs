// ONNX Conv (2-D, NCHW) -> ConvSpec.
// In: a Conv node (inputs X, W, optional B) and the constants lookup (for W's
// shape when kernel_shape is absent). Out: the geometry the tape's `conv2d`
// runs, or an error naming the node.
//
// The ONNX convention: W is [M, C/group, kH, kW]; `pads` is
// [top, left, bottom, right] (all begins, then all ends); output
// H' = floor((H + top + bottom - dilation·(kH - 1) - 1) / stride) + 1. YOLOv5
// exports carry BatchNorm folded into W and B, so every Conv has a bias.

use anyhow::Result;

use super::conv_geometry;
use crate::graph::onnx::{ConstTensor, pb};
use crate::kernels::conv::Geom;

/// The geometry of a 2-D convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
    pub groups: usize,
    /// Whether the node has a bias input.
    pub bias: bool,
}

impl ConvSpec {
    /// A `k`x`k` conv with stride `s`, padding `p` on every side, no dilation, one group.
    pub fn square(k: usize, s: usize, p: usize) -> Self {
        ConvSpec { kernel: [k, k], strides: [s, s], pads: [p; 4], dilations: [1, 1], groups: 1, bias: true }
    }

    /// Output `[h, w]` for an input `[h, w]`, None when the kernel does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<[usize; 2]> {
        let o = |n: usize, k: usize, s: usize, p0: usize, p1: usize, d: usize| {
            let span = d * (k - 1) + 1;
            (n + p0 + p1 >= span).then(|| (n + p0 + p1 - span) / s + 1)
        };
        let p = self.pads;
        Some([
            o(h, self.kernel[0], self.strides[0], p[0], p[2], self.dilations[0])?,
            o(w, self.kernel[1], self.strides[1], p[1], p[3], self.dilations[1])?,
        ])
    }

    /// One group's im2col geometry on an input of `cin` channels and size `[h, w]`.
    pub fn geom(&self, cin: usize, h: usize, w: usize) -> Option<Geom> {
        let [oh, ow] = self.out_hw(h, w)?;
        Some(Geom {
            c: cin / self.groups,
            h,
            w,
            kh: self.kernel[0],
            kw: self.kernel[1],
            sh: self.strides[0],
            sw: self.strides[1],
            pt: self.pads[0],
            pl: self.pads[1],
            dh: self.dilations[0],
            dw: self.dilations[1],
            oh,
            ow,
        })
    }
}

/// See the file header.
pub fn parse(node: &pb::NodeProto, consts: &dyn Fn(&str) -> Option<ConstTensor>) -> Result<ConvSpec> {
    conv_geometry(node, consts)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn yolov5_downsample_conv() {
        // /model.18/conv/Conv: 3x3 s2 p1, 80x80 -> 40x40
        let n = node("Conv", "/model.18/conv/Conv", &["x", "w", "b"], vec![ints("dilations", &[1, 1]), int("group", 1), ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1]), ints("strides", &[2, 2])]);
        let s = parse(&n, &weight(&[64, 64, 3, 3])).unwrap();
        assert_eq!(s, ConvSpec::square(3, 2, 1));
        assert_eq!(s.out_hw(80, 80), Some([40, 40]));
        assert_eq!(s.out_hw(81, 79), Some([41, 40]));
    }

    #[test]
    fn pads_are_begins_then_ends_and_defaults_come_from_the_weight() {
        // pads [top, left, bottom, right] = [0, 1, 2, 3], no kernel_shape
        let n = node("Conv", "c", &["x", "w"], vec![ints("pads", &[0, 1, 2, 3]), ints("dilations", &[2, 1]), int("group", 2)]);
        let s = parse(&n, &weight(&[4, 3, 3, 2])).unwrap();
        assert_eq!((s.kernel, s.pads, s.dilations, s.groups, s.bias), ([3, 2], [0, 1, 2, 3], [2, 1], 2, false));
        // h: 10 + 0 + 2 - (2*2 + 1) + 1 = 8; w: 10 + 1 + 3 - 2 + 1 = 13
        assert_eq!(s.out_hw(10, 10), Some([8, 13]));
        assert_eq!(s.geom(6, 10, 10).unwrap().c, 3);
    }

    #[test]
    fn refusals_name_the_node() {
        let auto = node("Conv", "/model.9/Conv", &["x", "w"], vec![string("auto_pad", "SAME_UPPER")]);
        let e = parse(&auto, &weight(&[4, 4, 3, 3])).unwrap_err().to_string();
        assert!(e.starts_with("node /model.9/Conv: auto_pad SAME_UPPER"), "{e}");
        let conv1d = node("Conv", "/m/Conv1d", &["x", "w"], vec![ints("kernel_shape", &[3])]);
        assert!(parse(&conv1d, &none).unwrap_err().to_string().contains("only 2-D"));
        let bad = node("Conv", "/m/C", &["x", "w"], vec![ints("kernel_shape", &[1, 1])]);
        assert!(parse(&bad, &weight(&[4, 4, 3, 3])).unwrap_err().to_string().contains("disagrees"));
        let groups = node("Conv", "/m/G", &["x", "w"], vec![int("group", 3)]);
        assert!(parse(&groups, &weight(&[4, 4, 3, 3])).unwrap_err().to_string().contains("groups"));
    }
}
