//! The command line: raw arguments in, validated settings, then one call into
//! the library per subcommand. Errors print as one line, `error: ...`, and
//! exit with status 1; nothing here does real work.

mod cache_cmd;
mod demo_cmd;
mod export_cmd;
mod inspect_cmd;
mod train_cmd;
mod predict_cmd;
mod val_cmd;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::engine::{Device, EngineChoice, EngineOptions};
use crate::graph::Model;

#[derive(Parser)]
#[command(name = "freezesplit", version, about = "Fine-tune an exported YOLOv5 ONNX on CPU: the Detect head, or layers N..23 and the head (--freeze N), on cached frozen features")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole job on a built-in example: cache, fine-tune a new class set, export, predict
    Demo(demo_cmd::DemoArgs),
    /// Show the Detect head (nc, anchors, strides, names) and a layer table
    Inspect(inspect_cmd::InspectArgs),
    /// Run the frozen backbone+neck once per image and cache the head inputs
    Cache(cache_cmd::CacheArgs),
    /// Train the head on cached features (YOLOv5's loss, optimizers and schedule)
    Train(train_cmd::TrainArgs),
    /// Validate a model, run or head on a dataset split (YOLOv5 val.py metrics)
    Val(val_cmd::ValArgs),
    /// Write a complete YOLOv5-style ONNX (frozen backbone + head + decode)
    Export(export_cmd::ExportArgs),
    /// Detect objects in images; annotated copies, YOLO labels and predictions.json
    Predict(predict_cmd::PredictArgs),
}

/// Engine flags shared by every command that runs the frozen graph.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Inference engine: ort (ONNX Runtime), tract (pure Rust), auto (ort when its library is found)
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineChoice,
    /// cpu, cuda, cuda:N, or auto (CUDA if available, else CPU, and says so)
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Path to libonnxruntime.so (else ORT_DYLIB_PATH, else a .venv next to the project)
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Worker threads (default: all cores)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl EngineArgs {
    pub fn options(&self) -> EngineOptions {
        EngineOptions { engine: self.engine, device: self.device, ort_lib: self.ort_lib.clone(), threads: self.threads, ort_spinning: false }
    }
}

/// The largest `--imgsz` accepted; YOLOv5 models are trained at 640 or 1280.
pub const MAX_IMGSZ: usize = 8192;

/// `--imgsz` checked against the model: out of range (0, or above
/// `MAX_IMGSZ`) is refused; a size that is not a multiple of the model's
/// largest stride is rounded up with a warning, as YOLOv5's `check_img_size`
/// does; a static export only runs at its own size (the default).
pub fn resolve_imgsz(model: &Model, requested: Option<usize>) -> Result<usize> {
    let stride = model.spec.strides().iter().fold(1f32, |a, &b| a.max(b)) as usize;
    let requested = match requested {
        Some(r) if r == 0 || r > MAX_IMGSZ => bail!("--imgsz {r} is out of range: give the image size in pixels, from 1 to {MAX_IMGSZ}"),
        Some(r) if r % stride != 0 => {
            let up = r.div_ceil(stride) * stride;
            eprintln!("warning: --imgsz {r} must be a multiple of the max stride {stride}, updating to {up}");
            Some(up)
        }
        r => r,
    };
    match (model.spec.imgsz, requested) {
        (Some([h, w]), _) if h != w => bail!("{} has a non-square input {h}x{w}; freezesplit letterboxes to squares", model.path.display()),
        (Some([h, _]), Some(r)) if r != h => bail!("{} is a static {h}x{h} export; --imgsz {r} cannot be used with it (export it with --dynamic, or drop --imgsz)", model.path.display()),
        (Some([h, _]), _) => Ok(h),
        (None, r) => Ok(r.unwrap_or(640)),
    }
}

/// `--conf-thres` and `--iou-thres` must lie in [0, 1] (NaN does not).
pub fn check_thresholds(conf_thres: f64, iou_thres: f64) -> Result<()> {
    for (flag, v) in [("--conf-thres", conf_thres), ("--iou-thres", iou_thres)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{flag} {v} is out of range: give a number from 0 to 1");
        }
    }
    Ok(())
}

/// Parses the arguments and runs the command; returns the exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo_cmd::run(a),
        Command::Inspect(a) => inspect_cmd::run(a),
        Command::Cache(a) => cache_cmd::run(a),
        Command::Train(a) => train_cmd::run(a),
        Command::Val(a) => val_cmd::run(a),
        Command::Export(a) => export_cmd::run(a),
        Command::Predict(a) => predict_cmd::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// `--freeze N` of export and predict: the model must split at N and its
/// layers N..23 must be ones the Rust tail runs. The graph written or run is
/// then the frozen part, those layers (with a run's trained initializers,
/// put in by `weights::resolve`) and the head: the original topology.
pub fn check_freeze(model: &crate::graph::Model, freeze: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = freeze {
        let cut = model.cut(n)?;
        let imgsz = model.spec.imgsz.map_or(640, |[h, _]| h);
        crate::tail::TailNet::build(model, &cut, imgsz)?;
    }
    Ok(())
}
