// Parity of head_forward + build_targets + compute_loss + backward against
// yolov5 7.0's ComputeLoss (fixtures from tools/loss_fixtures.py).
// In: tests/fixtures/loss/<case>.{safetensors,json}.
// Out: pass/fail; `-- --nocapture` prints the max errors per case.
//
// Tolerances: each loss part |rust - torch| <= 1e-4 * |torch| + 1e-7; each
// gradient tensor max|rust - torch| <= 1e-3 * max|torch| (relative to the
// tensor's max abs value); build_targets indices/classes exact, tbox 1e-6;
// head output p 1e-5 abs.

use std::path::PathBuf;

use ndarray::{Array2, ArrayD, ArrayView4, Ix4, IxDyn};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use freezesplit::autograd::{Features, Tape, Var};
use freezesplit::loss::{
    ANCHORS_P3_P5, Hyp, LossConfig, STRIDES_P3_P5, anchors_in_grid_units, build_targets,
    LossParts, compute_loss, compute_loss_on_features, head_forward, nchw_to_rows, scale_hyp,
};

const CASES: [&str; 7] = [
    "nc80_ls0",
    "nc80_ls01",
    "nc5_ls0",
    "nc5_ls01",
    "nc5_focal",
    "nc1",
    "nc5_notargets",
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss")
}

struct Case {
    meta: Value,
    bytes: Vec<u8>,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = fixture_dir();
        let meta_path = dir.join(format!("{name}.json"));
        let meta = serde_json::from_str(
            &std::fs::read_to_string(&meta_path).unwrap_or_else(|e| panic!("{meta_path:?}: {e}")),
        )
        .unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
        Case { meta, bytes }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn f32(&self, key: &str) -> ArrayD<f32> {
        let st = self.st();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("missing tensor {key}"));
        assert_eq!(t.dtype(), Dtype::F32, "{key}");
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    }

    fn i64(&self, key: &str) -> ArrayD<i64> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{key}");
        let v: Vec<i64> = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    }

    fn has(&self, key: &str) -> bool {
        self.st().tensor(key).is_ok()
    }

    fn num(&self, path: &[&str]) -> f64 {
        let mut v = &self.meta;
        for p in path {
            v = &v[*p];
        }
        v.as_f64().unwrap_or_else(|| panic!("json {path:?}"))
    }

    fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap() as usize
    }

    fn hyp(&self) -> Hyp {
        let h = |k: &str| self.num(&["hyp", k]) as f32;
        Hyp {
            box_: h("box"),
            obj: h("obj"),
            cls: h("cls"),
            cls_pw: h("cls_pw"),
            obj_pw: h("obj_pw"),
            anchor_t: h("anchor_t"),
            fl_gamma: h("fl_gamma"),
            label_smoothing: h("label_smoothing"),
        }
    }

    fn anchors(&self) -> Vec<Vec<[f32; 2]>> {
        let a = self.f32("anchors");
        (0..a.shape()[0])
            .map(|i| {
                (0..a.shape()[1])
                    .map(|j| [a[[i, j, 0]], a[[i, j, 1]]])
                    .collect()
            })
            .collect()
    }

    fn grids(&self) -> Vec<(usize, usize)> {
        (0..self.usize("nl"))
            .map(|i| {
                let f = self.f32(&format!("feat{i}"));
                (f.shape()[2], f.shape()[3])
            })
            .collect()
    }

    fn targets(&self) -> Array2<f32> {
        let t = self.f32("targets");
        let nt = t.shape()[0];
        t.into_shape_with_order((nt, 6)).unwrap()
    }
}

fn max_abs(a: &ArrayD<f32>) -> f32 {
    a.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn hyp_scaling_and_anchors_match_fixtures() {
    for name in CASES {
        let c = Case::load(name);
        let nc = c.usize("nc");
        let raw = Hyp {
            label_smoothing: c.num(&["hyp", "label_smoothing"]) as f32,
            fl_gamma: c.num(&["hyp", "fl_gamma"]) as f32,
            ..Hyp::scratch_low()
        };
        let ours = scale_hyp(&raw, nc, c.usize("nl"), c.usize("imgsz"));
        let theirs = c.hyp();
        for (a, b, k) in [
            (ours.box_, theirs.box_, "box"),
            (ours.obj, theirs.obj, "obj"),
            (ours.cls, theirs.cls, "cls"),
            (ours.cls_pw, theirs.cls_pw, "cls_pw"),
            (ours.obj_pw, theirs.obj_pw, "obj_pw"),
            (ours.anchor_t, theirs.anchor_t, "anchor_t"),
        ] {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{name} hyp {k}: {a} vs {b}"
            );
        }
        assert_eq!(
            c.anchors(),
            anchors_in_grid_units(&ANCHORS_P3_P5, &STRIDES_P3_P5),
            "{name}"
        );
    }
}

#[test]
fn build_targets_matches_fixtures() {
    for name in CASES {
        let c = Case::load(name);
        let lts = build_targets(
            c.targets().view(),
            &c.anchors(),
            &c.grids(),
            c.hyp().anchor_t,
        );
        for (i, lt) in lts.iter().enumerate() {
            let idx = c.i64(&format!("bt{i}_indices"));
            let tbox = c.f32(&format!("bt{i}_tbox"));
            let tcls = c.i64(&format!("bt{i}_tcls"));
            assert_eq!(lt.len(), idx.shape()[0], "{name} level {i} count");
            for k in 0..lt.len() {
                let got = [lt.b[k], lt.a[k], lt.gj[k], lt.gi[k]].map(|v| v as i64);
                let want = [idx[[k, 0]], idx[[k, 1]], idx[[k, 2]], idx[[k, 3]]];
                assert_eq!(got, want, "{name} level {i} row {k} indices");
                assert_eq!(
                    lt.tcls[k] as i64,
                    tcls[[k]],
                    "{name} level {i} row {k} tcls"
                );
                for d in 0..4 {
                    assert!(
                        (lt.tbox[k][d] - tbox[[k, d]]).abs() <= 1e-6,
                        "{name} level {i} row {k} tbox"
                    );
                }
            }
        }
    }
}

#[test]
fn loss_and_grads_match_yolov5() {
    let mut report = Vec::new();
    for name in CASES {
        let c = Case::load(name);
        let (nc, na, nl, bs) = (c.usize("nc"), c.usize("na"), c.usize("nl"), c.usize("bs"));
        let no = nc + 5;
        let grids = c.grids();
        let cfg = LossConfig::new(c.hyp(), nc, c.anchors());

        let mut t = Tape::new();
        let mut feats = Vec::new();
        let mut ws = Vec::new();
        let mut bsv = Vec::new();
        for i in 0..nl {
            let f = c
                .f32(&format!("feat{i}"))
                .into_dimensionality::<Ix4>()
                .unwrap();
            let rows: ArrayView4<f32> = f.view();
            feats.push(t.constant(nchw_to_rows(rows).into_dyn()));
            ws.push(t.param(c.f32(&format!("weight{i}"))));
            bsv.push(t.param(c.f32(&format!("bias{i}"))));
        }
        let p = head_forward(&mut t, &feats, &ws, &bsv, bs, &grids, na);

        // Head layout: p[i] rows (b, a, y, x) == torch p[i] [bs, na, ny, nx, no] flattened.
        let mut p_err = 0.0f32;
        let p_stored = c.has("p0");
        assert_eq!(
            p_stored,
            nc <= 5,
            "{name}: fixture stores p only for nc <= 5"
        );
        for (i, &pi) in p.iter().enumerate() {
            assert_eq!(t.value(pi).shape()[1], no);
            if p_stored {
                let want = c.f32(&format!("p{i}"));
                let want = want
                    .to_shape(IxDyn(t.value(pi).shape()))
                    .unwrap()
                    .into_owned();
                p_err = p_err.max(max_diff(t.value(pi), &want));
            }
        }
        assert!(p_err <= 1e-5, "{name}: head output differs by {p_err}");

        let parts = compute_loss(&mut t, &cfg, &p, &grids, bs, c.targets().view());
        let (loss_rel, grad_rel) = check_against_fixture(name, &c, &t, parts, &ws, &bsv);

        // The training path: the same loss straight from NCHW features, with
        // the convs evaluated only where the loss reads them.
        let mut t2 = Tape::new();
        let (mut feats2, mut ws2, mut bsv2) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..nl {
            feats2.push(t2.input(Features::from_array(c.f32(&format!("feat{i}")))));
            ws2.push(t2.param(c.f32(&format!("weight{i}"))));
            bsv2.push(t2.param(c.f32(&format!("bias{i}"))));
        }
        let parts2 = compute_loss_on_features(&mut t2, &cfg, &feats2, &ws2, &bsv2, &grids, bs, c.targets().view());
        let (loss_rel2, grad_rel2) = check_against_fixture(name, &c, &t2, parts2, &ws2, &bsv2);
        let p_txt = if p_stored {
            format!("{p_err:.1e}")
        } else {
            "n/a".into()
        };
        report.push(format!(
            "{name:14} loss max rel err {loss_rel:.2e}  grad max err/max|g| {grad_rel:.2e}  head p max abs err {p_txt}  | from features: loss {loss_rel2:.2e} grad {grad_rel2:.2e}"
        ));
    }
    for r in report {
        println!("{r}");
    }
}

/// Losses and gradients of one tape against the fixture; returns the largest
/// relative loss error and the largest gradient error / max|grad|.
fn check_against_fixture(name: &str, c: &Case, t: &Tape, parts: LossParts, ws: &[Var], bsv: &[Var]) -> (f64, f32) {
    let nl = ws.len();
        let mut loss_rel = 0.0f64;
        for (var, key) in [
            (parts.total, "total"),
            (parts.lbox, "lbox"),
            (parts.lobj, "lobj"),
            (parts.lcls, "lcls"),
        ] {
            let got = t.scalar(var) as f64;
            let want = c.num(&["loss", key]);
            let err = (got - want).abs();
            assert!(
                err <= 1e-4 * want.abs() + 1e-7,
                "{name} {key}: rust {got} vs torch {want}"
            );
            if want != 0.0 {
                loss_rel = loss_rel.max(err / want.abs());
            }
        }

        let g = t.backward(parts.total);
        let mut grad_rel = 0.0f32;
        for i in 0..nl {
            for (var, key) in [
                (ws[i], format!("grad_weight{i}")),
                (bsv[i], format!("grad_bias{i}")),
            ] {
                let want = c.f32(&key);
                let got = g
                    .get(var)
                    .cloned()
                    .unwrap_or_else(|| ArrayD::zeros(want.raw_dim()));
                let got = got.to_shape(want.raw_dim()).unwrap().into_owned();
                let scale = max_abs(&want).max(1e-12);
                let rel = max_diff(&got, &want) / scale;
                assert!(rel <= 1e-3, "{name} {key}: max diff / max|grad| = {rel}");
                grad_rel = grad_rel.max(rel);
            }
        }
        (loss_rel, grad_rel)
}
