//! Shared helpers for the integration tests: where the project's own models
//! are, where ../shared is (tests that need it skip with a reason when it is
//! absent), and whether ONNX Runtime's library can be found.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use freezesplit::engine::{EngineChoice, EngineOptions, ort_engine};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's committed test models.
pub fn project_models() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    v
}

/// `../shared`, or `None` after printing why the caller skips.
pub fn shared(what: &str) -> Option<PathBuf> {
    let p = root().join("../shared");
    if p.join("models").is_dir() {
        Some(p)
    } else {
        eprintln!("skipping {what}: ../shared is absent (it holds the real YOLOv5n exports and datasets)");
        None
    }
}

pub fn shared_models() -> Vec<PathBuf> {
    let Some(s) = shared("the ../shared models") else { return vec![] };
    let mut v: Vec<PathBuf> = std::fs::read_dir(s.join("models")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "onnx")).collect();
    v.sort();
    v
}

/// Engine options for each engine available here. The tract engine always
/// is; ort when its library is found (CI installs it into .venv).
pub fn engines() -> Vec<EngineOptions> {
    let mut v = vec![EngineOptions { engine: EngineChoice::Tract, ..Default::default() }];
    if ort_engine::find_library(None).is_some() {
        v.push(EngineOptions { engine: EngineChoice::Ort, device: freezesplit::engine::Device::Cpu, ..Default::default() });
    } else {
        eprintln!("note: ONNX Runtime library not found: ort engine not tested (CI installs it into .venv)");
    }
    v
}

pub fn python_with_onnx() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = py.exists() && std::process::Command::new(&py).args(["-c", "import onnx"]).status().is_ok_and(|s| s.success());
    if ok { Some(py) } else { None }
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_freezesplit"))
}
