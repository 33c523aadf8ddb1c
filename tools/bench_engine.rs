//! The bare engine loop, for comparison with `freezesplit cache`: letterboxes
//! the images first (untimed), then times only the frozen graph's runs.
//!
//!   cargo run --release --features tools --example bench_engine -- MODEL.onnx IMAGE_DIR [ort|tract] [N] [BATCH]
//!
//! Prints images/s of the engine alone (ORT workers spinning; SPIN=0 turns it off).

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
    let batch: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(1);
    let inputs: Vec<Array4<f32>> = images
        .chunks(batch)
        .map(|chunk| {
            let mut a = Array4::zeros((chunk.len(), 3, imgsz, imgsz));
            for (p, dst) in chunk.iter().zip(a.as_slice_mut().unwrap().chunks_mut(3 * imgsz * imgsz)) {
                preprocess::letterbox(&preprocess::decode(p).unwrap(), imgsz).write_chw(dst);
            }
            a
        })
        .collect();
    let n_images: usize = inputs.iter().map(|a| a.dim().0).sum();
    // spinning on: the faster setting for a bare loop (off in `cache`, see EngineOptions)
    // SESSIONS=k runs k sessions side by side, each with cores/k threads, on
    // alternate batches.
    let sessions: usize = std::env::var("SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let opts = EngineOptions { engine: engine_kind, device: freezesplit::engine::Device::Cpu, ort_spinning: std::env::var("SPIN").map_or(true, |v| v != "0"), threads: (cores / sessions).max(1), ..Default::default() };
    let frozen = model.frozen_bytes()?;
    let mut engines: Vec<Engine> = (0..sessions).map(|_| Engine::new(&frozen, imgsz, &opts)).collect::<anyhow::Result<_>>()?;
    for e in engines.iter_mut() {
        e.run(inputs[0].view())?; // warm-up
    }
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (k, e) in engines.iter_mut().enumerate() {
            let inputs = &inputs;
            scope.spawn(move || {
                for x in inputs.iter().skip(k).step_by(sessions) {
                    e.run(x.view()).unwrap();
                }
            });
        }
    });
    let s = start.elapsed().as_secs_f64();
    let engine = &engines[0];
    println!("{} x{sessions} batch {batch}: {n_images} images in {:.2}s: {:.1} images/s ({:.1} ms/image)", engine.name(), s, n_images as f64 / s, 1000.0 * s / n_images as f64);
    Ok(())
}
