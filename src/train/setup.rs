//! A run's set-up: validated `TrainOptions` in; everything the epochs read and
//! never change out (`Run`): the starting head and where its tensors live in
//! the model, the samples of both splits with their cache entries (the cache
//! filled first where anything is missing), the loss configuration and the
//! schedule. The checks that need the model or the data run before the cache
//! fill, so bad input costs nothing.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::batches::{SplitData, load_split};
use super::init;
use super::params::HeadLayout;
use super::schedule::Schedule;
use super::{TrainOptions, TrainWhat};
use crate::cache::{FeatureCache, build};
use crate::data::Dataset;
use crate::engine::Engine;
use crate::graph::Model;
use crate::head::Head;
use crate::loss::{Hyp, LossConfig, scale_hyp};
use crate::val::{ValItem, ValOptions};

pub struct Run {
    /// The head training starts from (pretrained, new class set or re-initialised).
    pub head0: Head,
    pub layout: HeadLayout,
    /// The learning-rate multiplier of each output channel (box, obj, cls rows).
    pub row_lr: Vec<f32>,
    /// The run's loss settings before `scale_hyp` (the val losses use them too).
    pub loss_hyp: Hyp,
    pub cfg: LossConfig,
    /// `[C, H, W]` and `(H, W)` of each level.
    pub shapes: Vec<[usize; 3]>,
    pub grids: Vec<(usize, usize)>,
    pub train: SplitData,
    pub val: SplitData,
    /// The val samples' entries, opened once.
    pub val_items: Vec<ValItem>,
    pub val_opts: ValOptions,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub cache_dir: PathBuf,
    pub cache_seconds: f64,
    /// Provenance written next to every saved head.
    pub source: HashMap<String, String>,
    /// Layers N..23 for `--freeze N` below 24.
    pub tail: Option<super::tail::TailRun>,
    /// `--add-classes`: the dataset's classes among the extended model's.
    pub add_classes: Option<super::add_classes::AddClasses>,
    /// The sparse data of `--train cls` (`--sparse`).
    pub sparse: Option<super::sparse::SparseRun>,
}

impl Run {
    /// The val items whose features the head reads: the cached entries at
    /// N = 24; below, the head inputs computed by the tail with `values`
    /// (once, at set-up, when the tail is frozen).
    pub fn val_items_for(&self, values: &super::params::Tensors) -> Result<std::borrow::Cow<'_, [ValItem]>> {
        use std::borrow::Cow;
        match &self.tail {
            None => Ok(Cow::Borrowed(&self.val_items)),
            Some(t) => match &t.frozen_val {
                Some(v) => Ok(Cow::Borrowed(v)),
                None => {
                    let net = super::tail::net_with(&t.net, values);
                    Ok(Cow::Owned(super::tail::val_items(&net, &self.val_items, &self.shapes, self.val_opts.batch_size, t.val_dir.path())?))
                }
            },
        }
    }

    /// Saves the head (and the tail below N = 24) with `values` as `stem`.
    pub fn save_weights(&self, values: &super::params::Tensors, stem: &std::path::Path) -> Result<()> {
        self.save_weights_with(values, stem, crate::fsutil::write_atomic)
    }

    /// `save_weights` with the head written by `write` (see `Head::save_with`).
    pub fn save_weights_with(&self, values: &super::params::Tensors, stem: &std::path::Path, write: fn(&std::path::Path, &[u8]) -> Result<()>) -> Result<()> {
        self.layout.head(&self.head0, values)?.save_with(stem, self.source.clone(), write)?;
        if let Some(t) = &self.tail {
            super::tail::save(stem, &t.net, values)?;
        }
        Ok(())
    }
}

pub fn prepare(opts: &TrainOptions) -> Result<Run> {
    let model = Model::load(&opts.weights)?;
    let data = Dataset::load(&opts.data)?;
    let train_images = data.labelled_images("train")?;
    let val_images = data.labelled_images("val")?;
    let nc = data.nc();
    if nc == 0 {
        bail!("{} names no classes (nc: 0); a detector needs at least one class in `names`", opts.data.display());
    }
    if train_images.is_empty() {
        bail!("the train split of {} has no images", opts.data.display());
    }
    if opts.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    if opts.batch_size > train_images.len() {
        bail!("--batch-size {} is larger than the train split of {} ({} images); use a batch size from 1 to {}", opts.batch_size, opts.data.display(), train_images.len(), train_images.len());
    }
    let add = if opts.add_classes { Some(super::add_classes::plan(&model.spec.names, &data.names, opts)?) } else { None };
    let (head0, note) = starting_head(&model, &data.names, opts, add.as_ref())?;

    let cache_start = std::time::Instant::now();
    let cut = model.cut(opts.freeze)?;
    let mut tail = if opts.freeze < crate::graph::cut::HEAD_ONLY {
        let net = crate::tail::TailNet::build(&model, &cut, opts.imgsz).with_context(|| format!("cannot train layers {}..23 of {}", opts.freeze, opts.weights.display()))?;
        let val_dir = crate::fsutil::temp_dir("freezesplit-val-", "the tail's outputs on the val images")?;
        let trains = opts.train != TrainWhat::Cls;
        let gemm = if trains { opts.precision.gemm() } else { None };
        if gemm.is_some() {
            eprintln!("layers {}..23 train with bf16 GEMMs (AVX512-BF16, f32 sums); validation and export run f32 (--precision f32 for f32 throughout)", opts.freeze);
        }
        Some(super::tail::TailRun { net, trains, gemm, val_dir, frozen_val: None })
    } else {
        None
    };
    let (cache, frozen) = FeatureCache::open_at(&opts.cache_dir, &model, &cut, opts.imgsz)?;
    let mut engine = None;
    let mut train = prepare_split(&cache, &mut engine, &frozen, opts, &train_images, nc, "train")?;
    let mut val = prepare_split(&cache, &mut engine, &frozen, opts, &val_images, nc, "val")?;
    drop(engine);
    let cache_seconds = cache_start.elapsed().as_secs_f64();
    if train.samples.is_empty() {
        bail!("none of the {} train images of {} could be read", train_images.len(), opts.data.display());
    }
    if let Some(note) = note {
        eprintln!("{note}");
    }
    if let Some(plan) = &add {
        super::add_classes::prepare_targets(plan, &model, &mut train, &mut val, tail.as_ref(), opts)?;
    }
    // load_split already hashed the images and verified their entries
    let val_items: Vec<ValItem> = val.samples.iter().map(|s| ValItem { image: s.image.clone(), entry: s.entry.clone() }).collect();

    let shapes = train.shapes.clone();
    if let Some(t) = tail.as_mut() {
        t.freeze_val(&val_items, &shapes, opts.batch_size)?;
    }
    // the head's grids: the cached levels at N = 24, else imgsz / stride
    let grids: Vec<(usize, usize)> = match &tail {
        None => shapes.iter().map(|s| (s[1], s[2])).collect(),
        Some(_) => head0.strides.iter().map(|&s| (opts.imgsz / s as usize, opts.imgsz / s as usize)).collect(),
    };
    let anchors_grid: Vec<Vec<[f32; 2]>> = head0.anchors.iter().zip(&head0.strides).map(|(a, s)| a.iter().map(|[w, h]| [w / s, h / s]).collect()).collect();
    let loss_hyp = opts.hyp.loss_hyp(opts.label_smoothing);
    // the head's class count: data.yaml's, or the extended model's with --add-classes
    let cfg = LossConfig::new(scale_hyp(&loss_hyp, head0.nc, head0.nl(), opts.imgsz), head0.nc, anchors_grid);
    // class-only epochs on the positives alone (`train::sparse`)
    let sparse = match opts.sparse {
        true => {
            // validated on the dataset's classes, as `Run::validate` does
            let val_head = add.as_ref().map_or_else(|| head0.clone(), |p| crate::val::classes::select_classes(&head0, &p.data_to_model));
            let vo = val_opts(opts);
            let src = super::sparse::SparseSource { cache: &cache, head: &head0, val_head: &val_head, cfg: &cfg, dtype: opts.dtype, val_opts: &vo, tail: tail.as_ref().map(|t| (&t.net, &shapes[..])) };
            // the candidates come from the head inputs: below 24, the frozen tail's
            let head_val = tail.as_ref().and_then(|t| t.frozen_val.as_deref()).unwrap_or(&val_items);
            Some(super::sparse::prepare_run(&src, &train.samples, &val.samples, head_val)?)
        }
        false => None,
    };
    let schedule = Schedule::new(&opts.hyp, opts.epochs, train.samples.len().div_ceil(opts.batch_size), opts.batch_size, opts.cos_lr);

    let mut source = HashMap::new();
    source.insert("model".to_string(), std::path::absolute(&opts.weights)?.display().to_string());
    source.insert("cache".to_string(), cache.dir.display().to_string());
    source.insert("data".to_string(), std::path::absolute(&opts.data)?.display().to_string());
    if let Some(plan) = &add {
        super::add_classes::source_entries(plan, &mut source);
    }

    Ok(Run {
        row_lr: match &add {
            Some(plan) if opts.train == TrainWhat::Cls => super::add_classes::cls_row_lr(&head0, plan.base_nc, opts.lr_cls),
            _ => row_lr(&head0, opts),
        },
        layout: HeadLayout::of(&model),
        head0,
        loss_hyp,
        cfg,
        shapes,
        grids,
        train,
        val,
        val_items,
        val_opts: val_opts(opts),
        weight_decay: schedule.weight_decay(opts.hyp.weight_decay),
        schedule,
        cache_dir: cache.dir.clone(),
        cache_seconds,
        source: { let mut s = source; s.insert("freeze".into(), opts.freeze.to_string()); s },
        tail,
        add_classes: add,
        sparse,
    })
}

/// The trainer's validation settings.
fn val_opts(opts: &TrainOptions) -> ValOptions {
    // the losses are the trainer's own, with the run's hyp (`epoch::evaluate`)
    ValOptions { batch_size: opts.batch_size * 2, dtype: opts.dtype, losses: false, ..Default::default() }
}

/// The head to start from, refused if it holds non-finite values, and the
/// line that says how it was made.
fn starting_head(model: &Model, names: &[String], opts: &TrainOptions, add: Option<&super::add_classes::AddClasses>) -> Result<(Head, Option<String>)> {
    let pretrained = Head::from_model(model)?;
    let layout = HeadLayout::of(model);
    if let Some(name) = layout.params(&pretrained, &[]).first_non_finite() {
        bail!("the Detect head of {} holds NaN or infinite values (initializer `{name}`); export the model again from a checkpoint that trained without diverging", opts.weights.display());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    Ok(if let Some(plan) = add {
        (super::add_classes::extend_head(&pretrained, &plan.added, &mut rng), Some(plan.describe()))
    } else if opts.reinit_head {
        (init::reinit_head(&pretrained, names, &mut rng), None)
    } else if pretrained.names != names {
        let note = (opts.train == TrainWhat::Cls || pretrained.nc != names.len())
            .then(|| format!("new class set: {} → {} classes ({}); box and objectness rows kept, class rows initialised", pretrained.nc, names.len(), names.join(", ")));
        (init::new_class_head(&pretrained, names, &mut rng), note)
    } else {
        (pretrained, None)
    })
}

/// Per output channel `a·no + k`: the multiplier of its kind of row; `--train
/// cls` freezes the box and objectness rows.
fn row_lr(head: &Head, opts: &TrainOptions) -> Vec<f32> {
    let no = head.no();
    (0..head.na() * no)
        .map(|r| {
            let k = r % no;
            let m = if k < 4 { opts.lr_box } else if k == 4 { opts.lr_obj } else { opts.lr_cls };
            if opts.train == TrainWhat::Cls && k < 5 { 0.0 } else { m as f32 }
        })
        .collect()
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
        eprintln!("{}", crate::data::skip_message(file, *line, reason));
    }
    Ok(data)
}
