//! `train`'s hyperparameter defaults end to end: the fine-tuning preset is the
//! default, YOLOv5's hyp.scratch-low.yaml still gives the results.csv that the
//! default gave before the preset existed (tests/fixtures/train/), and a
//! `--lr-box/--lr-obj/--lr-cls` flag overrides the hyp's multiplier key.

use crate::common;
use crate::train::{dataset, ok, train};

/// YOLOv5's data/hyps/hyp.scratch-low.yaml (v7.0), augmentation keys included.
const SCRATCH_LOW: &str = "lr0: 0.01\nlrf: 0.01\nmomentum: 0.937\nweight_decay: 0.0005\nwarmup_epochs: 3.0\nwarmup_momentum: 0.8\nwarmup_bias_lr: 0.1\nbox: 0.05\ncls: 0.5\ncls_pw: 1.0\nobj: 1.0\nobj_pw: 1.0\niou_t: 0.20\nanchor_t: 4.0\nfl_gamma: 0.0\nhsv_h: 0.015\nhsv_s: 0.7\nhsv_v: 0.4\ndegrees: 0.0\ntranslate: 0.1\nscale: 0.5\nshear: 0.0\nperspective: 0.0\nflipud: 0.0\nfliplr: 0.5\nmosaic: 1.0\nmixup: 0.0\ncopy_paste: 0.0\n";

fn values(csv: &str) -> Vec<f64> {
    csv.lines().skip(1).flat_map(|l| l.split(',').map(|v| v.parse::<f64>().unwrap()).collect::<Vec<_>>()).collect()
}

/// Largest difference between two results.csv; the header must match.
fn max_diff(a: &str, b: &str) -> f64 {
    assert_eq!(a.lines().next(), b.lines().next());
    let (x, y) = (values(a), values(b));
    assert_eq!(x.len(), y.len(), "{a}\n{b}");
    x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max)
}

fn csv(dir: &std::path::Path, run: &str) -> String {
    std::fs::read_to_string(dir.join("runs").join(run).join("results.csv")).unwrap()
}

#[test]
fn scratch_low_gives_the_old_default_and_the_preset_is_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let sl = dir.path().join("hyp.scratch-low.yaml");
    std::fs::write(&sl, SCRATCH_LOW).unwrap();
    ok(&train(dir.path(), &yaml, "file", &["--hyp", sl.to_str().unwrap()]));
    ok(&train(dir.path(), &yaml, "named", &["--hyp", "hyp.scratch-low"]));
    ok(&train(dir.path(), &yaml, "default", &[]));
    // written by this test's train() with the default of the commit before the
    // preset (hyp.scratch-low values, every multiplier 1); 6 decimals as written,
    // a little slack for another CPU's float kernels
    let old = std::fs::read_to_string(common::fixture("train/scratch_low_results.csv")).unwrap();
    let file = csv(dir.path(), "file");
    assert!(max_diff(&old, &file) < 5e-6, "scratch-low no longer reproduces the old default:\n{old}\n{file}");
    assert_eq!(file, csv(dir.path(), "named"));
    let default = csv(dir.path(), "default");
    assert!(max_diff(&old, &default) > 1e-4, "the default must be the fine-tuning preset:\n{default}");
    let hyp = std::fs::read_to_string(dir.path().join("runs/default/hyp.yaml")).unwrap();
    let preset = freezesplit::train::hyp::TrainHyp::preset("hyp.finetune").unwrap();
    assert!(hyp.contains(&format!("lr_box: {}", preset.lr_box)), "{hyp}");
}

#[test]
fn lr_flags_override_the_hyp_keys() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let sl = dir.path().join("sl.yaml");
    std::fs::write(&sl, SCRATCH_LOW).unwrap();
    let keyed = dir.path().join("keyed.yaml");
    std::fs::write(&keyed, format!("{SCRATCH_LOW}lr_box: 0.1\nlr_obj: 0.5\nlr_cls: 2.0\n")).unwrap();
    let (sl, keyed) = (sl.to_str().unwrap(), keyed.to_str().unwrap());
    ok(&train(dir.path(), &yaml, "keys", &["--hyp", keyed]));
    ok(&train(dir.path(), &yaml, "flags", &["--hyp", sl, "--lr-box", "0.1", "--lr-obj", "0.5", "--lr-cls", "2"]));
    ok(&train(dir.path(), &yaml, "override", &["--hyp", keyed, "--lr-box", "1", "--lr-obj", "1", "--lr-cls", "1"]));
    ok(&train(dir.path(), &yaml, "plain", &["--hyp", sl]));
    assert_eq!(csv(dir.path(), "keys"), csv(dir.path(), "flags"));
    assert_eq!(csv(dir.path(), "override"), csv(dir.path(), "plain"));
    assert!(max_diff(&csv(dir.path(), "keys"), &csv(dir.path(), "plain")) > 1e-5, "the multipliers must change the run");
    // the run's hyp.yaml shows the multipliers in effect
    let hyp = std::fs::read_to_string(dir.path().join("runs/override/hyp.yaml")).unwrap();
    assert!(hyp.contains("lr_box: 1.0") && hyp.contains("lr_cls: 1.0"), "{hyp}");
    let hyp = std::fs::read_to_string(dir.path().join("runs/flags/hyp.yaml")).unwrap();
    assert!(hyp.contains("lr_box: 0.1") && hyp.contains("lr_obj: 0.5"), "{hyp}");
}

#[test]
fn a_hyp_that_is_neither_file_nor_preset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let out = train(dir.path(), &yaml, "bad", &["--hyp", "hyp.finetuned.yaml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: --hyp hyp.finetuned.yaml: no such file and not a preset") && err.contains("hyp.finetune, hyp.scratch-low"), "{err}");
}
