//! The full path (`val --path full`): the source model and head in, exported
//! as one complete ONNX (`export::export_bytes`) and run image by image on an
//! engine; its `output0` rows go through the same post-processing as the fast
//! path. It checks the fast path end to end (cache, Rust decode) against the
//! file a user deploys. No losses here: `output0` holds sigmoided scores, not
//! the raw logits the loss needs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use ndarray::{Array4, Axis, Ix3};

use super::{Accumulator, ValOptions, ValReport, evaluate_image};
use crate::cache::build::SkippedImage;
use crate::engine::{Engine, EngineOptions};
use crate::graph::Model;
use crate::head::Head;
use crate::preprocess;

/// Validates the exported model on `images`; returns the report and the
/// engine's name.
pub fn validate_full(model: &Model, head: &Head, images: &[PathBuf], imgsz: usize, opts: &ValOptions, engine_opts: &EngineOptions) -> Result<(ValReport, String)> {
    let start = Instant::now();
    let bytes = crate::export::export_bytes(model, head, None)?;
    let mut engine = Engine::for_model(&model.path, &bytes, imgsz, engine_opts)?;
    let mut acc = Accumulator::new(head);
    let mut skipped = Vec::new();
    let bar = super::progress_bar(opts.progress, images.len(), "validating the exported model");
    for path in images {
        bar.inc(1);
        let img = match preprocess::decode(path) {
            Ok(i) => i,
            Err(e) => {
                bar.suspend(|| eprintln!("warning: skipping {}: {e:#}", path.display()));
                skipped.push(SkippedImage { path: path.clone(), reason: format!("{e:#}") });
                continue;
            }
        };
        let lb = preprocess::letterbox(&img, imgsz);
        let mut input = Array4::<f32>::zeros((1, 3, imgsz, imgsz));
        lb.write_chw(input.as_slice_mut().unwrap());
        let out = engine.run(input.view())?.remove(0);
        let out = out.into_dimensionality::<Ix3>().with_context(|| format!("the exported model's output0 is not [batch, anchors, 5 + nc] on {}", path.display()))?;
        acc.add(evaluate_image(out.index_axis(Axis(0), 0), &lb.meta, path, head.nc, opts)?, opts.warn_labels.then_some(&bar));
    }
    bar.finish_and_clear();
    let mut report = acc.finish(head, None, start);
    report.skipped_images = skipped;
    Ok((report, engine.name()))
}
