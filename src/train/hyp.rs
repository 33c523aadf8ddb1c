//! A YOLOv5 hyp yaml in (`data/hyps/hyp.*.yaml`); the training
//! hyperparameters out, with the defaults of hyp.scratch-low.yaml.
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
    /// Keys of the file that only augmentation uses, with their values.
    #[serde(skip)]
    pub not_applied: BTreeMap<String, f64>,
}

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
            not_applied: BTreeMap::new(),
        }
    }
}

impl TrainHyp {
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
                k if AUGMENTATION_KEYS.contains(&k) => {
                    h.not_applied.insert(key.clone(), v);
                    continue;
                }
                other => bail!("unknown hyp key `{other}`"),
            };
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
}
