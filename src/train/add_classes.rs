//! `train --add-classes`: the input model keeps every class it has and gains
//! the data.yaml classes it lacks. In: the model's head and names, the
//! dataset's names, the prepared splits. Out: the plan (`AddClasses`: which
//! names matched, which are new, each dataset class's model id), the extended
//! head (old rows copied, new class rows appended with YOLOv5's class-bias
//! initialisation), the row learning rates, the splits' targets in model ids
//! plus the pseudo-labels, and validation on the dataset's classes.
//!
//! Why it works: with the box and objectness rows frozen, YOLOv5's class
//! outputs are independent sigmoids, so with `--train cls` the old class rows
//! and the box/objectness rows have multiplier 0 (neither the optimizer, its
//! weight decay nor the EMA touches them) and the model's first 5 + nc_old
//! outputs stay bit-identical. A new row needs negatives or it learns "always
//! yes": the labelled objects of matched classes (their targets say 0 for the
//! new classes) and, by default, the input model's own confident detections
//! that no label covers (objects of old classes the data did not label), added
//! as labels of their old class.

use std::collections::HashMap;

use anyhow::{Result, bail};
use ndarray::Array2;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::batches::SplitData;
use super::setup::Run;
use super::tail::TailRun;
use super::{TrainOptions, TrainWhat};
use crate::cache::Entry;
use crate::graph::Model;
use crate::head::Head;
use crate::val::{ValItem, ValReport, classes};

/// detect.py's thresholds for the pseudo-labels: YOLOv5's conf = obj × cls.
pub const PSEUDO_CONF: f64 = 0.25;
pub const PSEUDO_NMS_IOU: f64 = 0.45;
/// A detection overlapping a label at this IoU is that label's object.
pub const PSEUDO_LABEL_IOU: f32 = 0.5;

/// Which data.yaml classes are the model's and which are new.
#[derive(Debug, Clone)]
pub struct AddClasses {
    /// The input model's class count: classes `0..base_nc` are old.
    pub base_nc: usize,
    /// The model class id of each dataset class.
    pub data_to_model: Vec<usize>,
    /// `(data.yaml name, model name, model id)` of the matched classes.
    pub matched: Vec<(String, String, usize)>,
    /// The new classes' names, in data.yaml order (model ids base_nc..).
    pub added: Vec<String>,
}

/// Matches data.yaml's names to the model's (case-insensitive); refused with
/// `--reinit-head` or when no name is new.
pub fn plan(model_names: &[String], data_names: &[String], opts: &TrainOptions) -> Result<AddClasses> {
    if opts.reinit_head {
        bail!("--add-classes keeps every row of the input model's head, and --reinit-head would re-initialise them; use one of the two");
    }
    let base_nc = model_names.len();
    let mut plan = AddClasses { base_nc, data_to_model: Vec::new(), matched: Vec::new(), added: Vec::new() };
    for (name, m) in data_names.iter().zip(classes::match_names(model_names, data_names)) {
        match m {
            Some(id) => {
                plan.data_to_model.push(id);
                plan.matched.push((name.clone(), model_names[id].clone(), id));
            }
            None => {
                plan.data_to_model.push(base_nc + plan.added.len());
                plan.added.push(name.clone());
            }
        }
    }
    if plan.added.is_empty() {
        bail!("--add-classes found no new class: every name in {} is already one of the {} classes of {}; train without --add-classes", opts.data.display(), base_nc, opts.weights.display());
    }
    Ok(plan)
}

impl AddClasses {
    /// The log line: matched names, new names.
    pub fn describe(&self) -> String {
        let matched: Vec<String> = self.matched.iter().map(|(d, m, id)| format!("{d} = {m} (class {id})")).collect();
        let added: Vec<String> = self.added.iter().enumerate().map(|(i, n)| format!("{n} (class {})", self.base_nc + i)).collect();
        let matched = if matched.is_empty() { "none".to_string() } else { matched.join(", ") };
        format!("add classes: {} → {} classes; matched by name: {matched}; new: {}", self.base_nc, self.base_nc + self.added.len(), added.join(", "))
    }
}

/// The input head with the new class rows appended to every anchor's block:
/// old rows copied, new rows as YOLOv5 initialises class rows (uniform
/// ±1/√fan_in, bias plus `log(0.6 / (nc − 0.99))` with the extended nc).
pub fn extend_head(pre: &Head, added: &[String], rng: &mut ChaCha8Rng) -> Head {
    let old_no = pre.no();
    let names = pre.names.iter().chain(added).cloned().collect();
    super::init::with_class_rows(pre, names, |k| k < old_no, rng)
}

/// `--train cls`: only the new class rows train (multiplier `--lr-cls`);
/// the old class rows and the box and objectness rows are frozen exactly.
pub fn cls_row_lr(head: &Head, base_nc: usize, lr_cls: f64) -> Vec<f32> {
    let no = head.no();
    (0..head.na() * no).map(|r| if r % no < 5 + base_nc { 0.0 } else { lr_cls as f32 }).collect()
}

/// The data.yaml class ids of both splits' targets as the model's.
pub fn remap_targets(split: &mut SplitData, data_to_model: &[usize]) {
    for s in &mut split.samples {
        for t in &mut s.targets {
            t[0] = data_to_model[t[0] as usize] as f32;
        }
    }
}

/// Counts of each kind of target, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TargetCounts {
    /// Labelled objects of new classes (positives of the new rows).
    pub new_labels: usize,
    /// Labelled objects of matched (old) classes: negatives of the new rows.
    pub old_labels: usize,
    /// The input model's own detections added as old-class labels.
    pub pseudo: usize,
}

/// Adds the pseudo-labels to `train`: per image, the input head's detections
/// (conf ≥ 0.25 after NMS at IoU 0.45, on `head_inputs[i]`, the head inputs
/// of `train.samples[i]`) that overlap no label at IoU ≥ 0.5, as labels of
/// their class. Returns how many were added.
pub fn add_pseudo_labels(pre: &Head, train: &mut SplitData, head_inputs: &[ValItem]) -> Result<usize> {
    let found: Vec<Vec<[f32; 5]>> = train
        .samples
        .par_iter()
        .zip(head_inputs)
        .map(|(sample, item)| {
            let e = Entry::open_verified_before(&item.entry)?;
            let imgsz = e.header.letterbox.imgsz as f32;
            let pred = crate::val::decode_entry(pre, &e, PSEUDO_CONF);
            let det = crate::metrics::non_max_suppression(pred.view(), PSEUDO_CONF, PSEUDO_NMS_IOU, None, false, false, 300);
            Ok(unlabelled(det.view(), &sample.targets, imgsz))
        })
        .collect::<Result<_>>()?;
    let mut n = 0;
    for (sample, extra) in train.samples.iter_mut().zip(found) {
        n += extra.len();
        sample.targets.extend(extra);
    }
    Ok(n)
}

/// The detections (`[n, 6]` xyxy conf cls, letterboxed pixels) that overlap
/// no target (`[cls, x, y, w, h]` normalised by imgsz) at IoU ≥ 0.5, as
/// targets, boxes clipped to the image.
fn unlabelled(det: ndarray::ArrayView2<f32>, targets: &[[f32; 5]], imgsz: f32) -> Vec<[f32; 5]> {
    let labels = Array2::from_shape_fn((targets.len(), 4), |(i, k)| {
        let [_, x, y, w, h] = targets[i];
        [x - w / 2.0, y - h / 2.0, x + w / 2.0, y + h / 2.0][k] * imgsz
    });
    let iou = crate::metrics::box_iou(det, labels.view());
    (0..det.nrows())
        .filter(|&i| iou.row(i).iter().all(|&v| v < PSEUDO_LABEL_IOU))
        .map(|i| {
            let c = |k: usize| det[[i, k]].clamp(0.0, imgsz);
            let (x1, y1, x2, y2) = (c(0), c(1), c(2), c(3));
            [det[[i, 5]], (x1 + x2) / 2.0 / imgsz, (y1 + y2) / 2.0 / imgsz, (x2 - x1) / imgsz, (y2 - y1) / imgsz]
        })
        .filter(|t| t[3] > 0.0 && t[4] > 0.0)
        .collect()
}

/// The labelled targets of `train` by kind (before pseudo-labels).
pub fn count_labels(train: &SplitData, base_nc: usize) -> TargetCounts {
    let mut c = TargetCounts::default();
    for t in train.samples.iter().flat_map(|s| &s.targets) {
        if (t[0] as usize) < base_nc { c.old_labels += 1 } else { c.new_labels += 1 }
    }
    c
}

/// The log line of the targets used.
pub fn describe_counts(c: &TargetCounts, pseudo_on: bool, train: TrainWhat) -> String {
    let pseudo = if pseudo_on {
        format!("{} pseudo-labels (the input model's own detections, conf ≥ {PSEUDO_CONF} after NMS at IoU {PSEUDO_NMS_IOU}, overlapping no label at IoU ≥ {PSEUDO_LABEL_IOU})", c.pseudo)
    } else {
        "no pseudo-labels (--no-pseudo-labels)".to_string()
    };
    let what = match train {
        TrainWhat::Cls => "only the new class rows train; the old class rows and the box and objectness rows stay bit-identical",
        TrainWhat::Head => "--train head: the old class rows and the box and objectness rows train too, so the old classes' outputs change (the before/after table shows what they lost)",
    };
    format!("add classes: train targets: {} labelled objects of new classes (positives); negatives for the new rows: {} labelled objects of the model's classes and {pseudo}; {what}", c.new_labels, c.old_labels)
}

/// The splits' targets in model ids and, unless `--no-pseudo-labels`, the
/// pseudo-labels added to the train split (from the head inputs: the cache
/// entries at N = 24, else the frozen tail's output); logs the counts.
pub fn prepare_targets(plan: &AddClasses, model: &Model, train: &mut SplitData, val: &mut SplitData, tail: Option<&TailRun>, opts: &TrainOptions) -> Result<()> {
    remap_targets(train, &plan.data_to_model);
    remap_targets(val, &plan.data_to_model);
    let mut counts = count_labels(train, plan.base_nc);
    if opts.pseudo_labels {
        let pre = Head::from_model(model)?;
        let items: Vec<ValItem> = train.samples.iter().map(|s| ValItem { image: s.image.clone(), entry: s.entry.clone() }).collect();
        counts.pseudo = match tail {
            None => add_pseudo_labels(&pre, train, &items)?,
            Some(t) => {
                let dir = crate::fsutil::temp_dir("freezesplit-pseudo-", "the pseudo-labels' head inputs")?;
                let inputs = super::tail::val_items(&t.net, &items, &train.shapes.clone(), opts.batch_size, dir.path())?;
                add_pseudo_labels(&pre, train, &inputs)?
            }
        };
    }
    eprintln!("{}", describe_counts(&counts, opts.pseudo_labels, opts.train));
    Ok(())
}

/// Provenance of an extended head: how many of its classes are old.
pub fn source_entries(plan: &AddClasses, source: &mut HashMap<String, String>) {
    source.insert(classes::BASE_NC_KEY.to_string(), plan.base_nc.to_string());
}

impl Run {
    /// `head` validated on the val split; with `--add-classes`, on the
    /// dataset's classes (matched by name), old and new reported apart.
    pub fn validate(&self, head: &Head, items: &[ValItem]) -> Result<ValReport> {
        let Some(plan) = &self.add_classes else { return crate::val::validate_items(head, items, &self.val_opts) };
        let mut r = crate::val::validate_items(&classes::select_classes(head, &plan.data_to_model), items, &self.val_opts)?;
        r.groups = Some(classes::ClassGroups { model_nc: head.nc, model_ids: plan.data_to_model.clone(), base_nc: plan.base_nc });
        Ok(r)
    }

    /// `validate` on the sparse candidates (`--sparse`): the same classes,
    /// the same groups.
    pub fn validate_sparse(&self, sv: &crate::val::sparse::SparseVal, head: &Head) -> ValReport {
        let Some(plan) = &self.add_classes else { return sv.validate(head, &self.val_opts) };
        let mut r = sv.validate(&classes::select_classes(head, &plan.data_to_model), &self.val_opts);
        r.groups = Some(classes::ClassGroups { model_nc: head.nc, model_ids: plan.data_to_model.clone(), base_nc: plan.base_nc });
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use ndarray::Array1;

    fn opts(reinit_head: bool) -> TrainOptions {
        TrainOptions {
            weights: "m.onnx".into(),
            data: "d.yaml".into(),
            epochs: 1,
            batch_size: 1,
            imgsz: 64,
            hyp: crate::train::hyp::TrainHyp::default(),
            train: TrainWhat::Cls,
            reinit_head,
            optimizer: crate::train::optim::OptimizerKind::Sgd,
            cos_lr: false,
            label_smoothing: 0.0,
            lr_box: 1.0,
            lr_obj: 1.0,
            lr_cls: 1.0,
            seed: 0,
            patience: 0,
            save_period: -1,
            save_dir: "r".into(),
            cache_dir: "c".into(),
            dtype: crate::cache::Dtype::F16,
            freeze: crate::graph::cut::HEAD_ONLY,
            add_classes: true,
            sparse: true,
            pseudo_labels: true,
            precision: crate::train::Precision::F32,
            engine: Default::default(),
            progress: false,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn head() -> Head {
        let no = 7;
        Head {
            nc: 2,
            names: names(&["car", "bus"]),
            strides: vec![8.0],
            anchors: vec![vec![[1.0, 2.0], [3.0, 4.0]]],
            weights: vec![Array2::from_shape_fn((2 * no, 4), |(r, c)| (r * 10 + c) as f32 * 0.1)],
            biases: vec![Array1::from_shape_fn(2 * no, |r| r as f32)],
        }
    }

    #[test]
    fn plan_matches_names_and_refuses_what_it_cannot_do() {
        let p = plan(&names(&["car", "bus"]), &names(&["Ambulance", "BUS"]), &opts(false)).unwrap();
        assert_eq!((p.base_nc, p.data_to_model.clone(), p.added.clone()), (2, vec![2, 1], names(&["Ambulance"])));
        assert_eq!(p.describe(), "add classes: 2 → 3 classes; matched by name: BUS = bus (class 1); new: Ambulance (class 2)");
        let e = plan(&names(&["car", "bus"]), &names(&["Car"]), &opts(false)).unwrap_err().to_string();
        assert!(e.contains("no new class") && e.contains("d.yaml"), "{e}");
        assert!(plan(&names(&["car"]), &names(&["x"]), &opts(true)).unwrap_err().to_string().contains("--reinit-head"));
    }

    #[test]
    fn the_extended_head_keeps_every_old_row_and_freezes_them() {
        let pre = head();
        let h = extend_head(&pre, &names(&["ambulance"]), &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!((h.nc, h.names.clone()), (3, names(&["car", "bus", "ambulance"])));
        for a in 0..2 {
            for k in 0..7 {
                assert_eq!(h.weights[0].row(a * 8 + k), pre.weights[0].row(a * 7 + k));
                assert_eq!(h.biases[0][a * 8 + k].to_bits(), pre.biases[0][a * 7 + k].to_bits());
            }
            // YOLOv5's class prior with the extended nc, plus U(±1/√cin)
            let prior = (0.6f64 / (3.0 - 0.99)).ln() as f32;
            assert!((h.biases[0][a * 8 + 7] - prior).abs() <= 0.5);
        }
        let lr = cls_row_lr(&h, 2, 0.5);
        assert_eq!(lr, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]);
    }

    #[test]
    fn pseudo_labels_are_the_detections_no_label_covers() {
        // two detections in a 100 px image: one on the label, one elsewhere
        let det = ndarray::arr2(&[[10.0f32, 10.0, 30.0, 30.0, 0.9, 1.0], [60.0, 60.0, 110.0, 90.0, 0.8, 0.0]]);
        let targets = [[1.0f32, 0.205, 0.2, 0.2, 0.2]];
        let t = unlabelled(det.view(), &targets, 100.0);
        assert_eq!(t.len(), 1);
        // clipped to the image: x2 110 -> 100
        let want = [0.0, 0.8, 0.75, 0.4, 0.3];
        assert!(t[0].iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", t[0]);
    }
}
