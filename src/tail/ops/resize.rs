// ONNX Resize / Upsample (nearest, 2-D spatial, NCHW) -> ResizeSpec.
// In: a Resize node (opset 10: X, scales; opset 11+: X, roi, scales, sizes) or
// an Upsample node (opset 7: `scales` attribute; opset 9: X, scales) and the
// constants lookup, in which the shape arithmetic that exports put in front
// of Resize has been evaluated at the cached input size. Out: the target
// (scales or sizes), or an error naming the node for every other mode.
//
// The ONNX convention implemented: mode nearest with
// coordinate_transformation_mode asymmetric and nearest_mode floor, which is
// what torch's `nn.Upsample(scale_factor=2, mode='nearest')` exports:
// output index o reads input index floor(o / scale), where scale is the
// `scales` value, or output/input size when `sizes` is given; output size is
// floor(input · scale). Opset-10 Resize and Upsample have no such attributes
// and behave this way (ONNX Runtime: asymmetric, floor when upsampling).

use anyhow::Result;

use super::{attr, attr_str, node_err};
use crate::graph::onnx::{ConstTensor, pb};

#[derive(Clone, Debug, PartialEq)]
pub enum ResizeTarget {
    /// Per-axis factors for N, C, H, W (N and C must be 1).
    Scales([f32; 4]),
    /// Output N, C, H, W (N and C must be the input's).
    Sizes([usize; 4]),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResizeSpec {
    /// The node's name, for errors at build time.
    pub name: String,
    pub target: ResizeTarget,
}

impl ResizeSpec {
    /// Output `[h, w]` and the `[h, w]` scales that map output to input
    /// indices, for an input of shape `shape` (NCHW).
    pub fn out_hw(&self, shape: &[usize]) -> Result<([usize; 2], [f32; 2])> {
        let err = |m: String| anyhow::anyhow!("node {}: {m}", self.name);
        if shape.len() != 4 {
            return Err(err(format!("Resize of a {}-D tensor is not supported (only NCHW feature maps)", shape.len())));
        }
        match &self.target {
            ResizeTarget::Scales(s) => {
                if s[0] != 1.0 || s[1] != 1.0 {
                    return Err(err(format!("scales {s:?} resize the batch or channel axis; only H and W may be resized")));
                }
                let o = |n: usize, s: f32| (n as f32 * s).floor() as usize;
                let out = [o(shape[2], s[2]), o(shape[3], s[3])];
                if out.contains(&0) {
                    return Err(err(format!("scales {s:?} give an empty output for input {shape:?}")));
                }
                Ok((out, [s[2], s[3]]))
            }
            ResizeTarget::Sizes(z) => {
                if z[0] != shape[0] || z[1] != shape[1] || z[2] == 0 || z[3] == 0 {
                    return Err(err(format!("sizes {z:?} for input {shape:?}: only a non-empty H and W may change")));
                }
                Ok(([z[2], z[3]], [z[2] as f32 / shape[2] as f32, z[3] as f32 / shape[3] as f32]))
            }
        }
    }
}

/// The input index each of `out` output indices reads along one axis:
/// floor(o / scale) (asymmetric, nearest_mode floor), clamped to the input.
pub fn nearest_src(out: usize, inp: usize, scale: f32) -> Vec<usize> {
    (0..out).map(|o| ((o as f32 / scale).floor() as usize).min(inp - 1)).collect()
}

/// A constant input, None when the input is absent (empty name) or empty
/// (older exports pass an empty `scales` next to `sizes`).
fn input_const(node: &pb::NodeProto, i: usize, consts: &dyn Fn(&str) -> Option<ConstTensor>) -> Result<Option<ConstTensor>> {
    let Some(name) = node.input.get(i).filter(|n| !n.is_empty()) else { return Ok(None) };
    match consts(name) {
        Some(c) if c.values.is_empty() => Ok(None),
        Some(c) => Ok(Some(c)),
        None => Err(node_err(node, format!("input {name} is not a constant at the cached input size (only shape arithmetic may feed Resize)"))),
    }
}

fn four<T: Copy>(node: &pb::NodeProto, what: &str, v: &[T]) -> Result<[T; 4]> {
    v.try_into().map_err(|_| node_err(node, format!("{what} has {} values; only 4-D NCHW resizes are supported", v.len())))
}

/// See the file header.
pub fn parse(node: &pb::NodeProto, consts: &dyn Fn(&str) -> Option<ConstTensor>) -> Result<ResizeSpec> {
    let mode = attr_str(node, "mode", "nearest");
    if mode != "nearest" {
        return Err(node_err(node, format!("{} mode {mode} is not supported (only nearest)", node.op_type)));
    }
    let upsample = node.op_type == "Upsample";
    // Opset-10 Resize (X, scales) and Upsample have no coordinate attributes.
    let legacy = upsample || node.input.len() == 2;
    if !legacy {
        let ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel");
        let nm = attr_str(node, "nearest_mode", "round_prefer_floor");
        if ctm != "asymmetric" || nm != "floor" {
            return Err(node_err(node, format!("Resize with coordinate_transformation_mode {ctm} and nearest_mode {nm} is not supported (only asymmetric with floor, as torch exports nn.Upsample)")));
        }
        if attr(node, "axes").is_some() {
            return Err(node_err(node, "Resize with the axes attribute is not supported"));
        }
        if attr_str(node, "keep_aspect_ratio_policy", "stretch") != "stretch" {
            return Err(node_err(node, "Resize with a keep_aspect_ratio_policy other than stretch is not supported"));
        }
    }
    let scales: Option<Vec<f32>> = if upsample && node.input.len() < 2 {
        attr(node, "scales").map(|a| a.floats.clone())
    } else {
        input_const(node, if legacy { 1 } else { 2 }, consts)?.map(|c| c.values.iter().map(|&v| v as f32).collect())
    };
    let sizes = if legacy { None } else { input_const(node, 3, consts)? };
    let target = match (scales, sizes) {
        (_, Some(z)) => ResizeTarget::Sizes(four(node, "sizes", &z.values.iter().map(|&v| v as usize).collect::<Vec<_>>())?),
        (Some(s), None) => ResizeTarget::Scales(four(node, "scales", &s)?),
        (None, None) => return Err(node_err(node, "neither scales nor sizes is given")),
    };
    if let ResizeTarget::Scales(s) = &target
        && legacy
        && s.iter().any(|&v| v < 1.0)
    {
        return Err(node_err(node, format!("{} scales {s:?} downsample; only upsampling is supported", node.op_type)));
    }
    Ok(ResizeSpec { name: node.name.clone(), target })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn yolov5_resize() -> pb::NodeProto {
        node("Resize", "/model.11/Resize", &["x", "", "", "sizes"], vec![string("coordinate_transformation_mode", "asymmetric"), string("mode", "nearest"), string("nearest_mode", "floor")])
    }

    #[test]
    fn sizes_as_yolov5_exports_them() {
        let c = |n: &str| (n == "sizes").then(|| ConstTensor { dims: vec![4], values: vec![1.0, 128.0, 40.0, 40.0] });
        let s = parse(&yolov5_resize(), &c).unwrap();
        assert_eq!(s.target, ResizeTarget::Sizes([1, 128, 40, 40]));
        assert_eq!(s.out_hw(&[1, 128, 20, 20]).unwrap(), ([40, 40], [2.0, 2.0]));
        let e = s.out_hw(&[2, 128, 20, 20]).unwrap_err().to_string();
        assert!(e.starts_with("node /model.11/Resize: sizes"), "{e}");
    }

    #[test]
    fn nearest_floor_convention() {
        // x2: each input row twice; x3/2 (floor(o / 1.5)): 0 0 1 2 2 3
        assert_eq!(nearest_src(6, 3, 2.0), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(nearest_src(6, 4, 1.5), vec![0, 0, 1, 2, 2, 3]);
        // downsampling by 2 picks every other element starting at 0
        assert_eq!(nearest_src(3, 6, 0.5), vec![0, 2, 4]);
    }

    #[test]
    fn scales_inputs_opset10_and_upsample() {
        let c = |n: &str| match n {
            "scales" => Some(ConstTensor { dims: vec![4], values: vec![1.0, 1.0, 2.0, 2.0] }),
            "empty" => Some(ConstTensor { dims: vec![0], values: vec![] }),
            _ => None,
        };
        let r10 = node("Resize", "r10", &["x", "scales"], vec![string("mode", "nearest")]);
        assert_eq!(parse(&r10, &c).unwrap().out_hw(&[1, 3, 5, 7]).unwrap(), ([10, 14], [2.0, 2.0]));
        let r11 = node("Resize", "r11", &["x", "empty", "scales"], vec![string("coordinate_transformation_mode", "asymmetric"), string("nearest_mode", "floor")]);
        assert_eq!(parse(&r11, &c).unwrap().target, ResizeTarget::Scales([1.0, 1.0, 2.0, 2.0]));
        let u7 = node("Upsample", "u7", &["x"], vec![floats("scales", &[1.0, 1.0, 2.0, 2.0])]);
        assert_eq!(parse(&u7, &c).unwrap().target, ResizeTarget::Scales([1.0, 1.0, 2.0, 2.0]));
        let u9 = node("Upsample", "u9", &["x", "scales"], vec![]);
        assert_eq!(parse(&u9, &c).unwrap().target, ResizeTarget::Scales([1.0, 1.0, 2.0, 2.0]));
    }

    #[test]
    fn refusals_name_the_node() {
        let c = |_: &str| Some(ConstTensor { dims: vec![4], values: vec![1.0, 1.0, 2.0, 2.0] });
        let half = node("Resize", "/model.11/Resize", &["x", "", "s"], vec![string("mode", "nearest")]);
        let e = parse(&half, &c).unwrap_err().to_string();
        assert!(e.starts_with("node /model.11/Resize: Resize with coordinate_transformation_mode half_pixel and nearest_mode round_prefer_floor"), "{e}");
        let lin = node("Resize", "/r", &["x", "", "s"], vec![string("mode", "linear")]);
        assert!(parse(&lin, &c).unwrap_err().to_string().contains("mode linear"));
        let dynamic = node("Resize", "/r", &["x", "", "", "sizes"], vec![string("coordinate_transformation_mode", "asymmetric"), string("nearest_mode", "floor")]);
        assert!(parse(&dynamic, &none).unwrap_err().to_string().contains("sizes is not a constant"));
        let s = parse(&node("Resize", "/r", &["x", "", "s"], vec![string("coordinate_transformation_mode", "asymmetric"), string("nearest_mode", "floor")]), &|_| {
            Some(ConstTensor { dims: vec![4], values: vec![1.0, 2.0, 2.0, 2.0] })
        })
        .unwrap();
        assert!(s.out_hw(&[1, 3, 4, 4]).unwrap_err().to_string().contains("batch or channel"));
    }
}
