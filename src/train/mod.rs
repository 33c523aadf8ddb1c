//! The training stage: a model, a dataset and settings in; a YOLOv5-style run
//! directory out (results.csv, weights/last and best as heads, opt.yaml,
//! hyp.yaml). Only the head runs: the frozen part is read from the feature
//! cache, filled first if anything is missing.
//!
//! The loop is train.py's without augmentation: nominal batch 64 with gradient
//! accumulation, warmup over max(warmup_epochs·nb, 100) iterations, linear or
//! cosine schedule, EMA of the weights for validation and saving.

pub mod batches;
pub mod hyp;
pub mod init;
pub mod optim;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::ArrayD;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autograd::Tape;
use crate::cache::{Dtype, FeatureCache, build};
use crate::data::Dataset;
use crate::engine::{Engine, EngineOptions};
use crate::graph::Model;
use crate::head::Head;
use crate::loss::{LossConfig, compute_loss_on_features, scale_hyp};
use batches::{Sample, SplitData, load_batch, load_split};
use hyp::TrainHyp;
use optim::{Ema, OptimizerKind, Optimizer, Param, interp, lr_factor};

/// What the optimizer may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainWhat {
    /// Every row of the three convolutions.
    Head,
    /// Only the class rows; box and objectness rows stay bit-identical.
    Cls,
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
    pub save_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub dtype: Dtype,
    #[serde(skip)]
    pub engine: EngineOptions,
    #[serde(skip)]
    pub progress: bool,
}

const NBS: usize = 64;

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
    pub rows: Vec<EpochRow>,
    pub cache: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    pub cache_seconds: f64,
    /// The starting head and the best head on the val split.
    pub before: Option<crate::val::ValReport>,
    pub after: Option<crate::val::ValReport>,
}

/// Fills the cache for the images that need it and returns the split's samples.
fn prepare_split(cache: &FeatureCache, engine: &mut Option<Vec<Engine>>, frozen: &[u8], opts: &TrainOptions, images: &[PathBuf], nc: usize, split: &str) -> Result<SplitData> {
    let mut data = load_split(cache, images, nc, opts.dtype, &Default::default())?;
    if !data.missing.is_empty() {
        if engine.is_none() {
            *engine = Some(Engine::for_fill(&opts.weights, frozen, opts.imgsz, &opts.engine)?);
        }
        // two sessions side by side: small batches, low memory, same speed
        let fill = build::FillOptions { batch_size: 2, dtype: opts.dtype, progress: opts.progress };
        let r = build::fill(cache, engine.as_mut().unwrap(), &data.missing, &fill)?;
        eprintln!("{split}: cached {} new images ({} skipped) in {:.1}s", r.computed, r.skipped, r.seconds);
        data = load_split(cache, images, nc, opts.dtype, &r.written.into_iter().collect())?;
    }
    for (file, line, reason) in &data.bad_lines {
        eprintln!("warning: {}:{line}: {reason}; line skipped", file.display());
    }
    Ok(data)
}

/// The head's tensors as optimizer parameters, with per-row multipliers.
fn params_of(head: &Head, opts: &TrainOptions) -> Vec<Param> {
    let no = head.no();
    let row_lr: Vec<f32> = (0..head.na() * no)
        .map(|r| {
            let k = r % no;
            let m = if k < 4 { opts.lr_box } else if k == 4 { opts.lr_obj } else { opts.lr_cls };
            if opts.train == TrainWhat::Cls && k < 5 { 0.0 } else { m as f32 }
        })
        .collect();
    let mut out = Vec::new();
    for (w, b) in head.weights.iter().zip(&head.biases) {
        out.push(Param { value: w.clone().into_dyn(), group: 1, row_lr: row_lr.clone() });
        out.push(Param { value: b.clone().into_dyn(), group: 0, row_lr: row_lr.clone() });
    }
    out
}

fn head_with(template: &Head, values: &[ArrayD<f32>]) -> Head {
    let mut h = template.clone();
    for l in 0..h.nl() {
        h.weights[l] = values[2 * l].clone().into_dimensionality().unwrap();
        h.biases[l] = values[2 * l + 1].clone().into_dimensionality().unwrap();
    }
    h
}

/// Loss parts `[box, obj, cls]` (not × bs) and parameter gradients.
fn step(values: &[ArrayD<f32>], batch: batches::Batch, cfg: &LossConfig, grids: &[(usize, usize)]) -> ([f32; 3], Vec<ArrayD<f32>>) {
    let mut t = Tape::new();
    let vars: Vec<_> = values.iter().map(|v| t.param(v.clone())).collect();
    let feats: Vec<_> = batch.feats.into_iter().map(|f| t.features(f)).collect();
    let weights: Vec<_> = vars.iter().step_by(2).copied().collect();
    let biases: Vec<_> = vars.iter().skip(1).step_by(2).copied().collect();
    let parts = compute_loss_on_features(&mut t, cfg, &feats, &weights, &biases, grids, batch.bs, batch.targets.view());
    let losses = [t.scalar(parts.lbox), t.scalar(parts.lobj), t.scalar(parts.lcls)];
    let mut g = t.backward(parts.total);
    let g = vars.iter().map(|&v| g.take(v).unwrap_or_else(|| ArrayD::zeros(t.value(v).raw_dim()))).collect();
    (losses, g)
}

fn tensors_of(prefix: &str, v: &[ArrayD<f32>], out: &mut BTreeMap<String, ArrayD<f32>>) {
    for (i, t) in v.iter().enumerate() {
        out.insert(format!("{prefix}.{i}"), t.as_standard_layout().into_owned());
    }
}

fn take_tensors(prefix: &str, n: usize, from: &mut BTreeMap<String, ArrayD<f32>>) -> Result<Vec<ArrayD<f32>>> {
    (0..n).map(|i| from.remove(&format!("{prefix}.{i}")).with_context(|| format!("training state lacks {prefix}.{i}"))).collect()
}

/// Trains; `resume` continues a run directory after its last finished epoch.
pub fn train(opts: &TrainOptions, resume: bool) -> Result<TrainReport> {
    let model = Model::load(&opts.weights)?;
    let data = Dataset::load(&opts.data)?;
    let train_images = data.images("train")?;
    let val_images = data.images("val")?;
    if train_images.is_empty() {
        bail!("the train split of {} has no images", opts.data.display());
    }
    let nc = data.nc();

    let cache_start = std::time::Instant::now();
    let (cache, frozen) = FeatureCache::open(&opts.cache_dir, &model, opts.imgsz)?;
    let mut engine = None;
    let train_set = prepare_split(&cache, &mut engine, &frozen, opts, &train_images, nc, "train")?;
    let val_set = prepare_split(&cache, &mut engine, &frozen, opts, &val_images, nc, "val")?;
    drop(engine);
    let cache_seconds = cache_start.elapsed().as_secs_f64();
    if train_set.samples.is_empty() {
        bail!("none of the {} train images of {} could be read", train_images.len(), opts.data.display());
    }
    let shapes = train_set.shapes.clone();
    // load_split already hashed the images and verified their entries
    let val_items: Vec<crate::val::ValItem> = val_set
        .samples
        .iter()
        .map(|s| crate::val::ValItem { image: s.image.clone(), entry: s.entry.clone() })
        .collect();

    // The starting head.
    let pretrained = Head::from_model(&model)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let head0 = if opts.reinit_head {
        init::reinit_head(&pretrained, &data.names, &mut rng)
    } else if pretrained.names != data.names {
        if opts.train == TrainWhat::Cls || pretrained.nc != nc {
            eprintln!("new class set: {} → {} classes ({}); box and objectness rows kept, class rows initialised", pretrained.nc, nc, data.names.join(", "));
        }
        init::new_class_head(&pretrained, &data.names, &mut rng)
    } else {
        pretrained.clone()
    };

    let nl = head0.nl();
    let grids: Vec<(usize, usize)> = shapes.iter().map(|s| (s[1], s[2])).collect();
    let anchors_grid: Vec<Vec<[f32; 2]>> = head0.anchors.iter().zip(&head0.strides).map(|(a, s)| a.iter().map(|[w, h]| [w / s, h / s]).collect()).collect();
    let cfg = LossConfig::new(scale_hyp(&opts.hyp.loss_hyp(opts.label_smoothing), nc, nl, opts.imgsz), nc, anchors_grid);

    let bs = opts.batch_size.max(1);
    let nb = train_set.samples.len().div_ceil(bs);
    let accumulate0 = ((NBS as f64 / bs as f64).round() as usize).max(1);
    let weight_decay = opts.hyp.weight_decay * (bs * accumulate0) as f64 / NBS as f64;
    let nw = ((opts.hyp.warmup_epochs * nb as f64).round() as usize).max(100);

    let mut params = params_of(&head0, opts);
    let mut optimizer = Optimizer::new(opts.optimizer, &params, &opts.hyp, weight_decay);
    let mut ema = Ema::new(&params);
    let mut acc: Vec<ArrayD<f32>> = params.iter().map(|p| ArrayD::zeros(p.value.raw_dim())).collect();
    let mut counters = state::Counters { epoch: 0, ema_updates: 0, opt_steps: 0, last_opt_step: -1, best_fitness: f64::NEG_INFINITY };

    let save_dir = &opts.save_dir;
    let wdir = save_dir.join("weights");
    std::fs::create_dir_all(&wdir).with_context(|| format!("cannot create {}", wdir.display()))?;
    let csv_path = save_dir.join("results.csv");
    let mut rows: Vec<EpochRow> = Vec::new();
    if resume {
        let mut st = state::load(&wdir.join("last_state"))?;
        let n = params.len();
        let values = take_tensors("param", n, &mut st.tensors)?;
        for (p, v) in params.iter_mut().zip(values) {
            p.value = v;
        }
        ema.params = take_tensors("ema", n, &mut st.tensors)?;
        optimizer.state.m = take_tensors("m", n, &mut st.tensors)?;
        if opts.optimizer != OptimizerKind::Sgd {
            optimizer.state.v = take_tensors("v", n, &mut st.tensors)?;
        }
        acc = take_tensors("acc", n, &mut st.tensors)?;
        counters = st.counters;
        ema.updates = counters.ema_updates;
        optimizer.state.steps = counters.opt_steps;
        // keep only the rows of finished epochs
        let text = std::fs::read_to_string(&csv_path).unwrap_or_default();
        let kept: Vec<&str> = text.lines().take(1 + counters.epoch).collect();
        crate::fsutil::write_atomic(&csv_path, format!("{}\n", kept.join("\n")).as_bytes())?;
        eprintln!("resuming {} from epoch {} of {}", save_dir.display(), counters.epoch, opts.epochs);
    } else {
        std::fs::write(save_dir.join("opt.yaml"), serde_yaml::to_string(opts)?)?;
        std::fs::write(save_dir.join("hyp.yaml"), opts.hyp.to_yaml())?;
        crate::fsutil::write_atomic(&csv_path, csv_header().as_bytes())?;
        if !opts.hyp.not_applied.is_empty() {
            let keys: Vec<String> = opts.hyp.not_applied.keys().cloned().collect();
            eprintln!("note: hyp keys {} are augmentations; they do not apply to a feature cache and are ignored", keys.join(", "));
        }
    }

    let mut source = HashMap::new();
    source.insert("model".to_string(), std::path::absolute(&opts.weights)?.display().to_string());
    source.insert("cache".to_string(), cache.dir.display().to_string());
    source.insert("data".to_string(), std::path::absolute(&opts.data)?.display().to_string());

    let val_opts = crate::val::ValOptions { batch_size: bs * 2, dtype: opts.dtype, ..Default::default() };
    let before = if val_items.is_empty() { None } else { Some(crate::val::validate_items(&head0, &val_items, &val_opts)?) };
    let train_start = std::time::Instant::now();
    for epoch in counters.epoch..opts.epochs {
        let epoch_start = std::time::Instant::now();
        let mut order: Vec<usize> = (0..train_set.samples.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)));
        let bar = if opts.progress { ProgressBar::with_draw_target(Some(nb as u64), ProgressDrawTarget::stderr()) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {per_sec} {msg}").unwrap().progress_chars("=> "));
        bar.set_prefix(format!("{:>5}", format!("{}/{}", epoch, opts.epochs - 1)));
        let mut mloss = [0f64; 3];
        let mut accumulate = accumulate0;
        for (i, chunk) in order.chunks(bs).enumerate() {
            let ni = (i + nb * epoch) as f64;
            if ni <= nw as f64 {
                accumulate = (interp(ni, 0.0, nw as f64, 1.0, NBS as f64 / bs as f64).round() as usize).max(1);
                for g in 0..2 {
                    let start = if g == 0 { opts.hyp.warmup_bias_lr } else { 0.0 };
                    optimizer.lr[g] = interp(ni, 0.0, nw as f64, start, opts.hyp.lr0 * lr_factor(epoch as f64, opts.epochs, opts.hyp.lrf, opts.cos_lr));
                    optimizer.momentum[g] = interp(ni, 0.0, nw as f64, opts.hyp.warmup_momentum, opts.hyp.momentum);
                }
            }
            let refs: Vec<&Sample> = chunk.iter().map(|&j| &train_set.samples[j]).collect();
            let batch = load_batch(&refs, &shapes, opts.dtype)?;
            let values: Vec<ArrayD<f32>> = params.iter().map(|p| p.value.clone()).collect();
            let (l, g) = step(&values, batch, &cfg, &grids);
            for (a, g) in acc.iter_mut().zip(g) {
                // the loss is × bs, as train.py's
                *a += &g;
            }
            if ni as i64 - counters.last_opt_step >= accumulate as i64 {
                optimizer.step(&mut params, &acc);
                for a in acc.iter_mut() {
                    a.fill(0.0);
                }
                ema.update(&params);
                counters.last_opt_step = ni as i64;
            }
            for k in 0..3 {
                mloss[k] = (mloss[k] * i as f64 + l[k] as f64) / (i + 1) as f64;
            }
            bar.set_message(format!("box {:.4} obj {:.4} cls {:.4}", mloss[0], mloss[1], mloss[2]));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let lr = optimizer.lr;
        // scheduler.step(): the next epoch's base rate
        for g in 0..2 {
            optimizer.lr[g] = opts.hyp.lr0 * lr_factor((epoch + 1) as f64, opts.epochs, opts.hyp.lrf, opts.cos_lr);
        }

        let train_seconds = epoch_start.elapsed().as_secs_f64();
        let ema_head = head_with(&head0, &ema.params);
        let (metrics, val) = if val_items.is_empty() {
            ([0.0; 4], [f32::NAN; 3])
        } else {
            let r = crate::val::validate_items(&ema_head, &val_items, &val_opts)?;
            let l = r.losses.unwrap_or([f64::NAN; 3]);
            ([r.summary.mp, r.summary.mr, r.summary.map50, r.summary.map], l.map(|v| v as f32))
        };
        let row = EpochRow { epoch, train: mloss.map(|v| v as f32), metrics, val, lr };
        eprintln!(
            "{:>5}  train box {:.4} obj {:.4} cls {:.4}  val P {:.3} R {:.3} mAP50 {:.3} mAP50-95 {:.3}  box {:.4} obj {:.4} cls {:.4}  ({:.2}s train + {:.2}s val)",
            format!("{}/{}", epoch, opts.epochs - 1),
            row.train[0], row.train[1], row.train[2], metrics[0], metrics[1], metrics[2], metrics[3], row.val[0], row.val[1], row.val[2],
            train_seconds,
            epoch_start.elapsed().as_secs_f64() - train_seconds
        );
        // YOLOv5's fitness: 0.1·mAP50 + 0.9·mAP50-95
        let fitness = 0.1 * metrics[2] + 0.9 * metrics[3];
        ema_head.save(&wdir.join("last"), source.clone())?;
        if fitness > counters.best_fitness || counters.best_fitness.is_infinite() {
            counters.best_fitness = fitness;
            ema_head.save(&wdir.join("best"), source.clone())?;
        }
        append_row(&csv_path, &row)?;
        counters.epoch = epoch + 1;
        counters.ema_updates = ema.updates;
        counters.opt_steps = optimizer.state.steps;
        let mut tensors = BTreeMap::new();
        tensors_of("param", &params.iter().map(|p| p.value.clone()).collect::<Vec<_>>(), &mut tensors);
        tensors_of("ema", &ema.params, &mut tensors);
        tensors_of("m", &optimizer.state.m, &mut tensors);
        tensors_of("v", &optimizer.state.v, &mut tensors);
        tensors_of("acc", &acc, &mut tensors);
        state::save(&wdir.join("last_state"), &state::TrainState { counters: counters.clone(), tensors })?;
        rows.push(row);
        // Test hook: die right after a finished epoch, as a kill would.
        if std::env::var("FREEZESPLIT_ABORT_AFTER_EPOCH").ok().and_then(|v| v.parse::<usize>().ok()) == Some(epoch) {
            std::process::abort();
        }
    }
    let done = opts.epochs.saturating_sub(rows.first().map_or(opts.epochs, |r| r.epoch));
    eprintln!("{done} epochs completed in {:.1}s ({:.2}s per epoch)", train_start.elapsed().as_secs_f64(), train_start.elapsed().as_secs_f64() / done.max(1) as f64);
    let after = match (val_items.is_empty(), Head::load(&wdir.join("best"))) {
        (false, Ok(best)) => Some(crate::val::validate_items(&best, &val_items, &val_opts)?),
        _ => None,
    };
    if let Err(e) = plot_run(save_dir, &csv_path, after.as_ref()) {
        eprintln!("warning: plots not written: {e:#}");
    }
    Ok(TrainReport { save_dir: save_dir.clone(), rows, cache: cache.dir.clone(), train_images: train_set.samples.len(), val_images: val_set.samples.len(), cache_seconds, before, after })
}

/// results.png from results.csv (all epochs, also across a resume), and the
/// best head's PR curve and confusion matrix.
fn plot_run(save_dir: &Path, csv: &Path, best: Option<&crate::val::ValReport>) -> Result<()> {
    let text = std::fs::read_to_string(csv)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|v| v.parse().unwrap_or(f64::NAN)).collect()).collect();
    let titles = ["train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall", "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"];
    let series: Vec<Vec<f64>> = titles.iter().map(|t| header.iter().position(|h| h == t).map(|c| rows.iter().map(|r| r[c]).collect()).unwrap_or_default()).collect();
    crate::plots::results_png(&save_dir.join("results.png"), &titles, &series)?;
    if let Some(r) = best {
        if let Some(c) = &r.summary.curves {
            crate::plots::pr_curve_png(&save_dir.join("PR_curve.png"), c, &r.names)?;
        }
        crate::plots::confusion_png(&save_dir.join("confusion_matrix.png"), &r.summary.confusion.matrix, &r.names)?;
    }
    Ok(())
}

fn csv_header() -> String {
    "epoch,train/box_loss,train/obj_loss,train/cls_loss,metrics/precision,metrics/recall,metrics/mAP_0.5,metrics/mAP_0.5:0.95,val/box_loss,val/obj_loss,val/cls_loss,x/lr0,x/lr1\n".to_string()
}

fn append_row(path: &Path, r: &EpochRow) -> Result<()> {
    // rewrite whole file atomically: a kill never leaves a half row
    let mut text = std::fs::read_to_string(path).unwrap_or_else(|_| csv_header());
    let mut line = Vec::new();
    write!(
        line,
        "{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.8},{:.8}",
        r.epoch, r.train[0], r.train[1], r.train[2], r.metrics[0], r.metrics[1], r.metrics[2], r.metrics[3], r.val[0], r.val[1], r.val[2], r.lr[0], r.lr[1]
    )?;
    text.push_str(&String::from_utf8(line)?);
    text.push('\n');
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Reads a run's opt.yaml for `--resume`.
pub fn load_opt(run: &Path) -> Result<TrainOptions> {
    let p = run.join("opt.yaml");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{} is not a training run (no opt.yaml)", run.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is damaged", p.display()))
}
