//! Our preprocessing against YOLOv5's own (OpenCV) tensors, made by
//! tools/letterbox_reference.py into tests/fixtures/letterbox/ref320. Two
//! comparisons: from the same decoded pixels (isolates resize + letterbox) and
//! from the image files (adds the JPEG decoder difference). Goal: mean
//! absolute difference ≤ 0.5 on the 0–255 scale.

use crate::common;

use freezesplit::preprocess;

#[derive(serde::Deserialize)]
struct Ref {
    source: String,
    png: String,
    imgsz: usize,
    pad: [f32; 2],
    resized: [usize; 2],
    decoded_png: Option<String>,
}

fn diff(a: &image::RgbImage, b: &image::RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut sum, mut max) = (0u64, 0u8);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.as_raw().len() as f64, max)
}

#[test]
fn letterbox_matches_yolov5_reference() {
    let dir = common::fixture("letterbox/ref320");
    let refs: Vec<Ref> = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(refs.len() >= 4);
    for r in refs {
        let want = image::open(dir.join(&r.png)).unwrap().to_rgb8();
        // resize + letterbox alone, from OpenCV's own decoded pixels
        let decoded = match &r.decoded_png {
            Some(p) => image::open(dir.join(p)).unwrap().to_rgb8(),
            None => preprocess::decode(&dir.join(&r.source)).unwrap(),
        };
        let lb = preprocess::letterbox(&decoded, r.imgsz);
        assert_eq!(lb.meta.pad, r.pad, "{}", r.png);
        assert_eq!(lb.meta.resized[0].max(lb.meta.resized[1]), r.imgsz.min(r.resized[0].max(r.resized[1])), "{}", r.png);
        let (mean, max) = diff(&lb.to_image(), &want);
        eprintln!("{}: same pixels in: mean |Δ| {mean:.4}, max {max}", r.png);
        assert!(mean <= 0.01 && max <= 1, "{}: resize differs from OpenCV: mean {mean}, max {max}", r.png);
        // the whole pipeline from the file
        let lb = preprocess::letterbox(&preprocess::decode(&dir.join(&r.source)).unwrap(), r.imgsz);
        let (mean, max) = diff(&lb.to_image(), &want);
        eprintln!("{}: from the file: mean |Δ| {mean:.4}, max {max}", r.png);
        assert!(mean <= 0.5, "{}: mean {mean}", r.png);
    }
}
