//! `--weights` resolution, shared by val, export and predict.
//!
//! In: a path the user typed: an exported `.onnx`, a run directory `RUN`
//! (head `RUN/weights/best`, else `RUN/weights/last`), or a saved head (its
//! stem, `.safetensors` or `.json`). Out: the source model (the frozen
//! backbone the head plugs into), the head, and where they came from.
//! A saved head names its source model in `HeadMeta.source["model"]`; the
//! head must fit that model (levels, input channels, strides).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::graph::Model;
use crate::head::{Head, HeadMeta};

/// Where the model and head came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An exported ONNX, used with its own head.
    Model(PathBuf),
    /// A saved head (`stem` without extension) on its source model; `run` is
    /// the run directory when one was given.
    Head { stem: PathBuf, model: PathBuf, run: Option<PathBuf> },
}

impl Source {
    /// The run directory, when `--weights` named one.
    pub fn run(&self) -> Option<&Path> {
        match self {
            Source::Head { run, .. } => run.as_deref(),
            Source::Model(_) => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Model(p) => write!(f, "{}", p.display()),
            Source::Head { stem, model, .. } => write!(f, "{} on {}", stem.display(), model.display()),
        }
    }
}

/// Resolves `--weights` (see the module doc).
pub fn resolve(path: &Path) -> Result<(Model, Head, Source)> {
    crate::graph::check_not_pytorch(path)?;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        if !path.is_file() {
            bail!("the model {} does not exist", path.display());
        }
        let model = Model::load(path)?;
        let head = Head::from_model(&model).with_context(|| format!("cannot read the Detect head of {}", path.display()))?;
        return Ok((model, head, Source::Model(path.to_path_buf())));
    }
    let (stem, run) = if path.is_dir() {
        let w = path.join("weights");
        let best = w.join("best");
        let last = w.join("last");
        if best.with_extension("safetensors").is_file() {
            (best, Some(path.to_path_buf()))
        } else if last.with_extension("safetensors").is_file() {
            (last, Some(path.to_path_buf()))
        } else {
            bail!("the run directory {} has neither weights/best.safetensors nor weights/last.safetensors", path.display());
        }
    } else {
        let stem = match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") | Some("json") => path.with_extension(""),
            _ => path.to_path_buf(),
        };
        if !stem.with_extension("safetensors").is_file() {
            bail!("{} is not an .onnx model, a run directory or a saved head (no {} found)", path.display(), stem.with_extension("safetensors").display());
        }
        (stem, None)
    };
    let head = Head::load(&stem)?;
    let meta_path = stem.with_extension("json");
    let meta: HeadMeta = serde_json::from_slice(&std::fs::read(&meta_path).with_context(|| format!("cannot read {}", meta_path.display()))?)
        .with_context(|| format!("{} is not a head metadata file", meta_path.display()))?;
    let Some(src) = meta.source.get("model") else {
        bail!("{} does not name its source model (no source.model entry), so the head cannot be run", meta_path.display());
    };
    let model_path = source_model_path(src, &stem);
    if !model_path.is_file() {
        bail!("the source model {src} named in {} does not exist", meta_path.display());
    }
    let mut model = Model::load(&model_path)?;
    // a run with --freeze below 24 trained layers N..23 too: they replace the
    // source model's initializers of the same names
    let tail = crate::train::tail::tail_path(&stem);
    if tail.is_file() {
        let tensors = crate::train::tail::load(&stem)?;
        model.replace_initializers(&tensors).with_context(|| format!("the trained layers {} do not fit the source model {}", tail.display(), model_path.display()))?;
    } else if meta.source.get("freeze").is_some_and(|n| n != "24") {
        bail!("{} was trained with --freeze {} but its trained layers {} are missing", stem.display(), meta.source["freeze"], tail.display());
    }
    check_fits(&model, &head).with_context(|| format!("the head {} does not fit its source model {}", stem.display(), model_path.display()))?;
    Ok((model, head, Source::Head { stem, model: model_path, run }))
}

/// A relative source path is taken as written (relative to the working
/// directory, as the trainer records it), else relative to the head's folder.
fn source_model_path(src: &str, stem: &Path) -> PathBuf {
    let p = PathBuf::from(src);
    if p.is_absolute() || p.is_file() {
        return p;
    }
    let beside = stem.parent().unwrap_or(Path::new(".")).join(&p);
    if beside.is_file() { beside } else { p }
}

/// The head must plug into the model's backbone: level count, input channels
/// and strides (the export's own check).
pub fn check_fits(model: &Model, head: &Head) -> Result<()> {
    crate::export::check_head(model, head)
}
