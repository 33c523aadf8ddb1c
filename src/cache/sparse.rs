//! The sparse cache of class-only training (`--train cls`, `--sparse`): per
//! image, the head-input feature vectors at build_targets' positives and
//! their targets in; one small self-checking file out, and back.
//!
//! ```text
//! CACHE_DIR/<graph key>/sparse/ab/<sparse key>.sprs
//! ```
//! Layout: `FZSPRS01` | header length (u32 LE) | JSON header | per level: the
//! positives' feature vectors `[n, C]` f16, their anchor `[n]` u32, their
//! label row `[n]` u32, their `1 - CIoU` `[n]` f32 | blake3 of everything
//! before (32 bytes). Written through `fsutil::write_atomic_unsynced` (a
//! unique locked temporary renamed into place: kill-safe, and concurrent
//! writers of the same key both succeed with the same bytes); a torn or
//! damaged file fails its checksum and is rebuilt.
//!
//! The key (`sparse_key`) hashes what the positives and the constant box and
//! objectness losses depend on: the dense entry's image key (in a directory
//! that is the frozen graph's), the labels' box geometry (not their classes),
//! anchors, grids, anchor_t and the frozen box/objectness rows with obj_pw and
//! fl_gamma. A positive stores the index of its label row, and the class is
//! read from the labels at load: changing class ids rebuilds nothing, and
//! changing boxes rebuilds only the images whose boxes changed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use half::f16;
use serde::{Deserialize, Serialize};

use super::FeatureCache;
use crate::preprocess::LetterboxMeta;

const MAGIC: &[u8; 8] = b"FZSPRS01";

/// What one image holds besides the positives themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseHeader {
    pub letterbox: LetterboxMeta,
    /// Per level: input channels C and the number of positives n.
    pub channels: Vec<usize>,
    pub counts: Vec<usize>,
    /// Per level: Σ over all na·ny·nx cells of the objectness BCE (obj_pw,
    /// focal with fl_gamma) against YOLOv5's tobj; the frozen rows make it a
    /// constant of the image.
    pub obj_bce_sum: Vec<f64>,
    /// Per level na·ny·nx, the divisor of the objectness mean.
    pub cells: Vec<usize>,
}

/// One level's positives, in build_targets order for the image alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseLevel {
    /// `[n, C]`: the head input at the positive's cell.
    pub feats: Vec<f16>,
    pub anchor: Vec<u32>,
    /// The label row (of the image's label file) the positive comes from.
    pub target: Vec<u32>,
    /// `1 - CIoU` of the frozen box rows against the positive's target.
    pub one_minus_iou: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SparseEntry {
    pub header: SparseHeader,
    pub levels: Vec<SparseLevel>,
}

impl SparseEntry {
    /// Bytes of the encoded file.
    pub fn encoded_len(&self) -> usize {
        encode(self).len()
    }
}

/// The sparse key of an image (see the module doc). `context` is everything
/// of the run the positives and constants depend on, already serialised.
pub fn sparse_key(image_key: &str, boxes: &[[f32; 4]], context: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"freezesplit-sparse-v1");
    h.update(image_key.as_bytes());
    h.update(&(boxes.len() as u64).to_le_bytes());
    for b in boxes {
        for v in b {
            h.update(&v.to_le_bytes());
        }
    }
    h.update(context);
    h.finalize().to_hex()[..32].to_string()
}

pub fn sparse_path(cache: &FeatureCache, key: &str) -> PathBuf {
    cache.dir.join("sparse").join(&key[..2]).join(format!("{key}.sprs"))
}

pub fn encode(e: &SparseEntry) -> Vec<u8> {
    let header = serde_json::to_vec(&e.header).expect("the header serialises");
    let mut buf = Vec::with_capacity(64 + header.len() + e.levels.iter().map(|l| l.feats.len() * 2 + l.anchor.len() * 12).sum::<usize>());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
    buf.extend_from_slice(&header);
    for l in &e.levels {
        l.feats.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        l.anchor.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        l.target.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        l.one_minus_iou.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
    }
    let hash = blake3::hash(&buf);
    buf.extend_from_slice(hash.as_bytes());
    buf
}

/// Reads `n` little-endian values of `size` bytes each from `b` at `*at`.
fn take<'a>(b: &'a [u8], at: &mut usize, n: usize, size: usize) -> Result<std::slice::ChunksExact<'a, u8>> {
    let end = *at + n * size;
    let s = b.get(*at..end).context("payload shorter than its header")?;
    *at = end;
    Ok(s.chunks_exact(size))
}

pub fn decode(bytes: &[u8]) -> Result<SparseEntry> {
    let n = bytes.len();
    if n < 12 + 32 || &bytes[..8] != MAGIC {
        bail!("not a freezesplit sparse file");
    }
    let (body, sum) = bytes.split_at(n - 32);
    if blake3::hash(body).as_bytes() != sum {
        bail!("checksum mismatch");
    }
    let hlen = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
    let header: SparseHeader = serde_json::from_slice(body.get(12..12 + hlen).context("header out of bounds")?)?;
    if header.channels.len() != header.counts.len() {
        bail!("header levels disagree");
    }
    let mut at = 12 + hlen;
    let mut levels = Vec::new();
    for (&c, &k) in header.channels.iter().zip(&header.counts) {
        let feats = take(body, &mut at, k * c, 2)?.map(|x| f16::from_le_bytes([x[0], x[1]])).collect();
        let u32s = |at: &mut usize| -> Result<Vec<u32>> { Ok(take(body, at, k, 4)?.map(|x| u32::from_le_bytes(x.try_into().unwrap())).collect()) };
        let anchor = u32s(&mut at)?;
        let target = u32s(&mut at)?;
        let one_minus_iou = take(body, &mut at, k, 4)?.map(|x| f32::from_le_bytes(x.try_into().unwrap())).collect();
        levels.push(SparseLevel { feats, anchor, target, one_minus_iou });
    }
    if at != body.len() {
        bail!("size does not match its header");
    }
    Ok(SparseEntry { header, levels })
}

/// The entry at `path`, or None when it is absent or damaged (then rebuilt).
pub fn read(path: &Path) -> Option<SparseEntry> {
    let bytes = std::fs::read(path).ok()?;
    decode(&bytes).ok()
}

pub fn write(path: &Path, e: &SparseEntry) -> Result<usize> {
    let bytes = encode(e);
    // the checksum catches what an OS crash loses: no need to wait for the disk
    crate::fsutil::write_atomic_unsynced(path, &bytes).with_context(|| format!("cannot write sparse cache entry {}", path.display()))?;
    Ok(bytes.len())
}

/// Removes the `.tmp-*` files killed writers left under `sparse/`.
pub fn remove_orphans(cache: &FeatureCache) -> usize {
    let min_age = crate::fsutil::ORPHAN_MIN_AGE;
    std::fs::read_dir(cache.dir.join("sparse")).into_iter().flatten().flatten().map(|s| crate::fsutil::remove_orphans(&s.path(), min_age)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> SparseEntry {
        let lb = LetterboxMeta { shape0: [10, 20], resized: [4, 8], pad: [0.0, 2.0], imgsz: 8 };
        let header = SparseHeader { letterbox: lb, channels: vec![3, 2], counts: vec![2, 0], obj_bce_sum: vec![1.5, 0.25], cells: vec![12, 3] };
        let l0 = SparseLevel { feats: (0..6).map(|i| f16::from_f32(i as f32 * 0.5)).collect(), anchor: vec![0, 2], target: vec![1, 0], one_minus_iou: vec![0.25, 0.75] };
        SparseEntry { header, levels: vec![l0, SparseLevel::default()] }
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let e = entry();
        let bytes = encode(&e);
        assert_eq!(decode(&bytes).unwrap(), e);
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        assert!(decode(&bad).is_err());
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn the_key_ignores_nothing_of_the_geometry() {
        let a = sparse_key("abc", &[[0.5, 0.5, 0.1, 0.2]], b"ctx");
        assert_eq!(a, sparse_key("abc", &[[0.5, 0.5, 0.1, 0.2]], b"ctx"));
        assert_ne!(a, sparse_key("abc", &[[0.5, 0.5, 0.1, 0.21]], b"ctx"));
        assert_ne!(a, sparse_key("abd", &[[0.5, 0.5, 0.1, 0.2]], b"ctx"));
        assert_ne!(a, sparse_key("abc", &[[0.5, 0.5, 0.1, 0.2]], b"ctx2"));
    }
}
