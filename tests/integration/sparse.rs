//! The sparse path of `--train cls` (train::sparse, val::sparse,
//! cache::sparse) against the dense path on the project's 3-class test model:
//! the same head after 3 epochs with the same seed, the same metrics from
//! sparse validation as from dense validation of the same head (also of a
//! model extended by --add-classes, validated on the dataset's classes),
//! `--add-classes` training sparse as dense, and a sparse cache that rebuilds
//! nothing when class ids change and only the changed image when a box moves.

use crate::common;
use crate::train::{dataset, ok, train};

use std::path::Path;

use freezesplit::cache::FeatureCache;
use freezesplit::cache::build;
use freezesplit::engine::{Engine, EngineChoice, EngineOptions};
use freezesplit::graph::Model;
use freezesplit::head::Head;
use freezesplit::val::{ValOptions, cached_items, validate_items};

const MODEL: &str = "models/tiny-256-nc3-stripped.onnx";

fn last_head(dir: &Path, name: &str) -> Head {
    Head::load(&dir.join("runs").join(name).join("weights/last")).unwrap()
}

fn max_diff(a: &Head, b: &Head) -> f32 {
    let w = a.weights.iter().zip(&b.weights).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()));
    let bi = a.biases.iter().zip(&b.biases).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()));
    w.chain(bi).fold(0f32, f32::max)
}

fn csv(dir: &Path, name: &str) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(dir.join("runs").join(name).join("results.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(|v| v.trim().parse().unwrap()).collect()).collect()
}

#[test]
fn sparse_class_only_training_gives_the_dense_head_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let dense = train(dir.path(), &yaml, "dense", &["--train", "cls", "--dense"]);
    ok(&dense);
    assert!(!String::from_utf8_lossy(&dense.stderr).contains("sparse:"));
    let sparse = train(dir.path(), &yaml, "sparse", &["--train", "cls"]);
    ok(&sparse);
    let err = String::from_utf8_lossy(&sparse.stderr);
    assert!(err.contains("sparse: train") && err.contains("8 of 8 images built now"), "{err}");

    let (hd, hs) = (last_head(dir.path(), "dense"), last_head(dir.path(), "sparse"));
    let d = max_diff(&hd, &hs);
    assert!(d <= 1e-5, "sparse and dense heads differ by {d} after 3 epochs");
    // the class rows did move: the comparison is not of two untouched heads
    let start = Head::from_model(&Model::load(&common::root().join(MODEL)).unwrap()).unwrap();
    assert!(max_diff(&start, &hs) > 1e-4);

    results_agree(dir.path());
}

#[test]
fn the_sparse_cache_rebuilds_only_what_changed_in_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let built = |name: &str| {
        let out = train(dir.path(), &yaml, name, &["--train", "cls"]);
        ok(&out);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let line = err.lines().find(|l| l.starts_with("sparse: train")).unwrap_or_else(|| panic!("no sparse line: {err}")).to_string();
        line.split(" of 8 images built now").next().unwrap().rsplit('(').next().unwrap().split(' ').next_back().unwrap().parse::<usize>().unwrap()
    };
    assert_eq!(built("a"), 8);
    assert_eq!(built("b"), 0);
    // other class ids, same boxes: nothing to rebuild
    let labels = dir.path().join("labels/train");
    for i in 0..8 {
        let p = labels.join(format!("im{i}.txt"));
        let text = std::fs::read_to_string(&p).unwrap();
        let swapped: String = text.lines().map(|l| if l.starts_with('9') { format!("{l}\n") } else { format!("{}{}\n", (l[..1].parse::<usize>().unwrap() + 1) % 3, &l[1..]) }).collect();
        std::fs::write(&p, swapped).unwrap();
    }
    assert_eq!(built("c"), 0);
    // one box moved: one image rebuilt
    let p = labels.join("im3.txt");
    let text = std::fs::read_to_string(&p).unwrap().replacen("0.3 0.4", "0.31 0.4", 1);
    std::fs::write(&p, text).unwrap();
    assert_eq!(built("d"), 1);
}

/// The demo model's cached val split (12 images of its synthetic shapes, so
/// the metrics are not all zero) and its head.
fn demo_split(dir: &Path) -> (Vec<freezesplit::val::ValItem>, Head) {
    let yaml = freezesplit::demo::synth::colour_dataset(dir, 1, 12, 3).unwrap();
    let model = Model::load(&freezesplit::demo::demo_model()).unwrap();
    let images = freezesplit::data::Dataset::load(&yaml).unwrap().labelled_images("val").unwrap();
    let imgsz = model.spec.imgsz.map_or(256, |s| s[0]);
    let (cache, frozen) = FeatureCache::open(&dir.join("cache"), &model, imgsz).unwrap();
    let eopts = EngineOptions { engine: EngineChoice::Tract, threads: 2, ..Default::default() };
    let mut engines = Engine::for_fill(&model.path, &frozen, imgsz, &eopts).unwrap();
    build::fill(&cache, &mut engines, &images, &build::FillOptions { batch_size: 2, dtype: freezesplit::cache::Dtype::F16, progress: false }).unwrap();
    let (items, skipped) = cached_items(&cache, &images, freezesplit::cache::Dtype::F16);
    assert!(skipped.is_empty() && items.len() == 12);
    (items, Head::from_model(&model).unwrap())
}

/// `head0` with its class rows moved as training moves them; box and
/// objectness rows kept.
fn moved_class_rows(head0: &Head) -> Head {
    let mut head = head0.clone();
    let no = head.no();
    for (l, (w, b)) in head.weights.iter_mut().zip(head.biases.iter_mut()).enumerate() {
        for r in (0..w.nrows()).filter(|r| r % no >= 5) {
            w.row_mut(r).iter_mut().enumerate().for_each(|(c, v)| *v += 0.05 * (((r * 7 + c * 3 + l) % 11) as f32 - 5.0) / 5.0);
            b[r] += 0.3 * ((r % 3) as f32 - 1.0);
        }
    }
    head
}

/// Dense and sparse validation of `heads` (the first one the sparse
/// candidates are built from) agree within 1e-6; their mAP50-95s.
fn assert_sparse_equals_dense(items: &[freezesplit::val::ValItem], heads: &[Head]) -> Vec<f64> {
    let opts = ValOptions { losses: false, ..Default::default() };
    let sv = freezesplit::val::sparse::SparseVal::build(&heads[0], items, &opts).unwrap();
    assert!(sv.candidates() > 0);
    let mut maps = Vec::new();
    for h in heads {
        let d = validate_items(h, items, &opts).unwrap().summary;
        let s = sv.validate(h, &opts).summary;
        for (what, x, y) in [("P", d.mp, s.mp), ("R", d.mr, s.mr), ("mAP50", d.map50, s.map50), ("mAP50-95", d.map, s.map), ("class-agnostic mAP50", d.agnostic_map50, s.agnostic_map50), ("class accuracy", d.class_accuracy.accuracy, s.class_accuracy.accuracy)] {
            assert!((x - y).abs() <= 1e-6, "{what}: dense {x} sparse {y}");
        }
        for (a, b) in d.per_class.iter().zip(&s.per_class) {
            assert_eq!(a.class, b.class);
            assert!((a.ap50_95 - b.ap50_95).abs() <= 1e-6 && (a.ap50 - b.ap50).abs() <= 1e-6, "class {}: dense {a:?} sparse {b:?}", a.class);
        }
        maps.push(d.map);
        assert_eq!(d.seen, s.seen);
        assert_eq!(d.class_accuracy.matched, s.class_accuracy.matched);
        assert_eq!(d.per_class.len(), s.per_class.len());
    }
    maps
}

#[test]
fn sparse_validation_equals_dense_validation_of_the_same_head() {
    let dir = tempfile::tempdir().unwrap();
    let (items, head0) = demo_split(dir.path());
    let head = moved_class_rows(&head0);
    let maps = assert_sparse_equals_dense(&items, &[head0, head]);
    // the class rows decide the metrics here, so the comparison is not empty
    assert!(maps[0] > 0.05 && (maps[0] - maps[1]).abs() > 1e-3, "mAP50-95 of the two heads: {maps:?}");
}

#[test]
fn sparse_validation_of_an_extended_model_equals_dense_validation() {
    use freezesplit::val::classes::select_classes;
    use rand::SeedableRng;
    let dir = tempfile::tempdir().unwrap();
    let (items, head0) = demo_split(dir.path());
    // --add-classes: one class appended to the 9; the dataset (3 classes)
    // names model classes 0 and 2 and the new one (as its class 1), so the
    // other 7 are dropped before NMS, as `Run::validate` does
    let ext = freezesplit::train::add_classes::extend_head(&head0, &["star".to_string()], &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
    let ids = [0, head0.nc, 2];
    let trained = moved_class_rows(&ext);
    let maps = assert_sparse_equals_dense(&items, &[select_classes(&ext, &ids), select_classes(&trained, &ids)]);
    assert!(maps[0] > 0.02 && (maps[0] - maps[1]).abs() > 1e-4, "mAP50-95 of the two heads: {maps:?}");
}

#[test]
fn add_classes_trains_sparse_by_default_and_as_dense_does() {
    let dir = tempfile::tempdir().unwrap();
    // the model's classes are circle, square, triangle
    let yaml = dataset(dir.path(), &["Square", "star"]);
    let dense = train(dir.path(), &yaml, "dense", &["--add-classes", "--dense"]);
    ok(&dense);
    assert!(!String::from_utf8_lossy(&dense.stderr).contains("sparse:"));
    let sparse = train(dir.path(), &yaml, "sparse", &["--add-classes"]);
    ok(&sparse);
    assert!(String::from_utf8_lossy(&sparse.stderr).contains("sparse: train"), "{}", String::from_utf8_lossy(&sparse.stderr));
    let (hd, hs) = (last_head(dir.path(), "dense"), last_head(dir.path(), "sparse"));
    assert_eq!(hs.names, vec!["circle", "square", "triangle", "star"]);
    let d = max_diff(&hd, &hs);
    assert!(d <= 1e-5, "sparse and dense extended heads differ by {d} after 3 epochs");
    results_agree(dir.path());
}

#[test]
fn sparse_and_dense_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["circle", "square", "triangle"]);
    let out = train(dir.path(), &yaml, "x", &["--sparse"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sparse trains the class rows only"), "{err}");
    let out = train(dir.path(), &yaml, "y", &["--train", "cls", "--sparse", "--dense"]);
    assert!(!out.status.success());
}

/// The dense and sparse runs' 3-epoch results.csv agree: P, R, mAP50 and
/// mAP50-95 within 1e-6, the losses within 1e-4 relative.
fn results_agree(dir: &Path) {
    // epoch, train box/obj/cls, P R mAP50 mAP50-95, val box/obj/cls, lrs
    let (rd, rs) = (csv(dir, "dense"), csv(dir, "sparse"));
    assert_eq!(rd.len(), 3);
    for (a, b) in rd.iter().zip(&rs) {
        for k in 1..11 {
            let tol = if (4..8).contains(&k) { 1e-6 } else { 1e-4 * a[k].abs().max(1e-3) };
            assert!((a[k] - b[k]).abs() <= tol, "results.csv column {k}: dense {} sparse {}", a[k], b[k]);
        }
    }
}

/// `train` on the named 320 test model (layer numbering known) at
/// `--freeze 17`.
fn train_17(dir: &Path, yaml: &Path, name: &str, extra: &[&str]) -> std::process::Output {
    let args: Vec<&str> = ["--freeze", "17"].iter().chain(extra).copied().collect();
    crate::train::train_model(dir, yaml, &common::root().join("models/tiny-320-op17.onnx"), name, &args)
}

/// Below `--freeze 24`, `--train cls` (and `--add-classes`) run the frozen
/// layers 17..23 once per image into the sparse cache instead of every
/// batch: the head follows the dense path's (which keeps the head inputs
/// f32; the sparse cache rounds them to f16, as the N = 24 cache does)
/// within 1e-5 after 3 epochs, the layers stay untouched, and a second run
/// rebuilds nothing.
#[test]
fn class_only_training_below_24_is_sparse_and_follows_the_dense_path() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path(), &["person", "bicycle", "car"]);
    let dense = train_17(dir.path(), &yaml, "dense", &["--train", "cls", "--dense"]);
    ok(&dense);
    assert!(!String::from_utf8_lossy(&dense.stderr).contains("sparse:"));
    let sparse = train_17(dir.path(), &yaml, "sparse", &["--train", "cls"]);
    ok(&sparse);
    let err = String::from_utf8_lossy(&sparse.stderr);
    assert!(err.contains("sparse: train") && err.contains("8 of 8 images built now"), "{err}");

    let (hd, hs) = (last_head(dir.path(), "dense"), last_head(dir.path(), "sparse"));
    let start = Head::from_model(&Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap()).unwrap();
    let (d, moved) = (max_diff(&hd, &hs), max_diff(&start, &hs));
    assert!(moved > 1e-3 && d <= 1e-5, "sparse and dense heads differ by {d} after 3 epochs (the class rows moved {moved})");
    results_agree(dir.path());
    let m = Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap();
    for (k, v) in &freezesplit::train::tail::load(&dir.path().join("runs/sparse/weights/best")).unwrap() {
        let (_, orig) = m.initializer_f32(k).unwrap();
        assert!(v.iter().zip(&orig).all(|(a, b)| a.to_bits() == b.to_bits()), "`{k}` changed with --train cls");
    }
    let again = train_17(dir.path(), &yaml, "again", &["--train", "cls"]);
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 of 8 images built now"));
    assert_eq!(csv(dir.path(), "again"), csv(dir.path(), "sparse"), "a rerun on the sparse cache gives other results");

    // --add-classes below 24: sparse by default, as dense does, old names kept
    let sub = dir.path().join("add");
    let yaml = dataset(&sub, &["Car", "star"]);
    let dense = train_17(&sub, &yaml, "dense", &["--add-classes", "--dense"]);
    ok(&dense);
    let sparse = train_17(&sub, &yaml, "sparse", &["--add-classes"]);
    ok(&sparse);
    assert!(String::from_utf8_lossy(&sparse.stderr).contains("sparse: train"));
    let (hd, hs) = (last_head(&sub, "dense"), last_head(&sub, "sparse"));
    assert_eq!(hs.names.len(), start.names.len() + 1);
    assert_eq!(hs.names.last().map(String::as_str), Some("star"));
    let d = max_diff(&hd, &hs);
    assert!(d <= 1e-5, "sparse and dense extended heads differ by {d} after 3 epochs");
    results_agree(&sub);
}
