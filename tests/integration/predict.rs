//! `freezesplit predict` on fixture images: a run directory per call (exp,
//! exp2), an annotated copy per image, YOLO label lines that match
//! predictions.json, and a clear error for a missing source.

use crate::common;

use std::process::Command;

#[test]
fn predict_writes_annotations_labels_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["a_landscape.jpg", "b_portrait.png"] {
        std::fs::copy(common::fixture(&format!("letterbox/src/{f}")), src.join(f)).unwrap();
    }
    let project = dir.path().join("runs/predict");
    // Random-weight model: a low threshold so that there are boxes to check.
    let run = |extra: &[&str]| {
        Command::new(common::bin())
            .args(["predict", "--json", "--engine", "tract", "--conf-thres", "0.0", "--max-det", "20", "--weights"])
            .arg(common::root().join("models/tiny-320-op17.onnx"))
            .arg("--project")
            .arg(&project)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let save = project.join("exp");
    assert_eq!(v["save_dir"].as_str().unwrap(), save.to_str().unwrap());
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    let on_disk: serde_json::Value = serde_json::from_slice(&std::fs::read(save.join("predictions.json")).unwrap()).unwrap();
    assert_eq!(&on_disk, &v["predictions"]);
    let mut boxes = 0;
    for p in preds {
        let name = std::path::Path::new(p["image"].as_str().unwrap()).file_name().unwrap().to_owned();
        let annotated = image::open(save.join(&name)).unwrap();
        assert_eq!((annotated.width() as u64, annotated.height() as u64), (p["width"].as_u64().unwrap(), p["height"].as_u64().unwrap()));
        let dets = p["detections"].as_array().unwrap();
        boxes += dets.len();
        let stem = std::path::Path::new(&name).file_stem().unwrap().to_str().unwrap().to_owned();
        let txt = save.join("labels").join(format!("{stem}.txt"));
        if dets.is_empty() {
            assert!(!txt.exists());
            continue;
        }
        let lines: Vec<String> = std::fs::read_to_string(&txt).unwrap().lines().map(String::from).collect();
        assert_eq!(lines.len(), dets.len());
        for (l, d) in lines.iter().zip(dets) {
            let f: Vec<f64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            assert_eq!(f.len(), 6, "class x y w h conf: {l}");
            assert_eq!(f[0] as u64, d["class"].as_u64().unwrap());
            assert!(f[1..5].iter().all(|&x| (0.0..=1.0).contains(&x)), "{l}");
            assert!((f[5] - d["conf"].as_f64().unwrap()).abs() < 1e-5);
            let xy = d["xyxy"].as_array().unwrap();
            let cx = (xy[0].as_f64().unwrap() + xy[2].as_f64().unwrap()) / 2.0 / p["width"].as_f64().unwrap();
            assert!((f[1] - cx).abs() < 1e-5, "{l}");
        }
    }
    assert!(boxes > 0, "the threshold gives boxes to check");

    let out = run(&[src.join("a_landscape.jpg").to_str().unwrap()]);
    assert!(out.status.success());
    assert!(project.join("exp2/a_landscape.jpg").exists(), "a second run goes to exp2");

    let out = run(&[dir.path().join("missing.jpg").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jpg"));
}
