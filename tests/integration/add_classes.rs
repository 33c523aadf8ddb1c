//! `train --add-classes` end to end: the extended export's first 5 + nc_old
//! output columns bit-identical to the input model's on every image (same
//! engine, same threads), on the project's 3-class test model and, when
//! ../shared is there, on yolov5n.onnx; the log lines; the refusals; and `val`
//! of an extended model on datasets naming some of its classes.

use crate::common;
use crate::train::{dataset, ok, train};

use std::path::{Path, PathBuf};
use std::process::Command;

use freezesplit::engine::{Engine, EngineOptions};
use freezesplit::graph::{Model, onnx};
use freezesplit::preprocess;
use ndarray::{Array4, Axis, Ix3};

/// `model`'s and `extended`'s output0 on each image: the first `keep`
/// columns equal bit for bit, the extended one `extra` columns wider.
fn assert_old_columns_bit_identical(model: &Path, extended: &Path, images: &[PathBuf], keep: usize, extra: usize, opts: &EngineOptions) {
    let m = Model::load(model).unwrap();
    let imgsz = m.spec.imgsz.map_or(320, |s| s[0]);
    let mut a = Engine::new(&onnx::encode_model(&m.proto), imgsz, opts).unwrap();
    let mut b = Engine::new(&std::fs::read(extended).unwrap(), imgsz, opts).unwrap();
    for img in images {
        let lb = preprocess::letterbox(&preprocess::decode(img).unwrap(), imgsz);
        let mut input = Array4::<f32>::zeros((1, 3, imgsz, imgsz));
        lb.write_chw(input.as_slice_mut().unwrap());
        let want = a.run(input.view()).unwrap().remove(0).into_dimensionality::<Ix3>().unwrap();
        let got = b.run(input.view()).unwrap().remove(0).into_dimensionality::<Ix3>().unwrap();
        assert_eq!(want.shape()[2], keep);
        assert_eq!(got.shape()[2], keep + extra);
        let (w, g) = (want.index_axis(Axis(0), 0), got.index_axis(Axis(0), 0));
        for (r, (wr, gr)) in w.rows().into_iter().zip(g.rows()).enumerate() {
            for k in 0..keep {
                assert_eq!(wr[k].to_bits(), gr[k].to_bits(), "{}: row {r} column {k}: {} vs {}", img.display(), wr[k], gr[k]);
            }
        }
    }
}

fn images_of(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["train", "val"].iter().flat_map(|s| std::fs::read_dir(dir.join("images").join(s)).unwrap().flatten().map(|e| e.path())).collect();
    v.sort();
    v
}

fn export(run: &Path) -> PathBuf {
    let out = run.join("weights/best.onnx");
    let o = Command::new(common::bin()).args(["export", "--weights"]).arg(run).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "export failed: {}", String::from_utf8_lossy(&o.stderr));
    out
}

fn val_json(weights: &Path, yaml: &Path, cache: &Path) -> serde_json::Value {
    let o = Command::new(common::bin()).args(["val", "--engine", "tract", "--json", "--weights"]).arg(weights).arg("--data").arg(yaml).arg("--cache-dir").arg(cache).output().unwrap();
    assert!(o.status.success(), "val failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn added_classes_leave_the_old_outputs_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    // the model's classes are circle, square, triangle
    let yaml = dataset(dir.path(), &["Square", "star"]);
    let out = train(dir.path(), &yaml, "add", &["--add-classes", "--optimizer", "SGD"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("add classes: 3 → 4 classes; matched by name: Square = square (class 1); new: star (class 3)"), "{err}");
    assert!(err.contains("labelled objects of new classes (positives); negatives for the new rows:") && err.contains("pseudo-labels"), "{err}");
    let run = dir.path().join("runs/add");
    let head = freezesplit::head::Head::load(&run.join("weights/last")).unwrap();
    assert_eq!(head.names, vec!["circle", "square", "triangle", "star"]);
    let exported = export(&run);
    assert_eq!(onnx::metadata(&Model::load(&exported).unwrap().proto, "base_nc"), Some("3"));
    let model = common::root().join(crate::train::MODEL);
    let mut images = images_of(dir.path());
    images.extend(["a_landscape.jpg", "c_wide.jpg"].iter().map(|f| common::fixture(&format!("letterbox/src/{f}"))));
    for opts in common::engines() {
        assert_old_columns_bit_identical(&model, &exported, &images, 8, 1, &opts);
    }

    // val on the training dataset: by name, old and new apart
    let v = val_json(&run, &yaml, &dir.path().join("cache"));
    assert_eq!(v["model_classes"], serde_json::json!([1, 3]));
    assert_eq!(v["base_nc"], 3);
    assert_eq!(v["per_class"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>().len(), v["per_class"].as_array().unwrap().len());
    // random weights detect little: a group without per-class results is null
    for g in ["old_classes", "new_classes"] {
        assert!(v.get(g).is_some_and(|x| x.is_null() || x["mAP50_95"].is_number()), "{v}");
    }
    // the export reports the same as the run it came from
    let ve = val_json(&exported, &yaml, &dir.path().join("cache"));
    assert_eq!(ve["mAP50_95"], v["mAP50_95"]);
    assert_eq!(ve["old_classes"], v["old_classes"]);

    // a dataset naming only old classes: the extended model validates
    // exactly as the input model does (the new class's predictions dropped)
    let old_only = dataset(&dir.path().join("old"), &["square", "TRIANGLE"]);
    let (ve, vo) = (val_json(&exported, &old_only, &dir.path().join("cache")), val_json(&model, &old_only, &dir.path().join("cache")));
    for k in ["P", "R", "mAP50", "mAP50_95", "per_class", "confusion_matrix"] {
        assert_eq!(ve[k], vo[k], "{k}");
    }
    assert!(ve["new_classes"].is_null(), "{ve}");
    assert!(ve["old_classes"].is_null() || ve["old_classes"]["mAP50_95"] == vo["mAP50_95"], "{ve}");
}

#[test]
fn add_classes_refusals_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "Square"]);
    let out = train(dir.path(), &yaml, "none", &["--add-classes"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--add-classes found no new class"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = train(dir.path(), &yaml, "re", &["--add-classes", "--reinit-head"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--add-classes keeps every row"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = train(dir.path(), &yaml, "np", &["--no-pseudo-labels"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-pseudo-labels applies only with --add-classes"), "{}", String::from_utf8_lossy(&out.stderr));
    // val refuses a dataset with a name the model lacks
    let other = dataset(&dir.path().join("o"), &["circle", "zebra"]);
    let o = Command::new(common::bin()).args(["val", "--engine", "tract", "--weights"]).arg(common::root().join(crate::train::MODEL)).arg("--data").arg(&other).arg("--cache-dir").arg(dir.path().join("cache")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no class named zebra"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn head_mode_and_no_pseudo_labels_say_what_they_do() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["square", "star"]);
    let out = train(dir.path(), &yaml, "h", &["--add-classes", "--train", "head", "--no-pseudo-labels"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no pseudo-labels (--no-pseudo-labels)") && err.contains("--train head: the old class rows and the box and objectness rows train too"), "{err}");
}

#[test]
fn yolov5n_keeps_its_80_outputs_bit_identical_with_an_added_class() {
    let Some(shared) = common::shared("the yolov5n add-classes bit-identity test") else { return };
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["Bus", "Ambulance"]);
    let model = shared.join("models/yolov5n.onnx");
    let engine = if freezesplit::engine::ort_engine::find_library(None).is_some() { "ort" } else { "tract" };
    let out = Command::new(common::bin())
        .args(["train", "--engine", engine, "--epochs", "2", "--batch-size", "4", "--seed", "7", "--add-classes", "--weights"])
        .arg(&model)
        .arg("--data")
        .arg(&yaml)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--project")
        .arg(dir.path().join("runs"))
        .args(["--name", "y"])
        .output()
        .unwrap();
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("matched by name: Bus = bus (class 5); new: Ambulance (class 80)"));
    let exported = export(&dir.path().join("runs/y"));
    for opts in common::engines() {
        assert_old_columns_bit_identical(&model, &exported, &images_of(dir.path()), 85, 1, &opts);
    }
}
