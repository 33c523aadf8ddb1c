//! The feature cache stage: a frozen graph and images in; one verified file of
//! the tensors that cross the freeze boundary (at `--freeze 24` the head-input
//! feature maps) per image out, content-addressed so that every later
//! experiment reuses them.
//!
//! ```text
//! CACHE_DIR/<graph key>/frozen.onnx      the frozen graph the features come from
//! CACHE_DIR/<graph key>/cache.json       imgsz, freeze, levels (the crossing tensors), source model
//! CACHE_DIR/<graph key>/f16/ab/<image key>.feat  (f32/, q8/ for --dtype f32, q8)
//! ```
//! The graph key hashes the frozen graph bytes, imgsz and the preprocessing
//! version; the image key hashes the image file's bytes. The frozen graph's
//! outputs are the cut's crossing tensors, so the key is the cut's: a
//! different N never reuses an entry, and N = 24 keeps the keys it always had.
//! Labels are not part of any key, so relabelling never invalidates features.
//!
//! Many processes may fill one cache at once (entries are written to locked
//! temporary files and renamed into place); `shard` splits a split between
//! them so that each computes only its own part.
//!
//! Opening a cache removes the `.tmp-*` files that killed writers left in it
//! (`fsutil::remove_orphans`); files that a running writer (another process
//! or shard on the same cache) holds locked are left alone.

pub mod build;
pub mod entry;
pub mod q8;
pub mod shard;
pub mod sparse;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use entry::{Dtype, Entry};

use crate::graph::{Cut, Model};
use crate::preprocess::PREPROCESS_VERSION;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheLevel {
    pub tensor: String,
    pub channels: usize,
    pub stride: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
    pub key: String,
    pub imgsz: usize,
    pub preprocess_version: u32,
    pub source_model: String,
    /// `--freeze N` of the cut; caches made before it existed are N = 24.
    #[serde(default = "head_only")]
    pub freeze: usize,
    /// The entry's tensors in order: the cut's crossing tensors.
    pub levels: Vec<CacheLevel>,
}

fn head_only() -> usize {
    crate::graph::cut::HEAD_ONLY
}

/// An opened (and, if new, initialised) cache directory for one frozen graph.
pub struct FeatureCache {
    pub dir: PathBuf,
    pub info: CacheInfo,
}

/// `$FREEZESPLIT_CACHE`, else `$XDG_CACHE_HOME/freezesplit`, else `~/.cache/freezesplit`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("FREEZESPLIT_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("freezesplit");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/freezesplit"),
        None => PathBuf::from(".freezesplit-cache"),
    }
}

pub fn graph_key(frozen: &[u8], imgsz: usize) -> String {
    let mut h = blake3::Hasher::new();
    h.update(frozen);
    h.update(&(imgsz as u64).to_le_bytes());
    h.update(&PREPROCESS_VERSION.to_le_bytes());
    h.finalize().to_hex()[..24].to_string()
}

pub fn image_key(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_string()
}

impl FeatureCache {
    /// Opens the cache of `--freeze 24` for `model` at `imgsz` under `root`,
    /// writing the frozen graph and `cache.json` the first time. Returns the
    /// frozen bytes too.
    pub fn open(root: &Path, model: &Model, imgsz: usize) -> Result<(FeatureCache, Vec<u8>)> {
        Self::open_at(root, model, &Cut::head_only(&model.spec), imgsz)
    }

    /// Opens the cache of `cut` (see `open`).
    pub fn open_at(root: &Path, model: &Model, cut: &Cut, imgsz: usize) -> Result<(FeatureCache, Vec<u8>)> {
        let stride = model.spec.strides().iter().fold(1f32, |a, &b| a.max(b)) as usize;
        if imgsz == 0 || !imgsz.is_multiple_of(stride) {
            bail!("image size {imgsz} does not fit {}: it must be a positive multiple of its largest stride {stride}", model.path.display());
        }
        let frozen = model.frozen_bytes_at(cut)?;
        let key = graph_key(&frozen, imgsz);
        let dir = root.join(&key);
        let info = CacheInfo {
            key: key.clone(),
            imgsz,
            preprocess_version: PREPROCESS_VERSION,
            source_model: model.path.display().to_string(),
            freeze: cut.freeze,
            levels: cut.crossing.iter().map(|c| CacheLevel { tensor: c.name.clone(), channels: c.channels, stride: c.stride as f32 }).collect(),
        };
        let onnx_path = dir.join("frozen.onnx");
        if std::fs::read(&onnx_path).ok().as_deref() != Some(&frozen[..]) {
            crate::fsutil::write_atomic(&onnx_path, &frozen)?;
        }
        let info_path = dir.join("cache.json");
        if !info_path.exists() {
            crate::fsutil::write_atomic(&info_path, &serde_json::to_vec_pretty(&info)?)?;
        }
        let cache = FeatureCache { dir, info };
        cache.remove_orphans();
        Ok((cache, frozen))
    }

    /// Removes the temporary files of killed writers (see the module doc);
    /// returns how many.
    pub fn remove_orphans(&self) -> usize {
        let min_age = crate::fsutil::ORPHAN_MIN_AGE;
        let mut n = crate::fsutil::remove_orphans(&self.dir, min_age);
        for dtype in Dtype::ALL {
            for shard in std::fs::read_dir(self.dir.join(dtype.name())).into_iter().flatten().flatten() {
                n += crate::fsutil::remove_orphans(&shard.path(), min_age);
            }
        }
        n
    }

    /// Opens an existing cache directory (one that `open` made).
    pub fn open_dir(dir: &Path) -> Result<FeatureCache> {
        let p = dir.join("cache.json");
        let info: CacheInfo = serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("{} is not a feature cache (no cache.json)", dir.display()))?)
            .with_context(|| format!("{} is damaged", p.display()))?;
        Ok(FeatureCache { dir: dir.to_path_buf(), info })
    }

    pub fn entry_path(&self, image_key: &str, dtype: Dtype) -> PathBuf {
        self.dir.join(dtype.name()).join(&image_key[..2]).join(format!("{image_key}.feat"))
    }

    /// The verified entry of an image, if cached; a damaged entry, or one of
    /// another dtype (misplaced by hand), counts as absent.
    pub fn get(&self, image_key: &str, dtype: Dtype) -> Option<Entry> {
        let p = self.entry_path(image_key, dtype);
        if !p.exists() {
            return None;
        }
        match Entry::open(&p) {
            Ok(e) if e.header.dtype != dtype => {
                eprintln!("warning: cache entry {} holds {} features in the {} directory; it will be recomputed", p.display(), e.header.dtype.name(), dtype.name());
                None
            }
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("warning: {e:#}; it will be recomputed");
                None
            }
        }
    }
}
