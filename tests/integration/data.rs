//! Datasets as users bring them, through the command line: a Roboflow export
//! (data.yaml saying `../train/images`), polygon labels, broken label files,
//! a FIFO and a symlink loop among the images, a split without labels, a
//! wrong `--split`, and the progress bar of `val`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODEL: &str = "models/tiny-256-nc3-stripped.onnx";

/// A Roboflow "YOLOv5 PyTorch" export laid out as the zip ships it: data.yaml
/// at the top (`train: ../train/images` ...), train/, valid/ and test/ each
/// with images/ and labels/. valid/ holds polygon labels, a duplicate row and
/// a label file that is a directory; test/ has no labels at all.
fn roboflow(dir: &Path) -> PathBuf {
    let srcs = ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg", "f_ceil_up.jpg"];
    for (split, n) in [("train", 4), ("valid", 4), ("test", 2)] {
        std::fs::create_dir_all(dir.join(split).join("images")).unwrap();
        std::fs::create_dir_all(dir.join(split).join("labels")).unwrap();
        for (i, src) in srcs.iter().take(n).enumerate() {
            let ext = Path::new(src).extension().unwrap().to_str().unwrap();
            let stem = format!("{split}{i}_{ext}.rf.0123456789abcdef");
            // distinct bytes per split: distinct cache entries
            let mut bytes = std::fs::read(common::fixture(&format!("letterbox/src/{src}"))).unwrap();
            bytes.extend_from_slice(split.as_bytes());
            std::fs::write(dir.join(split).join("images").join(format!("{stem}.{ext}")), bytes).unwrap();
            if split == "test" {
                continue;
            }
            let lbl = dir.join(split).join("labels").join(format!("{stem}.txt"));
            match (split, i) {
                ("valid", 0) => std::fs::write(&lbl, "0 0.2 0.2 0.6 0.2 0.6 0.7 0.2 0.7\n1 0.5 0.5 0.2 0.3 0.4 0.6\n").unwrap(),
                ("valid", 1) => std::fs::write(&lbl, "2 0.5 0.5 0.4 0.3\n2 0.5 0.5 0.4 0.3\n").unwrap(),
                ("valid", 2) => std::fs::create_dir_all(&lbl).unwrap(),
                _ => std::fs::write(&lbl, format!("{} 0.5 0.5 0.4 0.3\n", i % 3)).unwrap(),
            }
        }
    }
    let yaml = dir.join("data.yaml");
    std::fs::write(
        &yaml,
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: 3\nnames: ['circle', 'square', 'triangle']\n\nroboflow:\n  workspace: shapes\n  project: shapes\n  version: 2\n  license: CC BY 4.0\n  url: https://universe.roboflow.com/shapes/shapes/dataset/2\n",
    )
    .unwrap();
    yaml
}

fn run(args: &[&str], yaml: &Path, cache: &Path) -> Output {
    Command::new(common::bin()).args(args).args(["--engine", "tract", "--weights"]).arg(common::root().join(MODEL)).arg("--data").arg(yaml).arg("--cache-dir").arg(cache).output().unwrap()
}

fn ok_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_roboflow_export_caches_and_validates_as_it_ships() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = roboflow(dir.path());
    let cache = dir.path().join("cache");
    let out = run(&["cache", "--json", "--split", "train,val,test"], &yaml, &cache);
    let v = ok_json(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    for (split, n) in [("train", 4), ("val", 4), ("test", 2)] {
        assert_eq!(v["splits"][split]["computed"], n, "{split}: {v}");
    }
    let note = format!("note: {}: `train: ../train/images` does not exist; using {}", yaml.display(), dir.path().join("train/images").display());
    assert!(err.lines().any(|l| l.starts_with(&note)), "{err}");

    // val: polygons read as boxes and counted, the duplicate and the
    // directory label skipped with warnings, nothing aborts
    let out = run(&["val", "--json"], &yaml, &cache);
    let v = ok_json(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(v["segments_converted"], 2, "{v}");
    assert_eq!(v["skipped_labels"], 2, "{v}");
    assert_eq!(v["instances"], 2 + 1 + 1, "two polygons, the deduplicated box, the plain box");
    let valid = dir.path().join("valid/labels");
    assert!(err.contains(&format!("warning: {}:2: duplicate of line 1, removed; line skipped", valid.join("valid1_png.rf.0123456789abcdef.txt").display())), "{err}");
    assert!(err.contains(&format!("warning: {}: it is a directory, not a label file; label file skipped", valid.join("valid2_jpg.rf.0123456789abcdef.txt").display())), "{err}");
    assert!(err.contains("val: 4 images, 4 label files: 2 polygon labels converted to boxes, 1 duplicate label removed, 1 unreadable label file skipped"), "{err}");

    // at N = 24 val reads the cache as it is: it needs no temporary directory
    // (below N = 24 the tail's outputs go to one), so an unusable TMPDIR is no error
    let out = Command::new(common::bin())
        .args(["val", "--json", "--engine", "tract", "--weights"])
        .arg(common::root().join(MODEL))
        .arg("--data")
        .arg(&yaml)
        .arg("--cache-dir")
        .arg(&cache)
        .env("TMPDIR", dir.path().join("no-such-tmp"))
        .output()
        .unwrap();
    assert_eq!(ok_json(&out)["instances"], 4);
    // below N = 24 it needs one, and says where it tried and what to do (a
    // model with numbered layers, whose COCO names include the yaml's)
    let coco_yaml = dir.path().join("data-coco-names.yaml");
    std::fs::write(&coco_yaml, std::fs::read_to_string(&yaml).unwrap().replace("['circle', 'square', 'triangle']", "['person', 'bicycle', 'car']")).unwrap();
    let out = Command::new(common::bin())
        .args(["val", "--json", "--engine", "tract", "--freeze", "17", "--weights"])
        .arg(common::root().join("models/tiny-320-op17.onnx"))
        .arg("--data")
        .arg(&coco_yaml)
        .arg("--cache-dir")
        .arg(&cache)
        .env("TMPDIR", dir.path().join("no-such-tmp"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let want = format!("error: cannot create a temporary directory for the tail's outputs on the val images in {}; set TMPDIR to a writable directory", dir.path().join("no-such-tmp").display());
    assert!(err.lines().any(|l| l.starts_with(&want)), "{err}");

    // the test split has images but no labels: refused, naming where labels were looked for
    let out = run(&["val", "--json", "--split", "test"], &yaml, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let want = format!("error: no labels found in {}: expected labels/… next to images/…", dir.path().join("test/labels").display());
    assert!(err.lines().last().unwrap().starts_with(&want), "{err}");

    // a split name that is not there lists those that are
    let out = run(&["val", "--split", "valid"], &yaml, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().last().unwrap(), format!("error: {} has no `valid` split; the splits it defines: test, train, val", yaml.display()));
}

/// Training prints each label problem once, not once per validation, and
/// refuses a train split without labels before any caching.
#[test]
fn train_warns_once_and_refuses_a_split_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = roboflow(dir.path());
    let train = |yaml: &Path| {
        Command::new(common::bin())
            .args(["train", "--engine", "tract", "--epochs", "2", "--batch-size", "4", "--weights"])
            .arg(common::root().join(MODEL))
            .arg("--data")
            .arg(yaml)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--project")
            .arg(dir.path().join("runs"))
            .output()
            .unwrap()
    };
    let out = train(&yaml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("duplicate of line 1, removed").count(), 1, "{err}");
    assert!(err.contains("val: 4 images, 4 label files: 2 polygon labels converted to boxes"), "{err}");

    std::fs::remove_dir_all(dir.path().join("train/labels")).unwrap();
    let out = train(&yaml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let want = format!("error: no labels found in {}: expected labels/… next to images/…", dir.path().join("train/labels").display());
    assert!(err.lines().last().unwrap().starts_with(&want), "{err}");
}

#[cfg(unix)]
#[test]
fn a_fifo_and_a_symlink_loop_among_the_images_neither_hang_nor_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = roboflow(dir.path());
    let imgs = dir.path().join("train/images");
    std::os::unix::fs::symlink(&imgs, imgs.join("loop")).unwrap();
    let fifo = imgs.join("camera.jpg");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // today's code blocks on the FIFO forever; a hang fails the test by timeout
    let (tx, rx) = std::sync::mpsc::channel();
    let (y, c) = (yaml.clone(), dir.path().join("cache"));
    std::thread::spawn(move || tx.send(run(&["cache", "--json", "--split", "train"], &y, &c)).unwrap());
    let Ok(out) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
        // let the blocked reader go (a writer opening without blocking), then fail
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new().write(true).custom_flags(0o4000).open(&fifo); // O_NONBLOCK on Linux
        panic!("cache hung on the FIFO {}", fifo.display());
    };
    let v = ok_json(&out);
    assert_eq!(v["splits"]["train"]["images"], 4, "each image once: {v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("warning: skipping {}: it is a FIFO, not a regular file", fifo.display())), "{err}");
}

/// `val` on a split that is not cached yet shows a bar for the caching and
/// one for the validation (run in a pseudo-terminal: bars draw on terminals only).
#[test]
fn val_shows_a_progress_bar() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed; it gives the command a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let yaml = roboflow(dir.path());
    let cmd = format!(
        "{} val --engine tract --weights {} --data {} --cache-dir {}",
        common::bin().display(),
        common::root().join(MODEL).display(),
        yaml.display(),
        dir.path().join("cache").display()
    );
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("caching features"), "{tty}");
    assert!(tty.contains("validating ["), "no validation bar: {tty}");
    assert!(tty.contains("mAP50-95"), "{tty}");
}
