//! The export stage: the source `Model` and a (fine-tuned) `Head` in; a
//! complete ONNX detector out, a drop-in replacement for the file YOLOv5's
//! `export.py --include onnx` writes: input `images`, output `output0`
//! `[batch, N, 5 + nc]` of decoded boxes (xywh, pixels) and sigmoid scores,
//! metadata `stride` and `names`.
//!
//! The graph is the source's frozen backbone+neck (`split::frozen_graph`)
//! followed by the head's three 1x1 convs and YOLOv5's export-mode decode
//! (`decode`). The source's IR version, opset and other metadata are kept;
//! `nc`, `names` and anchors come from the head, so a head trained for a new
//! class set exports as a model of that class set.
//!
//! Shapes (`dynamic`):
//! - `None`: as the source. A fixed input batch stays that number (1 for
//!   YOLOv5 exports) and a symbolic one becomes `batch`; a static height and
//!   width keep the constant `[1, na, ny, nx, 2]` grids, a dynamic size builds
//!   the grid at run time.
//! - `Some(true)`: like `export.py --dynamic`: input `[batch, 3, height, width]`,
//!   output `[batch, anchors, 5 + nc]`, grid built at run time, whatever the
//!   source was. The backbone must accept other sizes; YOLOv5's does (no
//!   reshapes before the head), for sizes that are multiples of the max stride.
//! - `Some(false)`: batch fixed to 1; height and width static when the source's
//!   were, otherwise still dynamic (a dynamic source records no size to fix).

pub mod decode;
pub mod meta;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Result, bail};

use crate::graph::Model;
use crate::graph::onnx::{self, Dim, pb};
use crate::head::Head;
use decode::{Builder, Level, Shared};

/// Output tensor name of YOLOv5 exports.
pub const OUTPUT_NAME: &str = "output0";

/// Batch and spatial size of the exported graph.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportShape {
    pub batch: Dim,
    /// `Some([h, w])` for a static input size.
    pub imgsz: Option<[usize; 2]>,
}

/// The shapes `export_model` will use for `dynamic` (see the module doc).
pub fn export_shape(model: &Model, dynamic: Option<bool>) -> ExportShape {
    let spec = &model.spec;
    let symbolic = Dim::Symbol("batch".into());
    match dynamic {
        None => ExportShape {
            batch: match spec.batch {
                Dim::Fixed(n) => Dim::Fixed(n),
                Dim::Symbol(_) => symbolic,
            },
            imgsz: spec.imgsz,
        },
        Some(true) => ExportShape { batch: symbolic, imgsz: None },
        Some(false) => ExportShape { batch: Dim::Fixed(1), imgsz: spec.imgsz },
    }
}

/// Builds the complete model. Fails when the head does not fit the source's
/// backbone (level count, input channels, strides) or is inconsistent.
pub fn export_model(model: &Model, head: &Head, dynamic: Option<bool>) -> Result<pb::ModelProto> {
    let spec = &model.spec;
    check_head(model, head)?;
    let shape = export_shape(model, dynamic);
    let opset = onnx::opset(&model.proto);
    if opset < 11 {
        bail!("the source model uses opset {opset}; export needs opset 11 or later (Range)");
    }

    let frozen = crate::graph::split::frozen_graph(&model.proto, spec)?;
    let mut graph = frozen.graph.expect("frozen_graph returns a graph");
    let mut taken: HashSet<String> = HashSet::new();
    taken.extend(graph.node.iter().flat_map(|n| n.output.iter().cloned().chain([n.name.clone()])));
    taken.extend(graph.initializer.iter().map(|t| t.name.clone()));
    taken.extend(graph.input.iter().map(|i| i.name.clone()));
    if taken.contains(OUTPUT_NAME) {
        bail!("the backbone already has a tensor named `{OUTPUT_NAME}`");
    }
    taken.insert(OUTPUT_NAME.to_string());

    let layer = detect_layer_index(spec.levels.first().map(|l| l.weight.as_str()).unwrap_or(""));
    let mut b = Builder::new(taken, &format!("/model.{layer}"), opset);
    let weights: Vec<(String, String)> = (0..head.nl())
        .map(|i| {
            let w = head.weights[i].as_standard_layout();
            let wname = b.fresh(&format!("model.{layer}.m.{i}.weight"));
            b.add_initializer(onnx::float_tensor(&wname, &[w.nrows(), w.ncols(), 1, 1], w.as_slice().unwrap()));
            let bias = head.biases[i].as_standard_layout();
            let bname = b.fresh(&format!("model.{layer}.m.{i}.bias"));
            b.add_initializer(onnx::float_tensor(&bname, &[bias.len()], bias.as_slice().unwrap()));
            (wname, bname)
        })
        .collect();

    let shared = Shared::new(&mut b, head.nc, shape.imgsz.is_none());
    let batch_entry = shape.batch.fixed().unwrap_or(0);
    let mut level_outputs = Vec::new();
    for (i, l) in spec.levels.iter().enumerate() {
        let s = head.strides[i] as usize;
        let level = Level {
            index: i,
            input: &l.input_tensor,
            weight: &weights[i].0,
            bias: &weights[i].1,
            stride: head.strides[i],
            anchors: &head.anchors[i],
            no: head.no(),
            grid: shape.imgsz.map(|[h, w]| [h / s, w / s]),
            batch: batch_entry,
        };
        level_outputs.push(decode::emit_level(&mut b, &shared, &level));
    }
    let inputs: Vec<&str> = level_outputs.iter().map(String::as_str).collect();
    let concat_name = b.fresh(&format!("/model.{layer}/Concat_levels"));
    b.nodes.push(pb::NodeProto {
        name: concat_name,
        op_type: "Concat".into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![OUTPUT_NAME.into()],
        attribute: vec![decode::attr_int("axis", 1)],
        ..Default::default()
    });

    let (h, w) = match shape.imgsz {
        Some([h, w]) => (Dim::Fixed(h as i64), Dim::Fixed(w as i64)),
        None => (Dim::Symbol("height".into()), Dim::Symbol("width".into())),
    };
    let rows = match shape.imgsz {
        Some([h, w]) => Dim::Fixed(head.strides.iter().map(|&s| (head.na() * (h / s as usize) * (w / s as usize)) as i64).sum()),
        None => Dim::Symbol("anchors".into()),
    };
    graph.input = vec![onnx::float_value_info(&spec.input_name, &[shape.batch.clone(), Dim::Fixed(3), h, w])];
    graph.output = vec![onnx::float_value_info(OUTPUT_NAME, &[shape.batch.clone(), rows, Dim::Fixed(head.no() as i64)])];
    graph.node.extend(b.nodes);
    graph.initializer.extend(b.initializers);
    graph.name = model.proto.graph.as_ref().map(|g| g.name.clone()).unwrap_or_default();

    let mut metadata_props = model.proto.metadata_props.clone();
    set_metadata(&mut metadata_props, "stride", meta::stride_repr(&head.strides));
    set_metadata(&mut metadata_props, "names", meta::names_repr(&head.names));
    Ok(pb::ModelProto {
        graph: Some(graph),
        producer_name: "freezesplit".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        metadata_props,
        training_info: Vec::new(),
        ..model.proto.clone()
    })
}

/// `export_model`, encoded.
pub fn export_bytes(model: &Model, head: &Head, dynamic: Option<bool>) -> Result<Vec<u8>> {
    Ok(onnx::encode_model(&export_model(model, head, dynamic)?))
}

/// Exports to `path`, atomically: the file is either the old one or complete.
pub fn write_export(path: &Path, model: &Model, head: &Head, dynamic: Option<bool>) -> Result<()> {
    crate::fsutil::write_atomic(path, &export_bytes(model, head, dynamic)?)
}

/// The head must plug into the source backbone as it is.
pub fn check_head(model: &Model, head: &Head) -> Result<()> {
    let spec = &model.spec;
    if head.nl() != spec.levels.len() {
        bail!("the head has {} levels, the model's backbone feeds {}", head.nl(), spec.levels.len());
    }
    if head.names.len() != head.nc {
        bail!("the head has nc = {} but {} names", head.nc, head.names.len());
    }
    if head.strides.len() != head.nl() || head.anchors.len() != head.nl() || head.biases.len() != head.nl() {
        bail!("the head's strides, anchors, weights and biases disagree on the number of levels");
    }
    let (na, no) = (head.na(), head.no());
    if na == 0 || head.anchors.iter().any(|a| a.len() != na) {
        bail!("every level needs the same, non-zero number of anchors");
    }
    for (i, l) in spec.levels.iter().enumerate() {
        if head.strides[i] != l.stride {
            bail!("level {i}: the head's stride {} differs from the backbone's {}", head.strides[i], l.stride);
        }
        let (rows, cols) = head.weights[i].dim();
        if cols != l.in_channels {
            bail!("level {i}: the head reads {cols} channels, the backbone gives {}", l.in_channels);
        }
        if rows != na * no || head.biases[i].len() != na * no {
            bail!("level {i}: the head conv has {rows} outputs and {} biases, expected na·(5+nc) = {}", head.biases[i].len(), na * no);
        }
    }
    Ok(())
}

/// `24` from `model.24.m.0.weight`, so the initializers keep the source's
/// layer number (33 in P6 models); 24 when the source's names say nothing.
fn detect_layer_index(weight_name: &str) -> usize {
    let mut parts = weight_name.split('.');
    match (parts.next(), parts.next().and_then(|n| n.parse().ok()), parts.next()) {
        (Some("model"), Some(n), Some("m")) => n,
        _ => 24,
    }
}

/// Records (or, for None, removes) the `base_nc` metadata the export copies
/// from `proto`: how many of an extended model's classes are old.
pub fn set_base_nc(proto: &mut pb::ModelProto, base_nc: Option<usize>) {
    let key = crate::val::classes::BASE_NC_KEY;
    match base_nc {
        Some(n) => set_metadata(&mut proto.metadata_props, key, n.to_string()),
        None => proto.metadata_props.retain(|p| p.key != key),
    }
}

fn set_metadata(props: &mut Vec<pb::StringStringEntryProto>, key: &str, value: String) {
    match props.iter_mut().find(|p| p.key == key) {
        Some(p) => p.value = value,
        None => props.push(pb::StringStringEntryProto { key: key.into(), value }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_from_weight_names() {
        assert_eq!(detect_layer_index("model.24.m.0.weight"), 24);
        assert_eq!(detect_layer_index("model.33.m.0.weight"), 33);
        assert_eq!(detect_layer_index("w17"), 24);
    }
}
