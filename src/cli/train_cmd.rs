//! `freezesplit train --weights MODEL.onnx --data data.yaml [--epochs 30 ...]`
//! and `freezesplit train --resume RUN`: raw arguments in, validated
//! `TrainOptions` (train.py's defaults, the run directory claimed) out, then
//! `train::train` and its summary. train.py flags that cannot apply to cached
//! features are accepted with a note saying why.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::EngineArgs;
use super::cache_cmd::resolve_imgsz;
use crate::cache::{Dtype, default_cache_dir};
use crate::graph::Model;
use crate::runs::claim;
use crate::train::hyp::TrainHyp;
use crate::train::optim::OptimizerKind;
use crate::train::{self, Precision, TrainOptions, TrainWhat};

/// Every training flag is optional here so that `--resume` can tell which
/// were given; the defaults (train.py's) are applied in `settings`.
#[derive(Args)]
pub struct TrainArgs {
    /// The exported YOLOv5 ONNX model whose head is trained
    #[arg(long, required_unless_present = "resume")]
    pub weights: Option<PathBuf>,
    /// data.yaml of an Ultralytics-layout dataset
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<PathBuf>,
    /// Epochs [default: 50, README "Training defaults"]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per batch, at most the train split's [default: 16]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Image size (static exports use their own)
    #[arg(long)]
    pub imgsz: Option<usize>,
    /// A YOLOv5 hyp yaml or a preset: hyp.finetune (default), hyp.scratch-low
    #[arg(long)]
    pub hyp: Option<PathBuf>,
    /// head: every row of the head; cls: only the class rows [default: head]
    #[arg(long, value_enum)]
    pub train: Option<TrainWhat>,
    /// Re-initialise the whole head as YOLOv5 does (default: keep box/objectness rows)
    #[arg(long)]
    pub reinit_head: bool,
    /// Keep every class of the model and add the data.yaml classes it lacks (names matched case-insensitively); implies --train cls unless --train is given
    #[arg(long)]
    pub add_classes: bool,
    /// With --add-classes: no pseudo-labels (the model's own confident detections that no label covers, used as negatives for the new classes)
    #[arg(long)]
    pub no_pseudo_labels: bool,
    /// [default: SGD]
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Cosine learning-rate schedule (default linear)
    #[arg(long)]
    pub cos_lr: bool,
    /// Label smoothing epsilon in [0, 1) [default: 0]
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Learning-rate multiplier of the box rows [default: the hyp's lr_box]
    #[arg(long)]
    pub lr_box: Option<f64>,
    /// Learning-rate multiplier of the objectness rows [default: the hyp's lr_obj]
    #[arg(long)]
    pub lr_obj: Option<f64>,
    /// Learning-rate multiplier of the class rows [default: the hyp's lr_cls]
    #[arg(long)]
    pub lr_cls: Option<f64>,
    /// Learning-rate multiplier of the layers below the head that train with
    /// --freeze under 24 [default: the hyp's lr_tail]
    #[arg(long)]
    pub lr_tail: Option<f64>,
    /// [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// EarlyStopping patience (epochs without improvement; 0 disables) [default: 100]
    #[arg(long)]
    pub patience: Option<usize>,
    /// Save the EMA head as weights/epochN every N epochs (≤ 0: never) [default: -1]
    #[arg(long, allow_negative_numbers = true)]
    pub save_period: Option<i64>,
    /// [default: runs/train]
    #[arg(long)]
    pub project: Option<PathBuf>,
    /// [default: exp]
    #[arg(long)]
    pub name: Option<String>,
    /// Reuse project/name instead of incrementing it (a live run there is still refused)
    #[arg(long)]
    pub exist_ok: bool,
    /// Continue a run after its last finished epoch, with the settings of its opt.yaml
    #[arg(long, value_name = "RUN")]
    pub resume: Option<PathBuf>,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// [default: f16]
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// YOLOv5's --freeze: layers 0..N-1 frozen (cached), N..23 and the head trained; N in 10..=24 [default: 24]
    #[arg(long)]
    pub freeze: Option<usize>,
    /// Class-only training on the sparse cache (the head inputs at the loss's positives) with sparse validation; below --freeze 24 the frozen layers N..23 run once per image [default with --train cls (and --add-classes)]
    #[arg(long, conflicts_with = "dense")]
    pub sparse: bool,
    /// The dense path (every feature map every epoch), also with --train cls
    #[arg(long)]
    pub dense: bool,
    /// The arithmetic of the training step's convolutions below --freeze 24: bf16 (operands rounded to bfloat16, f32 sums; AVX512-BF16 CPUs), f32, or auto (bf16 where the CPU has it); validation and export always run f32 [default: auto]
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub yolov5: Yolov5OnlyArgs,
}

/// `--precision`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Auto,
    F32,
    Bf16,
}

/// The training step's precision for `--precision` (None: auto) at `freeze`.
fn resolve_precision(arg: Option<PrecisionArg>, freeze: usize, train: TrainWhat) -> Result<Precision> {
    let below = freeze < crate::graph::cut::HEAD_ONLY && train != TrainWhat::Cls;
    let has = crate::kernels::conv::bf16_path().is_some();
    Ok(match arg.unwrap_or(PrecisionArg::Auto) {
        PrecisionArg::Auto if below && has => Precision::Bf16,
        PrecisionArg::Auto | PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 if !has => bail!(
            "--precision bf16 needs a CPU with AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids or later; AMD Zen 4 or later), which this one is not; use --precision f32 (or auto, which picks f32 here)"
        ),
        PrecisionArg::Bf16 => {
            if !below {
                eprintln!("note: --precision bf16 changes nothing here: only the layers below --freeze 24 train with it, and with --freeze 24 or --train cls none do");
            }
            Precision::Bf16
        }
    })
}

/// train.py flags that mean nothing on cached features: accepted, and the
/// reason printed, instead of clap's unknown-flag error.
#[derive(Args)]
pub struct Yolov5OnlyArgs {
    #[arg(long, hide = true)]
    workers: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "ram")]
    cache: Option<String>,
    #[arg(long, hide = true)]
    image_weights: bool,
    #[arg(long, hide = true)]
    multi_scale: bool,
    #[arg(long, hide = true)]
    rect: bool,
    #[arg(long, hide = true)]
    sync_bn: bool,
    #[arg(long, hide = true)]
    quad: bool,
}

impl Yolov5OnlyArgs {
    /// One note per given flag: why it does not apply.
    fn notes(&self) -> Vec<String> {
        let given = [
            ("--workers", self.workers.is_some(), "there is no image dataloader: batches are read memory-mapped from the feature cache (--threads sets the compute threads)"),
            ("--cache", self.cache.is_some(), "the frozen features are always cached, on disk in --cache-dir, and read memory-mapped"),
            ("--image-weights", self.image_weights, "image-weighted sampling is not implemented; every image is seen once per epoch"),
            ("--multi-scale", self.multi_scale, "the features are cached at one image size (--imgsz); each size would need its own cache"),
            ("--rect", self.rect, "the features are cached from square letterboxed images of --imgsz; rectangular batches would need another cache"),
            ("--sync-bn", self.sync_bn, "it synchronises BatchNorm across DDP processes; the head has no BatchNorm and training runs in one process"),
            ("--quad", self.quad, "the quad dataloader is an image-loading augmentation; training here reads cached features"),
        ];
        given.iter().filter(|(_, g, _)| *g).map(|(flag, _, why)| format!("note: {flag} is ignored: {why}")).collect()
    }
}

impl TrainArgs {
    /// The training flags given on the command line (they conflict with `--resume`).
    fn training_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--weights", self.weights.is_some()),
            ("--data", self.data.is_some()),
            ("--epochs", self.epochs.is_some()),
            ("--batch-size", self.batch_size.is_some()),
            ("--imgsz", self.imgsz.is_some()),
            ("--hyp", self.hyp.is_some()),
            ("--train", self.train.is_some()),
            ("--reinit-head", self.reinit_head),
            ("--add-classes", self.add_classes),
            ("--no-pseudo-labels", self.no_pseudo_labels),
            ("--optimizer", self.optimizer.is_some()),
            ("--cos-lr", self.cos_lr),
            ("--label-smoothing", self.label_smoothing.is_some()),
            ("--lr-box", self.lr_box.is_some()),
            ("--lr-obj", self.lr_obj.is_some()),
            ("--lr-tail", self.lr_tail.is_some()),
            ("--lr-cls", self.lr_cls.is_some()),
            ("--seed", self.seed.is_some()),
            ("--patience", self.patience.is_some()),
            ("--save-period", self.save_period.is_some()),
            ("--project", self.project.is_some()),
            ("--name", self.name.is_some()),
            ("--exist-ok", self.exist_ok),
            ("--cache-dir", self.cache_dir.is_some()),
            ("--dtype", self.dtype.is_some()),
            ("--freeze", self.freeze.is_some()),
            ("--sparse", self.sparse),
            ("--dense", self.dense),
            ("--precision", self.precision.is_some()),
        ];
        given.iter().filter(|(_, g)| *g).map(|(f, _)| *f).collect()
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    for note in a.yolov5.notes() {
        eprintln!("{note}");
    }
    let (opts, resume) = match &a.resume {
        Some(run) => {
            let flags = a.training_flags();
            if !flags.is_empty() {
                bail!("--resume {} continues the run with the settings of its opt.yaml; {} cannot be given with it (start a new run to change them)", run.display(), flags.join(", "));
            }
            let mut o = train::load_opt(run)?;
            o.save_dir = run.clone();
            o.engine = a.engine.options();
            o.progress = true;
            (o, true)
        }
        None => (settings(&a)?, false),
    };
    let report = train::train(&opts, resume)?;
    println!(
        "{} epochs finished; train images {}, val images {}; cache {}",
        opts.epochs, report.train_images, report.val_images, report.cache.display()
    );
    if let Some(e) = report.stopped_at {
        println!("stopped early after epoch {e} (--patience {})", opts.patience);
    }
    if let Some(r) = report.rows.last() {
        println!("final val loss (last epoch, {}): box {:.5} obj {:.5} cls {:.5}", r.epoch, r.val[0], r.val[1], r.val[2]);
    }
    if let (Some(b), Some(a)) = (&report.before, &report.after) {
        print!("{}", before_after(b, a, report.best_epoch, &opts));
    }
    println!("results saved to {}", report.save_dir.display());
    Ok(())
}

/// The val split before (starting head) and after (best head).
fn before_after(b: &crate::val::ValReport, a: &crate::val::ValReport, best_epoch: Option<usize>, opts: &TrainOptions) -> String {
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
    match best_epoch {
        Some(e) => out.push_str(&format!("(after: the best head, epoch {e}, weights/best)\n")),
        None => out.push_str("(after: the best head, weights/best)\n"),
    }
    if opts.reinit_head {
        out.push_str("(before: the re-initialised head)\n");
    }
    out
}

/// Raw arguments to validated settings, before any work starts; the run
/// directory is claimed last, when everything else is valid.
fn settings(a: &TrainArgs) -> Result<TrainOptions> {
    let weights = a.weights.clone().unwrap();
    let data = a.data.clone().unwrap();
    let epochs = a.epochs.unwrap_or(50);
    let batch_size = a.batch_size.unwrap_or(16);
    let label_smoothing = a.label_smoothing.unwrap_or(0.0);
    // --add-classes keeps its promise (old outputs bit-identical) only with --train cls
    let train = a.train.unwrap_or(if a.add_classes { TrainWhat::Cls } else { TrainWhat::Head });
    let mut hyp = TrainHyp::resolve(a.hyp.as_deref())?;
    // a flag given explicitly overrides the hyp's key; hyp.yaml shows the result
    hyp.lr_box = a.lr_box.unwrap_or(hyp.lr_box);
    hyp.lr_obj = a.lr_obj.unwrap_or(hyp.lr_obj);
    hyp.lr_cls = a.lr_cls.unwrap_or(hyp.lr_cls);
    hyp.lr_tail = a.lr_tail.unwrap_or(hyp.lr_tail);
    let [lr_box, lr_obj, lr_cls] = [hyp.lr_box, hyp.lr_obj, hyp.lr_cls];
    if epochs == 0 {
        bail!("--epochs must be at least 1, got 0");
    }
    if batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    for (flag, v) in [("--lr-box", a.lr_box), ("--lr-obj", a.lr_obj), ("--lr-cls", a.lr_cls), ("--lr-tail", a.lr_tail)] {
        if let Some(v) = v
            && !(v >= 0.0 && v.is_finite())
        {
            bail!("{flag} must be a finite number in [0, inf), got {v}");
        }
    }
    if !(0.0..1.0).contains(&label_smoothing) {
        bail!("--label-smoothing must be in [0, 1), got {label_smoothing}");
    }
    if a.add_classes && a.reinit_head {
        bail!("--add-classes keeps every row of the input model's head, and --reinit-head would re-initialise them; use one of the two");
    }
    if a.no_pseudo_labels && !a.add_classes {
        bail!("--no-pseudo-labels applies only with --add-classes; drop it or add --add-classes");
    }
    if train == TrainWhat::Cls && a.reinit_head {
        bail!("--train cls keeps the box and objectness rows frozen, and --reinit-head would re-initialise them at random and leave them untrained; use one of the two");
    }
    if train == TrainWhat::Cls && (a.lr_box.is_some() || a.lr_obj.is_some()) {
        eprintln!("note: --lr-box and --lr-obj are ignored with --train cls: the box and objectness rows are frozen");
    }
    if (train == TrainWhat::Cls || (lr_box == 0.0 && lr_obj == 0.0)) && lr_cls == 0.0 {
        eprintln!("note: every row's learning-rate multiplier is 0: the head does not change (the epochs only validate it)");
    }
    let freeze = a.freeze.unwrap_or_else(train::default_freeze);
    // --add-classes implies --train cls, so it is sparse by default too
    let sparse = train::sparse::resolve(train, a.sparse, a.dense)?;
    let precision = resolve_precision(a.precision, freeze, train)?;
    let model = Model::load(&weights)?;
    let imgsz = resolve_imgsz(&model, a.imgsz)?;
    let project = a.project.clone().unwrap_or_else(|| PathBuf::from("runs/train"));
    let save_dir = claim(&project, a.name.as_deref().unwrap_or("exp"), a.exist_ok)?;
    Ok(TrainOptions {
        weights,
        data,
        epochs,
        batch_size,
        imgsz,
        train,
        reinit_head: a.reinit_head,
        optimizer: a.optimizer.unwrap_or(OptimizerKind::Sgd),
        cos_lr: a.cos_lr,
        label_smoothing,
        lr_box: hyp.lr_box,
        lr_obj: hyp.lr_obj,
        lr_cls: hyp.lr_cls,
        hyp,
        seed: a.seed.unwrap_or(0),
        patience: a.patience.unwrap_or_else(train::default_patience),
        save_period: a.save_period.unwrap_or_else(train::default_save_period),
        save_dir,
        cache_dir: a.cache_dir.clone().unwrap_or_else(default_cache_dir),
        dtype: a.dtype.unwrap_or(Dtype::F16),
        add_classes: a.add_classes,
        pseudo_labels: !a.no_pseudo_labels,
        freeze,
        sparse,
        precision,
        engine: a.engine.options(),
        progress: true,
    })
}
