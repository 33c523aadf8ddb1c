//! Cached features and YOLO labels in; training samples and mini-batches out.
//!
//! Labels are moved into the letterboxed frame as YOLOv5's dataloader moves
//! them (`val::letterboxed_targets`), so the loss sees the same targets as
//! train.py does without augmentation.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use ndarray::Array2;
use rayon::prelude::*;

use crate::cache::entry::{EntryHeader, lend_level};
use crate::cache::{Dtype, Entry, FeatureCache, image_key};
use crate::features::Features;
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

/// An image, its entry (path and header) if cached, and its labels.
type Found = (PathBuf, Option<(PathBuf, EntryHeader)>, data::Labels);

/// Matches images to their verified cache entries and reads their labels.
/// Entries whose key is in `written_now` were written by this process a
/// moment ago and are not checksummed again.
pub fn load_split(cache: &FeatureCache, images: &[PathBuf], nc: usize, dtype: Dtype, written_now: &HashSet<String>) -> Result<SplitData> {
    let found: Vec<_> = images
        .par_iter()
        .map(|img| -> Result<Found> {
            let key = std::fs::read(img).map(|b| image_key(&b)).ok();
            let entry = key.and_then(|k| {
                let p = cache.entry_path(&k, dtype);
                let e = if written_now.contains(&k) { Entry::open_written_now(&p) } else { Entry::open(&p) };
                // only the header is kept: the mapping goes at once
                e.ok().map(|e| (p, e.header))
            });
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
            Some((path, header)) => {
                if out.shapes.is_empty() {
                    out.shapes = header.shapes.clone();
                }
                let lb = header.letterbox;
                let t = crate::val::letterboxed_targets(&labels.boxes, &lb);
                let targets = t.rows().into_iter().map(|r| [r[0], r[1], r[2], r[3], r[4]]).collect();
                out.samples.push(Sample { targets, image: img, entry: path });
            }
        }
    }
    Ok(out)
}

/// One mini-batch: per level the features `[bs, C, H*W]` lent straight from
/// the memory-mapped cache entries (NCHW, the cache's dtype, no copy) and
/// targets `[nt, 6]` = `(image in batch, class, x, y, w, h)`.
pub struct Batch {
    pub feats: Vec<Features>,
    pub targets: Array2<f32>,
    pub bs: usize,
}

/// Maps a mini-batch's entries (verified earlier by `load_split`).
pub fn load_batch(samples: &[&Sample], shapes: &[[usize; 3]], dtype: Dtype) -> Result<Batch> {
    let bs = samples.len();
    let entries: Vec<Arc<Entry>> = samples
        .par_iter()
        .map(|s| {
            let e = Entry::open_verified_before(&s.entry)?;
            if e.header.dtype != dtype || e.header.shapes != shapes {
                bail!("cache entry {} holds {} features of shapes {:?}, expected {} {:?}", s.entry.display(), e.header.dtype.name(), e.header.shapes, dtype.name(), shapes);
            }
            Ok(Arc::new(e))
        })
        .collect::<Result<_>>()?;
    let feats = (0..shapes.len()).map(|level| lend_level(&entries, level)).collect::<Result<Vec<_>>>()?;
    Ok(Batch { feats, targets: targets_of(samples), bs })
}

/// The batch's targets `[n, 6]`: image index, class, x, y, w, h.
pub fn targets_of(samples: &[&Sample]) -> Array2<f32> {
    let rows: Vec<[f32; 6]> = samples.iter().enumerate().flat_map(|(b, s)| s.targets.iter().map(move |t| [b as f32, t[0], t[1], t[2], t[3], t[4]])).collect();
    Array2::from_shape_vec((rows.len(), 6), rows.into_iter().flatten().collect()).expect("6 values a row")
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
