//! `freezesplit inspect MODEL.onnx [--json]`

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::graph::{Model, summary};

#[derive(Args)]
pub struct InspectArgs {
    /// An ONNX model exported by YOLOv5's export.py
    pub model: PathBuf,
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let spec = &model.spec;
    let s = summary::summarize(&model);
    if a.json {
        let head_inputs: Vec<_> = spec
            .levels
            .iter()
            .map(|l| {
                let shape = crate::graph::split::feature_shape(spec, l.stride, l.in_channels, &spec.batch);
                json!({"name": l.input_tensor, "shape": shape, "conv": l.conv_node, "stride": l.stride})
            })
            .collect();
        let out = json!({
            "model": a.model,
            "opset": spec.opset,
            "nc": spec.nc,
            "names": spec.names,
            "names_from_metadata": spec.names_from_metadata,
            "imgsz": spec.imgsz,
            "input": spec.input_name,
            "output": spec.output_name,
            "strides": spec.strides(),
            "anchors": spec.levels.iter().map(|l| &l.anchors).collect::<Vec<_>>(),
            "head_inputs": head_inputs,
            "layers": s.layers,
            "total_params": s.total_params,
            "layers_named": s.named,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{}", a.model.display());
    let size = spec.imgsz.map_or("dynamic".to_string(), |[h, w]| format!("{h}x{w}"));
    println!("  opset {}, input `{}` {} ({}), output `{}`", spec.opset, spec.input_name, size, spec.batch, spec.output_name);
    let names = if spec.names.len() > 8 { format!("{}, ... ({} more)", spec.names[..8].join(", "), spec.names.len() - 8) } else { spec.names.join(", ") };
    println!("  nc {}: {}{}", spec.nc, names, if spec.names_from_metadata { "" } else { " (no names in metadata)" });
    println!("  Detect head: {} levels, {} anchors each", spec.levels.len(), spec.na);
    for l in &spec.levels {
        let anchors: Vec<String> = l.anchors.iter().map(|[w, h]| format!("{w}x{h}")).collect();
        println!("    stride {:>3}  anchors {:<24} input `{}` ({} channels)", l.stride, anchors.join(" "), l.input_tensor, l.in_channels);
    }
    println!();
    print!("{}", summary::render(&s));
    Ok(())
}
