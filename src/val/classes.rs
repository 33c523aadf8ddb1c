//! Classes matched by name between a model and a dataset. In: the model's
//! names (and how many of them are its old classes, `base_nc`, for a model
//! extended by `train --add-classes`) and a dataset's names. Out: the model
//! class of each dataset class (`match_names`), a head that predicts only
//! those classes in the dataset's order (`select_classes`), and the mAP of
//! the model's old and new classes as separate groups (`ClassGroups`).
//!
//! Validating on a dataset that names only some of the model's classes is
//! done on the selected head: the predictions of classes the dataset does not
//! name are gone before NMS (they take no max_det slots), the dataset's label
//! ids index the selected head's classes directly, and every kept column is
//! computed exactly as in the full head (each class row is its own dot
//! product and sigmoid).

use anyhow::{Result, bail};
use serde::Serialize;

use crate::head::Head;
use crate::metrics::ValSummary;

/// The ONNX metadata key (and head-source key) holding the number of old
/// classes of an extended model: classes `0..base_nc` came with the input
/// model of `train --add-classes`, the rest were added.
pub const BASE_NC_KEY: &str = "base_nc";

/// For each of `data_names`, the index of the model class of the same name
/// (case-insensitive), or None where the model has no such class.
pub fn match_names(model_names: &[String], data_names: &[String]) -> Vec<Option<usize>> {
    data_names.iter().map(|d| model_names.iter().position(|m| m.to_lowercase() == d.to_lowercase())).collect()
}

/// `head` with only the classes `ids` (model class indices), in that order;
/// box and objectness rows and the kept class rows bit-identical.
pub fn select_classes(head: &Head, ids: &[usize]) -> Head {
    let (na, no) = (head.na(), head.no());
    let keep: Vec<usize> = (0..na).flat_map(|a| (0..5).map(move |k| a * no + k).chain(ids.iter().map(move |&c| a * no + 5 + c))).collect();
    let weights = head.weights.iter().map(|w| w.select(ndarray::Axis(0), &keep)).collect();
    let biases = head.biases.iter().map(|b| b.select(ndarray::Axis(0), &keep)).collect();
    Head { nc: ids.len(), names: ids.iter().map(|&c| head.names[c].clone()).collect(), strides: head.strides.clone(), anchors: head.anchors.clone(), weights, biases }
}

/// The model classes a dataset is validated on: every dataset class matched
/// by name, or by index where the class counts agree and some name does not
/// match (a dataset that renames classes, as before matching existed).
/// Refused when the counts differ and a dataset name is not in the model.
pub fn val_classes(head: &Head, data_names: &[String], weights: &str, data: &str) -> Result<Option<Vec<usize>>> {
    let matched = match_names(&head.names, data_names);
    if matched.iter().all(Option::is_some) {
        let ids: Vec<usize> = matched.into_iter().flatten().collect();
        let identity = ids.len() == head.nc && ids.iter().enumerate().all(|(i, &c)| i == c);
        return Ok((!identity).then_some(ids));
    }
    if data_names.len() == head.nc {
        return Ok(None);
    }
    let missing: Vec<&str> = data_names.iter().zip(&matched).filter(|(_, m)| m.is_none()).map(|(n, _)| n.as_str()).collect();
    bail!(
        "{weights} detects {} classes but {data} has {}, and the model has no class named {}; validate on a dataset whose names are among the model's",
        head.nc,
        data_names.len(),
        missing.join(", ")
    )
}

/// How many classes of the model behind `--weights` are old: the
/// `base_nc` of an extended export's metadata or of a saved head's source;
/// None for a model that was not extended.
pub fn base_nc_of(model: &crate::graph::Model, source: &crate::weights::Source) -> Result<Option<usize>> {
    let (value, from) = match source {
        crate::weights::Source::Model(p) => (crate::graph::onnx::metadata(&model.proto, BASE_NC_KEY).map(str::to_string), p.clone()),
        crate::weights::Source::Head { stem, .. } => {
            let p = stem.with_extension("json");
            let meta: crate::head::HeadMeta = serde_json::from_slice(&std::fs::read(&p)?)?;
            (meta.source.get(BASE_NC_KEY).cloned(), p)
        }
    };
    value
        .map(|v| v.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("{} holds {BASE_NC_KEY} = {v:?}, not a class count; export the run again", from.display())))
        .transpose()
}

/// The model classes behind a report's classes and how many are old.
#[derive(Debug, Clone, Serialize)]
pub struct ClassGroups {
    /// The model's class count.
    pub model_nc: usize,
    /// The model class of each report class.
    pub model_ids: Vec<usize>,
    /// Model classes below this are the input model's (old) classes.
    pub base_nc: usize,
}

/// mAP50 and mAP50-95 over a group of classes (val.py's mean over the
/// classes that have labels), and how many classes it averages.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct GroupMap {
    pub classes: usize,
    #[serde(rename = "mAP50")]
    pub map50: f64,
    #[serde(rename = "mAP50_95")]
    pub map: f64,
}

impl ClassGroups {
    /// The old and the new classes' mAP (None for a group without labels).
    pub fn maps(&self, s: &ValSummary) -> [Option<GroupMap>; 2] {
        [true, false].map(|old| {
            let cls: Vec<_> = s.per_class.iter().filter(|c| self.model_ids.get(c.class).is_some_and(|&m| (m < self.base_nc) == old)).collect();
            let n = cls.len();
            (n > 0).then(|| GroupMap { classes: n, map50: cls.iter().map(|c| c.ap50).sum::<f64>() / n as f64, map: cls.iter().map(|c| c.ap50_95).sum::<f64>() / n as f64 })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    fn head(names: &[&str]) -> Head {
        let no = 5 + names.len();
        Head {
            nc: names.len(),
            names: names.iter().map(|s| s.to_string()).collect(),
            strides: vec![8.0],
            anchors: vec![vec![[1.0, 2.0], [3.0, 4.0]]],
            weights: vec![Array2::from_shape_fn((2 * no, 3), |(r, c)| (r * 10 + c) as f32)],
            biases: vec![Array1::from_shape_fn(2 * no, |r| r as f32)],
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_match_case_insensitively() {
        assert_eq!(match_names(&s(&["car", "bus", "truck"]), &s(&["Bus", "Ambulance", "CAR"])), vec![Some(1), None, Some(0)]);
    }

    #[test]
    fn selected_classes_keep_their_rows_in_the_dataset_order() {
        let h = head(&["a", "b", "c"]);
        let sel = select_classes(&h, &[2, 0]);
        assert_eq!((sel.nc, sel.names.clone()), (2, s(&["c", "a"])));
        // anchor 1: rows 8..13 of the full head are box/obj, then a b c
        let want = [0, 1, 2, 3, 4, 7, 5, 8, 9, 10, 11, 12, 15, 13];
        for (i, &r) in want.iter().enumerate() {
            assert_eq!(sel.weights[0].row(i), h.weights[0].row(r));
            assert_eq!(sel.biases[0][i], h.biases[0][r]);
        }
    }

    #[test]
    fn val_classes_match_rename_or_refuse() {
        let h = head(&["a", "b", "c"]);
        assert_eq!(val_classes(&h, &s(&["A", "b", "c"]), "m", "d").unwrap(), None);
        assert_eq!(val_classes(&h, &s(&["c", "a"]), "m", "d").unwrap(), Some(vec![2, 0]));
        assert_eq!(val_classes(&h, &s(&["x", "y", "z"]), "m", "d").unwrap(), None);
        let e = val_classes(&h, &s(&["a", "zebra"]), "m.onnx", "d.yaml").unwrap_err().to_string();
        assert!(e.contains("no class named zebra") && e.contains("m.onnx") && e.contains("d.yaml"), "{e}");
    }
}
