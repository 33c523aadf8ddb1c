//! The Rust tail (layers N..23 built from the ONNX nodes, `tail::TailNet`)
//! against the ONNX model itself: for every N in 10..=24, the frozen graph at
//! N run by an engine, then the tail and the head in Rust, must reproduce the
//! full model's `output0` run by the same engine on the same image (boxes
//! ≤ 1e-3 px, confidences ≤ 1e-5).

use std::path::Path;

use freezesplit::engine::Engine;
use freezesplit::graph::Model;
use freezesplit::head::Head;
use freezesplit::tail::TailNet;
use ndarray::{Array4, ArrayD, Axis, Ix2, s};

use crate::common;

/// output0 rows `[rows, 5 + nc]` from head inputs `[1, C, H, W]`.
fn decode(head: &Head, feats: &[ArrayD<f32>]) -> ndarray::Array2<f32> {
    let levels: Vec<(ndarray::Array2<f32>, usize, usize)> = feats
        .iter()
        .map(|f| {
            let (c, h, w) = (f.shape()[1], f.shape()[2], f.shape()[3]);
            (f.index_axis(Axis(0), 0).to_owned().into_shape_with_order((c, h * w)).unwrap(), h, w)
        })
        .collect();
    let views: Vec<_> = levels.iter().map(|(a, h, w)| (a.view(), *h, *w)).collect();
    head.decode(&views)
}

fn check_model(path: &Path, imgsz_dyn: usize) {
    let model = Model::load(path).unwrap();
    let imgsz = model.spec.imgsz.map(|[h, _]| h).unwrap_or(imgsz_dyn);
    let head = Head::from_model(&model).unwrap();
    let img = freezesplit::preprocess::decode(&common::fixture("letterbox/src/a_landscape.jpg")).unwrap();
    let lb = freezesplit::preprocess::letterbox(&img, imgsz);
    let mut input = Array4::<f32>::zeros((1, 3, imgsz, imgsz));
    lb.write_chw(input.as_slice_mut().unwrap());
    let full = std::fs::read(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy();
    for opts in common::engines() {
        let want = Engine::new(&full, imgsz, &opts).unwrap().run(input.view()).unwrap().remove(0);
        let want = want.index_axis(Axis(0), 0).into_dimensionality::<Ix2>().unwrap().to_owned();
        for n in 10..=24 {
            let cut = model.cut(n).unwrap();
            let frozen = model.frozen_bytes_at(&cut).unwrap();
            let crossing = Engine::new(&frozen, imgsz, &opts).unwrap().run(input.view()).unwrap();
            let net = TailNet::build(&model, &cut, imgsz).unwrap_or_else(|e| panic!("{name} at {n}: {e:#}"));
            let feats = net.eval(crossing).unwrap();
            let got = decode(&head, &feats);
            assert_eq!(got.shape(), want.shape(), "{name} at {n}");
            let dbox = (&got.slice(s![.., ..4]) - &want.slice(s![.., ..4])).iter().fold(0f32, |a, x| a.max(x.abs()));
            let dconf = (&got.slice(s![.., 4..]) - &want.slice(s![.., 4..])).iter().fold(0f32, |a, x| a.max(x.abs()));
            eprintln!("{name} {:?} N={n}: |box| {dbox:.2e} px, |conf| {dconf:.2e}", opts.engine);
            assert!(dbox <= 1e-3, "{name} ({:?}) at N = {n}: boxes differ by {dbox} px", opts.engine);
            assert!(dconf <= 1e-5, "{name} ({:?}) at N = {n}: confidences differ by {dconf}", opts.engine);
        }
    }
}

#[test]
fn tail_forward_reproduces_output0_for_every_n_on_the_test_models() {
    for m in ["tiny-320-op17.onnx", "tiny-320-op12.onnx", "tiny-dyn-op17.onnx", "tiny-dyn-op12-sim.onnx", "tiny-320-convt-op17.onnx"] {
        check_model(&common::root().join("models").join(m), 256);
    }
}

#[test]
fn tail_forward_reproduces_output0_for_every_n_on_the_shared_models() {
    for m in common::shared_models() {
        check_model(&m, 320);
    }
}

/// Loss and gradients through the tail and the head against YOLOv5's
/// ComputeLoss + backward on the BN-fused model (tests/fixtures/tail, made by
/// tools/tail_fixtures.py): for N = 10, 17 and 24, every trainable tensor by
/// its ONNX initializer name; loss ≤ 1e-4 relative, each gradient ≤ 1e-3 of
/// its tensor's largest magnitude.
/// One training step of the tail and head of models/tiny-320-op17.onnx on
/// the fixtures of tools/tail_fixtures.py for N = 10, 17 and 24, on the GEMM
/// path `gemm` (None: f32), against YOLOv5's ComputeLoss + backward on the
/// BN-fused model: each loss within `loss_tol` relative, each gradient within
/// `grad_tol` of its tensor's largest magnitude. Returns each N's gradients.
fn step_against_yolov5(gemm: Option<freezesplit::kernels::conv::Path>, loss_tol: f32, grad_tol: f32) -> Vec<freezesplit::train::params::Tensors> {
    use freezesplit::train::params::{HeadLayout, ParamStore};
    use freezesplit::train::tail::{TailRun, add_params, step};
    let model = Model::load(&common::root().join("models/tiny-320-op17.onnx")).unwrap();
    let head = Head::from_model(&model).unwrap();
    let layout = HeadLayout::of(&model);
    let anchors: Vec<Vec<[f32; 2]>> = head.anchors.iter().zip(&head.strides).map(|(a, s)| a.iter().map(|[w, h]| [w / s, h / s]).collect()).collect();
    let cfg = freezesplit::loss::LossConfig::new(freezesplit::loss::scale_hyp(&freezesplit::loss::Hyp::scratch_low(), 80, 3, 320), 80, anchors);
    let grids: Vec<(usize, usize)> = head.strides.iter().map(|&s| (320 / s as usize, 320 / s as usize)).collect();
    let mut out = Vec::new();
    for n in [10, 17, 24] {
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(common::fixture(&format!("tail/n{n}.json"))).unwrap()).unwrap();
        let bytes = std::fs::read(common::fixture(&format!("tail/n{n}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let get = |name: &str| -> ArrayD<f32> {
            let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture n{n} lacks `{name}`"));
            ArrayD::from_shape_vec(t.shape(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()).unwrap()
        };
        let cut = model.cut(n).unwrap();
        let net = TailNet::build(&model, &cut, 320).unwrap();
        let crossing: Vec<ArrayD<f32>> = cut.crossing.iter().map(|c| get(&c.name)).collect();
        let fixture_crossing: Vec<&str> = meta["crossing"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        let mut ours: Vec<&str> = cut.crossing.iter().map(|c| c.name.as_str()).collect();
        ours.sort();
        let mut theirs = fixture_crossing.clone();
        theirs.sort();
        assert_eq!(ours, theirs, "N = {n}: crossing tensors");
        let mut store: ParamStore = layout.params(&head, &vec![1.0; head.na() * head.no()]);
        let tail = TailRun { net, trains: true, gemm, val_dir: tempfile::tempdir().unwrap(), frozen_val: None };
        add_params(&tail.net, &mut store, 1.0);
        let targets = get("targets").into_dimensionality::<ndarray::Ix2>().unwrap();
        let (l, grads) = step(&store, crossing, targets.view(), 2, &cfg, &grids, &layout, &tail);
        let want = &meta["loss"];
        let mut worst = (0f32, 0f32);
        for (k, name) in ["lbox", "lobj", "lcls"].iter().enumerate() {
            let w = want[name].as_f64().unwrap() as f32;
            worst.0 = worst.0.max(((l[k] - w) / w).abs());
            assert!(((l[k] - w) / w).abs() <= loss_tol, "{gemm:?} N = {n}: {name} {} vs YOLOv5's {w}", l[k]);
        }
        let mut checked = 0;
        for name in st.names() {
            if name == "targets" || fixture_crossing.contains(&name) {
                continue;
            }
            let w = get(name);
            let g = grads.get(name).unwrap_or_else(|| panic!("N = {n}: no gradient for `{name}`"));
            assert_eq!(g.len(), w.len(), "N = {n}: `{name}`");
            let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
            let d = g.iter().zip(w.iter()).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            worst.1 = worst.1.max(d / scale);
            assert!(d <= grad_tol * scale, "{gemm:?} N = {n}: gradient of `{name}` differs by {d} (largest {scale})");
            checked += 1;
        }
        assert_eq!(checked, grads.len(), "N = {n}: every trainable tensor has a reference");
        eprintln!("{gemm:?} N = {n}: loss {l:?}, {checked} gradients checked; worst loss {:.2e} relative, worst gradient {:.2e} of its largest", worst.0, worst.1);
        out.push(grads);
    }
    out
}

#[test]
fn tail_gradients_match_yolov5_for_freeze_10_17_24() {
    step_against_yolov5(None, 1e-4, 1e-3);
}

/// `--precision bf16` (the training default on AVX512-BF16 CPUs): the same
/// step with the convolutions' operands rounded to bf16 stays close to
/// YOLOv5's f32 loss and gradients, and gives the same bits on 1 and 3
/// threads (sums in an order fixed by the shapes).
#[test]
fn tail_gradients_in_bf16_stay_close_to_yolov5_and_do_not_depend_on_threads() {
    let Some(bf16) = freezesplit::kernels::conv::bf16_path() else {
        eprintln!("skipping tail_gradients_in_bf16_stay_close_to_yolov5_and_do_not_depend_on_threads: this CPU has no AVX512-BF16");
        return;
    };
    let on = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| step_against_yolov5(Some(bf16), BF16_LOSS_TOL, BF16_GRAD_TOL));
    let (one, three) = (on(1), on(3));
    for (a, b) in one.iter().zip(&three) {
        for (name, g) in a {
            assert!(g.iter().zip(b[name].iter()).all(|(x, y)| x.to_bits() == y.to_bits()), "bf16 gradient of `{name}` differs between 1 and 3 threads");
        }
    }
}

/// The bf16 step's distance from YOLOv5's f32 step (see the test above):
/// measured 2.7e-6 (loss) and 9.2e-3 (gradients, N = 10) on this CPU, where
/// f32 is within 7.5e-6; the loss keeps the f32 parity tolerance, the
/// gradients get about twice what bf16's 8-bit mantissa cost here.
const BF16_LOSS_TOL: f32 = 1e-4;
const BF16_GRAD_TOL: f32 = 2e-2;

/// `train --freeze 17` on a named test model end to end: resumed after a
/// kill it ends byte-identical to an uninterrupted run (weights, the trained
/// layers, results.csv); the run's export and `val` of the run reproduce the
/// trainer's own final metrics; `--train cls` keeps layers 17..23 exactly.
#[test]
fn train_at_freeze_17_resumes_exactly_and_exports_what_it_validated() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let yaml = crate::train::dataset(dir.path(), &["person", "bicycle", "car"]);
    let model = common::root().join("models/tiny-320-op17.onnx");
    let run = |name: &str, abort: Option<usize>, extra: &[&str]| {
        let mut c = Command::new(common::bin());
        c.args(["train", "--engine", "tract", "--epochs", "3", "--batch-size", "4", "--seed", "3", "--freeze", "17", "--weights"])
            .arg(&model)
            .arg("--data")
            .arg(&yaml)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--project")
            .arg(dir.path().join("runs"))
            .args(["--name", name])
            .args(extra);
        if let Some(e) = abort {
            c.env("FREEZESPLIT_ABORT_AFTER_EPOCH", e.to_string());
        }
        c.output().unwrap()
    };
    crate::train::ok(&run("whole", None, &[]));
    assert!(!run("cut", Some(1), &[]).status.success());
    let cut = dir.path().join("runs/cut");
    crate::train::ok(&Command::new(common::bin()).args(["train", "--engine", "tract", "--resume"]).arg(&cut).output().unwrap());
    let whole = dir.path().join("runs/whole");
    for f in ["results.csv", "weights/last.safetensors", "weights/last.tail.safetensors", "weights/best.tail.safetensors"] {
        assert_eq!(std::fs::read(whole.join(f)).unwrap(), std::fs::read(cut.join(f)).unwrap(), "{f} differs after a resume");
    }
    // --precision auto took bf16 where the CPU has it, and the run says so;
    // a CPU without it (FREEZESPLIT_GEMM=fallback stands in for one) refuses
    // to resume such a run, and refuses --precision bf16, each in a sentence
    let opt = std::fs::read_to_string(whole.join("opt.yaml")).unwrap();
    let bf16 = freezesplit::kernels::conv::bf16_path().is_some();
    assert!(opt.contains(if bf16 { "precision: bf16" } else { "precision: f32" }), "{opt}");
    let without_bf16 = |c: &mut Command| c.env("FREEZESPLIT_GEMM", "fallback").output().unwrap();
    if bf16 {
        let out = without_bf16(Command::new(common::bin()).args(["train", "--engine", "tract", "--resume"]).arg(&whole));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("with bf16 GEMMs, which this CPU cannot run") && err.contains("--precision f32"), "{err}");
    }
    let out = without_bf16(Command::new(common::bin()).args(["train", "--freeze", "17", "--precision", "bf16", "--weights"]).arg(&model).arg("--data").arg(&yaml).arg("--project").arg(dir.path().join("runs")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("--precision bf16 needs a CPU with AVX512-BF16"), "{err}");
    // the trained layers changed, and they are what export and val use
    let tail = freezesplit::train::tail::load(&whole.join("weights/best")).unwrap();
    let m = Model::load(&model).unwrap();
    let moved = tail.iter().any(|(k, v)| {
        let (_, orig) = m.initializer_f32(k).unwrap();
        v.iter().zip(&orig).any(|(a, b)| a != b)
    });
    assert!(moved, "layers 17..23 did not train");
    let val = |w: &Path| {
        let out = Command::new(common::bin()).args(["val", "--engine", "tract", "--json", "--weights"]).arg(w).arg("--data").arg(&yaml).arg("--cache-dir").arg(dir.path().join("cache")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        [v["mAP50"].as_f64().unwrap(), v["mAP50_95"].as_f64().unwrap()]
    };
    let exp = Command::new(common::bin()).args(["export", "--weights"]).arg(&whole).output().unwrap();
    assert!(exp.status.success(), "{}", String::from_utf8_lossy(&exp.stderr));
    let of_run = val(&whole);
    let of_export = val(&whole.join("weights/best.onnx"));
    for k in 0..2 {
        assert!((of_run[k] - of_export[k]).abs() < 1e-3, "val of the run {of_run:?} vs its export {of_export:?}");
    }
    // --train cls: the tail runs frozen
    crate::train::ok(&run("cls", None, &["--train", "cls"]));
    let cls = freezesplit::train::tail::load(&dir.path().join("runs/cls/weights/best")).unwrap();
    for (k, v) in &cls {
        let (_, orig) = m.initializer_f32(k).unwrap();
        assert!(v.iter().zip(&orig).all(|(a, b)| a.to_bits() == b.to_bits()), "`{k}` changed with --train cls");
    }
}
