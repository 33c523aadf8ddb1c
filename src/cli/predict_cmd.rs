//! `freezesplit predict --weights MODEL.onnx|RUN SOURCE...`: arguments in;
//! `crate::predict` run into a new `runs/predict/exp*` directory; a line per
//! image and the directory printed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::EngineArgs;
use super::cache_cmd::resolve_imgsz;
use crate::predict::{self, PredictOptions};

#[derive(Args)]
pub struct PredictArgs {
    /// An exported YOLOv5 ONNX, a run directory, or a saved head
    #[arg(long)]
    pub weights: PathBuf,
    /// Images or folders of images
    #[arg(required = true)]
    pub source: Vec<PathBuf>,
    #[arg(long, default_value_t = 0.25)]
    pub conf_thres: f64,
    #[arg(long, default_value_t = 0.45)]
    pub iou_thres: f64,
    #[arg(long, default_value_t = 1000)]
    pub max_det: usize,
    #[arg(long, default_value = "runs/predict")]
    pub project: PathBuf,
    #[arg(long, default_value = "exp")]
    pub name: String,
    /// Image size for dynamic exports (static exports use their own)
    #[arg(long)]
    pub imgsz: Option<usize>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// YOLOv5's --freeze N the model is split at (10..=24): the frozen graph, layers N..23 as trained (a run's own) and the head, as one graph [default: 24]
    #[arg(long)]
    pub freeze: Option<usize>,
    /// Print predictions.json's content instead of a line per image
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PredictArgs) -> Result<()> {
    super::check_thresholds(a.conf_thres, a.iou_thres)?;
    let (model, head, source) = crate::weights::resolve(&a.weights)?;
    super::check_freeze(&model, a.freeze)?;
    let imgsz = resolve_imgsz(&model, a.imgsz)?;
    let images = predict::list_sources(&a.source)?;
    let save_dir = crate::runs::claim(&a.project, &a.name, false)?;
    let opts = PredictOptions { conf_thres: a.conf_thres, iou_thres: a.iou_thres, max_det: a.max_det, imgsz };
    let results = predict::predict(&model, &head, &images, &opts, &a.engine.options(), &save_dir, !a.json)?;
    if a.json {
        // A struct, not json!: json! widens the f32 values to f64 digits.
        #[derive(serde::Serialize)]
        struct Out<'a> {
            save_dir: &'a std::path::Path,
            weights: String,
            predictions: &'a [predict::ImagePrediction],
        }
        println!("{}", serde_json::to_string_pretty(&Out { save_dir: &save_dir, weights: source.to_string(), predictions: &results })?);
    } else {
        println!("Results saved to {} ({} images, labels in {})", save_dir.display(), results.len(), save_dir.join("labels").display());
    }
    Ok(())
}
