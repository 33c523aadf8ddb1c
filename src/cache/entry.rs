//! One cached image on disk: the head-input feature maps of one image in, a
//! self-checking file out; and back, through a memory map.
//!
//! Layout: `FZFEAT01` | header length (u32 LE) | JSON header | zero padding to
//! 64 bytes | levels `[C, H, W]` back to back in f16 or f32 (LE) | blake3 of
//! everything before (32 bytes). The checksum makes a torn or bit-rotten file
//! detectable on read; writes go through `fsutil::write_atomic`, so a crash
//! never leaves a partial file under the final name.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use ndarray::{Array3, ArrayView3};
use serde::{Deserialize, Serialize};

use crate::features::{FeatSlice, Features, LendLevel};
use crate::preprocess::LetterboxMeta;

const MAGIC: &[u8; 8] = b"FZFEAT01";
const ALIGN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryHeader {
    pub dtype: Dtype,
    /// `[C, H, W]` per level.
    pub shapes: Vec<[usize; 3]>,
    pub letterbox: LetterboxMeta,
}

/// Serialises one entry. `levels` are `[C, H, W]` f32 maps.
pub fn encode(levels: &[ArrayView3<f32>], letterbox: LetterboxMeta, dtype: Dtype) -> Vec<u8> {
    let header = EntryHeader { dtype, shapes: levels.iter().map(|l| [l.shape()[0], l.shape()[1], l.shape()[2]]).collect(), letterbox };
    let json = serde_json::to_vec(&header).expect("header serialises");
    let payload: usize = levels.iter().map(|l| l.len()).sum::<usize>() * dtype.size();
    let start = (12 + json.len()).div_ceil(ALIGN) * ALIGN;
    let mut buf = Vec::with_capacity(start + payload + 32);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    buf.resize(start, 0);
    for l in levels {
        let l = l.as_standard_layout();
        let s = l.as_slice().unwrap();
        match dtype {
            Dtype::F32 => buf.extend_from_slice(bytemuck::cast_slice(s)),
            Dtype::F16 => {
                // through a small buffer that stays in L1, not a second copy
                // of the level
                let mut h = [f16::ZERO; 2048];
                for c in s.chunks(h.len()) {
                    let h = &mut h[..c.len()];
                    h.convert_from_f32_slice(c);
                    buf.extend_from_slice(bytemuck::cast_slice(h));
                }
            }
        }
    }
    let hash = blake3::hash(&buf);
    buf.extend_from_slice(hash.as_bytes());
    buf
}

/// A verified, memory-mapped entry.
pub struct Entry {
    map: Mmap,
    pub header: EntryHeader,
    data_start: usize,
}

impl Entry {
    /// Maps and verifies a file; any damage is an error naming the file.
    pub fn open(path: &Path) -> Result<Entry> {
        Self::map(path, true, false)
    }

    /// Maps an entry that this process has already verified with `open`,
    /// skipping the checksum pass (training reads every entry every epoch).
    /// The mapping is populated up front: the whole file is about to be read,
    /// and one call beats a page fault per 64 KiB.
    pub fn open_verified_before(path: &Path) -> Result<Entry> {
        Self::map(path, false, true)
    }

    /// Maps a file this process wrote itself a moment ago, without the
    /// checksum pass (the header and size are still checked).
    pub fn open_written_now(path: &Path) -> Result<Entry> {
        Self::map(path, false, false)
    }

    fn map(path: &Path, verify: bool, populate: bool) -> Result<Entry> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open cache entry {}", path.display()))?;
        let mut opts = memmap2::MmapOptions::new();
        if populate {
            opts.populate();
        }
        // SAFETY: entries are immutable once renamed into place; writers only
        // ever replace a file with a new inode, never modify it.
        let map = unsafe { opts.map(&file) }.with_context(|| format!("cannot map cache entry {}", path.display()))?;
        Self::from_map(map, verify).with_context(|| format!("cache entry {} is damaged", path.display()))
    }

    fn from_map(map: Mmap, verify: bool) -> Result<Entry> {
        let n = map.len();
        if n < 12 + 32 || &map[..8] != MAGIC {
            bail!("not a freezesplit feature file");
        }
        let (body, sum) = map.split_at(n - 32);
        if verify && blake3::hash(body).as_bytes() != sum {
            bail!("checksum mismatch");
        }
        let hlen = u32::from_le_bytes(map[8..12].try_into().unwrap()) as usize;
        let header: EntryHeader = serde_json::from_slice(map.get(12..12 + hlen).context("header out of bounds")?)?;
        let data_start = (12 + hlen).div_ceil(ALIGN) * ALIGN;
        let payload: usize = header.shapes.iter().map(|s| s.iter().product::<usize>()).sum::<usize>() * header.dtype.size();
        if data_start + payload + 32 != n {
            bail!("size does not match its header");
        }
        Ok(Entry { map, header, data_start })
    }

    /// Level `i` as f32 `[C, H, W]` (converted from f16 when stored so).
    pub fn level(&self, i: usize) -> Array3<f32> {
        let mut out = Array3::zeros(self.header.shapes[i]);
        self.level_into(i, out.as_slice_mut().unwrap());
        out
    }

    /// Writes level `i` into a caller-owned buffer of `C*H*W` floats, so a
    /// training loop can reuse its buffers.
    pub fn level_into(&self, i: usize, out: &mut [f32]) {
        match self.level_raw(i) {
            FeatSlice::F32(x) => out.copy_from_slice(x),
            FeatSlice::F16(x) => x.convert_to_f32_slice(out),
        }
    }

    /// Level `i` as stored (f16 or f32), without converting: `[C*H*W]`.
    pub fn level_raw(&self, i: usize) -> FeatSlice<'_> {
        let size = self.header.dtype.size();
        let before: usize = self.header.shapes[..i].iter().map(|s| s.iter().product::<usize>()).sum();
        let len: usize = self.header.shapes[i].iter().product();
        let bytes = &self.map[self.data_start + before * size..self.data_start + (before + len) * size];
        // the payload starts 64-byte aligned in a page-aligned map
        match self.header.dtype {
            Dtype::F32 => FeatSlice::F32(bytemuck::cast_slice(bytes)),
            Dtype::F16 => FeatSlice::F16(bytemuck::cast_slice(bytes)),
        }
    }

    pub fn bytes(&self) -> usize {
        self.map.len()
    }
}

/// Level `level` of a shared entry, lent to a batch without a copy.
struct EntryLevel {
    entry: Arc<Entry>,
    level: usize,
}

impl LendLevel for EntryLevel {
    fn level(&self) -> FeatSlice<'_> {
        self.entry.level_raw(self.level)
    }
}

/// Level `level` of a batch of entries (image `b` = `entries[b]`), lent as
/// the head's ops read it.
pub fn lend_level(entries: &[Arc<Entry>], level: usize) -> Result<Features> {
    let [c, h, w] = entries.first().context("an empty batch")?.header.shapes[level];
    let lenders = entries.iter().map(|e| Arc::new(EntryLevel { entry: e.clone(), level }) as Arc<dyn LendLevel>).collect();
    Features::lent(lenders, c, h, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> LetterboxMeta {
        LetterboxMeta { shape0: [10, 20], resized: [4, 8], pad: [0.0, 2.0], imgsz: 8 }
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let a = Array3::from_shape_fn((2, 3, 4), |(c, y, x)| (c * 100 + y * 10 + x) as f32 * 0.01);
        let b = Array3::from_shape_fn((4, 1, 2), |(c, _, x)| -(c as f32) - x as f32 * 0.5);
        let dir = tempfile::tempdir().unwrap();
        for dtype in [Dtype::F32, Dtype::F16] {
            let bytes = encode(&[a.view(), b.view()], meta(), dtype);
            let p = dir.path().join(dtype.name());
            std::fs::write(&p, &bytes).unwrap();
            let e = Entry::open(&p).unwrap();
            assert_eq!(e.header.letterbox, meta());
            let tol = if dtype == Dtype::F32 { 0.0 } else { 2e-3 };
            assert!((e.level(0) - &a).iter().all(|d| d.abs() <= tol));
            assert!((e.level(1) - &b).iter().all(|d| d.abs() <= tol));
            // a flipped byte and a truncation are both caught
            let mut bad = bytes.clone();
            bad[bytes.len() / 2] ^= 1;
            std::fs::write(&p, &bad).unwrap();
            assert!(Entry::open(&p).is_err());
            std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
            assert!(Entry::open(&p).is_err());
        }
    }
}
