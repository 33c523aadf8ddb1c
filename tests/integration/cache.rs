//! The feature cache through the command line, as a user meets it: counts of
//! computed / cached / skipped, a rerun that computes nothing, bad images
//! skipped and named, kill -9 in the middle, and two processes at once.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use freezesplit::cache::{Entry, FeatureCache};

/// A dataset of `n` distinct images (fixture JPEGs/PNGs with a varying
/// trailing byte, which decoders ignore and the content hash does not), plus
/// a zero-byte, a truncated and a non-image file in the train split.
fn dataset(dir: &Path, n: usize) -> PathBuf {
    let img_dir = dir.join("images/train");
    std::fs::create_dir_all(&img_dir).unwrap();
    std::fs::create_dir_all(dir.join("labels/train")).unwrap();
    let srcs = ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg", "f_ceil_up.jpg"];
    for i in 0..n {
        let src = srcs[i % srcs.len()];
        let mut bytes = std::fs::read(common::fixture(&format!("letterbox/src/{src}"))).unwrap();
        bytes.extend_from_slice(format!("{i:08}").as_bytes());
        let ext = Path::new(src).extension().unwrap().to_str().unwrap();
        std::fs::write(img_dir.join(format!("img{i:03}.{ext}")), bytes).unwrap();
    }
    std::fs::write(img_dir.join("zero.jpg"), b"").unwrap();
    let jpg = std::fs::read(common::fixture("letterbox/src/a_landscape.jpg")).unwrap();
    std::fs::write(img_dir.join("truncated.jpg"), &jpg[..jpg.len() / 4]).unwrap();
    std::fs::write(img_dir.join("notes.png"), b"this is text, not a png").unwrap();
    let yaml = dir.join("data.yaml");
    std::fs::write(&yaml, "path: .\ntrain: images/train\nval: images/train\nnames:\n  0: circle\n  1: square\n  2: triangle\n").unwrap();
    yaml
}

fn cache_cmd(yaml: &Path, cache_dir: &Path) -> Command {
    let mut c = Command::new(common::bin());
    c.args(["cache", "--engine", "tract", "--split", "train", "--batch-size", "2", "--json", "--weights"])
        .arg(common::root().join("models/tiny-256-nc3-stripped.onnx"))
        .arg("--data")
        .arg(yaml)
        .arg("--cache-dir")
        .arg(cache_dir);
    c
}

fn counts(out: &Output) -> (u64, u64, u64) {
    assert!(out.status.success(), "cache failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["splits"]["train"];
    (t["computed"].as_u64().unwrap(), t["cached"].as_u64().unwrap(), t["skipped"].as_u64().unwrap())
}

/// Every entry file under the cache opens and verifies; returns how many.
fn verify_all(cache_root: &Path) -> usize {
    let mut n = 0;
    for graph in std::fs::read_dir(cache_root).unwrap().flatten() {
        if !graph.path().join("cache.json").exists() {
            continue; // killed before the cache was initialised
        }
        let cache = FeatureCache::open_dir(&graph.path()).unwrap();
        for shard in std::fs::read_dir(cache.dir.join("f16")).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "feat") {
                    Entry::open(&p).unwrap_or_else(|e| panic!("{e:#}"));
                    n += 1;
                }
            }
        }
    }
    n
}

#[test]
fn rerun_computes_nothing_and_bad_images_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 6);
    let cache_dir = dir.path().join("cache");
    let out = cache_cmd(&yaml, &cache_dir).output().unwrap();
    assert_eq!(counts(&out), (6, 0, 3));
    let err = String::from_utf8_lossy(&out.stderr);
    for bad in ["zero.jpg", "truncated.jpg", "notes.png"] {
        assert!(err.lines().any(|l| l.starts_with("warning: skipping") && l.contains(bad)), "no warning naming {bad}: {err}");
    }
    assert_eq!(counts(&cache_cmd(&yaml, &cache_dir).output().unwrap()), (0, 6, 3));
    assert_eq!(verify_all(&cache_dir), 6);

    // a damaged entry is detected on read and recomputed
    let graph_dir = std::fs::read_dir(&cache_dir).unwrap().flatten().next().unwrap().path();
    let shard = std::fs::read_dir(graph_dir.join("f16")).unwrap().flatten().next().unwrap().path();
    let entry = std::fs::read_dir(shard).unwrap().flatten().next().unwrap().path();
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&entry, bytes).unwrap();
    assert_eq!(counts(&cache_cmd(&yaml, &cache_dir).output().unwrap()), (1, 5, 3));

    // the plain-text report says when nothing is new
    let mut c = cache_cmd(&yaml, &cache_dir);
    let args: Vec<_> = c.get_args().filter(|a| *a != "--json").map(|a| a.to_owned()).collect();
    let out = Command::new(common::bin()).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 computed, 6 already cached, 3 skipped"), "{text}");
    assert!(text.contains("nothing new to compute"), "{text}");
    let _ = c.output();
}

#[test]
fn kill_9_then_rerun_completes_without_damage() {
    let dir = tempfile::tempdir().unwrap();
    let n = 40;
    let yaml = dataset(dir.path(), n);
    let cache_dir = dir.path().join("cache");
    for round in 0..3 {
        let mut child = cache_cmd(&yaml, &cache_dir).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        // let it write some entries, then kill it without warning
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
            if cache_dir.exists() && verify_all(&cache_dir) > round * 5 + 3 {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        verify_all(&cache_dir);
    }
    let before = verify_all(&cache_dir);
    let (computed, cached, skipped) = counts(&cache_cmd(&yaml, &cache_dir).output().unwrap());
    assert_eq!(cached as usize, before, "finished entries must not be recomputed");
    assert_eq!((computed + cached) as usize, n);
    assert_eq!(skipped, 3);
    assert_eq!(verify_all(&cache_dir), n);
}

#[test]
fn two_processes_on_one_cache_both_finish() {
    let dir = tempfile::tempdir().unwrap();
    let n = 16;
    let yaml = dataset(dir.path(), n);
    let cache_dir = dir.path().join("cache");
    let a = cache_cmd(&yaml, &cache_dir).spawn_output();
    let b = cache_cmd(&yaml, &cache_dir).spawn_output();
    let (ca, cb) = (counts(&a.join().unwrap()), counts(&b.join().unwrap()));
    assert_eq!((ca.0 + ca.1) as usize, n);
    assert_eq!((cb.0 + cb.1) as usize, n);
    assert_eq!(verify_all(&cache_dir), n);
    assert_eq!(counts(&cache_cmd(&yaml, &cache_dir).output().unwrap()), (0, n as u64, 3));
}

trait SpawnOutput {
    fn spawn_output(self) -> std::thread::JoinHandle<Output>;
}

impl SpawnOutput for Command {
    fn spawn_output(mut self) -> std::thread::JoinHandle<Output> {
        std::thread::spawn(move || self.output().unwrap())
    }
}

#[test]
fn cuda_that_cannot_register_fails_clearly_and_auto_says_it_falls_back() {
    if freezesplit::engine::ort_engine::find_library(None).is_none() {
        eprintln!("skipped: ONNX Runtime library not found (CI installs it into .venv)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 2);
    let run = |device: &str| {
        let mut c = Command::new(common::bin());
        c.args(["cache", "--engine", "ort", "--device", device, "--split", "train", "--json", "--weights"])
            .arg(common::root().join("models/tiny-256-nc3-stripped.onnx"))
            .arg("--data")
            .arg(&yaml)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"));
        c.output().unwrap()
    };
    let cuda = run("cuda");
    let err = String::from_utf8_lossy(&cuda.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if cuda.status.success() {
        eprintln!("note: CUDA works here; only the fallback wording is not checked");
        return;
    }
    // never a silent CPU run: a non-zero exit that says what to do
    assert!(err.contains("the CUDA execution provider could not be registered on cuda:0") && err.contains("--device cpu"), "{err}");
    let auto = run("auto");
    let err = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "{err}");
    assert!(err.contains("--device auto: CUDA is not available") && err.contains("running ONNX Runtime on the CPU"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&auto.stdout).unwrap();
    assert_eq!(v["engine"], "ort (cpu)");
}

#[test]
fn cache_freeze_12_holds_the_four_crossing_tensors_with_both_engines_and_dtypes() {
    use freezesplit::cache::{Dtype, image_key};
    use freezesplit::engine::{Engine, EngineChoice, EngineOptions};
    use freezesplit::graph::Model;

    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 2);
    let weights = common::root().join("models/tiny-320-op17.onnx");
    let model = Model::load(&weights).unwrap();
    let imgsz = 320;
    let run = |engine: &str, dtype: &str, freeze: usize, cache_dir: &Path| -> serde_json::Value {
        let out = Command::new(common::bin())
            .args(["cache", "--engine", engine, "--dtype", dtype, "--freeze", &freeze.to_string(), "--split", "train", "--json", "--weights"])
            .arg(&weights)
            .arg("--data")
            .arg(&yaml)
            .arg("--cache-dir")
            .arg(cache_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "cache --freeze {freeze} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // at 12: layer 11's upsample, 10 (into 22), 6 (into 12) and 4 (into 16),
    // of four different shapes
    let cut = model.cut(12).unwrap();
    let shapes: Vec<[usize; 3]> = (0..cut.crossing.len()).map(|i| cut.shape(i, imgsz)).collect();
    assert_eq!(cut.crossing.iter().map(|c| c.layer.unwrap()).collect::<Vec<_>>(), [4, 6, 10, 11]);
    assert_eq!(shapes, [[32, 40, 40], [64, 20, 20], [64, 10, 10], [64, 20, 20]]);
    let mut reference = Engine::new(&model.frozen_bytes_at(&cut).unwrap(), imgsz, &EngineOptions { engine: EngineChoice::Tract, ..Default::default() }).unwrap();
    let images = [dir.path().join("images/train/img000.jpg"), dir.path().join("images/train/img001.png")];
    let want: Vec<Vec<ndarray::ArrayD<f32>>> = images
        .iter()
        .map(|p| {
            let lb = freezesplit::preprocess::letterbox(&freezesplit::preprocess::decode(p).unwrap(), imgsz);
            let mut input = ndarray::Array4::<f32>::zeros((1, 3, imgsz, imgsz));
            lb.write_chw(input.as_slice_mut().unwrap());
            reference.run(input.view()).unwrap()
        })
        .collect();

    for opts in common::engines() {
        let engine = if opts.engine == EngineChoice::Ort { "ort" } else { "tract" };
        for dtype in [Dtype::F16, Dtype::F32] {
            let cache_dir = dir.path().join(format!("cache-{engine}-{}", dtype.name()));
            let v = run(engine, dtype.name(), 12, &cache_dir);
            assert_eq!(v["freeze"], 12);
            assert_eq!((v["splits"]["train"]["computed"].as_u64(), v["splits"]["train"]["skipped"].as_u64()), (Some(2), Some(3)));
            let cache = FeatureCache::open_dir(Path::new(v["cache"].as_str().unwrap())).unwrap();
            assert_eq!(cache.info.freeze, 12);
            assert_eq!(cache.info.levels.iter().map(|l| l.tensor.as_str()).collect::<Vec<_>>(), cut.crossing.iter().map(|c| c.name.as_str()).collect::<Vec<_>>());
            for (img, want) in images.iter().zip(&want) {
                let entry = cache.get(&image_key(&std::fs::read(img).unwrap()), dtype).expect("cached");
                assert_eq!(entry.header.shapes, shapes);
                for (i, w) in want.iter().enumerate() {
                    let got = entry.level(i);
                    let w = w.view().into_shape_with_order(got.dim()).unwrap();
                    let tol = |x: f32| if dtype == Dtype::F32 { 1e-4 } else { 1e-3 * x.abs().max(1.0) };
                    let bad = got.iter().zip(w.iter()).filter(|(g, w)| (*g - *w).abs() > tol(**w)).count();
                    assert_eq!(bad, 0, "{engine} {}: tensor {i} of {} differs", dtype.name(), img.display());
                }
            }
        }
    }

    // the default --freeze 24 never reuses them: its own directory, under
    // the key such caches always had
    let cache_dir = dir.path().join("cache-tract-f16");
    let v = run("tract", "f16", 24, &cache_dir);
    assert_eq!(v["splits"]["train"]["computed"], 2);
    assert!(v["cache"].as_str().unwrap().ends_with("b1e5ec66b1d8ab581fc6c06b"), "{v}");
    assert_eq!(FeatureCache::open_dir(Path::new(v["cache"].as_str().unwrap())).unwrap().info.levels.len(), 3);
    assert_eq!(verify_all(&cache_dir), 4);
}
