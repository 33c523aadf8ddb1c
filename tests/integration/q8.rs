//! `--dtype q8` through the command line: its entries verify, take about half
//! of f16's bytes and hold f16's values within half a quantisation step; a
//! damaged, misplaced or torn one is recomputed; f16 and q8 never stand in for
//! each other; and a short training run on q8 ends close to the same run on f16.

use crate::common;
use crate::train::{dataset, ok, train};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use freezesplit::cache::{Dtype, Entry};
use freezesplit::features::FeatSlice;

fn cache_cmd(yaml: &Path, cache_dir: &Path, dtype: &str) -> Command {
    let mut c = Command::new(common::bin());
    c.args(["cache", "--engine", "tract", "--batch-size", "2", "--json", "--dtype", dtype, "--weights"])
        .arg(common::root().join(crate::train::MODEL))
        .arg("--data")
        .arg(yaml)
        .arg("--cache-dir")
        .arg(cache_dir);
    c
}

/// (computed, cached) over the train and val splits.
fn counts(out: &Output) -> (u64, u64) {
    assert!(out.status.success(), "cache failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sum = |k: &str| ["train", "val"].iter().map(|s| v["splits"][s][k].as_u64().unwrap()).sum();
    (sum("computed"), sum("cached"))
}

/// The `.feat` files of `dtype` under the one graph directory of `root`, sorted.
fn entries(root: &Path, dtype: Dtype) -> Vec<PathBuf> {
    let graph = std::fs::read_dir(root).unwrap().flatten().next().unwrap().path();
    let mut v: Vec<PathBuf> = std::fs::read_dir(graph.join(dtype.name()))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|shard| std::fs::read_dir(shard.path()).unwrap().flatten().map(|f| f.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "feat"))
        .collect();
    v.sort();
    v
}

#[test]
fn q8_entries_are_half_of_f16s_close_to_them_and_never_stand_in_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let root = dir.path().join("cache");
    assert_eq!(counts(&cache_cmd(&yaml, &root, "f16").output().unwrap()), (12, 0));
    // the f16 entries are in the cache: q8 computes every image all the same
    assert_eq!(counts(&cache_cmd(&yaml, &root, "q8").output().unwrap()), (12, 0));
    assert_eq!(counts(&cache_cmd(&yaml, &root, "q8").output().unwrap()), (0, 12));
    let (f16s, q8s) = (entries(&root, Dtype::F16), entries(&root, Dtype::Q8));
    assert_eq!((f16s.len(), q8s.len()), (12, 12));
    for (h, q) in f16s.iter().zip(&q8s) {
        assert_eq!(h.file_name(), q.file_name(), "one entry per image and dtype");
        let (eh, eq) = (Entry::open(h).unwrap(), Entry::open(q).unwrap());
        assert_eq!(eq.header.dtype, Dtype::Q8);
        assert_eq!(eq.header.shapes, eh.header.shapes);
        assert!((eq.bytes() as f64) < 0.52 * eh.bytes() as f64, "q8 {} bytes, f16 {}", eq.bytes(), eh.bytes());
        for i in 0..eh.header.shapes.len() {
            let FeatSlice::Q8(raw) = eq.level_raw(i) else { panic!("a q8 entry lends q8") };
            let sp = raw.sp();
            let (a, b) = (eh.level(i), eq.level(i));
            for (k, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                // half a step, and f16's own rounding of the engine's value
                let bound = raw.scale[k / sp] * 0.5 * 1.01 + x.abs() * 1e-3 + 1e-5;
                assert!((x - y).abs() <= bound, "{} level {i} value {k}: f16 {x}, q8 {y}", q.display());
            }
        }
    }

    // a damaged q8 entry is recomputed
    let mut bytes = std::fs::read(&q8s[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&q8s[0], bytes).unwrap();
    assert_eq!(counts(&cache_cmd(&yaml, &root, "q8").output().unwrap()), (1, 11));
    // an f16 entry put where a q8 one belongs is intact but of the wrong dtype
    std::fs::copy(&f16s[1], &q8s[1]).unwrap();
    let out = cache_cmd(&yaml, &root, "q8").output().unwrap();
    assert_eq!(counts(&out), (1, 11));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds f16 features in the q8 directory"), "{err}");
    assert_eq!(Entry::open(&q8s[1]).unwrap().header.dtype, Dtype::Q8);
    // and the f16 entries are untouched by all of it
    assert_eq!(counts(&cache_cmd(&yaml, &root, "f16").output().unwrap()), (0, 12));
}

#[test]
fn kill_9_during_a_q8_fill_leaves_no_torn_entry() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let root = dir.path().join("cache");
    let mut child = cache_cmd(&yaml, &root, "q8").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // kill it as soon as the first entry is in place
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) && child.try_wait().unwrap().is_none() {
        if root.exists() && std::fs::read_dir(&root).unwrap().next().is_some() && !entries(&root, Dtype::Q8).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    let before = if root.exists() && std::fs::read_dir(&root).unwrap().next().is_some() { entries(&root, Dtype::Q8) } else { vec![] };
    for p in &before {
        Entry::open(p).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let (computed, cached) = counts(&cache_cmd(&yaml, &root, "q8").output().unwrap());
    assert_eq!(cached as usize, before.len(), "finished entries must not be recomputed");
    assert_eq!(computed + cached, 12);
    for p in entries(&root, Dtype::Q8) {
        Entry::open(&p).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

fn csv_rows(run: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(run.join("results.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(|v| v.trim().parse().unwrap()).collect()).collect()
}

#[test]
fn training_on_q8_ends_close_to_training_on_f16() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    ok(&train(dir.path(), &yaml, "f16", &["--dtype", "f16"]));
    ok(&train(dir.path(), &yaml, "q8", &["--dtype", "q8"]));
    assert_eq!(entries(&dir.path().join("cache"), Dtype::Q8).len(), 12, "the q8 run cached its own entries");
    let (a, b) = (csv_rows(&dir.path().join("runs/f16")), csv_rows(&dir.path().join("runs/q8")));
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b, "q8 features are not f16's: some figure must move");
    for (ra, rb) in a.iter().zip(&b) {
        // columns 1-3 and 8-10: train and val box, obj, cls losses. q8 moves
        // them by about 1e-5 relative here (the test model's mAP stays 0, so
        // the losses are what can tell)
        for c in [1, 2, 3, 8, 9, 10] {
            assert!((ra[c] - rb[c]).abs() <= 1e-3 * ra[c].abs() + 1e-6, "epoch {} column {c}: f16 {} q8 {}", ra[0], ra[c], rb[c]);
        }
    }
}
