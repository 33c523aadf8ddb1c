// Detect head (the nl 1x1 convs) on the tape, plus layout helpers.
// In: per level frozen features as a constant var [bs*ny*nx, cin] (rows in
// (b, y, x) order, see `nchw_to_rows`), conv weight param [na*no, cin] (or the
// conv's own [na*no, cin, 1, 1]) and bias param [na*no]; no = rows / na.
// Out: per level p[i] var [bs*na*ny*nx, no] with rows in (b, a, y, x) order,
// i.e. YOLOv5's x[i].view(bs, na, no, ny, nx).permute(0, 1, 3, 4, 2) flattened.

use ndarray::{Array2, ArrayView4};

use crate::autograd::{Tape, Var};

/// YOLOv5 default P3-P5 anchors in pixels (models/*.yaml), (w, h) pairs.
pub const ANCHORS_P3_P5: [[[f32; 2]; 3]; 3] = [
    [[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]],
    [[30.0, 61.0], [62.0, 45.0], [59.0, 119.0]],
    [[116.0, 90.0], [156.0, 198.0], [373.0, 326.0]],
];

pub const STRIDES_P3_P5: [f32; 3] = [8.0, 16.0, 32.0];

/// Pixel anchors -> grid units (Detect.anchors after `/= stride`).
pub fn anchors_in_grid_units(pixels: &[[[f32; 2]; 3]], strides: &[f32]) -> Vec<Vec<[f32; 2]>> {
    pixels
        .iter()
        .zip(strides)
        .map(|(lvl, &s)| lvl.iter().map(|a| [a[0] / s, a[1] / s]).collect())
        .collect()
}

/// Grid (ny, nx) per level for a square-ish input: imgsz / stride.
pub fn grids_for(img_h: usize, img_w: usize, strides: &[f32]) -> Vec<(usize, usize)> {
    strides
        .iter()
        .map(|&s| (img_h / s as usize, img_w / s as usize))
        .collect()
}

/// NCHW feature map -> [bs*ny*nx, c] matrix with rows (b, y, x), the left
/// operand of the 1x1 conv as a matmul.
pub fn nchw_to_rows(x: ArrayView4<f32>) -> Array2<f32> {
    let (bs, c, ny, nx) = x.dim();
    let nhwc = x.permuted_axes([0, 2, 3, 1]);
    let std = nhwc.as_standard_layout();
    std.to_shape((bs * ny * nx, c)).unwrap().into_owned()
}

pub fn head_forward(
    t: &mut Tape,
    feats: &[Var],
    weights: &[Var],
    biases: &[Var],
    bs: usize,
    grids: &[(usize, usize)],
    na: usize,
) -> Vec<Var> {
    assert!(
        feats.len() == weights.len() && feats.len() == biases.len() && feats.len() == grids.len()
    );
    let mut out = Vec::with_capacity(feats.len());
    for i in 0..feats.len() {
        let (ny, nx) = grids[i];
        let cin = t.value(feats[i]).shape()[1];
        assert_eq!(
            t.value(feats[i]).shape()[0],
            bs * ny * nx,
            "features[{i}] rows != bs*ny*nx"
        );
        let wshape = t.value(weights[i]).shape();
        assert!(
            wshape[0].is_multiple_of(na) && wshape[1] == cin,
            "weight[{i}] shape {wshape:?}"
        );
        // One fused op: conv output channel c = a*no + k goes to row (b, a, y, x), column k.
        out.push(t.linear_grouped(feats[i], weights[i], biases[i], bs, na));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::fd::{check, rand_array};
    use ndarray::Array4;

    #[test]
    fn layout_matches_conv_view_permute() {
        // Direct 1x1 conv in NCHW, then YOLOv5's view/permute by hand.
        let (bs, cin, ny, nx, na, no) = (2, 3, 2, 3, 2, 4);
        let x = rand_array(&[bs, cin, ny, nx], 1, -1.0, 1.0)
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        let w = rand_array(&[na * no, cin], 2, -1.0, 1.0);
        let b = rand_array(&[na * no], 3, -1.0, 1.0);
        let conv = Array4::from_shape_fn((bs, na * no, ny, nx), |(bi, c, yy, xx)| {
            b[[c]]
                + (0..cin)
                    .map(|k| w[[c, k]] * x[[bi, k, yy, xx]])
                    .sum::<f32>()
        });
        let mut t = Tape::new();
        let f = t.constant(nchw_to_rows(x.view()).into_dyn());
        let wv = t.param(w.clone());
        let bv = t.param(b.clone());
        let p = head_forward(&mut t, &[f], &[wv], &[bv], bs, &[(ny, nx)], na)[0];
        let pv = t.value(p);
        for bi in 0..bs {
            for a in 0..na {
                for yy in 0..ny {
                    for xx in 0..nx {
                        let r = ((bi * na + a) * ny + yy) * nx + xx;
                        for k in 0..no {
                            let want = conv[[bi, a * no + k, yy, xx]];
                            assert!((pv[[r, k]] - want).abs() < 1e-5);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn head_grads() {
        let (bs, cin, ny, nx, na, no) = (2, 3, 2, 2, 2, 3);
        let feats = rand_array(&[bs * ny * nx, cin], 4, -1.0, 1.0);
        let w = rand_array(&[na * no, cin, 1, 1], 5, -1.0, 1.0);
        let b = rand_array(&[na * no], 6, -1.0, 1.0);
        check(&[w, b], move |t, v| {
            let f = t.constant(feats.clone());
            head_forward(t, &[f], &[v[0]], &[v[1]], bs, &[(ny, nx)], na)[0]
        });
    }

    #[test]
    fn anchors_scale() {
        let a = anchors_in_grid_units(&ANCHORS_P3_P5, &STRIDES_P3_P5);
        assert_eq!(a[0][0], [1.25, 1.625]);
        assert_eq!(a[2][2], [373.0 / 32.0, 326.0 / 32.0]);
        assert_eq!(
            grids_for(640, 640, &STRIDES_P3_P5),
            vec![(80, 80), (40, 40), (20, 20)]
        );
    }
}
