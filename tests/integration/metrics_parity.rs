// Parity against YOLOv5 7.0 itself (fixtures from tools/metrics_fixtures.py).
// In: tests/fixtures/metrics/{coco80,shapes3}.{safetensors,json} and interp_cases.json,
// in tests/fixtures/metrics. Out: pass/fail plus a per-dataset report of the largest differences
// (run with --nocapture to see it).

use std::path::PathBuf;

use ndarray::{Array2, ArrayView2, s};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use freezesplit::metrics::{
    self, IOUV, ValStats, ap_per_class, non_max_suppression, npmath, process_batch, scale_boxes,
};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics")
}

struct Fixture {
    bytes: Vec<u8>,
    meta: Value,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let dir = fixtures_dir();
        let bytes = std::fs::read(dir.join(format!("{name}.safetensors")))
            .unwrap_or_else(|e| panic!("{}: {e} (set METRICS_FIXTURES_DIR)", dir.display()));
        let meta =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap())
                .unwrap();
        Fixture { bytes, meta }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn raw(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("missing tensor {key}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }
    fn f32_2d(&self, key: &str) -> Array2<f32> {
        let (dt, shape, data) = self.raw(key);
        assert_eq!(dt, Dtype::F32, "{key}");
        let v: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Array2::from_shape_vec((shape[0], shape[1]), v).unwrap()
    }
    fn f64_vec(&self, key: &str) -> (Vec<usize>, Vec<f64>) {
        let (dt, shape, data) = self.raw(key);
        assert_eq!(dt, Dtype::F64, "{key}");
        (
            shape,
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
    fn i64_vec(&self, key: &str) -> Vec<i64> {
        let (dt, _, data) = self.raw(key);
        assert_eq!(dt, Dtype::I64, "{key}");
        data.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn u8_2d(&self, key: &str) -> Array2<u8> {
        let (dt, shape, data) = self.raw(key);
        assert_eq!(dt, Dtype::U8, "{key}");
        Array2::from_shape_vec((shape[0], shape[1]), data).unwrap()
    }
    fn has(&self, key: &str) -> bool {
        self.st().tensor(key).is_ok()
    }
    fn nc(&self) -> usize {
        self.meta["nc"].as_u64().unwrap() as usize
    }
    fn images(&self) -> &Vec<Value> {
        self.meta["images"].as_array().unwrap()
    }
    fn results(&self) -> &Value {
        &self.meta["results"]
    }
}

fn shape2(v: &Value) -> [usize; 2] {
    [
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    ]
}

fn ratio_pad(v: &Value) -> metrics::RatioPad {
    let f = |x: &Value| x.as_f64().unwrap();
    ([f(&v[0][0]), f(&v[0][1])], [f(&v[1][0]), f(&v[1][1])])
}

fn max_abs_diff_f32(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn json_f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Per-image NMS outputs: same rows, same order, values within 1e-4 (we expect 0).
fn check_nms(fx: &Fixture, name: &str) {
    let mut worst = 0.0f32;
    let mut rows = 0;
    for (i, _) in fx.images().iter().enumerate() {
        let k = format!("img{i:02}");
        let pred = fx.f32_2d(&format!("{k}_pred"));
        for (key, cfg) in fx.meta["nms"].as_object().unwrap() {
            let classes: Option<Vec<usize>> = cfg["classes"]
                .as_array()
                .map(|a| a.iter().map(|c| c.as_u64().unwrap() as usize).collect());
            let out = non_max_suppression(
                pred.view(),
                cfg["conf_thres"].as_f64().unwrap(),
                cfg["iou_thres"].as_f64().unwrap(),
                classes.as_deref(),
                cfg["agnostic"].as_bool().unwrap(),
                cfg["multi_label"].as_bool().unwrap(),
                cfg["max_det"].as_u64().unwrap() as usize,
            );
            let want = fx.f32_2d(&format!("{k}_nms_{key}"));
            assert_eq!(out.dim(), want.dim(), "{name} {k} nms_{key}: shape");
            let d = max_abs_diff_f32(out.view(), want.view());
            assert!(d <= 1e-4, "{name} {k} nms_{key}: max diff {d}");
            worst = worst.max(d);
            rows += out.nrows();
        }
    }
    println!("{name}: NMS {rows} rows over 3 settings, max |diff| = {worst:e}");
}

/// scale_boxes on yolov5's NMS output must give yolov5's predn bit for bit.
fn check_scale(fx: &Fixture, name: &str) {
    let mut worst = 0.0f32;
    for (i, im) in fx.images().iter().enumerate() {
        let k = format!("img{i:02}");
        let mut p = fx.f32_2d(&format!("{k}_nms_val"));
        scale_boxes(
            shape2(&im["img1"]),
            p.view_mut(),
            shape2(&im["img0"]),
            Some(ratio_pad(&im["ratio_pad"])),
        );
        let want = fx.f32_2d(&format!("{k}_predn"));
        worst = worst.max(max_abs_diff_f32(p.view(), want.view()));
    }
    assert_eq!(worst, 0.0, "{name}: scale_boxes differs");
    println!("{name}: scale_boxes max |diff| = {worst:e}");
}

/// process_batch (class-aware and class-agnostic) must match exactly.
fn check_correct(fx: &Fixture, name: &str) {
    let mut n_true = 0;
    for (i, _) in fx.images().iter().enumerate() {
        let k = format!("img{i:02}");
        let predn = fx.f32_2d(&format!("{k}_predn"));
        let labels = fx.f32_2d(&format!("{k}_labels"));
        let want = fx.u8_2d(&format!("{k}_correct"));
        if predn.nrows() == 0 || labels.nrows() == 0 {
            assert!(want.iter().all(|&v| v == 0));
            continue;
        }
        let got = process_batch(predn.view(), labels.view(), &IOUV);
        let mut p0 = predn.clone();
        p0.column_mut(5).fill(0.0);
        let mut l0 = labels.clone();
        l0.column_mut(0).fill(0.0);
        let got_agn = process_batch(p0.view(), l0.view(), &IOUV);
        for ((idx, &w), (&g, &ga)) in want.indexed_iter().zip(got.iter().zip(got_agn.iter())) {
            assert_eq!(g, w & 1 == 1, "{name} {k} correct{idx:?}");
            assert_eq!(ga, w & 2 == 2, "{name} {k} correct_agnostic{idx:?}");
            n_true += g as usize;
        }
    }
    println!("{name}: correct matrices identical ({n_true} true entries)");
}

/// ap_per_class directly on yolov5's stats (rebuilt from the fixture).
fn check_ap(fx: &Fixture, name: &str) {
    let (mut tp_rows, mut conf, mut pcls, mut tcls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, _) in fx.images().iter().enumerate() {
        let k = format!("img{i:02}");
        let predn = fx.f32_2d(&format!("{k}_predn"));
        let labels = fx.f32_2d(&format!("{k}_labels"));
        let c = fx.u8_2d(&format!("{k}_correct"));
        if predn.nrows() == 0 && labels.nrows() == 0 {
            continue;
        }
        tp_rows.extend(c.iter().map(|&v| v & 1 == 1));
        conf.extend(predn.column(4).iter().copied());
        pcls.extend(predn.column(5).iter().map(|&v| v as usize));
        tcls.extend(labels.column(0).iter().map(|&v| v as usize));
    }
    let tp = Array2::from_shape_vec((conf.len(), 10), tp_rows).unwrap();
    let res = ap_per_class(tp.view(), &conf, &pcls, &tcls);
    let want_cls: Vec<usize> = fx.i64_vec("ap_class").iter().map(|&c| c as usize).collect();
    assert_eq!(res.unique_classes, want_cls, "{name}: ap_class");
    assert_eq!(
        res.best_index as u64,
        fx.results()["best_index"].as_u64().unwrap(),
        "{name}: F1 argmax index"
    );
    let mut worst = 0.0f64;
    for (key, got) in [
        ("p", &res.p),
        ("r", &res.r),
        ("f1", &res.f1),
        ("tp", &res.tp),
        ("fp", &res.fp),
    ] {
        let d = max_abs_diff(got, &fx.f64_vec(key).1);
        assert!(d <= 1e-9, "{name}: {key} max diff {d}");
        worst = worst.max(d);
    }
    let (ap_shape, ap_want) = fx.f64_vec("ap");
    assert_eq!(res.ap.dim(), (ap_shape[0], ap_shape[1]));
    let d = max_abs_diff(res.ap.as_slice().unwrap(), &ap_want);
    assert!(d <= 1e-9, "{name}: ap max diff {d}");
    worst = worst.max(d);
    if fx.has("py") {
        // YOLOv5's py only has rows for classes with predictions; ours has zero rows elsewhere
        let with_preds: Vec<usize> = res
            .unique_classes
            .iter()
            .enumerate()
            .filter(|(_, c)| pcls.contains(c))
            .map(|(i, _)| i)
            .collect();
        let (_, py_want) = fx.f64_vec("py");
        let py_got: Vec<f64> = with_preds
            .iter()
            .flat_map(|&i| res.py.row(i).to_vec())
            .collect();
        worst = worst.max(max_abs_diff(&py_got, &py_want));
        for (key, arr) in [
            ("p_curve", &res.p_curve),
            ("r_curve", &res.r_curve),
            ("f1_curve", &res.f1_curve),
        ] {
            let d = max_abs_diff(arr.as_slice().unwrap(), &fx.f64_vec(key).1);
            assert!(d <= 1e-12, "{name}: {key} max diff {d}");
            worst = worst.max(d);
        }
    }
    assert!(worst <= 1e-9, "{name}: ap_per_class worst diff {worst}");
    println!(
        "{name}: ap_per_class over {} preds / {} classes, max |diff| = {worst:e}",
        conf.len(),
        want_cls.len()
    );
}

/// ValStats end to end, fed with `predn` per image (yolov5's, or ours from our NMS).
fn run_valstats(fx: &Fixture, ours: bool) -> metrics::ValSummary {
    let mut vs = ValStats::new(fx.nc());
    let nms = &fx.meta["nms"]["val"];
    for (i, im) in fx.images().iter().enumerate() {
        let k = format!("img{i:02}");
        let labels = fx.f32_2d(&format!("{k}_labels"));
        let predn = if ours {
            let pred = fx.f32_2d(&format!("{k}_pred"));
            let mut p = non_max_suppression(
                pred.view(),
                nms["conf_thres"].as_f64().unwrap(),
                nms["iou_thres"].as_f64().unwrap(),
                None,
                false,
                true,
                nms["max_det"].as_u64().unwrap() as usize,
            );
            scale_boxes(
                shape2(&im["img1"]),
                p.slice_mut(s![.., ..4]),
                shape2(&im["img0"]),
                Some(ratio_pad(&im["ratio_pad"])),
            );
            p
        } else {
            fx.f32_2d(&format!("{k}_predn"))
        };
        vs.update(predn.view(), labels.view());
    }
    vs.finish()
}

fn check_valstats(fx: &Fixture, name: &str, ours: bool) {
    let r = run_valstats(fx, ours);
    let w = fx.results();
    let label = if ours {
        "full pipeline (our NMS)"
    } else {
        "ValStats"
    };
    assert_eq!(r.seen as u64, w["seen"].as_u64().unwrap());
    let nt: Vec<usize> = w["nt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(r.nt, nt, "{name}: nt");
    let mut worst = 0.0f64;
    for (key, got) in [
        ("mp", r.mp),
        ("mr", r.mr),
        ("map50", r.map50),
        ("map", r.map),
        ("agnostic_map50", r.agnostic_map50),
    ] {
        let d = (got - w[key].as_f64().unwrap()).abs();
        assert!(
            d <= 1e-6,
            "{name} {label}: {key} = {got} vs {} (diff {d})",
            w[key]
        );
        worst = worst.max(d);
    }
    let ap50: Vec<f64> = r.per_class.iter().map(|c| c.ap50).collect();
    let ap: Vec<f64> = r.per_class.iter().map(|c| c.ap50_95).collect();
    worst = worst
        .max(max_abs_diff(&ap50, &json_f64s(&w["ap50"])))
        .max(max_abs_diff(&ap, &json_f64s(&w["ap50_95"])));
    assert!(worst <= 1e-6, "{name} {label}: per-class AP diff {worst}");
    let (shape, cm) = fx.f64_vec("confusion");
    let got_cm: Vec<f64> = r.confusion.matrix.iter().map(|&v| v as f64).collect();
    assert_eq!((shape[0], shape[1]), r.confusion.matrix.dim());
    assert_eq!(got_cm, cm, "{name} {label}: confusion matrix");
    let acc = &w["class_acc"];
    assert_eq!(
        r.class_accuracy.matched as u64,
        acc["matched"].as_u64().unwrap(),
        "{name}: class_acc matched"
    );
    assert_eq!(
        r.class_accuracy.correct as u64,
        acc["correct"].as_u64().unwrap(),
        "{name}: class_acc correct"
    );
    println!(
        "{name}: {label}: P {:.6} R {:.6} mAP50 {:.6} mAP50-95 {:.6} agnostic mAP50 {:.6}, class acc {}/{}, confusion identical ({} counts), max |diff| = {worst:e}",
        r.mp,
        r.mr,
        r.map50,
        r.map,
        r.agnostic_map50,
        r.class_accuracy.correct,
        r.class_accuracy.matched,
        r.confusion.matrix.sum()
    );
}

fn check_dataset(name: &str) {
    let fx = Fixture::load(name);
    let iouv: Vec<f32> = json_f64s(&fx.meta["iouv"])
        .iter()
        .map(|&v| v as f32)
        .collect();
    assert_eq!(iouv, IOUV.to_vec(), "iouv");
    check_nms(&fx, name);
    check_scale(&fx, name);
    check_correct(&fx, name);
    check_ap(&fx, name);
    check_valstats(&fx, name, false);
    check_valstats(&fx, name, true);
}

#[test]
fn parity_coco80() {
    check_dataset("coco80");
}

#[test]
fn parity_shapes3() {
    check_dataset("shapes3");
}

#[test]
fn parity_np_interp() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixtures_dir().join("interp_cases.json")).unwrap())
            .unwrap();
    let mut n = 0;
    for (ci, c) in cases.as_array().unwrap().iter().enumerate() {
        let got = npmath::interp(
            &json_f64s(&c["x"]),
            &json_f64s(&c["xp"]),
            &json_f64s(&c["fp"]),
            c["left"].as_f64(),
            None,
        );
        let want = json_f64s(&c["y"]);
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "case {ci} x[{k}]: {g} vs {w}");
        }
        n += got.len();
    }
    println!("np.interp: {n} values bit-identical");
}

fn rows_f32(v: &Value, ncols: usize) -> Array2<f32> {
    let flat: Vec<f32> = v
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| json_f64s(r).into_iter().map(|x| x as f32))
        .collect();
    Array2::from_shape_vec((flat.len() / ncols, ncols), flat).unwrap()
}

/// Hand-made cases: exact ties where numpy/torch sort stably, f64 NMS threshold, and the
/// class-offset collision YOLOv5 allows when coordinates span more than 7680 px.
#[test]
fn parity_edge_cases() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixtures_dir().join("edge_cases.json")).unwrap())
            .unwrap();
    for c in cases["nms"].as_array().unwrap() {
        let pred = rows_f32(&c["pred"], c["pred"][0].as_array().unwrap().len());
        let cfg = &c["cfg"];
        let out = non_max_suppression(
            pred.view(),
            cfg["conf_thres"].as_f64().unwrap(),
            cfg["iou_thres"].as_f64().unwrap(),
            None,
            false,
            cfg["multi_label"].as_bool().unwrap(),
            cfg["max_det"].as_u64().unwrap() as usize,
        );
        assert_eq!(out, rows_f32(&c["out"], 6), "nms case {}", c["name"]);
    }
    for c in cases["matching"].as_array().unwrap() {
        let dets = rows_f32(&c["detections"], 6);
        let labels = rows_f32(&c["labels"], 5);
        let got = process_batch(dets.view(), labels.view(), &IOUV);
        let want: Vec<bool> = c["correct"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64() == Some(1)))
            .collect();
        assert_eq!(
            got.iter().copied().collect::<Vec<_>>(),
            want,
            "process_batch case {}",
            c["name"]
        );
        let nc = c["nc"].as_u64().unwrap() as usize;
        let mut cm = metrics::ConfusionMatrix::new(nc, 0.25, 0.45);
        cm.process_batch(Some(dets.view()), labels.view());
        let want_cm: Vec<u64> = c["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
            .collect();
        assert_eq!(
            cm.matrix.iter().copied().collect::<Vec<_>>(),
            want_cm,
            "confusion case {}",
            c["name"]
        );
    }
    println!(
        "edge cases: {} NMS + {} matching cases identical",
        cases["nms"].as_array().unwrap().len(),
        cases["matching"].as_array().unwrap().len()
    );
}
