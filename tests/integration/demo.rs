//! `freezesplit demo` as a new user runs it (default settings, the built-in
//! tract engine): the committed demo model learns the new colour classes.
//! Acceptance: matched-box class accuracy >= 0.9 after fine-tuning, and the
//! class-agnostic mAP50 not lower than before (box and objectness rows are
//! frozen), plus every artefact of the run.

use crate::common;

use std::process::Command;

#[test]
fn demo_learns_the_new_class_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::bin())
        .args(["demo", "--json", "--engine", "tract", "--project"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |side: &str, key: &str| v[side][key].as_f64().unwrap_or_else(|| panic!("{side}.{key} missing: {v}"));
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
    for side in ["before", "after"] {
        for key in ["mAP50", "class_agnostic_mAP50", "matched_class_accuracy"] {
            assert!((0.0..=1.0).contains(&get(side, key)));
        }
    }
    assert!(get("before", "matched_class_accuracy") < 0.6, "the new class rows start untrained: {v}");
    assert!(get("after", "matched_class_accuracy") >= 0.9, "{v}");
    assert!(get("after", "class_agnostic_mAP50") >= get("before", "class_agnostic_mAP50"), "{v}");
    assert!(get("after", "mAP50") > get("before", "mAP50"), "{v}");

    let run = dir.path().join("exp");
    for f in ["train/weights/best.onnx", "train/results.csv", "predict/predictions.json", "predict/val0000.png"] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let exported = freezesplit::graph::Model::load(&run.join("train/weights/best.onnx")).unwrap();
    assert_eq!(exported.spec.names, ["red", "green", "blue"]);
}
