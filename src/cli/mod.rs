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

use clap::{Args, Parser, Subcommand};

use crate::engine::{Device, EngineChoice, EngineOptions};

#[derive(Parser)]
#[command(name = "freezesplit", version, about = "Fine-tune the Detect head of an exported YOLOv5 ONNX on CPU, on cached frozen features")]
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
