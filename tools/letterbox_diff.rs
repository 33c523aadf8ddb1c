//! Compares freezesplit's preprocessing with YOLOv5's over a whole reference
//! set made by tools/letterbox_reference.py:
//!
//!   .venv-tools/bin/python tools/letterbox_reference.py --imgsz 640 --out /tmp/lb640 ../shared/data/coco128/images/train2017
//!   cargo run --release --features tools --example letterbox_diff -- /tmp/lb640
//!
//! Prints the mean and max absolute pixel difference (0–255) per image and overall.

use std::path::PathBuf;

use freezesplit::preprocess;

#[derive(serde::Deserialize)]
struct Ref {
    source: String,
    png: String,
    imgsz: usize,
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: letterbox_diff REFERENCE_DIR"));
    let refs: Vec<Ref> = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let (mut sum, mut n, mut max) = (0u64, 0u64, 0u8);
    let mut worst = (0.0f64, String::new());
    for r in &refs {
        let want = image::open(dir.join(&r.png))?.to_rgb8();
        let got = preprocess::letterbox(&preprocess::decode(&dir.join(&r.source))?, r.imgsz).to_image();
        let (mut s, mut m) = (0u64, 0u8);
        for (a, b) in got.as_raw().iter().zip(want.as_raw()) {
            let d = a.abs_diff(*b);
            s += d as u64;
            m = m.max(d);
        }
        let mean = s as f64 / want.as_raw().len() as f64;
        if mean > worst.0 {
            worst = (mean, r.png.clone());
        }
        sum += s;
        n += want.as_raw().len() as u64;
        max = max.max(m);
    }
    println!("{} images: mean |Δ| {:.4}, max |Δ| {max}; worst image {} (mean {:.4})", refs.len(), sum as f64 / n as f64, worst.1, worst.0);
    Ok(())
}
