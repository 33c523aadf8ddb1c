//! A YOLOv5 hyp yaml (`data/hyps/hyp.*.yaml`) or the name of a built-in preset
//! in; the training hyperparameters out. Keys a file lacks take the values of
//! hyp.scratch-low.yaml (`TrainHyp::default()`).
//!
//! Besides YOLOv5's keys a hyp may carry `lr_box`, `lr_obj` and `lr_cls`: the
//! learning-rate multipliers of the head's box, objectness and class rows
//! (YOLOv5's files lack them, so they train every row alike, multiplier 1),
//! and `lr_tail`: the multiplier of the trained layers before the head
//! (`--freeze N` below 24).
//! `train`'s default is the preset `hyp.finetune` (hyp.finetune.yaml, embedded):
//! fine-tuning a pretrained head wants its box rows moved gently, which YOLOv5's
//! from-scratch values do not (issue 10, item 15; README "Train the head").
//!
//! Augmentation keys (mosaic, hsv_*, degrees, ...) are accepted but cannot
//! apply to cached features: they are listed back to the user as not applied.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::loss::Hyp;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainHyp {
    pub lr0: f64,
    pub lrf: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub warmup_momentum: f64,
    pub warmup_bias_lr: f64,
    #[serde(rename = "box")]
    pub box_: f64,
    pub cls: f64,
    pub cls_pw: f64,
    pub obj: f64,
    pub obj_pw: f64,
    pub iou_t: f64,
    pub anchor_t: f64,
    pub fl_gamma: f64,
    /// Learning-rate multiplier of the box rows (freezesplit's key; 1 when absent).
    #[serde(default = "one")]
    pub lr_box: f64,
    /// Learning-rate multiplier of the objectness rows.
    #[serde(default = "one")]
    pub lr_obj: f64,
    /// Learning-rate multiplier of the class rows.
    #[serde(default = "one")]
    pub lr_cls: f64,
    /// Learning-rate multiplier of the layers N..23 that train below
    /// `--freeze 24` (their weights and biases alike).
    #[serde(default = "one")]
    pub lr_tail: f64,
    /// Keys of the file that only augmentation uses, with their values.
    #[serde(skip)]
    pub not_applied: BTreeMap<String, f64>,
}

fn one() -> f64 {
    1.0
}

/// `train`'s default: the fine-tuning preset.
pub const DEFAULT_PRESET: &str = "hyp.finetune";

/// The built-in presets, by the name `--hyp` accepts.
const PRESETS: &[(&str, Option<&str>)] = &[
    ("hyp.finetune", Some(include_str!("hyp.finetune.yaml"))),
    // YOLOv5's hyp.scratch-low.yaml: the Default values, multipliers 1
    ("hyp.scratch-low", None),
];

const AUGMENTATION_KEYS: &[&str] = &[
    "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic", "mixup", "copy_paste",
];

impl Default for TrainHyp {
    /// hyp.scratch-low.yaml
    fn default() -> Self {
        TrainHyp {
            lr0: 0.01,
            lrf: 0.01,
            momentum: 0.937,
            weight_decay: 0.0005,
            warmup_epochs: 3.0,
            warmup_momentum: 0.8,
            warmup_bias_lr: 0.1,
            box_: 0.05,
            cls: 0.5,
            cls_pw: 1.0,
            obj: 1.0,
            obj_pw: 1.0,
            iou_t: 0.20,
            anchor_t: 4.0,
            fl_gamma: 0.0,
            lr_box: 1.0,
            lr_obj: 1.0,
            lr_cls: 1.0,
            lr_tail: 1.0,
            not_applied: BTreeMap::new(),
        }
    }
}

impl TrainHyp {
    /// A built-in preset by name (`hyp.finetune`, `hyp.scratch-low`; the
    /// `hyp.` prefix may be left out).
    pub fn preset(name: &str) -> Option<TrainHyp> {
        let full = if name.starts_with("hyp.") { name.to_string() } else { format!("hyp.{name}") };
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == full)?;
        Some(match text {
            Some(t) => Self::parse(t).expect("the embedded preset parses"),
            None => TrainHyp::default(),
        })
    }

    /// `--hyp`'s value: an existing file is read as a hyp yaml, else the name
    /// of a preset; `None` gives the default preset.
    pub fn resolve(arg: Option<&Path>) -> Result<TrainHyp> {
        let Some(p) = arg else { return Ok(Self::preset(DEFAULT_PRESET).unwrap()) };
        if p.exists() {
            return Self::load(p);
        }
        match p.to_str().and_then(Self::preset) {
            Some(h) => Ok(h),
            None => {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!("--hyp {}: no such file and not a preset; give a YOLOv5 hyp yaml or one of {}", p.display(), names.join(", "))
            }
        }
    }

    /// Reads a hyp yaml; a value of the wrong type or an unknown key is an
    /// error naming the file and the key.
    pub fn load(path: &Path) -> Result<TrainHyp> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the hyp file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> Result<TrainHyp> {
        let map: BTreeMap<String, serde_yaml::Value> = serde_yaml::from_str(text).context("not a YAML mapping of hyperparameters")?;
        let mut h = TrainHyp::default();
        for (key, value) in map {
            let v = match &value {
                serde_yaml::Value::Number(n) => n.as_f64().unwrap(),
                other => bail!("hyp key `{key}` must be a number, found {}", serde_yaml::to_string(other).unwrap_or_default().trim()),
            };
            let slot = match key.as_str() {
                "lr0" => &mut h.lr0,
                "lrf" => &mut h.lrf,
                "momentum" => &mut h.momentum,
                "weight_decay" => &mut h.weight_decay,
                "warmup_epochs" => &mut h.warmup_epochs,
                "warmup_momentum" => &mut h.warmup_momentum,
                "warmup_bias_lr" => &mut h.warmup_bias_lr,
                "box" => &mut h.box_,
                "cls" => &mut h.cls,
                "cls_pw" => &mut h.cls_pw,
                "obj" => &mut h.obj,
                "obj_pw" => &mut h.obj_pw,
                "iou_t" => &mut h.iou_t,
                "anchor_t" => &mut h.anchor_t,
                "fl_gamma" => &mut h.fl_gamma,
                "lr_box" => &mut h.lr_box,
                "lr_obj" => &mut h.lr_obj,
                "lr_cls" => &mut h.lr_cls,
                "lr_tail" => &mut h.lr_tail,
                k if AUGMENTATION_KEYS.contains(&k) => {
                    h.not_applied.insert(key.clone(), v);
                    continue;
                }
                other => bail!("unknown hyp key `{other}`"),
            };
            if key.starts_with("lr_") && !(v >= 0.0 && v.is_finite()) {
                bail!("hyp key `{key}` must be a non-negative number, found {v}");
            }
            *slot = v;
        }
        h.validate()?;
        Ok(h)
    }

    /// Every value inside the range train.py can work with; the message names
    /// the key and its valid range.
    pub fn validate(&self) -> Result<()> {
        // (key, value, low, low inclusive, high, high inclusive)
        let inf = f64::INFINITY;
        let ranges = [
            ("lr0", self.lr0, 0.0, false, 1.0, true),
            ("lrf", self.lrf, 0.0, false, 1.0, true),
            ("momentum", self.momentum, 0.0, true, 1.0, false),
            ("weight_decay", self.weight_decay, 0.0, true, 1.0, false),
            ("warmup_epochs", self.warmup_epochs, 0.0, true, inf, false),
            ("warmup_momentum", self.warmup_momentum, 0.0, true, 1.0, false),
            ("warmup_bias_lr", self.warmup_bias_lr, 0.0, true, 1.0, true),
            ("box", self.box_, 0.0, true, inf, false),
            ("cls", self.cls, 0.0, true, inf, false),
            ("obj", self.obj, 0.0, true, inf, false),
            ("cls_pw", self.cls_pw, 0.0, false, inf, false),
            ("obj_pw", self.obj_pw, 0.0, false, inf, false),
            ("iou_t", self.iou_t, 0.0, false, 1.0, false),
            ("anchor_t", self.anchor_t, 1.0, true, inf, false),
            ("fl_gamma", self.fl_gamma, 0.0, true, inf, false),
        ];
        for (key, v, lo, lo_in, hi, hi_in) in ranges {
            let above = if lo_in { v >= lo } else { v > lo };
            let below = if hi_in { v <= hi } else { v < hi };
            if !(above && below) {
                let hi_s = if hi.is_infinite() { "inf".to_string() } else { hi.to_string() };
                bail!("hyp `{key}` must be in {}{lo}, {hi_s}{}, got {v}", if lo_in { "[" } else { "(" }, if hi_in { "]" } else { ")" });
            }
        }
        Ok(())
    }

    /// The loss gains, before train.py's scaling for nc, nl and imgsz.
    pub fn loss_hyp(&self, label_smoothing: f64) -> Hyp {
        Hyp {
            box_: self.box_ as f32,
            obj: self.obj as f32,
            cls: self.cls as f32,
            cls_pw: self.cls_pw as f32,
            obj_pw: self.obj_pw as f32,
            anchor_t: self.anchor_t as f32,
            fl_gamma: self.fl_gamma as f32,
            label_smoothing: label_smoothing as f32,
        }
    }

    /// The applied keys as a YOLOv5 hyp.yaml.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yolov5_hyp_files() {
        let h = TrainHyp::parse("lr0: 0.02\nbox: 0.1\nmosaic: 1.0\nfliplr: 0.5\n").unwrap();
        assert_eq!(h.lr0, 0.02);
        assert_eq!(h.box_, 0.1);
        assert_eq!(h.momentum, 0.937);
        assert_eq!(h.not_applied.keys().collect::<Vec<_>>(), vec!["fliplr", "mosaic"]);
        let e = TrainHyp::parse("lr0: fast\n").unwrap_err();
        assert!(format!("{e:#}").contains("`lr0` must be a number"));
        assert!(TrainHyp::parse("lr_zero: 0.1\n").is_err());
        assert_eq!(TrainHyp::parse(&TrainHyp::default().to_yaml()).unwrap(), TrainHyp::default());
    }

    #[test]
    fn values_outside_their_range_are_refused_with_the_range() {
        for (text, want) in [
            ("lr0: .nan\n", "`lr0` must be in (0, 1], got NaN"),
            ("lr0: 1000000\n", "`lr0` must be in (0, 1], got 1000000"),
            ("lr0: 0\n", "`lr0` must be in (0, 1]"),
            ("momentum: 1.0\n", "`momentum` must be in [0, 1), got 1"),
            ("warmup_epochs: -1\n", "`warmup_epochs` must be in [0, inf)"),
            ("anchor_t: 0.5\n", "`anchor_t` must be in [1, inf)"),
            ("obj: .inf\n", "`obj` must be in [0, inf), got inf"),
        ] {
            let e = TrainHyp::parse(text).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text}: {e:#}");
        }
        TrainHyp::default().validate().unwrap();
    }

    /// YOLOv5's data/hyps/hyp.scratch-low.yaml (v7.0), without its comments.
    const SCRATCH_LOW: &str = "lr0: 0.01\nlrf: 0.01\nmomentum: 0.937\nweight_decay: 0.0005\nwarmup_epochs: 3.0\nwarmup_momentum: 0.8\nwarmup_bias_lr: 0.1\nbox: 0.05\ncls: 0.5\ncls_pw: 1.0\nobj: 1.0\nobj_pw: 1.0\niou_t: 0.20\nanchor_t: 4.0\nfl_gamma: 0.0\nhsv_h: 0.015\nhsv_s: 0.7\nhsv_v: 0.4\ndegrees: 0.0\ntranslate: 0.1\nscale: 0.5\nshear: 0.0\nperspective: 0.0\nflipud: 0.0\nfliplr: 0.5\nmosaic: 1.0\nmixup: 0.0\ncopy_paste: 0.0\n";

    #[test]
    fn yolov5_files_train_every_row_alike() {
        let h = TrainHyp::parse(SCRATCH_LOW).unwrap();
        assert_eq!((h.lr_box, h.lr_obj, h.lr_cls), (1.0, 1.0, 1.0));
        let mut plain = h.clone();
        plain.not_applied.clear();
        assert_eq!(plain, TrainHyp::default());
        assert_eq!(TrainHyp::preset("hyp.scratch-low").unwrap(), TrainHyp::default());
    }

    #[test]
    fn multiplier_keys_are_read_checked_and_written_back() {
        let h = TrainHyp::parse("lr_box: 0.1\nlr_obj: 0.5\nlr_cls: 0\nlr_tail: 0.2\n").unwrap();
        assert_eq!((h.lr_box, h.lr_obj, h.lr_cls, h.lr_tail), (0.1, 0.5, 0.0, 0.2));
        let yaml = h.to_yaml();
        assert!(yaml.contains("lr_box: 0.1") && yaml.contains("lr_tail: 0.2"), "{yaml}");
        assert_eq!(TrainHyp::parse(&yaml).unwrap(), h);
        let e = TrainHyp::parse("lr_box: -0.1\n").unwrap_err();
        assert!(format!("{e:#}").contains("`lr_box` must be a non-negative number"), "{e:#}");
        // an opt.yaml written before these keys existed still loads, with multipliers 1
        let mut old: serde_yaml::Mapping = serde_yaml::from_str(&TrainHyp::default().to_yaml()).unwrap();
        old.remove("lr_box");
        old.remove("lr_tail");
        let back: TrainHyp = serde_yaml::from_value(serde_yaml::Value::Mapping(old)).unwrap();
        assert_eq!((back.lr_box, back.lr_tail), (1.0, 1.0));
    }

    #[test]
    fn the_default_is_the_finetune_preset_and_names_resolve() {
        let ft = TrainHyp::resolve(None).unwrap();
        assert_eq!(ft, TrainHyp::preset("hyp.finetune").unwrap());
        assert_eq!(ft, TrainHyp::preset("finetune").unwrap());
        assert_ne!(ft, TrainHyp::default());
        // the embedded file names every key: nothing falls back to scratch-low unseen
        let keys: serde_yaml::Mapping = serde_yaml::from_str(include_str!("hyp.finetune.yaml")).unwrap();
        let all: serde_yaml::Mapping = serde_yaml::from_str(&ft.to_yaml()).unwrap();
        assert_eq!(keys.len(), all.len());
        assert_eq!(TrainHyp::resolve(Some(Path::new("hyp.scratch-low"))).unwrap(), TrainHyp::default());
        let e = TrainHyp::resolve(Some(Path::new("hyp.finetuned"))).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("--hyp hyp.finetuned") && msg.contains("hyp.finetune, hyp.scratch-low"), "{msg}");
    }
}
