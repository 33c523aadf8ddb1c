//! The bare engine loop, for comparison with `freezesplit cache`: letterboxes
//! the images first (untimed), then times only the frozen graph's runs.
//!
//!   cargo run --release --example bench_engine -- MODEL.onnx IMAGE_DIR [ort|tract] [N]
//!
//! Prints images/s of the engine alone.

use std::path::PathBuf;
use std::time::Instant;

use freezesplit::engine::{Engine, EngineChoice, EngineOptions};
use freezesplit::graph::Model;
use freezesplit::preprocess;
use ndarray::Array4;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(&PathBuf::from(&args[1]))?;
    let engine_kind = match args.get(3).map(String::as_str) {
        Some("tract") => EngineChoice::Tract,
        _ => EngineChoice::Ort,
    };
    let n: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64);
    let imgsz = model.spec.imgsz.map_or(640, |s| s[0]);
    let mut images: Vec<PathBuf> = std::fs::read_dir(&args[2])?.flatten().map(|e| e.path()).collect();
    images.sort();
    images.truncate(n);
    let inputs: Vec<Array4<f32>> = images
        .iter()
        .map(|p| {
            let lb = preprocess::letterbox(&preprocess::decode(p).unwrap(), imgsz);
            let mut a = Array4::zeros((1, 3, imgsz, imgsz));
            lb.write_chw(a.as_slice_mut().unwrap());
            a
        })
        .collect();
    let mut engine = Engine::new(&model.frozen_bytes()?, imgsz, &EngineOptions { engine: engine_kind, ..Default::default() })?;
    engine.run(inputs[0].view())?; // warm-up
    let start = Instant::now();
    for x in &inputs {
        engine.run(x.view())?;
    }
    let s = start.elapsed().as_secs_f64();
    println!("{}: {} images in {:.2}s: {:.1} images/s ({:.1} ms/image)", engine.name(), inputs.len(), s, inputs.len() as f64 / s, 1000.0 * s / inputs.len() as f64);
    Ok(())
}
