//! Cached features and YOLO labels in; training samples and mini-batches out.
//!
//! Labels are moved into the letterboxed frame as YOLOv5's dataloader moves
//! them (`val::letterboxed_targets`), so the loss sees the same targets as
//! train.py does without augmentation.

use std::path::PathBuf;

use anyhow::Result;
use half::f16;
use ndarray::Array2;
use rayon::prelude::*;

use crate::autograd::{FeatData, Features};
use crate::cache::entry::LevelData;
use crate::cache::{Dtype, Entry, FeatureCache, image_key};
use crate::data;

#[derive(Debug, Clone)]
pub struct Sample {
    pub image: PathBuf,
    pub entry: PathBuf,
    /// `[class, x, y, w, h]` normalised to the letterboxed square.
    pub targets: Vec<[f32; 5]>,
}

#[derive(Debug, Default)]
pub struct SplitData {
    pub samples: Vec<Sample>,
    /// Images with no cache entry (they were skipped while caching).
    pub missing: Vec<PathBuf>,
    /// `(label file, line, reason)` of skipped label lines.
    pub bad_lines: Vec<(PathBuf, usize, String)>,
    /// `[C, H, W]` of each level.
    pub shapes: Vec<[usize; 3]>,
}

/// Matches images to their verified cache entries and reads their labels.
pub fn load_split(cache: &FeatureCache, images: &[PathBuf], nc: usize, dtype: Dtype) -> Result<SplitData> {
    let found: Vec<_> = images
        .par_iter()
        .map(|img| -> Result<(PathBuf, Option<(PathBuf, Entry)>, data::Labels)> {
            let key = std::fs::read(img).map(|b| image_key(&b)).ok();
            let entry = key.map(|k| cache.entry_path(&k, dtype)).and_then(|p| Entry::open(&p).ok().map(|e| (p, e)));
            let labels = data::read_labels(&data::label_path(img), nc)?;
            Ok((img.clone(), entry, labels))
        })
        .collect::<Result<_>>()?;
    let mut out = SplitData::default();
    for (img, entry, labels) in found {
        let lp = data::label_path(&img);
        out.bad_lines.extend(labels.skipped.iter().map(|(l, r)| (lp.clone(), *l, r.clone())));
        match entry {
            None => out.missing.push(img),
            Some((path, e)) => {
                if out.shapes.is_empty() {
                    out.shapes = e.header.shapes.clone();
                }
                let lb = e.header.letterbox;
                let t = crate::val::letterboxed_targets(&labels.boxes, &lb);
                let targets = t.rows().into_iter().map(|r| [r[0], r[1], r[2], r[3], r[4]]).collect();
                out.samples.push(Sample { targets, image: img, entry: path });
            }
        }
    }
    Ok(out)
}

/// One mini-batch: per level the features `[bs, C, H*W]` as cached (NCHW, the
/// cache's dtype) and targets `[nt, 6]` = `(image in batch, class, x, y, w, h)`.
pub struct Batch {
    pub feats: Vec<Features>,
    pub targets: Array2<f32>,
    pub bs: usize,
}

/// Reads a mini-batch, reusing `bufs` (the previous batch's features) when
/// they fit: a fresh allocation per batch costs more in page faults than the
/// head's arithmetic on it. The values are copied as stored, f16 stays f16.
pub fn load_batch(samples: &[&Sample], shapes: &[[usize; 3]], dtype: Dtype, mut bufs: Vec<Features>) -> Result<Batch> {
    let bs = samples.len();
    bufs.truncate(shapes.len());
    let mut feats: Vec<Features> = Vec::with_capacity(shapes.len());
    let mut old = bufs.into_iter();
    for &[c, h, w] in shapes {
        let n = bs * c * h * w;
        let data = match (old.next().map(|f| f.data), dtype) {
            (Some(FeatData::F16(mut v)), Dtype::F16) => {
                v.resize(n, f16::ZERO);
                FeatData::F16(v)
            }
            (Some(FeatData::F32(mut v)), Dtype::F32) => {
                v.resize(n, 0.0);
                FeatData::F32(v)
            }
            (_, Dtype::F16) => FeatData::F16(vec![f16::ZERO; n]),
            (_, Dtype::F32) => FeatData::F32(vec![0.0; n]),
        };
        feats.push(Features { data, bs, cin: c, sp: h * w });
    }
    // Each image fills its own part of every level, in parallel.
    let mut per_image: Vec<Vec<ImageSlot>> = (0..bs).map(|_| Vec::new()).collect();
    for f in feats.iter_mut() {
        let per = f.cin * f.sp;
        match &mut f.data {
            FeatData::F16(v) => v.chunks_mut(per).zip(per_image.iter_mut()).for_each(|(c, p)| p.push(ImageSlot::F16(c))),
            FeatData::F32(v) => v.chunks_mut(per).zip(per_image.iter_mut()).for_each(|(c, p)| p.push(ImageSlot::F32(c))),
        }
    }
    per_image.into_par_iter().zip(samples.par_iter()).try_for_each(|(outs, s)| -> Result<()> {
        let e = Entry::open_verified_before(&s.entry)?;
        for (l, out) in outs.into_iter().enumerate() {
            match (e.level_raw(l), out) {
                (LevelData::F16(src), ImageSlot::F16(dst)) => dst.copy_from_slice(src),
                (LevelData::F32(src), ImageSlot::F32(dst)) => dst.copy_from_slice(src),
                _ => anyhow::bail!("cache entry {} is not {}", s.entry.display(), dtype.name()),
            }
        }
        Ok(())
    })?;
    let rows: Vec<[f32; 6]> = samples.iter().enumerate().flat_map(|(b, s)| s.targets.iter().map(move |t| [b as f32, t[0], t[1], t[2], t[3], t[4]])).collect();
    let targets = Array2::from_shape_vec((rows.len(), 6), rows.into_iter().flatten().collect())?;
    Ok(Batch { feats, targets, bs })
}

enum ImageSlot<'a> {
    F16(&'a mut [f16]),
    F32(&'a mut [f32]),
}

#[cfg(test)]
mod tests {
    use crate::data::Label;
    use crate::preprocess::LetterboxMeta;

    #[test]
    fn labels_follow_the_letterbox() {
        // 200x100 image into 100: resized 100x50, padded 25 top and bottom
        let lb = LetterboxMeta { shape0: [100, 200], resized: [50, 100], pad: [0.0, 25.0], imgsz: 100 };
        let t = crate::val::letterboxed_targets(&[Label { class: 2, xywh: [0.5, 0.5, 0.2, 0.4] }], &lb);
        let [c, x, y, w, h] = [t[[0, 0]], t[[0, 1]], t[[0, 2]], t[[0, 3]], t[[0, 4]]];
        assert_eq!(c, 2.0);
        assert!((x - 0.5).abs() < 1e-6 && (y - 0.5).abs() < 1e-6);
        assert!((w - 0.2).abs() < 1e-6 && (h - 0.2).abs() < 1e-6);
    }
}
