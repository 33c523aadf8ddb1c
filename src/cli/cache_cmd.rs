//! `freezesplit cache --weights MODEL --data data.yaml [--split train,val] [--freeze N] [--shard I/N]`:
//! the flags in; the cache filled for the splits (or one shard of them, see
//! `cache::shard`) and a line of counts per split (or JSON) out.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;

use super::EngineArgs;
use crate::cache::shard::{self, ShardChoice};
use crate::cache::{Dtype, FeatureCache, build, default_cache_dir};
use crate::data::Dataset;
use crate::engine::Engine;
use crate::graph::Model;

#[derive(Args)]
pub struct CacheArgs {
    /// The exported YOLOv5 ONNX model
    #[arg(long)]
    pub weights: PathBuf,
    /// data.yaml of an Ultralytics-layout dataset
    #[arg(long)]
    pub data: PathBuf,
    /// Splits to cache, comma separated
    #[arg(long, default_value = "train,val", value_delimiter = ',')]
    pub split: Vec<String>,
    /// Cache root (default: $FREEZESPLIT_CACHE or ~/.cache/freezesplit)
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Storage type of the features
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: Dtype,
    /// Freeze boundary, as YOLOv5's --freeze: layers 0..N-1 frozen (10..=24;
    /// 24 caches the Detect head's inputs). The cache holds the tensors that
    /// cross it
    #[arg(long, default_value_t = crate::graph::cut::HEAD_ONLY)]
    pub freeze: usize,
    /// Image size for dynamic exports (static exports use their own)
    #[arg(long)]
    pub imgsz: Option<usize>,
    /// Images per engine run. Two sessions run side by side, so small batches
    /// keep memory low (about 0.33 GB at 2, 1 GB at 8 for yolov5n at 640) at
    /// the same speed
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Fill only shard I of N of each split (I in 1..=N), chosen by a hash of
    /// each image's path in the dataset, so N processes on N machines fill one
    /// shared cache. Without it a Slurm array task or a Kubernetes Indexed
    /// Job pod (JOB_COMPLETION_INDEX of FREEZESPLIT_SHARD_COUNT) takes its
    /// shard from the environment; --shard 1/1 takes the whole split
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print the counts and the cache path as JSON
    #[arg(long)]
    pub json: bool,
}

/// The model's input size, checked against `--imgsz`.
pub fn resolve_imgsz(model: &Model, requested: Option<usize>) -> Result<usize> {
    super::resolve_imgsz(model, requested)
}

pub fn run(a: CacheArgs) -> Result<()> {
    // every --split listed, and the shard, before the model is read
    let choice = shard::resolve(a.shard.as_deref(), &|k| std::env::var(k).ok())?;
    let data = Dataset::load(&a.data)?;
    let mut splits = Vec::new();
    for s in &a.split {
        let all = data.images(s)?;
        if all.is_empty() {
            bail!("the `{s}` split of {} has no images", a.data.display());
        }
        let images = match &choice {
            Some(c) => shard::select(&all, &data.root, c.shard),
            None => all.clone(),
        };
        splits.push((s.clone(), all.len(), images));
    }
    if let Some(c) = &choice {
        let counts: Vec<String> = splits.iter().map(|(s, all, mine)| format!("{} of {all} {s} images", mine.len())).collect();
        eprintln!("cache: shard {} (from {}): {}", c.shard, c.source, counts.join(", "));
    }
    let model = Model::load(&a.weights)?;
    let cut = model.cut(a.freeze)?;
    let imgsz = resolve_imgsz(&model, a.imgsz)?;
    let root = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let (cache, frozen) = FeatureCache::open_at(&root, &model, &cut, imgsz)?;
    let mut engines = Engine::for_fill(&model.path, &frozen, imgsz, &a.engine.options())?;
    let opts = build::FillOptions { batch_size: a.batch_size, dtype: a.dtype, progress: !a.json };
    let mut reports = serde_json::Map::new();
    for (name, _, images) in &splits {
        let r = build::fill(&cache, &mut engines, images, &opts)?;
        if !a.json {
            print_counts(name, &r, choice.as_ref());
        }
        reports.insert(name.clone(), serde_json::to_value(&r)?);
    }
    if a.json {
        let shard = choice.as_ref().map(|c| json!({"index": c.shard.index, "count": c.shard.count, "from": c.source}));
        println!("{}", serde_json::to_string_pretty(&json!({"cache": cache.dir, "engine": engines[0].name(), "imgsz": imgsz, "dtype": a.dtype, "freeze": cut.freeze, "shard": shard, "splits": reports}))?);
    } else {
        println!("cache: {} ({})", cache.dir.display(), engines[0].name());
    }
    Ok(())
}

/// One split's counts; a whole-split fill also says how many entries were
/// missing (what shards left, or all of them the first time).
fn print_counts(name: &str, r: &build::FillReport, choice: Option<&ShardChoice>) {
    let rate = if r.computed > 0 { format!(", {:.1} images/s", r.computed as f64 / r.seconds) } else { String::new() };
    let shard = choice.map_or(String::new(), |c| format!(" (shard {})", c.shard));
    println!("{name}{shard}: {} images: {} computed, {} already cached, {} skipped ({:.1}s{rate})", r.images, r.computed, r.cached, r.skipped, r.seconds);
    if choice.is_none() && r.cached > 0 {
        println!("{name}: {} of {} entries were missing; {} filled now", r.images - r.cached, r.images, r.computed);
    }
    if r.computed == 0 {
        println!("{name}: nothing new to compute");
    }
}
