//! `freezesplit val` as a user runs it: the fast path (cache + Rust head)
//! and the full path (complete exported ONNX) agree on every metric; a run
//! directory / saved head validates like the model it came from; bad label
//! lines are skipped and counted; a head without a source model is refused.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use freezesplit::cache::{Dtype, FeatureCache, build};
use freezesplit::data::Dataset;
use freezesplit::engine::{Engine, EngineChoice, EngineOptions};
use freezesplit::graph::Model;
use freezesplit::head::Head;
use freezesplit::val::{self, ValOptions};
use serde_json::Value;

/// A dataset in `dir`: the first 16 coco128 images with their labels and the
/// 320 px YOLOv5n (real detections) when ../shared is present, else the
/// fixture images with hand-written labels and a random-weight tiny model.
/// One label file carries a bad line. Returns (data.yaml, model).
fn dataset(dir: &Path) -> (PathBuf, PathBuf) {
    let (img_dir, lbl_dir) = (dir.join("images/val"), dir.join("labels/val"));
    std::fs::create_dir_all(&img_dir).unwrap();
    std::fs::create_dir_all(&lbl_dir).unwrap();
    let names: Vec<String>;
    let model;
    if let Some(shared) = common::shared("the coco128 val parity data") {
        let coco = shared.join("data/coco128");
        names = Dataset::load(&coco.join("data.yaml")).unwrap().names;
        let mut imgs: Vec<PathBuf> = std::fs::read_dir(coco.join("images/train2017")).unwrap().flatten().map(|e| e.path()).collect();
        imgs.sort();
        for p in imgs.iter().take(16) {
            let name = p.file_name().unwrap();
            std::fs::copy(p, img_dir.join(name)).unwrap();
            let lbl = freezesplit::data::label_path(p);
            if lbl.exists() {
                std::fs::copy(&lbl, lbl_dir.join(lbl.file_name().unwrap())).unwrap();
            }
        }
        model = shared.join("models/yolov5n-320.onnx");
    } else {
        names = Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap().spec.names;
        for (i, src) in ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg", "d_exact.png", "f_ceil_up.jpg"].iter().enumerate() {
            std::fs::copy(common::fixture(&format!("letterbox/src/{src}")), img_dir.join(src)).unwrap();
            let stem = Path::new(src).file_stem().unwrap().to_str().unwrap();
            std::fs::write(lbl_dir.join(format!("{stem}.txt")), format!("{} 0.5 0.5 0.4 0.3\n{} 0.3 0.6 0.2 0.5\n", i % 3, (i + 1) % 3)).unwrap();
        }
        model = common::root().join("models/tiny-320-op17.onnx");
    }
    let first_label = std::fs::read_dir(&lbl_dir).unwrap().flatten().map(|e| e.path()).min().unwrap();
    let mut text = std::fs::read_to_string(&first_label).unwrap();
    text.push_str("0 0.5 0.5 0.1\n");
    std::fs::write(&first_label, text).unwrap();
    let yaml = dir.join("data.yaml");
    std::fs::write(&yaml, format!("path: .\ntrain: images/val\nval: images/val\nnames: {}\n", serde_json::to_string(&names).unwrap())).unwrap();
    (yaml, model)
}

fn val_json(args: &[&str], weights: &Path, yaml: &Path, cache: &Path) -> Value {
    let out = Command::new(common::bin())
        .args(["val", "--json", "--engine", "tract", "--weights"])
        .arg(weights)
        .arg("--data")
        .arg(yaml)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "val failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const METRICS: &[&str] = &["P", "R", "mAP50", "mAP50_95", "class_agnostic_mAP50", "matched_class_accuracy"];

fn assert_same_metrics(a: &Value, b: &Value, tol: f64) {
    for k in METRICS {
        let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
        assert!((x - y).abs() <= tol, "{k}: {x} vs {y}");
    }
    for k in ["images", "instances", "skipped_images", "skipped_labels"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    assert_eq!(a["confusion_matrix"]["matrix"], b["confusion_matrix"]["matrix"]);
    let (pa, pb) = (a["per_class"].as_array().unwrap(), b["per_class"].as_array().unwrap());
    assert_eq!(pa.len(), pb.len());
    for (ca, cb) in pa.iter().zip(pb) {
        assert_eq!(ca["class"], cb["class"]);
        for k in ["P", "R", "mAP50", "mAP50_95"] {
            let (x, y) = (ca[k].as_f64().unwrap(), cb[k].as_f64().unwrap());
            assert!((x - y).abs() <= tol, "class {} {k}: {x} vs {y}", ca["name"]);
        }
    }
}

#[test]
fn fast_and_full_paths_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (yaml, model) = dataset(dir.path());
    let cache = dir.path().join("cache");
    let fast = val_json(&["--dtype", "f32"], &model, &yaml, &cache);
    let full = val_json(&["--path", "full"], &model, &yaml, &cache);
    eprintln!("fast: P {} R {} mAP50 {} mAP50-95 {}", fast["P"], fast["R"], fast["mAP50"], fast["mAP50_95"]);
    eprintln!("full: P {} R {} mAP50 {} mAP50-95 {}", full["P"], full["R"], full["mAP50"], full["mAP50_95"]);
    assert_same_metrics(&fast, &full, 1e-6);
    assert_eq!(fast["skipped_labels"], 1, "the bad label line is counted");
    assert!(fast["box_loss"].as_f64().unwrap() > 0.0 && fast["obj_loss"].as_f64().unwrap() > 0.0);
    assert!(full["box_loss"].is_null());
    if common::shared("").is_some() {
        assert!(fast["mAP50"].as_f64().unwrap() > 0.2, "YOLOv5n finds objects in coco128: {}", fast["mAP50"]);
        assert!(fast["instances"].as_u64().unwrap() > 50);
    }
    // A rerun reads the cache and computes nothing.
    let again = val_json(&["--dtype", "f32"], &model, &yaml, &cache);
    assert_eq!(again["engine"], "none (all features were cached)");
    assert_same_metrics(&fast, &again, 0.0);
}

#[test]
fn a_saved_head_validates_like_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let (yaml, model_path) = dataset(dir.path());
    let cache_root = dir.path().join("cache");
    let model = Model::load(&model_path).unwrap();
    let head = Head::from_model(&model).unwrap();
    let run = dir.path().join("runs/train/exp");
    let source = HashMap::from([("model".to_string(), model_path.display().to_string())]);
    head.save(&run.join("weights/best"), source).unwrap();

    // The library entry point the trainer calls, on features cached beforehand.
    let imgsz = model.spec.imgsz.unwrap()[0];
    let (cache, frozen) = FeatureCache::open(&cache_root, &model, imgsz).unwrap();
    let data = Dataset::load(&yaml).unwrap();
    let mut engine = Engine::new(&frozen, imgsz, &EngineOptions { engine: EngineChoice::Tract, ..Default::default() }).unwrap();
    build::fill(&cache, std::slice::from_mut(&mut engine), &data.images("val").unwrap(), &build::FillOptions { batch_size: 4, dtype: Dtype::F16, progress: false }).unwrap();
    let (m2, h2, src) = freezesplit::weights::resolve(&run).unwrap();
    assert_eq!(src.run(), Some(run.as_path()));
    let lib = val::validate(&m2, &h2, &data, "val", &ValOptions::default(), &cache).unwrap();

    let by_run = val_json(&[], &run, &yaml, &cache_root);
    let by_model = val_json(&[], &model_path, &yaml, &cache_root);
    assert_eq!(by_run["engine"], "none (all features were cached)");
    assert_same_metrics(&by_run, &by_model, 0.0);
    assert_eq!(by_run["box_loss"], by_model["box_loss"]);
    assert!((lib.summary.map50 - by_run["mAP50"].as_f64().unwrap()).abs() == 0.0);
    assert_eq!(lib.losses.unwrap()[1], by_run["obj_loss"].as_f64().unwrap());

    // Without a source model the head cannot run: one clear sentence.
    let stem = dir.path().join("orphan");
    head.save(&stem, HashMap::new()).unwrap();
    let err = format!("{:#}", freezesplit::weights::resolve(&stem.with_extension("safetensors")).err().unwrap());
    assert!(err.contains("orphan.json") && err.contains("source model"), "{err}");
    let empty = dir.path().join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let err = format!("{:#}", freezesplit::weights::resolve(&empty).err().unwrap());
    assert!(err.contains("best.safetensors"), "{err}");
}
