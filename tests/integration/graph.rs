//! The graph stage on every model we have: Detect found by structure, anchors,
//! strides, nc, names and input size read; the frozen graph valid ONNX; the
//! layer table complete; bad files refused with one sentence.

use crate::common;

use std::process::Command;

use freezesplit::graph::{Model, onnx, summary};

const COCO_ANCHORS: [[[f32; 2]; 3]; 3] = [[[10., 13.], [16., 30.], [33., 23.]], [[30., 61.], [62., 45.], [59., 119.]], [[116., 90.], [156., 198.], [373., 326.]]];

#[test]
fn detect_head_is_found_in_every_model() {
    let mut models = common::project_models();
    models.extend(common::shared_models());
    assert!(models.len() >= 5);
    for path in models {
        let m = Model::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let s = &m.spec;
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(s.strides(), vec![8.0, 16.0, 32.0], "{name}");
        for (l, want) in s.levels.iter().zip(COCO_ANCHORS) {
            assert_eq!(l.anchors, want.to_vec(), "{name}");
        }
        let (nc, first) = if name.contains("nc3") {
            (3, "circle")
        } else if name.starts_with("demo-shapes") {
            (9, "red circle")
        } else {
            (80, "person")
        };
        assert_eq!(s.nc, nc, "{name}");
        assert_eq!(s.names[0], first, "{name}");
        assert!(s.names_from_metadata);
        let want_size = if name.contains("dyn") {
            None
        } else if name.contains("256") || name.starts_with("demo-shapes") {
            Some([256, 256])
        } else if name.contains("320") {
            Some([320, 320])
        } else {
            Some([640, 640])
        };
        assert_eq!(s.imgsz, want_size, "{name}");
    }
}

#[test]
fn frozen_graph_is_valid_onnx_with_the_head_inputs_as_outputs() {
    let py = common::python_with_onnx();
    if py.is_none() {
        eprintln!("note: python with the onnx package not found in .venv: onnx.checker not run (CI installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut models = common::project_models();
    models.extend(common::shared_models());
    for path in models {
        let m = Model::load(&path).unwrap();
        let bytes = m.frozen_bytes().unwrap();
        let frozen = onnx::decode_model(&bytes).unwrap();
        let g = frozen.graph.as_ref().unwrap();
        let outs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
        let want: Vec<&str> = m.spec.levels.iter().map(|l| l.input_tensor.as_str()).collect();
        assert_eq!(outs, want);
        assert!(g.node.len() < m.proto.graph.as_ref().unwrap().node.len());
        assert!(!g.node.iter().any(|n| n.input.iter().any(|i| *i == m.spec.levels[0].weight)), "head weights must not be in the frozen graph");
        assert_eq!(frozen.metadata_props, m.proto.metadata_props);
        assert_eq!(onnx::opset(&frozen), m.spec.opset);
        // every initializer is used
        let used: std::collections::HashSet<&str> = g.node.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
        assert!(g.initializer.iter().all(|t| used.contains(t.name.as_str())));
        if let Some(py) = &py {
            let p = dir.path().join("frozen.onnx");
            std::fs::write(&p, &bytes).unwrap();
            let st = Command::new(py).args(["-c", "import onnx,sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)"]).arg(&p).status().unwrap();
            assert!(st.success(), "onnx.checker rejected the frozen graph of {}", path.display());
        }
    }
}

#[test]
fn layer_table_has_yolov5_modules() {
    let m = Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap();
    let s = summary::summarize(&m);
    assert!(s.named);
    let kinds: Vec<&str> = s.layers.iter().map(|l| l.module.as_str()).collect();
    assert_eq!(kinds.len(), 25, "{kinds:?}");
    assert_eq!(kinds[0], "Conv");
    assert_eq!(kinds[2], "C3");
    assert_eq!(kinds[9], "SPPF");
    assert_eq!(kinds[11], "Upsample");
    assert_eq!(kinds[12], "Concat");
    assert_eq!(kinds[24], "Detect");
    assert_eq!(s.layers[9].part, "backbone");
    assert_eq!(s.layers[10].part, "neck");
    // P3/8 output of layer 17 at 320: 40x40
    assert_eq!(s.layers[17].output_shape.as_ref().unwrap()[2..], [40, 40]);
    assert_eq!(s.layers[24].output_shape, Some(vec![1, 6300, 85]));
    let onnx_params: usize = m.proto.graph.as_ref().unwrap().initializer.iter().filter(|t| t.dims.len() > 1 || t.name.contains("bias")).map(|t| t.dims.iter().product::<i64>() as usize).sum();
    assert!(s.total_params <= onnx_params && s.total_params > onnx_params * 9 / 10);

    let stripped = Model::load(&common::root().join("models/tiny-256-nc3-stripped.onnx")).unwrap();
    let s = summary::summarize(&stripped);
    assert!(!s.named);
    assert_eq!(s.layers.last().unwrap().module, "Detect");
    assert!(summary::render(&s).contains("grouped by structure"));
}

fn run_inspect(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(common::bin()).arg("inspect").arg(path).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_files_get_one_sentence_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "this is not a model\n").unwrap();
    let good = std::fs::read(common::root().join("models/tiny-320-op17.onnx")).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &good[..good.len() / 3]).unwrap();
    // a valid ONNX that is not a detector: one Relu
    let relu = onnx::pb::ModelProto {
        ir_version: 8,
        opset_import: vec![onnx::pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(onnx::pb::GraphProto {
            name: "relu".into(),
            node: vec![onnx::pb::NodeProto { op_type: "Relu".into(), input: vec!["x".into()], output: vec!["y".into()], ..Default::default() }],
            input: vec![onnx::float_value_info("x", &[onnx::Dim::Fixed(1), onnx::Dim::Fixed(3), onnx::Dim::Fixed(8), onnx::Dim::Fixed(8)])],
            output: vec![onnx::float_value_info("y", &[onnx::Dim::Fixed(1), onnx::Dim::Fixed(3), onnx::Dim::Fixed(8), onnx::Dim::Fixed(8)])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let relu_path = dir.path().join("relu.onnx");
    std::fs::write(&relu_path, onnx::encode_model(&relu)).unwrap();
    let missing = dir.path().join("missing.onnx");

    for (path, expect) in [(&text, "not"), (&truncated, "truncated"), (&relu_path, "not a YOLOv5 detector"), (&missing, "cannot read")] {
        let (ok, _, err) = run_inspect(path);
        assert!(!ok, "{}", path.display());
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected for {}: {err}", path.display());
        assert!(lines[0].starts_with("error: "), "{err}");
        assert!(lines[0].contains(path.to_str().unwrap()), "the message must name the file: {err}");
        assert!(lines[0].contains(expect), "{err}");
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn inspect_json_has_the_documented_fields() {
    let out = Command::new(common::bin()).args(["inspect", "--json"]).arg(common::root().join("models/tiny-dyn-op12-sim.onnx")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nc"], 80);
    assert_eq!(v["names"][0], "person");
    assert!(v["imgsz"].is_null());
    assert_eq!(v["strides"], serde_json::json!([8.0, 16.0, 32.0]));
    assert_eq!(v["anchors"][2][2], serde_json::json!([373.0, 326.0]));
    assert_eq!(v["head_inputs"].as_array().unwrap().len(), 3);
    assert_eq!(v["head_inputs"][0]["shape"][1], 32);
    assert_eq!(v["layers"].as_array().unwrap().len(), 25);
}

/// Cache keys of the frozen graphs as made before the freeze boundary could
/// move (`--freeze 24` only): caches filled then must stay valid.
const KEYS_BEFORE_THE_MOVABLE_BOUNDARY: [(&str, &str); 9] = [
    ("demo-shapes.onnx", "7856f342cb0a7d614d731588"),
    ("tiny-256-nc3-stripped.onnx", "a2655eaee31f7d98270edae4"),
    ("tiny-320-op12.onnx", "3f09399417e36c0ca1bfba52"),
    ("tiny-320-op17.onnx", "b1e5ec66b1d8ab581fc6c06b"),
    ("tiny-dyn-op12-sim.onnx", "d889ebf1edece313bdb0a194"),
    ("tiny-dyn-op17.onnx", "404e1d465998638ecc0b9f0c"),
    ("yolov5n-320.onnx", "cf8129b7a6c20e169339fc14"),
    ("yolov5n-dyn-sim-op12.onnx", "1da31c539822982a44519e6e"),
    ("yolov5n.onnx", "26131b00852c29a4455ac5e4"),
];

fn file_name(p: &std::path::Path) -> &str {
    p.file_name().unwrap().to_str().unwrap()
}

#[test]
fn freeze_24_keeps_todays_frozen_graph_and_cache_keys() {
    let mut models = common::project_models();
    models.extend(common::shared_models());
    for path in models {
        let m = Model::load(&path).unwrap();
        let name = file_name(&path);
        let cut = m.cut(24).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let heads: Vec<&str> = m.spec.levels.iter().map(|l| l.input_tensor.as_str()).collect();
        assert_eq!(cut.crossing.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), heads, "{name}: at N = 24 the head inputs cross, in level order");
        assert_eq!(cut.head_inputs, heads);
        assert!(cut.tail_nodes.is_empty(), "{name}");
        let bytes = m.frozen_bytes_at(&cut).unwrap();
        assert_eq!(bytes, m.frozen_bytes().unwrap(), "{name}");
        let imgsz = m.spec.imgsz.map_or(640, |s| s[0]);
        let want = KEYS_BEFORE_THE_MOVABLE_BOUNDARY.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
        if let Some(want) = want {
            assert_eq!(freezesplit::cache::graph_key(&bytes, imgsz), want, "{name}: the N = 24 frozen graph changed, so every existing cache would be recomputed");
        }
    }
}

/// YOLOv5l channel counts (width 1.0) of the layers whose outputs cross.
fn base_channels(layer: usize) -> usize {
    match layer {
        4 | 14 | 17 => 256,
        6 | 10 | 16 | 19 | 20 => 512,
        9 | 12 | 23 => 1024,
        _ => panic!("layer {layer} is not expected to cross"),
    }
}

fn stride_of(layer: usize) -> usize {
    match layer {
        4 | 16 | 17 => 8,
        6 | 12 | 14 | 19 | 20 => 16,
        _ => 32,
    }
}

/// The layers whose outputs cross boundary N in yolov5n/s/m/l/x.yaml: layer
/// N-1, plus the skip connections into later Concats (12 reads 6, 16 reads
/// 4, 19 reads 14, 22 reads 10) and the head inputs (17, 20, 23) that start
/// before N.
fn crossing_layers(n: usize) -> Vec<usize> {
    match n {
        10 => vec![4, 6, 9],
        13 => vec![4, 10, 12],
        17 => vec![10, 14, 16],
        20 => vec![10, 17, 19],
        24 => vec![17, 20, 23],
        _ => unreachable!(),
    }
}

#[test]
fn crossing_tensors_and_tail_at_10_13_17_20_24() {
    let mut models: Vec<(std::path::PathBuf, f64)> = common::project_models().into_iter().filter(|p| !file_name(p).contains("stripped")).map(|p| (p, 0.125)).collect();
    models.extend(common::shared_models().into_iter().map(|p| (p, 0.25)));
    for (path, width) in models {
        let m = Model::load(&path).unwrap();
        let name = file_name(&path);
        let g = m.proto.graph.as_ref().unwrap();
        let ix = onnx::GraphIndex::new(g);
        let imgsz = m.spec.imgsz.map_or(640, |s| s[0]);
        for n in [10, 13, 17, 20, 24] {
            let cut = m.cut(n).unwrap_or_else(|e| panic!("{name} at {n}: {e:#}"));
            let got: Vec<(Option<usize>, usize, usize)> = cut.crossing.iter().map(|c| (c.layer, c.channels, c.stride)).collect();
            let want: Vec<(Option<usize>, usize, usize)> = crossing_layers(n).into_iter().map(|l| (Some(l), (base_channels(l) as f64 * width) as usize, stride_of(l))).collect();
            assert_eq!(got, want, "{name} at --freeze {n}");
            for c in &cut.crossing {
                let producer = &g.node[ix.producer_of(&c.name).unwrap()];
                assert!(producer.name.starts_with(&format!("/model.{}/", c.layer.unwrap())), "{name} at {n}: `{}` made by `{}`", c.name, producer.name);
            }
            let bytes: usize = want.iter().map(|(_, ch, s)| ch * (imgsz / s) * (imgsz / s) * 2).sum();
            assert_eq!(cut.bytes_per_image(imgsz, freezesplit::cache::Dtype::F16), bytes, "{name} at {n}");
            // the tail is exactly the ops of layers N..=23 (shape arithmetic
            // of a Resize included) with the constants they read, wherever an
            // exporter or simplifier put those constants
            let layer_of = |i: usize| freezesplit::graph::layers::layer_index(&g.node[i].name);
            let is_op = |i: &usize| g.node[*i].op_type != "Constant";
            let tail: std::collections::HashSet<usize> = cut.tail_nodes.iter().copied().collect();
            let in_tail_layers: std::collections::HashSet<usize> = (0..g.node.len()).filter(|&i| layer_of(i).is_some_and(|k| (n..24).contains(&k))).collect();
            let ops = |s: &std::collections::HashSet<usize>| s.iter().copied().filter(is_op).collect::<std::collections::HashSet<usize>>();
            assert_eq!(ops(&tail), ops(&in_tail_layers), "{name} at {n}");
            assert!(in_tail_layers.is_subset(&tail), "{name} at {n}");
            assert!(cut.tail_nodes.windows(2).all(|w| w[0] < w[1]), "graph order");
            let params: usize = summary::summarize(&m).layers.iter().filter(|l| l.index >= n && l.index < 24).map(|l| l.params).sum();
            let head: usize = m.spec.levels.iter().map(|l| l.in_channels * m.spec.na * m.spec.no() + m.spec.na * m.spec.no()).sum();
            assert_eq!(cut.trainable_params(&m), params + head, "{name} at {n}");
        }
        if name == "yolov5n.onnx" {
            // 64x80x80 + 128x40x40 + 256x20x20 f16 values
            assert_eq!(m.cut(10).unwrap().bytes_per_image(640, freezesplit::cache::Dtype::F16), 1_433_600);
            // the Resize's shape arithmetic of layer 11 (an unnamed Constant among it) trains with its layer
            let cut = m.cut(11).unwrap();
            assert!(cut.tail_nodes.iter().any(|&i| g.node[i].op_type == "Constant" && layer_of_name_is_none(&g.node[i].name)));
        }
    }
}

fn layer_of_name_is_none(name: &str) -> bool {
    freezesplit::graph::layers::layer_index(name).is_none()
}

#[test]
fn freeze_out_of_range_and_stripped_names_are_refused_in_one_sentence() {
    let tiny = Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap();
    for n in [0, 9, 25, 100] {
        let e = format!("{:#}", tiny.cut(n).unwrap_err());
        assert!(e.contains(&format!("--freeze {n}")) && e.contains("10..=24"), "{e}");
    }
    let path = common::root().join("models/tiny-256-nc3-stripped.onnx");
    let stripped = Model::load(&path).unwrap();
    assert!(stripped.cut(24).is_ok());
    let e = format!("{:#}", stripped.cut(17).unwrap_err());
    assert!(e.contains(path.to_str().unwrap()) && e.contains("only --freeze 24"), "{e}");

    // an older exporter's graph: node names without model.N, only the
    // weights carry it, so Upsample and Concat layers have no number
    let mut proto = tiny.proto.clone();
    for (i, n) in proto.graph.as_mut().unwrap().node.iter_mut().enumerate() {
        n.name = format!("{}_{i}", n.op_type);
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old-names.onnx");
    std::fs::write(&old, onnx::encode_model(&proto)).unwrap();
    let old_model = Model::load(&old).unwrap();
    assert!(old_model.cut(24).is_ok());
    let e = format!("{:#}", old_model.cut(12).unwrap_err());
    assert!(e.contains(old.to_str().unwrap()) && e.contains("only --freeze 24"), "{e}");

    for args in [vec!["inspect", "--freeze", "17"], vec!["inspect", "--freeze", "9", "--json"]] {
        let out = Command::new(common::bin()).args(&args).arg(&path).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains("--freeze"), "{err}");
    }
}

#[test]
fn inspect_freeze_shows_the_crossing_tensors_and_marks_the_table() {
    let model = common::root().join("models/tiny-320-op17.onnx");
    let out = Command::new(common::bin()).args(["inspect", "--freeze", "10"]).arg(&model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["layer  4  [32, 40, 40]", "layer  6  [64, 20, 20]", "layer  9  [128, 10, 10]", "cache per image: 179200 bytes of f16"] {
        assert!(text.contains(want), "no `{want}` in:\n{text}");
    }
    // the boundary line sits between rows 9 and 10 of the table
    let lines: Vec<&str> = text.lines().collect();
    let mark = lines.iter().position(|l| l.starts_with("----") && l.contains("--freeze 10")).expect("a boundary line");
    assert!(lines[mark - 1].trim_start().starts_with("9 ") && lines[mark + 1].trim_start().starts_with("10 "), "{text}");

    let out = Command::new(common::bin()).args(["inspect", "--json", "--freeze", "17"]).arg(&model).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &v["freeze"];
    assert_eq!(f["n"], 17);
    let layers: Vec<u64> = f["crossing"].as_array().unwrap().iter().map(|c| c["layer"].as_u64().unwrap()).collect();
    assert_eq!(layers, [10, 14, 16]);
    assert_eq!(f["crossing"][2]["shape"], serde_json::json!([64, 40, 40]));
    assert_eq!(f["bytes_per_image_f16"], (64 * 10 * 10 + 32 * 20 * 20 + 64 * 40 * 40) * 2);
    assert!(f["trainable_params"].as_u64().unwrap() > 0);
    assert_eq!(v["layers"][16]["frozen"], true);
    assert_eq!(v["layers"][17]["frozen"], false);
}

/// The full model with `extra` as additional graph outputs, so that one run
/// shows its intermediate tensors.
fn with_extra_outputs(m: &Model, extra: &[String]) -> Vec<u8> {
    let mut proto = m.proto.clone();
    let g = proto.graph.as_mut().unwrap();
    for (i, t) in extra.iter().enumerate() {
        let shape: Vec<onnx::Dim> = ["b", "c", "h", "w"].iter().map(|d| onnx::Dim::Symbol(format!("x{i}_{d}"))).collect();
        g.output.push(onnx::float_value_info(t, &shape));
    }
    onnx::encode_model(&proto)
}

#[test]
fn frozen_graph_at_10_and_17_equals_the_full_models_tensors_on_both_engines() {
    use freezesplit::engine::Engine;
    let py = common::python_with_onnx();
    let dir = tempfile::tempdir().unwrap();
    let img = freezesplit::preprocess::decode(&common::fixture("letterbox/src/a_landscape.jpg")).unwrap();
    for model in ["tiny-320-op17.onnx", "tiny-dyn-op12-sim.onnx"] {
        let m = Model::load(&common::root().join("models").join(model)).unwrap();
        let imgsz = 320;
        let lb = freezesplit::preprocess::letterbox(&img, imgsz);
        let mut input = ndarray::Array4::<f32>::zeros((1, 3, imgsz, imgsz));
        lb.write_chw(input.as_slice_mut().unwrap());
        for n in [10, 17] {
            let cut = m.cut(n).unwrap();
            let names: Vec<String> = cut.crossing.iter().map(|c| c.name.clone()).collect();
            let frozen = m.frozen_bytes_at(&cut).unwrap();
            let g = onnx::decode_model(&frozen).unwrap().graph.unwrap();
            assert_eq!(g.output.iter().map(|o| o.name.clone()).collect::<Vec<_>>(), names);
            if let Some(py) = &py {
                let p = dir.path().join("frozen.onnx");
                std::fs::write(&p, &frozen).unwrap();
                let st = Command::new(py).args(["-c", "import onnx,sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)"]).arg(&p).status().unwrap();
                assert!(st.success(), "onnx.checker rejected the frozen graph of {model} at {n}");
            }
            let full = with_extra_outputs(&m, &names);
            for opts in common::engines() {
                let got = Engine::new(&frozen, imgsz, &opts).unwrap().run(input.view()).unwrap();
                let want = Engine::new(&full, imgsz, &opts).unwrap().run(input.view()).unwrap();
                assert_eq!(got.len(), names.len());
                for (i, g) in got.iter().enumerate() {
                    let w = &want[1 + i];
                    let [c, h, wd] = cut.shape(i, imgsz);
                    assert_eq!(g.shape(), [1, c, h, wd], "{model} at {n}: `{}`", names[i]);
                    assert_eq!(g.shape(), w.shape());
                    let d = (g - w).iter().fold(0f32, |a, x| a.max(x.abs()));
                    assert!(d <= 1e-4, "{model} at {n} ({:?}): `{}` differs by {d}", opts.engine, names[i]);
                }
            }
        }
    }
}
