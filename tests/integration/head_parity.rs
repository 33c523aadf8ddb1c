//! The Rust Detect head on cached features reproduces the exported model's
//! `output0`: the frozen graph runs through an engine into a cache entry, the
//! entry is read back, the three 1x1 convs and YOLOv5's decode run in Rust,
//! and the result is compared with the complete original model run through the
//! same engine. Boxes within 1e-3 pixels, confidences within 1e-5 (f32 cache);
//! the f16 cache error is printed.

use crate::common;

use std::path::PathBuf;

use freezesplit::cache::{Dtype, FeatureCache, build};
use freezesplit::engine::{Engine, EngineOptions};
use freezesplit::graph::{Model, onnx};
use freezesplit::head::Head;
use freezesplit::preprocess;
use ndarray::{Array4, Axis, s};

fn images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg"].iter().map(|f| common::fixture(&format!("letterbox/src/{f}"))).collect();
    if let Some(sh) = common::shared("bus.jpg, zidane.jpg and coco128 images in the head parity test") {
        v.push(sh.join("data/images/bus.jpg"));
        v.push(sh.join("data/images/zidane.jpg"));
        let dir = sh.join("data/coco128/images/train2017");
        let mut c: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
        c.sort();
        v.extend(c.into_iter().take(3));
    }
    v
}

/// Max abs differences (boxes, confidences) between the Rust head on cached
/// features and the full model, over `images`.
fn compare(model_path: &std::path::Path, opts: &EngineOptions, dtype: Dtype, images: &[PathBuf]) -> (f32, f32) {
    let model = Model::load(model_path).unwrap();
    let imgsz = model.spec.imgsz.map_or(320, |s| s[0]);
    let head = Head::from_model(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cache, frozen) = FeatureCache::open(dir.path(), &model, imgsz).unwrap();
    let mut frozen_engine = Engine::new(&frozen, imgsz, opts).unwrap();
    let report = build::fill(&cache, std::slice::from_mut(&mut frozen_engine), images, &build::FillOptions { batch_size: 2, dtype, progress: false }).unwrap();
    assert_eq!(report.computed, images.len());

    let full_bytes = onnx::encode_model(&model.proto);
    let mut full = Engine::new(&full_bytes, imgsz, opts).unwrap();
    let (mut dbox, mut dconf) = (0f32, 0f32);
    for img in images {
        let lb = preprocess::letterbox(&preprocess::decode(img).unwrap(), imgsz);
        let mut input = Array4::<f32>::zeros((1, 3, imgsz, imgsz));
        lb.write_chw(input.as_slice_mut().unwrap());
        let want = full.run(input.view()).unwrap().remove(0);
        let want = want.index_axis(Axis(0), 0);

        let key = freezesplit::cache::image_key(&std::fs::read(img).unwrap());
        let entry = cache.get(&key, dtype).expect("entry cached");
        let levels: Vec<_> = (0..head.nl()).map(|i| entry.level(i)).collect();
        let flat: Vec<_> = levels.iter().map(|l| (l.view().into_shape_with_order((l.shape()[0], l.shape()[1] * l.shape()[2])).unwrap(), l.shape()[1], l.shape()[2])).collect();
        let got = head.decode(&flat);
        assert_eq!(got.shape(), want.shape(), "{}", model_path.display());
        dbox = dbox.max((&got.slice(s![.., ..4]) - &want.slice(s![.., ..4])).iter().fold(0f32, |m, d| m.max(d.abs())));
        dconf = dconf.max((&got.slice(s![.., 4..]) - &want.slice(s![.., 4..])).iter().fold(0f32, |m, d| m.max(d.abs())));
    }
    (dbox, dconf)
}

#[test]
fn rust_head_reproduces_output0_on_every_model_and_engine() {
    let images = images();
    let mut models = common::project_models();
    models.extend(common::shared_models());
    for opts in common::engines() {
        for m in &models {
            let (dbox, dconf) = compare(m, &opts, Dtype::F32, &images);
            eprintln!("{:?} {}: f32 cache: max |Δbox| {dbox:.2e} px, max |Δconf| {dconf:.2e}", opts.engine, m.file_name().unwrap().to_string_lossy());
            assert!(dbox <= 1e-3, "{}: box error {dbox}", m.display());
            assert!(dconf <= 1e-5, "{}: confidence error {dconf}", m.display());
        }
    }
}

#[test]
fn f16_cache_error_is_small() {
    let images = images();
    let m = common::root().join("models/tiny-320-op17.onnx");
    let opts = common::engines().remove(0);
    let (dbox, dconf) = compare(&m, &opts, Dtype::F16, &images);
    eprintln!("f16 cache: max |Δbox| {dbox:.3e} px, max |Δconf| {dconf:.3e}");
    assert!(dbox < 2.0 && dconf < 5e-3);
}
