//! `freezesplit inspect MODEL.onnx [--freeze N] [--json]`: the Detect head,
//! the layer table and, with `--freeze N`, where N cuts (the tensors that
//! cross the boundary, cache bytes per image, trainable parameters).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::cache::Dtype;
use crate::graph::{Cut, Model, summary};

#[derive(Args)]
pub struct InspectArgs {
    /// An ONNX model exported by YOLOv5's export.py
    pub model: PathBuf,
    /// Show where YOLOv5's --freeze N cuts (layers 0..N-1 frozen, 10..=24)
    #[arg(long)]
    pub freeze: Option<usize>,
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let cut = a.freeze.map(|n| model.cut(n)).transpose()?;
    let spec = &model.spec;
    let s = summary::summarize(&model);
    // dynamic exports: shapes and bytes at the size `cache` uses by default
    let imgsz = s.imgsz[0];
    if a.json {
        let head_inputs: Vec<_> = spec
            .levels
            .iter()
            .map(|l| {
                let shape = crate::graph::split::feature_shape(spec, l.stride, l.in_channels, &spec.batch);
                json!({"name": l.input_tensor, "shape": shape, "conv": l.conv_node, "stride": l.stride})
            })
            .collect();
        let mut layers = serde_json::to_value(&s.layers)?;
        if let (Some(c), Some(rows)) = (&cut, layers.as_array_mut()) {
            for r in rows {
                let frozen = r["index"].as_u64().is_some_and(|i| (i as usize) < c.freeze);
                r["frozen"] = json!(frozen);
            }
        }
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
            "layers": layers,
            "total_params": s.total_params,
            "layers_named": s.named,
            "freeze": cut.as_ref().map(|c| freeze_json(c, &model, imgsz)),
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
    if let Some(c) = &cut {
        print!("{}", render_cut(c, &model, imgsz));
    }
    println!();
    print!("{}", summary::render_at(&s, cut.as_ref().map(|c| c.freeze)));
    Ok(())
}

fn freeze_json(c: &Cut, model: &Model, imgsz: usize) -> serde_json::Value {
    let crossing: Vec<_> = c
        .crossing
        .iter()
        .enumerate()
        .map(|(i, x)| json!({"name": x.name, "layer": x.layer, "channels": x.channels, "stride": x.stride, "shape": c.shape(i, imgsz)}))
        .collect();
    json!({
        "n": c.freeze,
        "crossing": crossing,
        "imgsz": imgsz,
        "bytes_per_image_f16": c.bytes_per_image(imgsz, Dtype::F16),
        "bytes_per_image_q8": c.bytes_per_image(imgsz, Dtype::Q8),
        "trainable_params": c.trainable_params(model),
        "tail_nodes": c.tail_nodes.len(),
    })
}

fn render_cut(c: &Cut, model: &Model, imgsz: usize) -> String {
    let n = c.freeze;
    let trains = if n == 24 { "24 (the Detect head) trains".to_string() } else { format!("{n}-24 train") };
    let mut out = format!("  --freeze {n}: layers 0-{} frozen (run once per image and cached), {trains}: {} parameters\n", n - 1, c.trainable_params(model));
    let dynamic = if model.spec.imgsz.is_none() { " (a dynamic export: at cache's default --imgsz)" } else { "" };
    out.push_str(&format!("    tensors crossing the boundary (what the cache holds), shapes at {imgsz}x{imgsz}{dynamic}:\n"));
    for (i, x) in c.crossing.iter().enumerate() {
        let layer = x.layer.map_or("?".to_string(), |l| l.to_string());
        out.push_str(&format!("      layer {layer:>2}  {:<16} stride {:>2}  `{}`\n", format!("{:?}", c.shape(i, imgsz)), x.stride, x.name));
    }
    let bytes = c.bytes_per_image(imgsz, Dtype::F16);
    let q8 = c.bytes_per_image(imgsz, Dtype::Q8);
    out.push_str(&format!("    cache per image: {bytes} bytes of f16 features ({:.2} MB); {q8} with --dtype q8 ({:.2} MB)\n", bytes as f64 / 1e6, q8 as f64 / 1e6));
    out
}
