//! `freezesplit train --weights MODEL.onnx --data data.yaml [--epochs 30 ...]`
//! and `freezesplit train --resume RUN`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::EngineArgs;
use super::cache_cmd::resolve_imgsz;
use crate::cache::{Dtype, default_cache_dir};
use crate::graph::Model;
use crate::runs::increment_path;
use crate::train::hyp::TrainHyp;
use crate::train::optim::OptimizerKind;
use crate::train::{self, TrainOptions, TrainWhat};

#[derive(Args)]
pub struct TrainArgs {
    /// The exported YOLOv5 ONNX model whose head is trained
    #[arg(long, required_unless_present = "resume")]
    pub weights: Option<PathBuf>,
    /// data.yaml of an Ultralytics-layout dataset
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<PathBuf>,
    /// Epochs (default 50, README "Training defaults")
    #[arg(long, default_value_t = 50)]
    pub epochs: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Image size (static exports use their own)
    #[arg(long)]
    pub imgsz: Option<usize>,
    /// A YOLOv5 hyp yaml or a preset: hyp.finetune (default), hyp.scratch-low
    #[arg(long)]
    pub hyp: Option<PathBuf>,
    /// head: every row of the head; cls: only the class rows
    #[arg(long, value_enum, default_value = "head")]
    pub train: TrainWhat,
    /// Re-initialise the whole head as YOLOv5 does (default: keep box/objectness rows)
    #[arg(long)]
    pub reinit_head: bool,
    #[arg(long, value_enum, default_value = "SGD")]
    pub optimizer: OptimizerKind,
    /// Cosine learning-rate schedule (default linear)
    #[arg(long)]
    pub cos_lr: bool,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Learning-rate multiplier of the box rows (default: the hyp's lr_box)
    #[arg(long)]
    pub lr_box: Option<f64>,
    /// Learning-rate multiplier of the objectness rows (default: the hyp's lr_obj)
    #[arg(long)]
    pub lr_obj: Option<f64>,
    /// Learning-rate multiplier of the class rows (default: the hyp's lr_cls)
    #[arg(long)]
    pub lr_cls: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/train")]
    pub project: PathBuf,
    #[arg(long, default_value = "exp")]
    pub name: String,
    /// Continue a run after its last finished epoch
    #[arg(long, value_name = "RUN")]
    pub resume: Option<PathBuf>,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: Dtype,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (opts, resume) = match &a.resume {
        Some(run) => {
            let mut o = train::load_opt(run)?;
            o.save_dir = run.clone();
            o.engine = a.engine.options();
            o.progress = true;
            (o, true)
        }
        None => (settings(&a)?, false),
    };
    let report = train::train(&opts, resume)?;
    let last = report.rows.last();
    println!(
        "{} epochs finished; train images {}, val images {}; cache {}",
        opts.epochs, report.train_images, report.val_images, report.cache.display()
    );
    if let Some(r) = last {
        println!("final val loss: box {:.5} obj {:.5} cls {:.5}", r.val[0], r.val[1], r.val[2]);
    }
    if let (Some(b), Some(a)) = (&report.before, &report.after) {
        print!("{}", before_after(b, a, &opts));
    }
    println!("results saved to {}", report.save_dir.display());
    Ok(())
}

/// The val split before (starting head) and after (best head).
fn before_after(b: &crate::val::ValReport, a: &crate::val::ValReport, opts: &TrainOptions) -> String {
    let mut out = format!("\nval split, {} images          before      after\n", a.summary.seen);
    let rows = [
        ("mAP50", b.summary.map50, a.summary.map50),
        ("mAP50-95", b.summary.map, a.summary.map),
        ("class-agnostic mAP50", b.summary.agnostic_map50, a.summary.agnostic_map50),
        ("matched-box class accuracy", b.summary.class_accuracy.accuracy, a.summary.class_accuracy.accuracy),
    ];
    for (name, x, y) in rows {
        out.push_str(&format!("{name:<28} {x:>10.4} {y:>10.4}\n"));
    }
    let ap = |r: &crate::val::ValReport, c: usize| r.summary.per_class.iter().find(|m| m.class == c).map_or(0.0, |m| m.ap50_95);
    for (c, name) in a.names.iter().enumerate() {
        out.push_str(&format!("{:<28} {:>10.4} {:>10.4}\n", format!("AP50-95 {name}"), ap(b, c), ap(a, c)));
    }
    if opts.reinit_head {
        out.push_str("(before: the re-initialised head)\n");
    }
    out
}

/// Raw arguments to validated settings, before any work starts.
fn settings(a: &TrainArgs) -> Result<TrainOptions> {
    let weights = a.weights.clone().unwrap();
    let data = a.data.clone().unwrap();
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    for (flag, v) in [("--lr-box", a.lr_box), ("--lr-obj", a.lr_obj), ("--lr-cls", a.lr_cls)] {
        if let Some(v) = v
            && !(v >= 0.0 && v.is_finite())
        {
            bail!("{flag} must be a non-negative number, got {v}");
        }
    }
    if !(0.0..1.0).contains(&a.label_smoothing) {
        bail!("--label-smoothing must be in [0, 1)");
    }
    let model = Model::load(&weights)?;
    let imgsz = resolve_imgsz(&model, a.imgsz)?;
    let mut hyp = TrainHyp::resolve(a.hyp.as_deref())?;
    // a flag given explicitly overrides the hyp's key; hyp.yaml shows the result
    hyp.lr_box = a.lr_box.unwrap_or(hyp.lr_box);
    hyp.lr_obj = a.lr_obj.unwrap_or(hyp.lr_obj);
    hyp.lr_cls = a.lr_cls.unwrap_or(hyp.lr_cls);
    Ok(TrainOptions {
        weights,
        data,
        epochs: a.epochs,
        batch_size: a.batch_size,
        imgsz,
        train: a.train,
        reinit_head: a.reinit_head,
        optimizer: a.optimizer,
        cos_lr: a.cos_lr,
        label_smoothing: a.label_smoothing,
        lr_box: hyp.lr_box,
        lr_obj: hyp.lr_obj,
        lr_cls: hyp.lr_cls,
        hyp,
        seed: a.seed,
        save_dir: increment_path(&a.project, &a.name),
        cache_dir: a.cache_dir.clone().unwrap_or_else(default_cache_dir),
        dtype: a.dtype,
        engine: a.engine.options(),
        progress: true,
    })
}
