//! `freezesplit demo`: nothing in; the whole job on a built-in example out.
//!
//! The committed demo model (models/demo-shapes.onnx) was pretrained to
//! detect red, green and blue circles, squares and triangles (9 classes). The
//! demo draws a new synthetic dataset of the same objects labelled by colour
//! only (3 classes), caches its features,
//! trains only the class rows for the new 3-class set, prints the before/after
//! table, exports the fine-tuned ONNX and annotates a few val images.

pub mod synth;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::cache::Dtype;
use crate::engine::EngineOptions;
use crate::graph::Model;
use crate::head::Head;
use crate::train::hyp::TrainHyp;
use crate::train::optim::OptimizerKind;
use crate::train::{TrainOptions, TrainWhat};
use crate::val::ValReport;

/// Where the committed demo model is.
pub fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-shapes.onnx")
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoMetrics {
    #[serde(rename = "mAP50")]
    pub map50: f64,
    #[serde(rename = "mAP50_95")]
    pub map: f64,
    #[serde(rename = "class_agnostic_mAP50")]
    pub agnostic_map50: f64,
    pub matched_class_accuracy: f64,
}

impl DemoMetrics {
    fn of(r: &ValReport) -> DemoMetrics {
        DemoMetrics { map50: r.summary.map50, map: r.summary.map, agnostic_map50: r.summary.agnostic_map50, matched_class_accuracy: r.summary.class_accuracy.accuracy }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub before: DemoMetrics,
    pub after: DemoMetrics,
    pub run: PathBuf,
    pub exported: PathBuf,
    pub predictions: PathBuf,
    pub seconds: f64,
}

pub struct DemoOptions {
    pub project: PathBuf,
    pub epochs: usize,
    pub engine: EngineOptions,
    pub progress: bool,
}

pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let start = std::time::Instant::now();
    let model_path = demo_model();
    if !model_path.exists() {
        bail!("the demo model {} is missing; it is made by tools/make_demo_model.py", model_path.display());
    }
    let save_dir = crate::runs::claim(&opts.project, "exp", false)?;
    let data_dir = save_dir.join("data");
    if opts.progress {
        eprintln!("demo: drawing 240 train + 60 val synthetic images labelled by colour into {}", data_dir.display());
    }
    let yaml = synth::colour_dataset(&data_dir, 240, 60, 0)?;

    let model = Model::load(&model_path)?;
    let train_opts = TrainOptions {
        weights: model_path.clone(),
        data: yaml,
        epochs: opts.epochs,
        batch_size: 16,
        imgsz: model.spec.imgsz.map_or(256, |s| s[0]),
        hyp: TrainHyp::default(),
        train: TrainWhat::Cls,
        reinit_head: false,
        optimizer: OptimizerKind::Sgd,
        cos_lr: false,
        label_smoothing: 0.0,
        lr_box: 1.0,
        lr_obj: 1.0,
        lr_cls: 1.0,
        seed: 0,
        patience: crate::train::default_patience(),
        save_period: crate::train::default_save_period(),
        save_dir: save_dir.join("train"),
        cache_dir: save_dir.join("cache"),
        dtype: Dtype::F16,
        freeze: crate::graph::cut::HEAD_ONLY,
        add_classes: false,
        pseudo_labels: true,
        precision: crate::train::Precision::F32,
        sparse: crate::train::sparse::resolve(TrainWhat::Cls, false, false)?,
        engine: opts.engine.clone(),
        progress: opts.progress,
    };
    let report = crate::train::train(&train_opts, false)?;
    let (Some(before), Some(after)) = (report.before, report.after) else { bail!("the demo's val split produced no metrics") };

    let head = Head::load(&train_opts.save_dir.join("weights/best"))?;
    let exported = train_opts.save_dir.join("weights/best.onnx");
    crate::export::write_export(&exported, &model, &head, None)?;

    let val_images: Vec<PathBuf> = (0..6).map(|i| data_dir.join(format!("images/val/val{i:04}.png"))).collect();
    let predictions = save_dir.join("predict");
    let popts = crate::predict::PredictOptions { conf_thres: 0.25, iou_thres: 0.45, max_det: 1000, imgsz: train_opts.imgsz };
    crate::predict::predict(&model, &head, &val_images, &popts, &opts.engine, &predictions, false)?;

    Ok(DemoReport { before: DemoMetrics::of(&before), after: DemoMetrics::of(&after), run: save_dir, exported, predictions, seconds: start.elapsed().as_secs_f64() })
}
