//! The training stage: a model, a dataset and settings in; a YOLOv5-style run
//! directory out (results.csv, weights/last and best as heads, opt.yaml,
//! hyp.yaml, the checkpoint last_state.safetensors). Only the head runs: the
//! frozen part is read from the feature cache, filled first if anything is
//! missing.
//!
//! The loop is train.py's without augmentation, in parts: set-up
//! (`setup.rs`), the schedule as a pure function of the iteration
//! (`schedule.rs`: warmup, lr, momentum, accumulate), an epoch (`epoch.rs`),
//! its evaluation, and the checkpoint (`state.rs`), which holds every
//! component's state dict by parameter name (`params.rs`) and from which
//! results.csv and the last/best heads are derived.

pub mod add_classes;
pub mod batches;
pub mod epoch;
pub mod hyp;
pub mod init;
pub mod optim;
pub mod params;
pub mod results;
pub mod schedule;
pub mod setup;
pub mod sparse;
pub mod state;
pub mod tail;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::cache::Dtype;
use crate::engine::EngineOptions;
use hyp::TrainHyp;
use optim::{Ema, Optimizer, OptimizerKind};
use params::{ParamStore, Tensors};
use schedule::Stopper;
use setup::Run;
use state::{Checkpoint, Counters, StateDict};

/// What the optimizer may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainWhat {
    /// Every row of the three convolutions.
    Head,
    /// Only the class rows; box and objectness rows stay bit-identical.
    Cls,
}

/// The arithmetic of the convolutions of a training step below --freeze 24
/// (validation, export and the head at 24 always run f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and sums.
    F32,
    /// Operands rounded to bfloat16, products summed in f32 (AVX512-BF16):
    /// twice the multiply-adds per instruction, as PyTorch's bf16 autocast.
    Bf16,
}

impl Precision {
    /// The GEMM path of a training step's tape: None for f32 (the CPU's
    /// fastest f32 path), the bf16 path otherwise.
    pub fn gemm(self) -> Option<crate::kernels::conv::Path> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(crate::kernels::conv::Path::Avx512Bf16),
        }
    }
}

/// Runs made before `--precision` existed trained in f32.
pub fn default_precision() -> Precision {
    Precision::F32
}

/// Validated settings; also the content of opt.yaml.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub weights: PathBuf,
    pub data: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub imgsz: usize,
    pub hyp: TrainHyp,
    pub train: TrainWhat,
    pub reinit_head: bool,
    pub optimizer: OptimizerKind,
    pub cos_lr: bool,
    pub label_smoothing: f64,
    pub lr_box: f64,
    pub lr_obj: f64,
    pub lr_cls: f64,
    pub seed: u64,
    /// YOLOv5's EarlyStopping patience in epochs; 0 never stops.
    #[serde(default = "default_patience")]
    pub patience: usize,
    /// Save the EMA head as weights/epochN every this many epochs; ≤ 0 never.
    #[serde(default = "default_save_period")]
    pub save_period: i64,
    pub save_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub dtype: Dtype,
    /// YOLOv5's `--freeze N`: layers 0..N-1 frozen and cached, N..23 and the head trained.
    #[serde(default = "default_freeze")]
    pub freeze: usize,
    /// `--add-classes`: keep the model's classes, add data.yaml's new ones.
    #[serde(default)]
    pub add_classes: bool,
    /// With `add_classes`: the input model's own detections as negatives.
    #[serde(default = "default_pseudo_labels")]
    pub pseudo_labels: bool,
    /// Class-only training on the sparse cache and sparse validation
    /// (`train::sparse`); runs made before it existed are dense.
    #[serde(default)]
    pub sparse: bool,
    /// The training step's convolutions below --freeze 24 (`Precision`).
    #[serde(default = "default_precision")]
    pub precision: Precision,
    #[serde(skip)]
    pub engine: EngineOptions,
    #[serde(skip)]
    pub progress: bool,
}

/// train.py's `--patience` default.
pub fn default_patience() -> usize {
    100
}
/// `--freeze` of runs made before it existed: the head only.
pub fn default_freeze() -> usize {
    crate::graph::cut::HEAD_ONLY
}

/// `--add-classes` uses pseudo-labels unless `--no-pseudo-labels`.
pub fn default_pseudo_labels() -> bool {
    true
}

/// train.py's `--save-period` default (off).
pub fn default_save_period() -> i64 {
    -1
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochRow {
    pub epoch: usize,
    pub train: [f32; 3],
    /// P, R, mAP50, mAP50-95 of the EMA head on the val split.
    pub metrics: [f64; 4],
    pub val: [f32; 3],
    pub lr: [f64; 2],
}

pub struct TrainReport {
    pub save_dir: PathBuf,
    /// The epochs this call trained (after a resume, only those).
    pub rows: Vec<EpochRow>,
    pub cache: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    pub cache_seconds: f64,
    /// The starting head and the best head on the val split.
    pub before: Option<crate::val::ValReport>,
    pub after: Option<crate::val::ValReport>,
    /// The epoch whose head is weights/best.
    pub best_epoch: Option<usize>,
    /// The epoch `--patience` stopped after, if it did.
    pub stopped_at: Option<usize>,
}

/// Everything a resume restores, moved on by each epoch.
pub struct State {
    pub params: ParamStore,
    pub optimizer: Optimizer,
    pub ema: Ema,
    /// Gradients accumulated since the last optimizer step, by name.
    pub acc: Tensors,
    pub counters: Counters,
    /// The EMA values of the best epoch so far.
    pub best: Option<Tensors>,
    /// results.csv's text, header and finished epochs.
    pub results_csv: String,
}

impl State {
    fn new(run: &Run, opts: &TrainOptions) -> State {
        let mut params = run.layout.params(&run.head0, &run.row_lr);
        if let Some(t) = run.tail.as_ref().filter(|t| t.trains) {
            tail::add_params(&t.net, &mut params, opts.hyp.lr_tail);
        }
        State {
            optimizer: Optimizer::new(opts.optimizer, &params, run.weight_decay),
            ema: Ema::new(&params),
            acc: params.zeros(),
            params,
            counters: Counters { epoch: 0, last_opt_step: -1, best_fitness: None, best_epoch: None, stopper: Stopper::new(opts.patience), stopped: false },
            best: None,
            results_csv: results::csv_header(),
        }
    }

    /// Whether the optimizer has stepped yet (the parameters moved).
    pub fn has_stepped(&self) -> bool {
        self.counters.last_opt_step >= 0
    }

    fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        for (prefix, t) in [("param.", &self.params.values()), ("acc.", &self.acc)].into_iter().chain(self.best.as_ref().map(|b| ("best.", b))) {
            sd.tensors.extend(t.iter().map(|(k, v)| (format!("{prefix}{k}"), v.as_standard_layout().into_owned())));
        }
        self.optimizer.state_dict("optimizer.", &mut sd);
        self.ema.state_dict("ema.", &mut sd);
        sd
    }

    fn load(&mut self, c: Checkpoint) -> Result<()> {
        let sd = &c.state;
        self.params.set_values(&sd.tensors_under("param."))?;
        let acc = sd.tensors_under("acc.");
        for (k, v) in self.acc.iter_mut() {
            *v = params::take_like(&acc, k, v)?;
        }
        self.optimizer.load_state_dict("optimizer.", sd)?;
        self.ema.load_state_dict("ema.", sd)?;
        let best = sd.tensors_under("best.");
        self.best = (!best.is_empty()).then_some(best);
        self.counters = c.counters;
        self.results_csv = c.results_csv;
        Ok(())
    }
}

fn state_path(wdir: &Path) -> PathBuf {
    wdir.join("last_state.safetensors")
}

/// Trains; `resume` continues a run directory after its last finished epoch.
pub fn train(opts: &TrainOptions, resume: bool) -> Result<TrainReport> {
    let save_dir = &opts.save_dir;
    let _lock = crate::runs::RunLock::acquire(save_dir)?;
    let run = setup::prepare(opts)?;
    let wdir = save_dir.join("weights");
    std::fs::create_dir_all(&wdir).with_context(|| format!("cannot create {}", wdir.display()))?;
    let mut st = begin(&run, opts, &wdir, resume)?;

    let before = if run.val_items.is_empty() { None } else { Some(run.validate(&run.head0, &run.val_items_for(&st.params.values())?)?) };
    let train_start = std::time::Instant::now();
    let mut rows = Vec::new();
    for epoch in st.counters.epoch..opts.epochs {
        let epoch_start = std::time::Instant::now();
        let mloss = epoch::train_epoch(&run, &mut st, epoch, opts)?;
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        let ema_head = run.layout.head(&run.head0, st.ema.values())?;
        let (metrics, val) = epoch::evaluate(&run, &ema_head, st.ema.values())?;
        let row = EpochRow { epoch, train: mloss.map(|v| v as f32), metrics, val, lr: run.schedule.reported_lr(epoch) };
        eprintln!(
            "{:>5}  train box {:.4} obj {:.4} cls {:.4}  val P {:.3} R {:.3} mAP50 {:.3} mAP50-95 {:.3}  box {:.4} obj {:.4} cls {:.4}  ({:.2}s train + {:.2}s val)",
            format!("{}/{}", epoch, opts.epochs - 1),
            row.train[0], row.train[1], row.train[2], metrics[0], metrics[1], metrics[2], metrics[3], row.val[0], row.val[1], row.val[2],
            train_seconds,
            epoch_start.elapsed().as_secs_f64() - train_seconds
        );
        let improved = finish_epoch(&mut st, &row)?;
        if opts.save_period > 0 && epoch % opts.save_period as usize == 0 {
            run.save_weights(st.ema.values(), &wdir.join(format!("epoch{epoch}")))?;
        }
        // the checkpoint first: what follows is derived from it
        let saving = std::time::Instant::now();
        state::save(&state_path(&wdir), &Checkpoint { counters: st.counters.clone(), state: st.state_dict(), results_csv: st.results_csv.clone() })?;
        let last = epoch + 1 == opts.epochs || st.counters.stopped;
        write_derived(&run, &st, &wdir, improved, last)?;
        if crate::autograd::profile::enabled() {
            eprintln!("checkpoint and derived files: {:.1} ms", saving.elapsed().as_secs_f64() * 1e3);
        }
        rows.push(row);
        // Test hook: die right after a finished epoch, as a kill would.
        if std::env::var("FREEZESPLIT_ABORT_AFTER_EPOCH").ok().and_then(|v| v.parse::<usize>().ok()) == Some(epoch) {
            std::process::abort();
        }
        if st.counters.stopped {
            let s = &st.counters.stopper;
            eprintln!(
                "Stopping training early as no improvement observed in last {} epochs. Best results observed at epoch {}, best model saved as weights/best.safetensors.\nTo change EarlyStopping(patience={}) pass a new value, i.e. `--patience 300`, or `--patience 0` to disable EarlyStopping.",
                s.patience, s.best_epoch, s.patience
            );
            break;
        }
    }
    let done = rows.len();
    eprintln!("{done} epochs completed in {:.1}s ({:.2}s per epoch)", train_start.elapsed().as_secs_f64(), train_start.elapsed().as_secs_f64() / done.max(1) as f64);
    let after = match (run.val_items.is_empty(), &st.best) {
        (false, Some(best)) => Some(run.validate(&run.layout.head(&run.head0, best)?, &run.val_items_for(best)?)?),
        _ => None,
    };
    if let Err(e) = results::plot_run(save_dir, &save_dir.join("results.csv"), after.as_ref()) {
        eprintln!("warning: plots not written: {e:#}");
    }
    Ok(TrainReport {
        save_dir: save_dir.clone(),
        rows,
        cache: run.cache_dir.clone(),
        train_images: run.train.samples.len(),
        val_images: run.val.samples.len(),
        cache_seconds: run.cache_seconds,
        before,
        after,
        best_epoch: st.counters.best_epoch,
        stopped_at: st.counters.stopped.then(|| st.counters.epoch - 1),
    })
}

/// The state to start from: fresh, or the checkpoint's for `resume`.
fn begin(run: &Run, opts: &TrainOptions, wdir: &Path, resume: bool) -> Result<State> {
    let mut st = State::new(run, opts);
    if !resume {
        start_run_dir(opts, wdir)?;
        crate::fsutil::write_atomic(&opts.save_dir.join("results.csv"), st.results_csv.as_bytes())?;
        return Ok(st);
    }
    let c = state::load(&state_path(wdir))?;
    if c.counters.stopped || c.counters.epoch >= opts.epochs {
        let how = if c.counters.stopped { ", stopped early by --patience" } else { "" };
        bail!("{} is finished ({} of {} epochs{how}); nothing to resume", opts.save_dir.display(), c.counters.epoch, opts.epochs);
    }
    st.load(c).with_context(|| format!("{} does not fit this run's head", state_path(wdir).display()))?;
    // the checkpoint is the truth: files a kill left behind are rewritten from it
    write_derived(run, &st, wdir, true, true)?;
    eprintln!("resuming {} from epoch {} of {}", opts.save_dir.display(), st.counters.epoch, opts.epochs);
    Ok(st)
}

/// Books a finished epoch into the state: its results.csv row, the best head
/// (YOLOv5's fitness, 0.1·mAP50 + 0.9·mAP50-95), early stopping. True when
/// the epoch is the new best.
fn finish_epoch(st: &mut State, row: &EpochRow) -> Result<bool> {
    let fitness = 0.1 * row.metrics[2] + 0.9 * row.metrics[3];
    let improved = st.counters.best_fitness.is_none_or(|b| fitness > b);
    if improved {
        st.counters.best_fitness = Some(fitness);
        st.counters.best_epoch = Some(row.epoch);
        st.best = Some(st.ema.values().clone());
    }
    st.counters.stopped = st.counters.stopper.update(row.epoch, fitness);
    st.results_csv.push_str(&results::csv_row(row)?);
    st.counters.epoch = row.epoch + 1;
    Ok(improved)
}

/// results.csv and weights/last (and best) from the state.
///
/// Atomic always (a kill leaves the old file or the new one), but waited
/// for on the disk (fsync) only when `durable`: after the run's last epoch
/// and on resume. In between, the checkpoint, synced just before, holds
/// everything these files say and a resume rewrites them from it, so an OS
/// crash that loses them loses nothing; the syncs of these three to five
/// files were most of an epoch's saving time.
fn write_derived(run: &Run, st: &State, wdir: &Path, best_too: bool, durable: bool) -> Result<()> {
    let write = if durable { crate::fsutil::write_atomic } else { crate::fsutil::write_atomic_unsynced };
    let save_dir = wdir.parent().unwrap_or(Path::new("."));
    write(&save_dir.join("results.csv"), st.results_csv.as_bytes())?;
    run.save_weights_with(st.ema.values(), &wdir.join("last"), write)?;
    if let (true, Some(best)) = (best_too, &st.best) {
        run.save_weights_with(best, &wdir.join("best"), write)?;
    }
    Ok(())
}

/// A fresh run: opt.yaml and hyp.yaml, and nothing of an earlier run in the
/// same directory (`--exist-ok`) that a later `--resume` could pick up.
fn start_run_dir(opts: &TrainOptions, wdir: &Path) -> Result<()> {
    for stem in ["last_state", "last", "best"] {
        for ext in ["safetensors", "json"] {
            let p = wdir.join(stem).with_extension(ext);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("cannot remove {} of an earlier run", p.display()))?;
            }
        }
    }
    crate::fsutil::write_atomic(&opts.save_dir.join("opt.yaml"), serde_yaml::to_string(opts)?.as_bytes())?;
    crate::fsutil::write_atomic(&opts.save_dir.join("hyp.yaml"), opts.hyp.to_yaml().as_bytes())?;
    if !opts.hyp.not_applied.is_empty() {
        let keys: Vec<String> = opts.hyp.not_applied.keys().cloned().collect();
        eprintln!("note: hyp keys {} are augmentations; they do not apply to a feature cache and are ignored", keys.join(", "));
    }
    Ok(())
}

/// Reads a run's opt.yaml for `--resume`.
pub fn load_opt(run: &Path) -> Result<TrainOptions> {
    let p = run.join("opt.yaml");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{} is not a training run (no opt.yaml)", run.display()))?;
    let o: TrainOptions = serde_yaml::from_str(&text).with_context(|| format!("{} is damaged", p.display()))?;
    if o.precision == Precision::Bf16 && crate::kernels::conv::bf16_path().is_none() {
        bail!(
            "{} trains its layers below --freeze 24 with bf16 GEMMs, which this CPU cannot run (no AVX512-BF16); resume it on a CPU that has them (Intel Cooper Lake, Sapphire Rapids or later; AMD Zen 4 or later), or start a new run with --precision f32",
            run.display()
        );
    }
    Ok(o)
}
