//! `freezesplit val --weights MODEL.onnx|RUN --data data.yaml [--split val]`:
//! arguments in; the fast path (cache + Rust head) or the full path (complete
//! exported ONNX) run through `crate::val`; the report printed as val.py's
//! table or as JSON.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use super::EngineArgs;
use super::cache_cmd::resolve_imgsz;
use crate::cache::{Dtype, FeatureCache, build, default_cache_dir};
use crate::data::Dataset;
use crate::engine::Engine;
use crate::val::{self, ValOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValPath {
    /// Cached frozen features + the Rust head (fills the cache when needed)
    Fast,
    /// The complete exported ONNX on an engine, image by image
    Full,
}

#[derive(Args)]
pub struct ValArgs {
    /// An exported YOLOv5 ONNX, a run directory, or a saved head
    #[arg(long)]
    pub weights: PathBuf,
    /// data.yaml of an Ultralytics-layout dataset
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "val")]
    pub split: String,
    #[arg(long, default_value_t = 0.001)]
    pub conf_thres: f64,
    #[arg(long, default_value_t = 0.6)]
    pub iou_thres: f64,
    #[arg(long, default_value_t = 300)]
    pub max_det: usize,
    #[arg(long, value_enum, default_value = "fast")]
    pub path: ValPath,
    /// Cache root (default: $FREEZESPLIT_CACHE or ~/.cache/freezesplit)
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Storage type of the cached features (fast path)
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: Dtype,
    /// Image size for dynamic exports (static exports use their own)
    #[arg(long)]
    pub imgsz: Option<usize>,
    /// Images per loss batch (val.py's 32)
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Fast path: cache layers 0..N-1 and run layers N..23 in Rust (YOLOv5's --freeze N, 10..=24) [default: 24]
    #[arg(long)]
    pub freeze: Option<usize>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ValArgs) -> Result<()> {
    super::check_thresholds(a.conf_thres, a.iou_thres)?;
    // the dataset first: a wrong --split or a split without labels is
    // refused before the model is read
    let data = Dataset::load(&a.data)?;
    let images = data.labelled_images(&a.split)?;
    if images.is_empty() {
        bail!("the `{}` split of {} has no images", a.split, a.data.display());
    }
    let (model, head, source) = crate::weights::resolve(&a.weights)?;
    // a dataset naming some of the model's classes is validated on those (val::classes)
    let selected = val::classes::val_classes(&head, &data.names, &a.weights.display().to_string(), &a.data.display().to_string())?;
    let base_nc = val::classes::base_nc_of(&model, &source)?;
    let groups = (selected.is_some() || base_nc.is_some())
        .then(|| val::classes::ClassGroups { model_nc: head.nc, model_ids: selected.clone().unwrap_or_else(|| (0..head.nc).collect()), base_nc: base_nc.unwrap_or(head.nc) });
    let head = match &selected {
        Some(ids) => val::classes::select_classes(&head, ids),
        None => head,
    };
    let imgsz = resolve_imgsz(&model, a.imgsz)?;
    let opts = ValOptions {
        conf_thres: a.conf_thres,
        iou_thres: a.iou_thres,
        max_det: a.max_det,
        batch_size: a.batch_size,
        dtype: a.dtype,
        losses: a.path == ValPath::Fast,
        progress: !a.json,
        warn_labels: true,
    };
    let (report, engine, cache_dir) = match a.path {
        ValPath::Full => {
            let (r, e) = val::full::validate_full(&model, &head, &images, imgsz, &opts, &a.engine.options())?;
            (r, e, None)
        }
        ValPath::Fast => {
            let root = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
            let cut = model.cut(a.freeze.unwrap_or(crate::graph::cut::HEAD_ONLY))?;
            // a run's trained layers are in `model` already (weights::resolve)
            let tail = if cut.freeze < crate::graph::cut::HEAD_ONLY { Some(crate::tail::TailNet::build(&model, &cut, imgsz)?) } else { None };
            let (cache, frozen) = FeatureCache::open_at(&root, &model, &cut, imgsz)?;
            let (mut items, mut skipped) = val::cached_items(&cache, &images, a.dtype);
            let mut engine = "none (all features were cached)".to_string();
            if !skipped.is_empty() {
                let mut e = Engine::for_fill(&model.path, &frozen, imgsz, &a.engine.options())?;
                let fill = build::fill(&cache, &mut e, &images, &build::FillOptions { batch_size: 2, dtype: a.dtype, progress: !a.json })?;
                engine = e[0].name();
                (items, skipped) = val::cached_items(&cache, &images, a.dtype);
                for s in &mut skipped {
                    if let Some(f) = fill.skipped_images.iter().find(|f| f.path == s.path) {
                        s.reason = f.reason.clone();
                    }
                }
            }
            // below N = 24 the items become the tail's outputs, written to a
            // temporary directory that must outlive validate_items
            let _tmp = match &tail {
                Some(net) => {
                    let tmp = crate::fsutil::temp_dir("freezesplit-val-", "the tail's outputs on the val images")?;
                    let shapes: Vec<[usize; 3]> = (0..cut.crossing.len()).map(|i| cut.shape(i, imgsz)).collect();
                    items = crate::train::tail::val_items(net, &items, &shapes, a.batch_size, tmp.path())?;
                    Some(tmp)
                }
                None => None,
            };
            let mut r = val::validate_items(&head, &items, &opts)?;
            r.skipped_images = skipped;
            (r, engine, Some(cache.dir))
        }
    };
    let report = val::ValReport { groups, ..report };
    if a.json {
        let mut v = val::report::to_json(&report);
        v["engine"] = engine.into();
        v["cache"] = serde_json::to_value(&cache_dir)?;
        v["weights"] = source.to_string().into();
        v["path"] = format!("{:?}", a.path).to_lowercase().into();
        v["imgsz"] = imgsz.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", val::report::text(&report));
        match &cache_dir {
            Some(d) => println!("weights: {source}; features: {} ({}, {engine}); {:.1}s", d.display(), a.dtype.name(), report.seconds),
            None => println!("weights: {source}; full model on {engine}; {:.1}s", report.seconds),
        }
    }
    Ok(())
}
