//! `freezesplit train` end to end on a small dataset made here from the
//! fixture images, with the project's 3-class test model: determinism, exact
//! resume after an abort (also past the warmup, also with the files derived
//! from the checkpoint lost), `--train cls` freezing box/objectness rows, a
//! new class set, val losses with the run's hyp, early stopping and the other
//! train.py flags, run directories, a diverging run, and clear errors for bad
//! input.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use freezesplit::graph::Model;
use freezesplit::head::Head;

pub(crate) const MODEL: &str = "models/tiny-256-nc3-stripped.onnx";

/// 8 train and 4 val images (fixture images with distinct trailing bytes),
/// each with two labelled boxes; one label file has a bad line.
pub(crate) fn dataset(dir: &Path, names: &[&str]) -> PathBuf {
    dataset_n(dir, names, 8, 4)
}

/// `dataset` with `ntrain` and `nval` images.
fn dataset_n(dir: &Path, names: &[&str], ntrain: usize, nval: usize) -> PathBuf {
    let srcs = ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg", "f_ceil_up.jpg"];
    for (split, n) in [("train", ntrain), ("val", nval)] {
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
    train_model(dir, yaml, &common::root().join(MODEL), name, extra)
}

/// `train` with another model.
pub(crate) fn train_model(dir: &Path, yaml: &Path, model: &Path, name: &str, extra: &[&str]) -> Output {
    Command::new(common::bin())
        .args(["train", "--engine", "tract", "--epochs", "3", "--batch-size", "4", "--seed", "7", "--weights"])
        .arg(model)
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

fn train_cmd(dir: &Path, yaml: &Path) -> Command {
    train_cmd_with(dir, yaml, &common::root().join(MODEL), &dir.join("cache"))
}

fn train_cmd_with(dir: &Path, yaml: &Path, model: &Path, cache: &Path) -> Command {
    let mut c = Command::new(common::bin());
    c.args(["train", "--engine", "tract", "--seed", "7", "--weights"]).arg(model).arg("--data").arg(yaml).arg("--cache-dir").arg(cache).arg("--project").arg(dir.join("runs"));
    c
}

fn resume(run: &Path, abort_after: Option<usize>) -> Output {
    let mut c = Command::new(common::bin());
    c.args(["train", "--engine", "tract", "--resume"]).arg(run);
    if let Some(e) = abort_after {
        c.env("FREEZESPLIT_ABORT_AFTER_EPOCH", e.to_string());
    }
    c.output().unwrap()
}

fn csv_rows(run: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(run.join("results.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(|v| v.trim().parse().unwrap()).collect()).collect()
}

#[test]
fn resume_after_the_warmup_is_identical_to_an_uninterrupted_run() {
    // 24 images in batches of 2: 12 batches an epoch, warmup max(3·12, 100)
    // = 100 iterations, over after batch 4 of epoch 8; then one optimizer
    // step every 32 batches, so gradients are carried across the kills
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset_n(dir.path(), &["circle", "square", "triangle"], 24, 4);
    let runs = dir.path().join("runs");
    let args = ["--epochs", "12", "--batch-size", "2"];
    ok(&train_cmd(dir.path(), &yaml).args(args).args(["--name", "whole"]).output().unwrap());
    let killed = train_cmd(dir.path(), &yaml).args(args).args(["--name", "cut"]).env("FREEZESPLIT_ABORT_AFTER_EPOCH", "8").output().unwrap();
    assert!(!killed.status.success());
    let cut = runs.join("cut");
    assert!(!resume(&cut, Some(9)).status.success(), "the hook kills the resumed run after epoch 9");
    // a kill after the checkpoint but before the files derived from it
    std::fs::write(cut.join("results.csv"), "epoch\n").unwrap();
    for f in ["last.safetensors", "best.safetensors", "best.json"] {
        std::fs::remove_file(cut.join("weights").join(f)).unwrap();
    }
    assert!(!resume(&cut, Some(10)).status.success());
    ok(&resume(&cut, None));
    assert_eq!(csv_rows(&cut).len(), 12);

    let whole = runs.join("whole");
    let (a, b) = (std::fs::read_to_string(whole.join("results.csv")).unwrap(), std::fs::read_to_string(cut.join("results.csv")).unwrap());
    assert_eq!(a, b, "results.csv after 3 kills differs from the uninterrupted run");
    for f in ["last.safetensors", "best.safetensors", "last_state.safetensors"] {
        assert!(std::fs::read(whole.join("weights").join(f)).unwrap() == std::fs::read(cut.join("weights").join(f)).unwrap(), "{f} differs");
    }
    // after warmup each epoch runs at lr0·lf(epoch): 0.01·((1 − e/12)·0.99 + 0.01)
    for (e, row) in csv_rows(&whole).iter().enumerate().skip(9) {
        let lf = (1.0 - e as f64 / 12.0) * 0.99 + 0.01;
        assert!((row[11] - 0.01 * lf).abs() < 1e-8 && (row[12] - 0.01 * lf).abs() < 1e-8, "epoch {e}: {row:?}");
    }
    assert!(!cut.join("weights/last_state.json").exists(), "the checkpoint is one file");
}

#[test]
fn val_losses_use_the_runs_loss_settings() {
    // every multiplier 0: the head stays the pretrained one, so the val
    // losses differ only by the loss settings
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let hyp = dir.path().join("double.yaml");
    std::fs::write(&hyp, "box: 0.1\nobj: 2.0\ncls: 1.0\n").unwrap();
    let frozen = ["--epochs", "1", "--batch-size", "4", "--lr-box", "0", "--lr-obj", "0", "--lr-cls", "0"];
    let runs = dir.path().join("runs");
    let mut notes = Vec::new();
    for (name, extra) in [("plain", vec![]), ("double", vec!["--hyp", hyp.to_str().unwrap()]), ("smooth", vec!["--label-smoothing", "0.2"])] {
        let out = train_cmd(dir.path(), &yaml).args(frozen).args(["--name", name]).args(extra).output().unwrap();
        ok(&out);
        notes.push(String::from_utf8_lossy(&out.stderr).contains("the head does not change"));
    }
    let val = |name: &str| csv_rows(&runs.join(name))[0][8..11].to_vec();
    let (plain, double, smooth) = (val("plain"), val("double"), val("smooth"));
    for k in 0..3 {
        assert!(plain[k] > 0.0 && (double[k] - 2.0 * plain[k]).abs() <= 2e-6, "val loss {k}: {plain:?} with the hyp gains doubled: {double:?}");
    }
    assert_eq!(smooth[..2], plain[..2]);
    assert_ne!(smooth[2], plain[2], "label smoothing must change the val cls loss");
    assert_eq!(notes, [true; 3], "a run where nothing trains says so");
}

#[test]
fn a_diverging_run_stops_at_the_first_non_finite_loss() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let out = train_cmd(dir.path(), &yaml).args(["--epochs", "3", "--batch-size", "1", "--name", "nan", "--lr-cls", "1e36", "--lr-obj", "1e36"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: training stopped at epoch 0, batch") && err.contains("Likely cause: the updates diverged"), "{err}");
    let w = dir.path().join("runs/nan/weights");
    assert!(!w.join("best.safetensors").exists() && !w.join("last_state.safetensors").exists(), "nothing of a diverged epoch is saved");
}

#[test]
fn bad_options_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let hyp = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let nan = hyp("nan.yaml", "lr0: .nan\n");
    let huge = hyp("huge.yaml", "lr0: 1000000\n");
    let mom = hyp("mom.yaml", "momentum: 1.0\n");
    let no_classes = dir.path().join("nc0.yaml");
    std::fs::write(&no_classes, "path: .\ntrain: images/train\nval: images/val\nnames: []\n").unwrap();
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec!["--hyp", &nan], &yaml, "nan.yaml: hyp `lr0` must be in (0, 1], got NaN"),
        (vec!["--hyp", &huge], &yaml, "hyp `lr0` must be in (0, 1], got 1000000"),
        (vec!["--hyp", &mom], &yaml, "hyp `momentum` must be in [0, 1), got 1"),
        (vec!["--batch-size", "9"], &yaml, "--batch-size 9 is larger than the train split"),
        (vec!["--train", "cls", "--reinit-head"], &yaml, "--train cls keeps the box and objectness rows frozen"),
        (vec!["--label-smoothing", "1.5"], &yaml, "--label-smoothing must be in [0, 1), got 1.5"),
        (vec!["--lr-cls=-1"], &yaml, "--lr-cls must be a finite number in [0, inf), got -1"),
        (vec![], &no_classes, "names no classes (nc: 0)"),
    ];
    for (i, (extra, data, want)) in cases.into_iter().enumerate() {
        let cache = dir.path().join(format!("cache{i}"));
        let out = train_cmd_with(dir.path(), data, &common::root().join(MODEL), &cache).args(["--name", "bad"]).args(&extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains("error: ") && err.contains(want), "{extra:?}: expected `{want}` in: {err}");
        assert!(!cache.exists(), "{extra:?}: work started before the refusal");
    }
    let out = Command::new(common::bin()).args(["train", "--resume", "runs/x", "--epochs", "5", "--lr-cls", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--epochs, --lr-cls cannot be given with it"), "{err}");
}

#[test]
fn patience_save_period_exist_ok_and_train_py_only_flags() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let runs = dir.path().join("runs");
    let out = train_cmd(dir.path(), &yaml).args(["--epochs", "3", "--batch-size", "4", "--name", "p", "--save-period", "2", "--workers", "8", "--cache", "--rect", "--sync-bn"]).output().unwrap();
    ok(&out);
    let (err, stdout) = (String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    for flag in ["--workers", "--cache", "--rect", "--sync-bn"] {
        assert!(err.contains(&format!("note: {flag} is ignored: ")), "{flag}: {err}");
    }
    let w = runs.join("p/weights");
    assert!(w.join("epoch0.safetensors").exists() && w.join("epoch2.safetensors").exists() && !w.join("epoch1.safetensors").exists());
    assert!(stdout.contains("final val loss (last epoch, 2):") && stdout.contains("(after: the best head, epoch "), "{stdout}");

    // --exist-ok reuses p, but not while another run holds it
    let lock = freezesplit::runs::RunLock::acquire(&runs.join("p")).unwrap();
    let busy = train_cmd(dir.path(), &yaml).args(["--epochs", "1", "--batch-size", "4", "--name", "p", "--exist-ok"]).output().unwrap();
    assert!(!busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("in use by another live run"));
    drop(lock);
    ok(&train_cmd(dir.path(), &yaml).args(["--epochs", "1", "--batch-size", "4", "--name", "p", "--exist-ok"]).output().unwrap());
    assert_eq!(csv_rows(&runs.join("p")).len(), 1);
    assert!(!runs.join("p2").exists());

    // EarlyStopping as YOLOv5's: stop once `patience` epochs passed without
    // a fitness >= the best. The demo's colours with the train labels
    // permuted: the more it trains, the worse it does on the true val labels.
    let shapes = dir.path().join("shapes");
    let shapes_yaml = freezesplit::demo::synth::colour_dataset(&shapes, 32, 8, 3).unwrap();
    for f in std::fs::read_dir(shapes.join("labels/train")).unwrap() {
        let p = f.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let moved: Vec<String> = text.lines().map(|l| l.split_once(' ').map(|(c, rest)| format!("{} {rest}", (c.parse::<usize>().unwrap() + 1) % 3)).unwrap()).collect();
        std::fs::write(&p, moved.join("\n") + "\n").unwrap();
    }
    let out = train_cmd_with(dir.path(), &shapes_yaml, &freezesplit::demo::demo_model(), &dir.path().join("cache"))
        .args(["--epochs", "15", "--batch-size", "4", "--train", "cls", "--name", "stop", "--patience", "2"])
        .output()
        .unwrap();
    ok(&out);
    let rows = csv_rows(&runs.join("stop"));
    let (mut best, mut best_epoch, mut expect) = (0.0, 0, 15);
    for (e, r) in rows.iter().enumerate() {
        let fi = 0.1 * r[6] + 0.9 * r[7];
        if fi >= best {
            (best, best_epoch) = (fi, e);
        }
        if e - best_epoch >= 2 {
            expect = e + 1;
            break;
        }
    }
    assert_eq!(rows.len(), expect, "{rows:?}");
    assert!(expect < 15, "this run should stop early: {rows:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("stopped early after epoch {}", expect - 1)));
    let again = resume(&runs.join("stop"), None);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("nothing to resume"));
}

#[test]
fn a_model_whose_head_holds_nan_is_refused_before_caching() {
    // the test model with one bias of its Detect head set to NaN in the file
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let src = common::root().join(MODEL);
    let model = Model::load(&src).unwrap();
    let name = model.spec.levels[1].bias.clone();
    let (_, bias) = model.initializer_f32(&name).unwrap();
    let pattern: Vec<u8> = bias[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut bytes = std::fs::read(&src).unwrap();
    let at = bytes.windows(pattern.len()).position(|w| w == pattern.as_slice()).expect("the bias values are stored little-endian in the file");
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = dir.path().join("nan-head.onnx");
    std::fs::write(&bad, bytes).unwrap();
    let cache = dir.path().join("cache");
    let out = train_cmd_with(dir.path(), &yaml, &bad, &cache).args(["--epochs", "1", "--batch-size", "4", "--name", "nanhead"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nan-head.onnx holds NaN or infinite values") && err.contains(&format!("`{name}`")), "{err}");
    assert!(!cache.exists(), "refused before the cache fill");
}
