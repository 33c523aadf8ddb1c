//! The export stage against the models we have: an exported model (source
//! backbone + head + YOLOv5 decode) reproduces the source's `output0` through
//! every engine; a head with a new class set exports and its output equals the
//! Rust decode of the frozen features; dynamic exports run at other batches
//! and sizes; onnx's checker accepts every file. Boxes within 1e-3 px,
//! confidences within 1e-5.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use freezesplit::engine::{Engine, EngineChoice, EngineOptions};
use freezesplit::export::{self, export_bytes};
use freezesplit::graph::{Model, onnx, split};
use freezesplit::head::Head;
use freezesplit::preprocess;
use ndarray::{Array1, Array2, Array4, ArrayD, ArrayView2, Axis, s};

const BOX_TOL: f32 = 1e-3;
const CONF_TOL: f32 = 1e-5;

fn images() -> Vec<PathBuf> {
    ["a_landscape.jpg", "b_portrait.png", "c_wide.jpg"].iter().map(|f| common::fixture(&format!("letterbox/src/{f}"))).collect()
}

fn letterboxed(img: &Path, imgsz: usize) -> Array4<f32> {
    let lb = preprocess::letterbox(&preprocess::decode(img).unwrap(), imgsz);
    let mut input = Array4::<f32>::zeros((1, 3, imgsz, imgsz));
    lb.write_chw(input.as_slice_mut().unwrap());
    input
}

/// Max abs differences on boxes (cols 0..4) and confidences (4..).
fn diffs(got: ArrayView2<f32>, want: ArrayView2<f32>) -> (f32, f32) {
    assert_eq!(got.shape(), want.shape());
    let m = |a: ArrayView2<f32>, b: ArrayView2<f32>| (&a - &b).iter().fold(0f32, |m, d| m.max(d.abs()));
    (m(got.slice(s![.., ..4]), want.slice(s![.., ..4])), m(got.slice(s![.., 4..]), want.slice(s![.., 4..])))
}

fn imgsz_of(m: &Model) -> usize {
    m.spec.imgsz.map_or(320, |s| s[0])
}

fn engine_name(o: &EngineOptions) -> &'static str {
    if o.engine == EngineChoice::Ort { "ort" } else { "tract" }
}

fn all_models() -> Vec<PathBuf> {
    let mut v = common::project_models();
    v.extend(common::shared_models());
    v
}

/// The Rust decode of image `b` of a batch of frozen-graph outputs.
fn rust_decode(head: &Head, feats: &[ArrayD<f32>], b: usize) -> Array2<f32> {
    let per_level: Vec<_> = feats
        .iter()
        .map(|f| {
            let f = f.index_axis(Axis(0), b);
            let (c, h, w) = (f.shape()[0], f.shape()[1], f.shape()[2]);
            (f.to_owned().into_shape_with_order((c, h * w)).unwrap(), h, w)
        })
        .collect();
    let views: Vec<_> = per_level.iter().map(|(a, h, w)| (a.view(), *h, *w)).collect();
    head.decode(&views)
}

/// The frozen graph with height and width symbolic too, so that ONNX Runtime
/// accepts other sizes even for a static source.
fn frozen_any_size(m: &Model) -> Vec<u8> {
    let mut f = split::frozen_graph(&m.proto, &m.spec).unwrap();
    let g = f.graph.as_mut().unwrap();
    let shape = [onnx::Dim::Symbol("batch".into()), onnx::Dim::Fixed(3), onnx::Dim::Symbol("height".into()), onnx::Dim::Symbol("width".into())];
    g.input[0] = onnx::float_value_info(&g.input[0].name.clone(), &shape);
    onnx::encode_model(&f)
}

/// A head for a new class set: nc = 2, seeded random weights, anchors of
/// level 0 scaled so that anchors visibly come from the head.
fn new_class_head(model: &Model) -> Head {
    let base = Head::from_model(model).unwrap();
    let (na, no) = (base.na(), 7);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut anchors = base.anchors.clone();
    for a in &mut anchors[0] {
        a[0] *= 1.5;
        a[1] *= 0.75;
    }
    Head {
        nc: 2,
        names: vec!["ambulance".into(), "bus".into()],
        strides: base.strides.clone(),
        anchors,
        weights: base.in_channels().iter().map(|&c| Array2::from_shape_fn((na * no, c), |_| rnd() * 0.2)).collect(),
        biases: base.in_channels().iter().map(|_| Array1::from_shape_fn(na * no, |_| rnd() * 2.0)).collect(),
    }
}

fn check_reloaded(path: &Path, bytes: &[u8], head: &Head, source: &Model, dynamic: Option<bool>) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("exported.onnx");
    std::fs::write(&p, bytes).unwrap();
    let m = Model::load(&p).unwrap_or_else(|e| panic!("{}: the export does not load: {e:#}", path.display()));
    let g = m.proto.graph.as_ref().unwrap();
    let used: std::collections::HashSet<&str> = g.node.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    for t in &g.initializer {
        assert!(used.contains(t.name.as_str()), "{}: initializer `{}` is unused", path.display(), t.name);
    }
    let sp = &m.spec;
    assert_eq!(sp.nc, head.nc);
    assert_eq!(sp.names, head.names);
    assert!(sp.names_from_metadata);
    assert_eq!(sp.strides(), head.strides);
    assert_eq!(sp.levels.iter().map(|l| l.anchors.clone()).collect::<Vec<_>>(), head.anchors);
    assert_eq!(sp.opset, source.spec.opset);
    assert_eq!(sp.input_name, "images");
    assert_eq!(sp.output_name, "output0");
    assert_eq!(m.proto.ir_version, source.proto.ir_version);
    assert_eq!(onnx::metadata(&m.proto, "stride"), Some("32"));
    let want = export::export_shape(source, dynamic);
    assert_eq!(sp.imgsz, want.imgsz);
    assert_eq!(sp.batch, want.batch);
    for (i, l) in sp.levels.iter().enumerate() {
        assert_eq!(l.weight, format!("model.24.m.{i}.weight"));
        assert_eq!(l.bias, format!("model.24.m.{i}.bias"));
    }
    m
}

#[test]
fn export_reproduces_the_source_model_on_every_engine() {
    let images = images();
    for path in all_models() {
        let model = Model::load(&path).unwrap();
        let head = Head::from_model(&model).unwrap();
        let bytes = export_bytes(&model, &head, None).unwrap();
        check_reloaded(&path, &bytes, &head, &model, None);
        let imgsz = imgsz_of(&model);
        let source = onnx::encode_model(&model.proto);
        for opts in common::engines() {
            let mut exported = Engine::new(&bytes, imgsz, &opts).unwrap();
            let mut original = Engine::new(&source, imgsz, &opts).unwrap();
            let (mut dbox, mut dconf) = (0f32, 0f32);
            for img in &images {
                let input = letterboxed(img, imgsz);
                let got = exported.run(input.view()).unwrap().remove(0);
                let want = original.run(input.view()).unwrap().remove(0);
                assert_eq!(got.shape(), want.shape());
                let (b, c) = diffs(got.index_axis(Axis(0), 0).into_dimensionality().unwrap(), want.index_axis(Axis(0), 0).into_dimensionality().unwrap());
                dbox = dbox.max(b);
                dconf = dconf.max(c);
            }
            eprintln!("round trip {} {}: max |Δbox| {dbox:.2e} px, max |Δconf| {dconf:.2e}", engine_name(&opts), path.file_name().unwrap().to_string_lossy());
            assert!(dbox <= BOX_TOL && dconf <= CONF_TOL, "{}: {dbox} {dconf}", path.display());
        }
    }
}

#[test]
fn a_head_with_new_classes_exports_and_matches_the_rust_decode() {
    let images = images();
    for name in ["tiny-320-op17.onnx", "tiny-320-op12.onnx", "tiny-dyn-op12-sim.onnx", "tiny-256-nc3-stripped.onnx"] {
        let path = common::root().join("models").join(name);
        let model = Model::load(&path).unwrap();
        let head = new_class_head(&model);
        let exported = export::export_model(&model, &head, None).unwrap();
        assert_eq!(onnx::metadata(&exported, "names"), Some("{0: 'ambulance', 1: 'bus'}"));
        assert_eq!(onnx::metadata(&exported, "stride"), Some("32"));
        assert_eq!(exported.producer_name, "freezesplit");
        let bytes = onnx::encode_model(&exported);
        let reloaded = check_reloaded(&path, &bytes, &head, &model, None);
        assert_eq!(Head::from_model(&reloaded).unwrap(), head, "{name}: the head reads back from the export");

        let imgsz = imgsz_of(&model);
        let frozen = model.frozen_bytes().unwrap();
        for opts in common::engines() {
            let mut exp = Engine::new(&bytes, imgsz, &opts).unwrap();
            let mut fro = Engine::new(&frozen, imgsz, &opts).unwrap();
            let (mut dbox, mut dconf) = (0f32, 0f32);
            for img in &images {
                let input = letterboxed(img, imgsz);
                let got = exp.run(input.view()).unwrap().remove(0);
                assert_eq!(got.shape()[2], 7);
                let want = rust_decode(&head, &fro.run(input.view()).unwrap(), 0);
                let (b, c) = diffs(got.index_axis(Axis(0), 0).into_dimensionality().unwrap(), want.view());
                dbox = dbox.max(b);
                dconf = dconf.max(c);
            }
            eprintln!("nc=2 head {} {name}: max |Δbox| {dbox:.2e} px, max |Δconf| {dconf:.2e}", engine_name(&opts));
            assert!(dbox <= BOX_TOL && dconf <= CONF_TOL, "{name}: {dbox} {dconf}");
        }
    }
}

/// A batch of 2 real images at `h x w`: letterboxed to the long side, then
/// the middle `h` rows kept.
fn batch_of_two(h: usize, w: usize) -> Array4<f32> {
    assert!(w >= h);
    let imgs = images();
    let mut out = Array4::<f32>::zeros((2, 3, h, w));
    for (b, img) in imgs.iter().take(2).enumerate() {
        let sq = letterboxed(img, w);
        let top = (w - h) / 2;
        out.slice_mut(s![b, .., .., ..]).assign(&sq.slice(s![0, .., top..top + h, ..]));
    }
    out
}

#[test]
fn dynamic_exports_run_at_other_batches_and_sizes() {
    let mut models: Vec<PathBuf> = ["tiny-320-op17.onnx", "tiny-320-op12.onnx", "tiny-dyn-op17.onnx", "tiny-dyn-op12-sim.onnx"]
        .iter()
        .map(|n| common::root().join("models").join(n))
        .collect();
    models.extend(common::shared_models().into_iter().filter(|p| p.to_string_lossy().contains("dyn")));
    for path in models {
        let model = Model::load(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for head in [Head::from_model(&model).unwrap(), new_class_head(&model)] {
            let bytes = export_bytes(&model, &head, Some(true)).unwrap();
            let m = check_reloaded(&path, &bytes, &head, &model, Some(true));
            assert_eq!(m.spec.imgsz, None);
            assert_eq!(m.spec.batch, onnx::Dim::Symbol("batch".into()));
            for opts in common::engines() {
                // tract's engine runs square inputs; ort takes any shape
                let (h, w) = if opts.engine == EngineChoice::Ort { (256, 384) } else { (256, 256) };
                let input = batch_of_two(h, w);
                let mut exp = Engine::new(&bytes, w, &opts).unwrap();
                let mut fro = Engine::new(&frozen_any_size(&model), w, &opts).unwrap();
                let got = exp.run(input.view()).unwrap().remove(0);
                let feats = fro.run(input.view()).unwrap();
                let rows: usize = head.strides.iter().map(|&s| head.na() * (h / s as usize) * (w / s as usize)).sum();
                assert_eq!(got.shape(), [2, rows, head.no()], "{name}");
                let (mut dbox, mut dconf) = (0f32, 0f32);
                for b in 0..2 {
                    let want = rust_decode(&head, &feats, b);
                    let (db, dc) = diffs(got.index_axis(Axis(0), b).into_dimensionality().unwrap(), want.view());
                    dbox = dbox.max(db);
                    dconf = dconf.max(dc);
                }
                eprintln!("dynamic nc={} {} {name} 2x3x{h}x{w}: max |Δbox| {dbox:.2e} px, max |Δconf| {dconf:.2e}", head.nc, engine_name(&opts));
                assert!(dbox <= BOX_TOL && dconf <= CONF_TOL, "{name}: {dbox} {dconf}");
            }
        }
    }
}

#[test]
fn a_static_size_with_a_dynamic_batch_keeps_constant_grids() {
    // No YOLOv5 export has this combination; pretend the source had it.
    let path = common::root().join("models/tiny-320-op17.onnx");
    let mut model = Model::load(&path).unwrap();
    model.spec.batch = onnx::Dim::Symbol("N".into());
    let head = new_class_head(&model);
    let bytes = export_bytes(&model, &head, None).unwrap();
    let m = check_reloaded(&path, &bytes, &head, &model, None);
    assert_eq!((m.spec.batch.clone(), m.spec.imgsz), (onnx::Dim::Symbol("batch".into()), Some([320, 320])));
    assert!(!m.proto.graph.as_ref().unwrap().node.iter().any(|n| n.op_type == "Range"), "static grids expected");
    let input = batch_of_two(320, 320);
    let frozen = model.frozen_bytes().unwrap();
    for opts in common::engines() {
        let got = Engine::new(&bytes, 320, &opts).unwrap().run(input.view()).unwrap().remove(0);
        let feats = Engine::new(&frozen, 320, &opts).unwrap().run(input.view()).unwrap();
        assert_eq!(got.shape(), [2, 6300, 7]);
        for b in 0..2 {
            let (db, dc) = diffs(got.index_axis(Axis(0), b).into_dimensionality().unwrap(), rust_decode(&head, &feats, b).view());
            assert!(db <= BOX_TOL && dc <= CONF_TOL, "{} image {b}: {db} {dc}", engine_name(&opts));
        }
    }
}

#[test]
fn static_export_of_a_dynamic_source_fixes_the_batch_only() {
    let model = Model::load(&common::root().join("models/tiny-dyn-op17.onnx")).unwrap();
    let shape = export::export_shape(&model, Some(false));
    assert_eq!(shape.batch, onnx::Dim::Fixed(1));
    assert_eq!(shape.imgsz, None);
    let head = Head::from_model(&model).unwrap();
    let bytes = export_bytes(&model, &head, Some(false)).unwrap();
    let m = check_reloaded(Path::new("tiny-dyn-op17.onnx"), &bytes, &head, &model, Some(false));
    assert_eq!(m.spec.batch, onnx::Dim::Fixed(1));
}

#[test]
fn a_head_that_does_not_fit_is_refused() {
    let model = Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap();
    let mut head = Head::from_model(&model).unwrap();
    head.names.pop();
    assert!(export::export_model(&model, &head, None).unwrap_err().to_string().contains("names"));
    let mut head = Head::from_model(&model).unwrap();
    head.weights[1] = Array2::zeros((255, 7));
    assert!(export::export_model(&model, &head, None).unwrap_err().to_string().contains("channels"));
}

#[test]
fn write_export_leaves_a_complete_file() {
    let model = Model::load(&common::root().join("models/tiny-320-op12.onnx")).unwrap();
    let head = Head::from_model(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out/best.onnx");
    export::write_export(&p, &model, &head, None).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), export_bytes(&model, &head, None).unwrap());
    let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().flatten().filter(|e| e.file_name() != "best.onnx").collect();
    assert!(leftovers.is_empty());
}

const CHECK_PY: &str = r#"
import json, sys, onnx
path, names = sys.argv[1], json.loads(sys.argv[2])
m = onnx.load(path)
onnx.checker.check_model(m, full_check=True)
meta = {p.key: p.value for p in m.metadata_props}
assert meta["names"] == repr(dict(enumerate(names))), (meta["names"], names)
assert eval(meta["names"]) == dict(enumerate(names))
assert meta["stride"] == "32", meta["stride"]
inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
out = inferred.graph.output[0]
assert out.name == "output0"
print([d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim])
"#;

#[test]
fn onnx_checker_accepts_every_export() {
    let Some(py) = common::python_with_onnx() else {
        eprintln!("note: python with the onnx package not found in .venv: onnx.checker not run (CI installs it)");
        return;
    };
    // FREEZESPLIT_KEEP_EXPORTS=DIR keeps the files (e.g. for tools/check_export.py)
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("FREEZESPLIT_KEEP_EXPORTS").map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    for path in all_models() {
        let model = Model::load(&path).unwrap();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let heads = [("same", Head::from_model(&model).unwrap()), ("nc2", new_class_head(&model))];
        for (tag, head) in &heads {
            for (dtag, dynamic) in [("", None), ("-dynamic", Some(true))] {
                let p = dir.join(format!("{stem}-{tag}{dtag}.onnx"));
                export::write_export(&p, &model, head, dynamic).unwrap();
                let out = Command::new(&py).args(["-c", CHECK_PY]).arg(&p).arg(serde_json::to_string(&head.names).unwrap()).output().unwrap();
                assert!(out.status.success(), "onnx.checker rejected {}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
                eprintln!("checker ok: {} output0 {}", p.file_name().unwrap().to_string_lossy(), String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
}

/// The emitted ops must be valid in every opset from 12 on (Split changes at
/// 13). Our sources are opset 12 and 17 only, so the opset-17 model is
/// relabelled (its backbone ops are unchanged from 13 to 20) and exported.
#[test]
fn exports_are_valid_in_opsets_13_to_20() {
    let Some(py) = common::python_with_onnx() else {
        eprintln!("note: python with the onnx package not found in .venv: opset check not run (CI installs it)");
        return;
    };
    let path = common::root().join("models/tiny-320-op17.onnx");
    let base = Model::load(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = letterboxed(&images()[0], 320);
    let opts = common::engines().pop().unwrap();
    let head = new_class_head(&base);
    for dynamic in [None, Some(true)] {
        let want = Engine::new(&export_bytes(&base, &head, dynamic).unwrap(), 320, &opts).unwrap().run(input.view()).unwrap().remove(0);
        for opset in [13, 14, 15, 16, 18, 19, 20] {
            let mut proto = base.proto.clone();
            proto.opset_import.iter_mut().filter(|o| o.domain.is_empty()).for_each(|o| o.version = opset);
            let spec = freezesplit::graph::detect::find_detect(&proto).unwrap();
            let model = Model { path: path.clone(), proto, spec };
            let bytes = export_bytes(&model, &head, dynamic).unwrap();
            let p = dir.path().join(format!("op{opset}.onnx"));
            std::fs::write(&p, &bytes).unwrap();
            let out = Command::new(&py).args(["-c", CHECK_PY]).arg(&p).arg(serde_json::to_string(&head.names).unwrap()).output().unwrap();
            assert!(out.status.success(), "opset {opset}: {}", String::from_utf8_lossy(&out.stderr));
            let got = Engine::new(&bytes, 320, &opts).unwrap().run(input.view()).unwrap().remove(0);
            assert_eq!(got, want, "opset {opset} {}", engine_name(&opts));
        }
    }
}


/// `freezesplit export` through the command line: a run directory writes
/// RUN/weights/best.onnx, a model writes <stem>-freezesplit.onnx beside a copy;
/// both load back with the head's classes.
#[test]
fn export_command_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::root().join("models/tiny-256-nc3-stripped.onnx");
    let model_copy = dir.path().join("tiny.onnx");
    std::fs::copy(&src, &model_copy).unwrap();
    let model = Model::load(&model_copy).unwrap();
    let head = Head::from_model(&model).unwrap();
    let run = dir.path().join("runs/train/exp");
    let source = std::collections::HashMap::from([("model".to_string(), model_copy.display().to_string())]);
    head.save(&run.join("weights/best"), source).unwrap();
    for (weights, want, extra) in [(&run, run.join("weights/best.onnx"), vec![]), (&model_copy, dir.path().join("tiny-freezesplit.onnx"), vec!["--dynamic"])] {
        let out = Command::new(common::bin()).args(["export", "--json", "--weights"]).arg(weights).args(&extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(Path::new(v["path"].as_str().unwrap()), want);
        assert_eq!(v["nc"], 3);
        let m = Model::load(&want).unwrap();
        assert_eq!(m.spec.names, head.names);
        assert_eq!(m.spec.imgsz, if extra.is_empty() { Some([256, 256]) } else { None });
    }
}

/// `export --freeze N` of an untouched model, for every N of YOLOv5's
/// boundary: the frozen graph, layers N..23 as they are and the head make
/// the source model again, so every N writes the same file, and that file
/// reproduces the source's output0 (boxes ≤ 1e-3 px, confidences ≤ 1e-5)
/// on every engine; a model whose layer numbers are stripped is refused
/// below 24 with the reason.
#[test]
fn export_at_every_freeze_of_an_untouched_model_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::root().join("models/tiny-320-op17.onnx");
    let export_at = |n: usize| -> Vec<u8> {
        let out = dir.path().join(format!("f{n}.onnx"));
        let o = Command::new(common::bin()).args(["export", "--weights"]).arg(&src).args(["--freeze", &n.to_string(), "--out"]).arg(&out).output().unwrap();
        assert!(o.status.success(), "--freeze {n}: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&out).unwrap()
    };
    let at24 = export_at(24);
    for n in 10..24 {
        assert!(export_at(n) == at24, "--freeze {n} wrote another file than --freeze 24");
    }
    let model = Model::load(&src).unwrap();
    let source = onnx::encode_model(&model.proto);
    for opts in common::engines() {
        let mut exported = Engine::new(&at24, 320, &opts).unwrap();
        let mut original = Engine::new(&source, 320, &opts).unwrap();
        for img in images() {
            let input = letterboxed(&img, 320);
            let got = exported.run(input.view()).unwrap().remove(0);
            let want = original.run(input.view()).unwrap().remove(0);
            let (b, c) = diffs(got.index_axis(Axis(0), 0).into_dimensionality().unwrap(), want.index_axis(Axis(0), 0).into_dimensionality().unwrap());
            assert!(b <= BOX_TOL && c <= CONF_TOL, "{} {}: {b} {c}", engine_name(&opts), img.display());
        }
    }
    let stripped = common::root().join("models/tiny-256-nc3-stripped.onnx");
    let o = Command::new(common::bin()).args(["export", "--weights"]).arg(&stripped).args(["--freeze", "17", "--out"]).arg(dir.path().join("s.onnx")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("24"), "a stripped model at --freeze 17: {err}");
}
