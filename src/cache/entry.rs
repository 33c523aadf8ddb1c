//! One cached image on disk: the head-input feature maps of one image in, a
//! self-checking file out; and back, through a memory map.
//!
//! Layout: `FZFEAT01` | header length (u32 LE) | JSON header | zero padding to
//! 64 bytes | levels `[C, H, W]` back to back in f16 or f32 (LE) | blake3 of
//! everything before (32 bytes). A q8 entry's levels are, instead, every
//! level's per-channel scales `[C]` and offsets `[C]` (f32 LE) first, then
//! every level's bytes `[C, H, W]` (`cache::q8`): the f32s stay aligned
//! whatever the shapes. The checksum makes a torn or bit-rotten file
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

use super::q8;
use crate::features::{FeatSlice, Features, LendLevel, Q8Slice};
use crate::preprocess::LetterboxMeta;

const MAGIC: &[u8; 8] = b"FZFEAT01";
const ALIGN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    F32,
    /// 8 bits a value, with a scale and an offset per channel: about half of f16's bytes
    Q8,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F16, Dtype::F32, Dtype::Q8];

    /// Bytes a level `[c, h, w]` takes in an entry of this dtype.
    pub fn level_bytes(self, c: usize, h: usize, w: usize) -> usize {
        match self {
            Dtype::F16 => 2 * c * h * w,
            Dtype::F32 => 4 * c * h * w,
            Dtype::Q8 => q8::level_bytes(c, h, w),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
            Dtype::Q8 => "q8",
        }
    }
}

/// Bytes of an entry's levels (between the header and the checksum).
fn payload_bytes(dtype: Dtype, shapes: &[[usize; 3]]) -> usize {
    shapes.iter().map(|&[c, h, w]| dtype.level_bytes(c, h, w)).sum()
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
    let payload = payload_bytes(dtype, &header.shapes);
    let start = (12 + json.len()).div_ceil(ALIGN) * ALIGN;
    let mut buf = Vec::with_capacity(start + payload + 32);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    buf.resize(start, 0);
    match dtype {
        Dtype::Q8 => encode_q8(levels, &mut buf),
        Dtype::F32 | Dtype::F16 => levels.iter().for_each(|l| encode_float(l, dtype, &mut buf)),
    }
    debug_assert_eq!(buf.len(), start + payload);
    let hash = blake3::hash(&buf);
    buf.extend_from_slice(hash.as_bytes());
    buf
}

/// Appends one level in f32 or f16.
fn encode_float(l: &ArrayView3<f32>, dtype: Dtype, buf: &mut Vec<u8>) {
    let l = l.as_standard_layout();
    let s = l.as_slice().unwrap();
    if dtype == Dtype::F32 {
        return buf.extend_from_slice(bytemuck::cast_slice(s));
    }
    // through a small buffer that stays in L1, not a second copy of the level
    let mut h = [f16::ZERO; 2048];
    for c in s.chunks(h.len()) {
        let h = &mut h[..c.len()];
        h.convert_from_f32_slice(c);
        buf.extend_from_slice(bytemuck::cast_slice(h));
    }
}

/// Appends q8 levels: every level's scales and offsets, then every level's
/// bytes (see the module doc).
fn encode_q8(levels: &[ArrayView3<f32>], buf: &mut Vec<u8>) {
    let mut codes = Vec::with_capacity(levels.len());
    for l in levels {
        let (c, sp) = (l.shape()[0], l.shape()[1] * l.shape()[2]);
        let l = l.as_standard_layout();
        let (mut scale, mut offset, mut q) = (vec![0f32; c], vec![0f32; c], vec![0u8; c * sp]);
        q8::quantise(l.as_slice().unwrap(), sp, q8::Q8Mode::Affine, &mut scale, &mut offset, &mut q);
        buf.extend_from_slice(bytemuck::cast_slice(&scale));
        buf.extend_from_slice(bytemuck::cast_slice(&offset));
        codes.push(q);
    }
    for q in codes {
        buf.extend_from_slice(&q);
    }
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
        if data_start + payload_bytes(header.dtype, &header.shapes) + 32 != n {
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
            FeatSlice::Q8(x) => x.dequantise_into(out),
        }
    }

    /// Level `i` as stored (f16, f32 or q8), without converting: `[C*H*W]`.
    pub fn level_raw(&self, i: usize) -> FeatSlice<'_> {
        if self.header.dtype == Dtype::Q8 {
            return self.level_q8(i);
        }
        let size = self.header.dtype.level_bytes(1, 1, 1);
        let before: usize = self.header.shapes[..i].iter().map(|s| s.iter().product::<usize>()).sum();
        let len: usize = self.header.shapes[i].iter().product();
        let bytes = &self.map[self.data_start + before * size..self.data_start + (before + len) * size];
        // the payload starts 64-byte aligned in a page-aligned map
        match self.header.dtype {
            Dtype::F32 => FeatSlice::F32(bytemuck::cast_slice(bytes)),
            Dtype::F16 => FeatSlice::F16(bytemuck::cast_slice(bytes)),
            Dtype::Q8 => unreachable!("handled by level_q8"),
        }
    }

    /// Level `i` of a q8 entry (see the module doc for the layout).
    fn level_q8(&self, i: usize) -> FeatSlice<'_> {
        let shapes = &self.header.shapes;
        let [c, h, w] = shapes[i];
        let chans_before: usize = shapes[..i].iter().map(|s| s[0]).sum();
        let chans_all: usize = shapes.iter().map(|s| s[0]).sum();
        let params = &self.map[self.data_start + 8 * chans_before..self.data_start + 8 * (chans_before + c)];
        // the params start 64-byte aligned and are all 4-byte floats
        let (scale, offset) = bytemuck::cast_slice::<u8, f32>(params).split_at(c);
        let before: usize = shapes[..i].iter().map(|s| s.iter().product::<usize>()).sum();
        let q0 = self.data_start + 8 * chans_all + before;
        FeatSlice::Q8(Q8Slice { q: &self.map[q0..q0 + c * h * w], scale, offset })
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
        for dtype in Dtype::ALL {
            let bytes = encode(&[a.view(), b.view()], meta(), dtype);
            let p = dir.path().join(dtype.name());
            std::fs::write(&p, &bytes).unwrap();
            let e = Entry::open(&p).unwrap();
            assert_eq!(e.header.letterbox, meta());
            assert_eq!(e.header.dtype, dtype);
            assert_eq!(bytes.len(), e.data_start + payload_bytes(dtype, &[[2, 3, 4], [4, 1, 2]]) + 32);
            // q8: half a step of the widest channel (b's, 0.5 over 255 steps)
            let tol = match dtype {
                Dtype::F32 => 0.0,
                Dtype::F16 => 2e-3,
                Dtype::Q8 => 0.5 / 255.0 * 0.5 * 1.001,
            };
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

    #[test]
    fn q8_levels_lend_per_channel_codes_and_read_like_their_f32_copy() {
        use crate::autograd::Tape;
        let a = Array3::from_shape_fn((5, 3, 7), |(c, y, x)| ((c * 31 + y * 7 + x * 3) % 13) as f32 * 0.2 - 0.28 * c as f32);
        let b = Array3::from_shape_fn((3, 2, 2), |(c, y, x)| (c + y) as f32 - x as f32 * 0.25);
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<Arc<Entry>> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("{i}.feat"));
                let a = &a + i as f32 * 0.5;
                std::fs::write(&p, encode(&[a.view(), b.view()], meta(), Dtype::Q8)).unwrap();
                Arc::new(Entry::open(&p).unwrap())
            })
            .collect();
        let FeatSlice::Q8(q) = entries[0].level_raw(1) else { panic!("a q8 entry lends q8") };
        assert_eq!((q.scale.len(), q.offset.len(), q.q.len()), (3, 3, 12));
        // channel 0 of b is 0, 0, 1, 1 less 0.25 at x = 1: min -0.25, max 1
        assert_eq!(q.offset[0], -0.25);
        assert!((q.scale[0] - 1.25 / 255.0).abs() < 1e-7);
        // the fused ops read a lent q8 batch exactly as its dequantised f32 copy
        let lent = lend_level(&entries, 0).unwrap();
        let copy = Features::from_array(lent.to_array());
        let w = ndarray::Array2::from_shape_fn((6, 5), |(j, c)| (j as f32 - c as f32) * 0.1).into_dyn();
        let bias = ndarray::Array1::from_shape_fn(6, |j| j as f32 * 0.01).into_dyn();
        let run = |f: Features| {
            let mut t = Tape::new();
            let (x, wv, bv) = (t.input(f), t.param(w.clone()), t.param(bias.clone()));
            let y = t.conv1x1_channels(x, wv, bv, &[1, 4]);
            let z = t.conv1x1_at(x, wv, bv, &[(0, 3, 1), (1, 20, 0), (1, 5, 1)], 2);
            let o = t.obj_bce_on_features(x, wv, bv, &[4, 5], &[(2, 1.0), (30, 0.5)], 1.0);
            let (sy, sz) = (t.sum(y), t.sum(z));
            let s = t.add(sy, sz);
            let total = t.add(s, o);
            let mut g = t.backward(total);
            (t.value(y).clone(), t.value(z).clone(), t.value(o).clone(), g.take(wv).unwrap(), g.take(bv).unwrap())
        };
        let (q8, f32s) = (run(lent), run(copy));
        assert_eq!(q8.0, f32s.0);
        assert_eq!(q8.1, f32s.1);
        assert_eq!(q8.2, f32s.2);
        assert_eq!(q8.3, f32s.3);
        assert_eq!(q8.4, f32s.4);
    }
}
