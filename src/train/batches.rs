//! Cached features and YOLO labels in; training samples and mini-batches out.
//!
//! Labels are moved into the letterboxed frame as YOLOv5's dataloader moves
//! them (`val::letterboxed_targets`), so the loss sees the same targets as
//! train.py does without augmentation.
//!
//! `ReadAhead` asks the kernel for the entries of the batches ahead while the
//! current one trains: a cache bigger than the page cache is then read from
//! disk while the head computes, not page fault by page fault when a batch
//! is mapped (issue 13).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

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

/// Reads the entries of coming batches into the page cache in a background
/// thread, about `read_ahead_bytes()` (at least one batch) ahead of the batch
/// that trains. Why a thread and `posix_fadvise(WILLNEED)`, not a read:
/// opening an entry can block on its inode and extent blocks, which the
/// training thread must not wait for; the advice then queues the whole
/// file's reads at once and returns, so the disk has many requests in flight
/// and the pages stay where `Entry`'s map finds them (no copy, no anonymous
/// memory). Why a window in bytes: what hides the disk's hiccups is data in
/// flight, whatever the batch size and dtype. Without a disk to wait for
/// (the cache in RAM) it costs a system call per entry.
pub struct ReadAhead<'a> {
    samples: &'a [Sample],
    batches: &'a [&'a [usize]],
    depth: usize,
    tx: Option<crossbeam_channel::Sender<Vec<PathBuf>>>,
    worker: Option<JoinHandle<()>>,
}

/// The read-ahead window: `$FREEZESPLIT_READ_AHEAD_MB` MiB, default 48 (two
/// f16 batches of 16 at 640, four of q8).
/// Bounded by what the page cache may hold: a window it cannot keep is
/// evicted before it is read.
pub fn read_ahead_bytes() -> u64 {
    std::env::var("FREEZESPLIT_READ_AHEAD_MB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(48) << 20
}

impl<'a> ReadAhead<'a> {
    /// For an epoch over `batches` (indices into `samples`); `enabled` false
    /// (an epoch that reads no entries) or a window of 0 makes every `at` a
    /// no-op.
    pub fn new(samples: &'a [Sample], batches: &'a [&'a [usize]], enabled: bool) -> ReadAhead<'a> {
        Self::with_window(samples, batches, if enabled { read_ahead_bytes() } else { 0 })
    }

    fn with_window(samples: &'a [Sample], batches: &'a [&'a [usize]], window: u64) -> ReadAhead<'a> {
        // entries of one cache are all of one size: the first batch's first tells
        let entry_bytes = batches.first().and_then(|b| b.first()).and_then(|&j| std::fs::metadata(&samples[j].entry).ok()).map_or(0, |m| m.len());
        let batch_bytes = entry_bytes * batches.first().map_or(0, |b| b.len()) as u64;
        let depth = if window == 0 || batch_bytes == 0 { 0 } else { window.div_ceil(batch_bytes) as usize };
        let (tx, worker) = if depth > 0 {
            let (tx, rx) = crossbeam_channel::unbounded::<Vec<PathBuf>>();
            let worker = std::thread::Builder::new().name("cache-read-ahead".into()).spawn(move || rx.iter().flatten().for_each(|p| will_need(&p))).ok();
            (worker.is_some().then_some(tx), worker)
        } else {
            (None, None)
        };
        let ahead = ReadAhead { samples, batches, depth, tx, worker };
        for b in 0..depth {
            ahead.ask(b);
        }
        ahead
    }

    /// Batch `i` is about to train: asks for the batch that enters the window.
    pub fn at(&self, i: usize) {
        if self.depth > 0 {
            self.ask(i + self.depth);
        }
    }

    fn ask(&self, b: usize) {
        if let (Some(tx), Some(batch)) = (&self.tx, self.batches.get(b)) {
            let _ = tx.send(batch.iter().map(|&j| self.samples[j].entry.clone()).collect());
        }
    }
}

impl Drop for ReadAhead<'_> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Asks the kernel to read the whole file into the page cache, without
/// waiting for it. Only advice: a file that cannot be opened (it will fail,
/// with its name, where the batch is mapped) is passed over.
fn will_need(path: &std::path::Path) {
    #[cfg(target_os = "linux")]
    if let Ok(f) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the advice reads nothing into our memory.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

/// The batch's targets `[n, 6]`: image index, class, x, y, w, h.
pub fn targets_of(samples: &[&Sample]) -> Array2<f32> {
    let rows: Vec<[f32; 6]> = samples.iter().enumerate().flat_map(|(b, s)| s.targets.iter().map(move |t| [b as f32, t[0], t[1], t[2], t[3], t[4]])).collect();
    Array2::from_shape_vec((rows.len(), 6), rows.into_iter().flatten().collect()).expect("6 values a row")
}

#[cfg(test)]
mod tests {
    use super::{ReadAhead, Sample};
    use crate::data::Label;
    use crate::preprocess::LetterboxMeta;

    /// The fraction of `path`'s pages in the page cache (mincore).
    #[cfg(target_os = "linux")]
    fn resident(path: &std::path::Path) -> f64 {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: the test's own file, not modified while mapped; the map is only probed
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let page = 4096;
        let mut v = vec![0u8; map.len().div_ceil(page)];
        // SAFETY: v has a byte per page of the mapping
        assert_eq!(unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), v.as_mut_ptr()) }, 0);
        v.iter().filter(|&&b| b & 1 == 1).count() as f64 / v.len() as f64
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn read_ahead_reads_the_batches_ahead_into_the_page_cache() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let samples: Vec<Sample> = (0..4)
            .map(|i| {
                let entry = dir.path().join(format!("{i}.feat"));
                let bytes: Vec<u8> = (0..4u32 << 20).map(|k| (k.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8).collect();
                std::fs::write(&entry, bytes).unwrap();
                let f = std::fs::File::open(&entry).unwrap();
                f.sync_all().unwrap();
                // SAFETY: a valid descriptor; clean pages are dropped from the page cache
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                Sample { image: entry.clone(), entry, targets: vec![] }
            })
            .collect();
        if samples.iter().any(|s| resident(&s.entry) > 0.0) {
            eprintln!("skipped: {} keeps its files in memory (tmpfs?), nothing to read ahead", dir.path().display());
            return;
        }
        let batches: Vec<&[usize]> = vec![&[0], &[1], &[2, 3]];
        let settled = |want: [bool; 4]| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let now: Vec<bool> = samples.iter().map(|s| resident(&s.entry) == 1.0).collect();
                if now == want || std::time::Instant::now() > deadline {
                    return now;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        // disabled: nothing is read
        drop(ReadAhead::new(&samples, &batches, false));
        assert_eq!(settled([false; 4]), [false; 4]);
        // a window of two batches (4 MiB entries): both at once, the next when batch 0 trains
        let ahead = ReadAhead::with_window(&samples, &batches, 8 << 20);
        assert_eq!(settled([true, true, false, false]), [true, true, false, false]);
        ahead.at(0);
        ahead.at(1);
        drop(ahead);
        assert_eq!(settled([true; 4]), [true; 4]);
    }

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
