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
