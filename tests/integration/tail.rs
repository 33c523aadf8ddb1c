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
