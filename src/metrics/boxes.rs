// Box helpers from YOLOv5 utils/general.py and utils/metrics.py, in float32 like the
// torch tensors val.py runs them on.
// In: [N, >=4] f32 box rows (xywh or xyxy pixels). Out: converted boxes, the pairwise
// IoU matrix, or boxes rescaled in place from letterboxed to original-image pixels.
// Every operation is done in the order and precision torch does it (one f32 rounding
// per tensor op) so IoUs that land on an iouv threshold compare the same way.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};

/// box_iou's eps (YOLOv5 default 1e-7, added in f32).
pub const BOX_IOU_EPS: f32 = 1e-7;

/// Letterbox geometry as val.py gets it from the dataloader: ((ratio_h, ratio_w), (pad_w, pad_h)).
/// scale_boxes uses ratio.0 (the height ratio) as the single gain, like YOLOv5.
pub type RatioPad = ([f64; 2], [f64; 2]);

/// torch.minimum / torch.maximum / clamp(min=0) all propagate NaN; f32::min/max do not.
#[inline]
fn tmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b < a {
        b
    } else {
        a
    }
}
#[inline]
fn tmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}
#[inline]
fn clamp0(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// YOLOv5 xywh2xyxy: centre/size to corners. Columns past the 4th are copied as-is
/// (YOLOv5 clones the whole tensor too).
pub fn xywh2xyxy(x: ArrayView2<f32>) -> Array2<f32> {
    assert!(x.ncols() >= 4, "xywh2xyxy needs at least 4 columns");
    let mut y = x.to_owned();
    for (mut yr, xr) in y.axis_iter_mut(Axis(0)).zip(x.axis_iter(Axis(0))) {
        yr[0] = xr[0] - xr[2] / 2.0;
        yr[1] = xr[1] - xr[3] / 2.0;
        yr[2] = xr[0] + xr[2] / 2.0;
        yr[3] = xr[1] + xr[3] / 2.0;
    }
    y
}

/// YOLOv5 box_iou: IoU of every box1 row (xyxy, first 4 columns) with every box2 row.
/// Returns [N, M]. inter / (area1 + area2 - inter + eps), each step rounded to f32.
pub fn box_iou(box1: ArrayView2<f32>, box2: ArrayView2<f32>) -> Array2<f32> {
    assert!(
        box1.ncols() >= 4 && box2.ncols() >= 4,
        "box_iou needs xyxy columns"
    );
    let area = |r: ndarray::ArrayView1<f32>| (r[2] - r[0]) * (r[3] - r[1]);
    let area2: Vec<f32> = box2.axis_iter(Axis(0)).map(area).collect();
    let mut out = Array2::<f32>::zeros((box1.nrows(), box2.nrows()));
    for (i, a) in box1.axis_iter(Axis(0)).enumerate() {
        let area1 = area(a);
        for (j, b) in box2.axis_iter(Axis(0)).enumerate() {
            let w = clamp0(tmin(a[2], b[2]) - tmax(a[0], b[0]));
            let h = clamp0(tmin(a[3], b[3]) - tmax(a[1], b[1]));
            let inter = w * h;
            out[[i, j]] = inter / (area1 + area2[j] - inter + BOX_IOU_EPS);
        }
    }
    out
}

/// YOLOv5 clip_boxes: clamp xyxy (first 4 columns) to an image of `shape` = [h, w].
pub fn clip_boxes(mut boxes: ArrayViewMut2<f32>, shape: [usize; 2]) {
    let (h, w) = (shape[0] as f32, shape[1] as f32);
    for mut r in boxes.axis_iter_mut(Axis(0)) {
        // torch clamp_ keeps NaN, like f32::clamp
        r[0] = r[0].clamp(0.0, w);
        r[1] = r[1].clamp(0.0, h);
        r[2] = r[2].clamp(0.0, w);
        r[3] = r[3].clamp(0.0, h);
    }
}

/// YOLOv5 scale_boxes: map xyxy boxes (first 4 columns, in place) from the network
/// input `img1_shape` [h, w] back to the original `img0_shape` [h, w], then clip.
/// With `ratio_pad = None` the gain/pad are recomputed as YOLOv5 does (centred
/// letterbox); with Some((ratio, pad)) it uses gain = ratio[0] and pad as given.
/// The f64 gain/pad are rounded to f32 before use, as torch does with Python scalars.
pub fn scale_boxes(
    img1_shape: [usize; 2],
    mut boxes: ArrayViewMut2<f32>,
    img0_shape: [usize; 2],
    ratio_pad: Option<RatioPad>,
) {
    assert!(boxes.ncols() >= 4, "scale_boxes needs xyxy columns");
    let (gain, pad) = match ratio_pad {
        None => {
            let (h1, w1) = (img1_shape[0] as f64, img1_shape[1] as f64);
            let (h0, w0) = (img0_shape[0] as f64, img0_shape[1] as f64);
            let gain = (h1 / h0).min(w1 / w0);
            (gain, [(w1 - w0 * gain) / 2.0, (h1 - h0 * gain) / 2.0])
        }
        Some((ratio, pad)) => (ratio[0], pad),
    };
    let (gain, padx, pady) = (gain as f32, pad[0] as f32, pad[1] as f32);
    for mut r in boxes.axis_iter_mut(Axis(0)) {
        r[0] -= padx;
        r[2] -= padx;
        r[1] -= pady;
        r[3] -= pady;
        for k in 0..4 {
            r[k] /= gain;
        }
    }
    clip_boxes(boxes, img0_shape);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn xywh_to_xyxy_keeps_extra_columns() {
        let x = array![[10.0f32, 20.0, 4.0, 6.0, 0.9]];
        assert_eq!(xywh2xyxy(x.view()), array![[8.0f32, 17.0, 12.0, 23.0, 0.9]]);
    }

    #[test]
    fn iou_basic() {
        let a = array![[0.0f32, 0.0, 10.0, 10.0]];
        let b = array![
            [0.0f32, 0.0, 10.0, 10.0],
            [5.0, 0.0, 15.0, 10.0],
            [20.0, 20.0, 30.0, 30.0]
        ];
        let iou = box_iou(a.view(), b.view());
        assert!((iou[[0, 0]] - 1.0).abs() < 1e-6);
        assert!((iou[[0, 1]] - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(iou[[0, 2]], 0.0);
        assert_eq!(iou.dim(), (1, 3));
    }

    #[test]
    fn scale_and_clip() {
        // 1280x720 letterboxed into 640x640: gain 0.5, pad (0, 140)
        let mut b = array![[10.0f32, 150.0, 100.0, 700.0, 0.5, 1.0]];
        scale_boxes(
            [640, 640],
            b.view_mut(),
            [720, 1280],
            Some(([0.5, 0.5], [0.0, 140.0])),
        );
        assert_eq!(b, array![[20.0f32, 20.0, 200.0, 720.0, 0.5, 1.0]]);
        let mut c = array![[10.0f32, 150.0, 100.0, 700.0]];
        scale_boxes([640, 640], c.view_mut(), [720, 1280], None);
        assert_eq!(c, array![[20.0f32, 20.0, 200.0, 720.0]]);
    }
}
