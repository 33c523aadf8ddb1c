//! `freezesplit train` end to end on a small dataset made here from the
//! fixture images, with the project's 3-class test model: determinism, exact
//! resume after an abort, `--train cls` freezing box/objectness rows, a new
//! class set, and clear errors for bad input.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use freezesplit::graph::Model;
use freezesplit::head::Head;

const MODEL: &str = "models/tiny-256-nc3-stripped.onnx";

/// 8 train and 4 val images (fixture images with distinct trailing bytes),
/// each with two labelled boxes; one label file has a bad line.
pub(crate) fn dataset(dir: &Path, names: &[&str]) -> PathBuf {
    let srcs = ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg", "f_ceil_up.jpg"];
    for (split, n) in [("train", 8), ("val", 4)] {
        let img_dir = dir.join("images").join(split);
        let lbl_dir = dir.join("labels").join(split);
        std::fs::create_dir_all(&img_dir).unwrap();
        std::fs::create_dir_all(&lbl_dir).unwrap();
        for i in 0..n {
            let src = srcs[i % srcs.len()];
            let mut bytes = std::fs::read(common::fixture(&format!("letterbox/src/{src}"))).unwrap();
            bytes.extend_from_slice(format!("{split}{i}").as_bytes());
            let ext = Path::new(src).extension().unwrap().to_str().unwrap();
            std::fs::write(img_dir.join(format!("im{i}.{ext}")), bytes).unwrap();
            let c = i % names.len();
            let mut lines = format!("{c} 0.3 0.4 0.2 0.3\n{} 0.7 0.6 0.35 0.25\n", (c + 1) % names.len());
            if i == 1 && split == "train" {
                lines.push_str("9 0.5 0.5 0.1 0.1\n");
            }
            std::fs::write(lbl_dir.join(format!("im{i}.txt")), lines).unwrap();
        }
    }
    let yaml = dir.join("data.yaml");
    let names_yaml: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("  {i}: {n}")).collect();
    std::fs::write(&yaml, format!("path: .\ntrain: images/train\nval: images/val\nnames:\n{}\n", names_yaml.join("\n"))).unwrap();
    yaml
}

pub(crate) fn train(dir: &Path, yaml: &Path, name: &str, extra: &[&str]) -> Output {
    Command::new(common::bin())
        .args(["train", "--engine", "tract", "--epochs", "3", "--batch-size", "4", "--seed", "7", "--weights"])
        .arg(common::root().join(MODEL))
        .arg("--data")
        .arg(yaml)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--project")
        .arg(dir.join("runs"))
        .args(["--name", name])
        .args(extra)
        .output()
        .unwrap()
}

pub(crate) fn ok(out: &Output) {
    assert!(out.status.success(), "train failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn same_seed_same_results_and_exact_resume() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let a = train(dir.path(), &yaml, "a", &[]);
    ok(&a);
    let err = String::from_utf8_lossy(&a.stderr);
    assert!(err.contains("labels/train/im1.txt:3: class 9 is not below nc = 3"), "bad label line must be named: {err}");
    ok(&train(dir.path(), &yaml, "b", &[]));
    let runs = dir.path().join("runs");
    let csv_a = std::fs::read_to_string(runs.join("a/results.csv")).unwrap();
    assert_eq!(csv_a.lines().count(), 4, "{csv_a}");
    assert_eq!(csv_a, std::fs::read_to_string(runs.join("b/results.csv")).unwrap());
    for f in ["opt.yaml", "hyp.yaml", "weights/best.safetensors", "weights/best.json", "weights/last.safetensors"] {
        assert!(runs.join("a").join(f).exists(), "{f}");
    }

    // killed right after epoch 1, then resumed: identical to the uninterrupted run
    let killed = Command::new(common::bin())
        .env("FREEZESPLIT_ABORT_AFTER_EPOCH", "1")
        .args(["train", "--engine", "tract", "--epochs", "3", "--batch-size", "4", "--seed", "7", "--weights"])
        .arg(common::root().join(MODEL))
        .arg("--data")
        .arg(&yaml)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--project")
        .arg(&runs)
        .args(["--name", "c"])
        .output()
        .unwrap();
    assert!(!killed.status.success());
    assert_eq!(std::fs::read_to_string(runs.join("c/results.csv")).unwrap().lines().count(), 3);
    let resumed = Command::new(common::bin()).args(["train", "--engine", "tract", "--resume"]).arg(runs.join("c")).output().unwrap();
    ok(&resumed);
    assert_eq!(csv_a, std::fs::read_to_string(runs.join("c/results.csv")).unwrap());
    assert_eq!(std::fs::read(runs.join("a/weights/last.safetensors")).unwrap(), std::fs::read(runs.join("c/weights/last.safetensors")).unwrap());
}

#[test]
fn cls_mode_keeps_box_and_objectness_rows_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    ok(&train(dir.path(), &yaml, "cls", &["--train", "cls", "--optimizer", "AdamW"]));
    let before = Head::from_model(&Model::load(&common::root().join(MODEL)).unwrap()).unwrap();
    let after = Head::load(&dir.path().join("runs/cls/weights/last")).unwrap();
    let no = before.no();
    let mut changed_cls = false;
    for l in 0..before.nl() {
        for r in 0..before.weights[l].nrows() {
            let (wb, wa) = (before.weights[l].row(r), after.weights[l].row(r));
            if r % no < 5 {
                assert!(wb.iter().zip(wa.iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "level {l} row {r} changed");
                assert_eq!(before.biases[l][r].to_bits(), after.biases[l][r].to_bits());
            } else if wb != wa {
                changed_cls = true;
            }
        }
    }
    assert!(changed_cls, "class rows must train");
}

#[test]
fn new_class_set_keeps_the_pretrained_box_and_objectness_rows() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["ambulance", "bus"]);
    ok(&train(dir.path(), &yaml, "new", &["--train", "cls"]));
    let before = Head::from_model(&Model::load(&common::root().join(MODEL)).unwrap()).unwrap();
    let after = Head::load(&dir.path().join("runs/new/weights/last")).unwrap();
    assert_eq!(after.nc, 2);
    assert_eq!(after.names, vec!["ambulance", "bus"]);
    for a in 0..3 {
        for k in 0..5 {
            assert_eq!(after.weights[0].row(a * 7 + k), before.weights[0].row(a * 8 + k));
        }
    }
}

#[test]
fn bad_settings_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let hyp = dir.path().join("hyp.yaml");
    std::fs::write(&hyp, "lr0: fast\n").unwrap();
    let out = train(dir.path(), &yaml, "h", &["--hyp", hyp.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hyp.yaml") && err.contains("`lr0` must be a number"), "{err}");

    let empty = dir.path().join("empty.yaml");
    std::fs::create_dir_all(dir.path().join("nothing")).unwrap();
    std::fs::write(&empty, "path: .\ntrain: nothing\nval: nothing\nnames: [a, b, c]\n").unwrap();
    let out = train(dir.path(), &empty, "e", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("train split"), "{}", String::from_utf8_lossy(&out.stderr));
}
