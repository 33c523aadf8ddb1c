//! Bad input and shared use, as users meet them: a PyTorch checkpoint given
//! as `--weights`, `--imgsz` and thresholds out of range, a damaged graph, a
//! cache entry truncated under a running validation, orphaned temporary
//! files next to a live writer's, and file modes under a umask. Every bad
//! input must end as one `error: ...` line and exit status 1, never a panic.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use freezesplit::cache::{FeatureCache, build};
use freezesplit::engine::{Engine, EngineChoice, EngineOptions};
use freezesplit::graph::Model;
use freezesplit::head::Head;

const MODEL: &str = "models/tiny-256-nc3-stripped.onnx";
const DYNAMIC: &str = "models/tiny-dyn-op17.onnx";

/// `n` train and `n` val images (fixtures with distinct trailing bytes), one
/// labelled box each, classes circle/square/triangle.
fn dataset(dir: &Path, n: usize) -> PathBuf {
    let srcs = ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg"];
    for split in ["train", "val"] {
        let (img_dir, lbl_dir) = (dir.join("images").join(split), dir.join("labels").join(split));
        std::fs::create_dir_all(&img_dir).unwrap();
        std::fs::create_dir_all(&lbl_dir).unwrap();
        for i in 0..n {
            let src = srcs[i % srcs.len()];
            let mut bytes = std::fs::read(common::fixture(&format!("letterbox/src/{src}"))).unwrap();
            bytes.extend_from_slice(format!("{split}{i}").as_bytes());
            let ext = Path::new(src).extension().unwrap().to_str().unwrap();
            std::fs::write(img_dir.join(format!("im{i}.{ext}")), bytes).unwrap();
            std::fs::write(lbl_dir.join(format!("im{i}.txt")), format!("{} 0.4 0.5 0.3 0.4\n", i % 3)).unwrap();
        }
    }
    let yaml = dir.join("data.yaml");
    std::fs::write(&yaml, "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: circle\n  1: square\n  2: triangle\n").unwrap();
    yaml
}

fn run(args: &[&str]) -> Output {
    Command::new(common::bin()).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A failure as the project promises it: status 1, one `error: ` line that
/// contains every one of `parts`.
fn assert_error(out: &Output, parts: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1 (not a panic): {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    for p in parts {
        assert!(line.contains(p), "`{p}` not in: {line}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_pytorch_checkpoint_is_refused_with_the_export_command_in_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 1);
    let pt = dir.path().join("yolov5s.pt");
    // torch.save writes a zip archive
    std::fs::write(&pt, b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl").unwrap();
    let mut checkpoints = vec![pt.clone(), dir.path().join("missing.pt")];
    if let Some(shared) = common::shared("the real yolov5n.pt") {
        checkpoints.push(shared.join("models/yolov5n.pt"));
    }
    let img = dir.path().join("images/val/im0.jpg");
    let cache = dir.path().join("cache");
    for p in &checkpoints {
        let w = s(p);
        let commands: Vec<Vec<&str>> = vec![
            vec!["inspect", w],
            vec!["cache", "--weights", w, "--data", s(&yaml), "--cache-dir", s(&cache)],
            vec!["train", "--weights", w, "--data", s(&yaml), "--cache-dir", s(&cache), "--project", s(dir.path())],
            vec!["val", "--weights", w, "--data", s(&yaml), "--cache-dir", s(&cache)],
            vec!["export", "--weights", w],
            vec!["predict", "--weights", w, s(&img), "--project", s(dir.path())],
        ];
        for c in commands {
            let out = run(&c);
            assert_error(&out, &[w, "reads ONNX", &format!("python export.py --weights {w} --include onnx")]);
        }
    }
}

#[test]
fn imgsz_is_rounded_up_to_the_stride_with_a_warning_and_refused_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 1);
    let cache = dir.path().join("cache");
    let model = common::root().join(DYNAMIC);
    let cache_at = |imgsz: &str, engine: &str| run(&["cache", "--engine", engine, "--split", "val", "--json", "--weights", s(&model), "--data", s(&yaml), "--cache-dir", s(&cache), "--imgsz", imgsz]);
    let out = cache_at("100", "tract");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: --imgsz 100 must be a multiple of the max stride 32, updating to 128"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["imgsz"], 128);
    // 0 used to reach the ONNX Runtime fill (a zero chunk size panicked)
    let mut engines = vec!["tract"];
    if freezesplit::engine::ort_engine::find_library(None).is_some() {
        engines.push("ort");
    }
    for engine in engines {
        for bad in ["0", "8193", "100000"] {
            assert_error(&cache_at(bad, engine), &[&format!("--imgsz {bad} is out of range"), "8192"]);
        }
    }
    let out = run(&["predict", "--engine", "tract", "--imgsz", "0", "--weights", s(&model), s(&dir.path().join("images/val/im0.jpg")), "--project", s(dir.path())]);
    assert_error(&out, &["--imgsz 0 is out of range"]);
    // the library refuses it too
    let m = Model::load(&model).unwrap();
    let e = FeatureCache::open(&cache, &m, 0).err().expect("imgsz 0 accepted");
    assert!(format!("{e:#}").contains("image size 0"), "{e:#}");
}

#[test]
fn thresholds_outside_0_1_or_nan_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 1);
    let model = common::root().join(MODEL);
    let img = dir.path().join("images/val/im0.jpg");
    let cache = dir.path().join("cache");
    for (flag, v) in [("--conf-thres", "1.5"), ("--conf-thres", "-0.1"), ("--conf-thres", "NaN"), ("--iou-thres", "2"), ("--iou-thres", "nan")] {
        let arg = format!("{flag}={v}");
        let out = run(&["val", "--engine", "tract", "--weights", s(&model), "--data", s(&yaml), "--cache-dir", s(&cache), &arg]);
        assert_error(&out, &[flag, "out of range", "0 to 1"]);
        let out = run(&["predict", "--engine", "tract", "--weights", s(&model), s(&img), "--project", s(dir.path()), &arg]);
        assert_error(&out, &[flag, "out of range"]);
    }
}

/// The model with its graph changed by `edit`, saved in `dir`.
fn edited_model(dir: &Path, name: &str, edit: impl FnOnce(&mut freezesplit::graph::onnx::pb::GraphProto, &Model)) -> PathBuf {
    let src = common::root().join(MODEL);
    let m = Model::load(&src).unwrap();
    let mut proto = freezesplit::graph::onnx::load_model(&src).unwrap();
    edit(proto.graph.as_mut().unwrap(), &m);
    let p = dir.join(name);
    std::fs::write(&p, freezesplit::graph::onnx::encode_model(&proto)).unwrap();
    p
}

#[test]
fn a_head_conv_reading_a_missing_tensor_is_an_error_naming_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 1);
    let bad = edited_model(dir.path(), "dangling.onnx", |g, m| {
        let conv = g.node.iter_mut().find(|n| n.op_type == "Conv" && n.name == m.spec.levels[1].conv_node && n.input[1] == m.spec.levels[1].weight).unwrap();
        conv.input[0] = "no_such_tensor".into();
    });
    let out = run(&["cache", "--engine", "tract", "--weights", s(&bad), "--data", s(&yaml), "--cache-dir", s(&dir.path().join("cache"))]);
    assert_error(&out, &[s(&bad), "no_such_tensor"]);
    assert_error(&run(&["inspect", s(&bad)]), &[s(&bad), "no_such_tensor"]);
    // the same damage deeper in the backbone
    let bad2 = edited_model(dir.path(), "dangling2.onnx", |g, _| {
        let n = g.node.iter_mut().find(|n| n.op_type == "Mul").unwrap();
        n.input[0] = "lost".into();
    });
    assert_error(&run(&["cache", "--engine", "tract", "--weights", s(&bad2), "--data", s(&yaml), "--cache-dir", s(&dir.path().join("cache"))]), &[s(&bad2), "lost"]);
}

#[test]
fn an_engine_error_names_the_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 1);
    // a backbone weight whose data does not fit its shape: the graph is
    // structurally fine, only an engine finds out
    let bad = edited_model(dir.path(), "badweight.onnx", |g, _| {
        let first_conv_w = g.node.iter().find(|n| n.op_type == "Conv").unwrap().input[1].clone();
        let t = g.initializer.iter_mut().find(|t| t.name == first_conv_w).unwrap();
        t.dims[0] += 1;
    });
    let out = run(&["cache", "--engine", "tract", "--weights", s(&bad), "--data", s(&yaml), "--cache-dir", s(&dir.path().join("cache"))]);
    assert_error(&out, &[s(&bad), "engine"]);
}

/// Fills a cache for the val split with the library, as `val` does.
fn filled_cache(dir: &Path, n: usize) -> (FeatureCache, Vec<PathBuf>, Head) {
    let yaml = dataset(dir, n);
    let model = Model::load(&common::root().join(MODEL)).unwrap();
    let images = freezesplit::data::Dataset::load(&yaml).unwrap().images("val").unwrap();
    let (cache, frozen) = FeatureCache::open(&dir.join("cache"), &model, 256).unwrap();
    let opts = EngineOptions { engine: EngineChoice::Tract, threads: 2, ..Default::default() };
    let mut engines = Engine::for_fill(&model.path, &frozen, 256, &opts).unwrap();
    build::fill(&cache, &mut engines, &images, &build::FillOptions { batch_size: 2, dtype: freezesplit::cache::Dtype::F16, progress: false }).unwrap();
    (cache, images, Head::from_model(&model).unwrap())
}

#[test]
fn an_entry_truncated_by_another_process_during_validation_is_an_error_not_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, images, head) = filled_cache(dir.path(), 3);
    let opts = freezesplit::val::ValOptions::default();
    // what the trainer does: find the entries once, validate every epoch
    let (items, skipped) = freezesplit::val::cached_items(&cache, &images, opts.dtype);
    assert!(skipped.is_empty() && items.len() == 3);
    freezesplit::val::validate_items(&head, &items, &opts).unwrap();
    // another process truncates an entry in place (same inode)
    let victim = &items[1].entry;
    std::fs::OpenOptions::new().write(true).open(victim).unwrap().set_len(4096).unwrap();
    let e = freezesplit::val::validate_items(&head, &items, &opts).expect_err("a truncated entry was read");
    let msg = format!("{e:#}");
    assert!(msg.contains(victim.to_str().unwrap()) && msg.contains("damaged"), "{msg}");
}

/// A `.tmp-*` file in `dir`, last modified an hour ago.
fn old_tmp(dir: &Path, name: &str) -> (PathBuf, std::fs::File) {
    let p = dir.join(format!(".tmp-{name}"));
    let f = std::fs::File::create(&p).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
    (p, f)
}

#[test]
fn a_fill_removes_orphaned_temporary_files_but_not_a_live_writers() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _, _) = filled_cache(dir.path(), 1);
    let shard = std::fs::read_dir(cache.dir.join("f16")).unwrap().flatten().next().unwrap().path();
    let (orphan, f) = old_tmp(&shard, "killed");
    drop(f);
    let (top_orphan, f) = old_tmp(&cache.dir, "killed-too");
    drop(f);
    // a writer in another process holds its file locked while it writes
    let (live, _) = old_tmp(&shard, "running");
    let mut writer = Command::new("flock").arg(&live).args(["sleep", "60"]).spawn().expect("flock(1) runs");
    let start = std::time::Instant::now();
    while std::fs::File::open(&live).unwrap().try_lock().is_ok() {
        assert!(start.elapsed() < Duration::from_secs(20), "flock(1) did not take the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    // a file this young may be a writer that has not taken its lock yet
    let young = shard.join(".tmp-just-created");
    std::fs::write(&young, b"").unwrap();

    let yaml = dir.path().join("data.yaml");
    let out = run(&["cache", "--engine", "tract", "--split", "val", "--weights", s(&common::root().join(MODEL)), "--data", s(&yaml), "--cache-dir", s(&dir.path().join("cache"))]);
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!orphan.exists() && !top_orphan.exists(), "orphans were left");
    assert!(live.exists(), "a live writer's file was removed");
    assert!(young.exists(), "a fresh temporary file was removed");
}

#[cfg(unix)]
#[test]
fn files_follow_the_umask_so_a_shared_cache_and_run_work() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), 2);
    let model = common::root().join(MODEL);
    let mode = |p: &Path| std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777;
    for (umask, want) in [("022", 0o644), ("002", 0o664)] {
        let root = dir.path().join(umask);
        let (cache, runs, out_onnx) = (root.join("cache"), root.join("runs"), root.join("out.onnx"));
        let train = ["train", "--engine", "tract", "--epochs", "1", "--batch-size", "2", "--weights", s(&model), "--data", s(&yaml), "--cache-dir", s(&cache), "--project", s(&runs), "--name", "exp"];
        let run = runs.join("exp");
        let export = ["export", "--weights", s(&run), "--out", s(&out_onnx)];
        for args in [&train[..], &export[..]] {
            let out = Command::new("sh").arg("-c").arg(format!("umask {umask} && exec \"$0\" \"$@\"")).arg(common::bin()).args(args).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let graph = std::fs::read_dir(root.join("cache")).unwrap().flatten().next().unwrap().path();
        let shard = std::fs::read_dir(graph.join("f16")).unwrap().flatten().next().unwrap().path();
        let entry = std::fs::read_dir(&shard).unwrap().flatten().next().unwrap().path();
        for p in [entry, graph.join("cache.json"), graph.join("frozen.onnx"), run.join("results.csv"), run.join("weights/best.safetensors"), run.join("weights/last.json"), root.join("out.onnx")] {
            assert_eq!(mode(&p), want, "{} under umask {umask}: {:o}", p.display(), mode(&p));
        }
    }
}
