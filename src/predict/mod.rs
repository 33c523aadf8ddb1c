//! Prediction, as YOLOv5's detect.py: weights and images (files or folders)
//! in; per image an annotated copy, `labels/<stem>.txt` (`class x y w h conf`,
//! normalised to the original image, detect.py's `--save-txt --save-conf`),
//! and one `predictions.json` for all, written into a run directory.
//!
//! The complete exported model (`export::export_bytes`) runs on an engine;
//! its `output0` goes through NMS (single-label, like detect.py) and back to
//! original pixels with the letterbox gain and pad. Images are letterboxed
//! exactly as for validation (load_image + square letterbox).

pub mod draw;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{Array4, ArrayView2, Axis, Ix3};
use serde::Serialize;

use crate::data::IMG_FORMATS;
use crate::engine::{Engine, EngineOptions};
use crate::graph::Model;
use crate::head::Head;
use crate::preprocess;
use crate::val::postprocess;
use crate::val::report::fmt_g;

/// detect.py's defaults.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub conf_thres: f64,
    pub iou_thres: f64,
    pub max_det: usize,
    pub imgsz: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub class: usize,
    pub name: String,
    pub conf: f32,
    /// Original-image pixels.
    pub xyxy: [f32; 4],
}

#[derive(Debug, Clone, Serialize)]
pub struct ImagePrediction {
    pub image: PathBuf,
    pub width: u32,
    pub height: u32,
    pub detections: Vec<Detection>,
    /// The annotated copy.
    pub saved: PathBuf,
}

/// Files as given, folders expanded to their images (sorted, not recursive,
/// as detect.py's glob).
pub fn list_sources(sources: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for s in sources {
        if s.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(s)
                .with_context(|| format!("cannot list {}", s.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMG_FORMATS.contains(&e.to_ascii_lowercase().as_str())))
                .collect();
            v.sort();
            out.extend(v);
        } else if s.is_file() {
            out.push(s.clone());
        } else {
            bail!("the source {} does not exist", s.display());
        }
    }
    if out.is_empty() {
        bail!("no images found in {}", sources.iter().map(|s| s.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    Ok(out)
}

/// detect.py's label line: `cls x y w h conf` with `%g`.
pub fn label_line(d: &Detection, w: u32, h: u32) -> String {
    let [x1, y1, x2, y2] = d.xyxy;
    let (w, h) = (w as f32, h as f32);
    let v = [((x1 + x2) / 2.0) / w, ((y1 + y2) / 2.0) / h, (x2 - x1) / w, (y2 - y1) / h];
    let mut s = d.class.to_string();
    for x in v.iter().chain(std::iter::once(&d.conf)) {
        s.push(' ');
        s += &fmt_g(*x as f64, 6);
    }
    s
}

/// Runs `model` + `head` on `images`, writing everything into `save_dir`
/// (created). Unreadable images are skipped with a warning.
pub fn predict(model: &Model, head: &Head, images: &[PathBuf], opts: &PredictOptions, engine_opts: &EngineOptions, save_dir: &Path, verbose: bool) -> Result<Vec<ImagePrediction>> {
    let bytes = crate::export::export_bytes(model, head, None)?;
    let mut engine = Engine::for_model(&model.path, &bytes, opts.imgsz, engine_opts)?;
    let labels_dir = save_dir.join("labels");
    std::fs::create_dir_all(&labels_dir).with_context(|| format!("cannot create {}", labels_dir.display()))?;
    let font = draw::find_font();
    if font.is_none() {
        eprintln!("note: no TTF font found (set FREEZESPLIT_FONT); boxes are drawn without labels");
    }
    let mut results = Vec::new();
    for (i, path) in images.iter().enumerate() {
        let mut img = match preprocess::decode(path) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("warning: skipping {}: {e:#}", path.display());
                continue;
            }
        };
        let lb = preprocess::letterbox(&img, opts.imgsz);
        let mut input = Array4::<f32>::zeros((1, 3, opts.imgsz, opts.imgsz));
        lb.write_chw(input.as_slice_mut().unwrap());
        let out = engine.run(input.view())?.remove(0).into_dimensionality::<Ix3>()?;
        let det = postprocess(out.index_axis(Axis(0), 0), &lb.meta, opts.conf_thres, opts.iou_thres, false, opts.max_det);
        let detections = to_detections(det.view(), &head.names);
        let (w, h) = img.dimensions();
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        if !detections.is_empty() {
            let mut f = std::fs::File::create(labels_dir.join(format!("{stem}.txt")))?;
            for d in &detections {
                writeln!(f, "{}", label_line(d, w, h))?;
            }
        }
        draw::annotate(&mut img, det.view(), &head.names, font.as_ref().map(|(f, _)| f));
        let saved = save_dir.join(path.file_name().unwrap());
        img.save(&saved).with_context(|| format!("cannot write {}", saved.display()))?;
        if verbose {
            println!("image {}/{} {}: {}x{} {}", i + 1, images.len(), path.display(), w, h, summary(&detections, &head.names));
        }
        results.push(ImagePrediction { image: path.clone(), width: w, height: h, detections, saved });
    }
    crate::fsutil::write_atomic(&save_dir.join("predictions.json"), &serde_json::to_vec_pretty(&results)?)?;
    Ok(results)
}

fn to_detections(det: ArrayView2<f32>, names: &[String]) -> Vec<Detection> {
    det.rows()
        .into_iter()
        .map(|r| {
            let class = r[5] as usize;
            Detection { class, name: names.get(class).cloned().unwrap_or_else(|| class.to_string()), conf: r[4], xyxy: [r[0], r[1], r[2], r[3]] }
        })
        .collect()
}

/// detect.py's "2 persons, 1 bus" (without its naive plural).
fn summary(d: &[Detection], names: &[String]) -> String {
    if d.is_empty() {
        return "(no detections)".into();
    }
    let mut counts = vec![0usize; names.len().max(d.iter().map(|x| x.class + 1).max().unwrap_or(0))];
    for x in d {
        counts[x.class] += 1;
    }
    counts.iter().enumerate().filter(|(_, n)| **n > 0).map(|(c, n)| format!("{n} {}", names.get(c).cloned().unwrap_or_else(|| c.to_string()))).collect::<Vec<_>>().join(", ")
}
