//! `freezesplit export --weights RUN|MODEL.onnx [--out FILE.onnx] [--dynamic]`:
//! weights in; a complete YOLOv5-style ONNX out (`export::write_export`),
//! reloaded and described (path, opset, shapes, nc, names).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::graph::Model;
use crate::graph::onnx::{Dim, value_info_shape};
use crate::weights::Source;

#[derive(Args)]
pub struct ExportArgs {
    /// A run directory, a saved head, or an exported YOLOv5 ONNX
    #[arg(long)]
    pub weights: PathBuf,
    /// Output file (default: RUN/weights/best.onnx for runs, <stem>-freezesplit.onnx next to a model or head)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Dynamic batch, height and width, like export.py --dynamic
    #[arg(long)]
    pub dynamic: bool,
    /// YOLOv5's --freeze N the model is split at (10..=24): the frozen graph, layers N..23 as trained (a run's own) and the head, as one graph [default: 24]
    #[arg(long)]
    pub freeze: Option<usize>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

fn default_out(source: &Source) -> PathBuf {
    match source {
        Source::Head { stem, run: Some(run), .. } => run.join("weights").join(format!("{}.onnx", stem.file_name().unwrap().to_string_lossy())),
        Source::Head { stem, .. } => stem.with_extension("onnx"),
        Source::Model(p) => sibling(p),
    }
}

fn sibling(p: &Path) -> PathBuf {
    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    p.with_file_name(format!("{stem}-freezesplit.onnx"))
}

fn shape_of(m: &Model, input: bool) -> Vec<Dim> {
    let g = m.proto.graph.as_ref().unwrap();
    let (list, name) = if input { (&g.input, &m.spec.input_name) } else { (&g.output, &m.spec.output_name) };
    list.iter().find(|v| &v.name == name).and_then(value_info_shape).unwrap_or_default()
}

fn fmt_shape(s: &[Dim]) -> String {
    s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

pub fn run(a: ExportArgs) -> Result<()> {
    let (mut model, head, source) = crate::weights::resolve(&a.weights)?;
    super::check_freeze(&model, a.freeze)?;
    // an extended head (train --add-classes) says in the export how many classes are old
    let base_nc = crate::val::classes::base_nc_of(&model, &source)?;
    crate::export::set_base_nc(&mut model.proto, base_nc.filter(|&n| n < head.nc));
    let out = a.out.clone().unwrap_or_else(|| default_out(&source));
    crate::export::write_export(&out, &model, &head, a.dynamic.then_some(true))?;
    let m = Model::load(&out).with_context(|| format!("the exported file {} does not load back", out.display()))?;
    let (ins, outs) = (shape_of(&m, true), shape_of(&m, false));
    if a.json {
        let v = json!({"path": out, "weights": source.to_string(), "opset": m.spec.opset, "input": {"name": m.spec.input_name, "shape": ins},
                       "output": {"name": m.spec.output_name, "shape": outs}, "nc": m.spec.nc, "names": m.spec.names});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("exported {} -> {}", source, out.display());
        println!("opset {}; input {} {}; output {} {}", m.spec.opset, m.spec.input_name, fmt_shape(&ins), m.spec.output_name, fmt_shape(&outs));
        println!("nc {}; names {:?}", m.spec.nc, m.spec.names);
    }
    Ok(())
}
