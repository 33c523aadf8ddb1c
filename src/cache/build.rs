//! Filling the cache: image paths in; entries on disk and a count of computed /
//! already cached / skipped images out.
//!
//! A producer thread reads, hashes, decodes and letterboxes images in parallel
//! (rayon) while engine threads run and encode the previous batches and a
//! writer thread writes the ones before, so the engines never wait for the
//! CPU work around them. Images that cannot be read (or are no regular file),
//! decoded, or are above the pixel limit are skipped with a warning naming
//! the file, and counted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use crossbeam_channel::{bounded, unbounded};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::Array4;
use rayon::prelude::*;
use serde::Serialize;

use super::{Dtype, FeatureCache, entry, image_key};
use crate::engine::Engine;
use crate::preprocess::{self, Letterboxed};

#[derive(Debug, Clone)]
pub struct FillOptions {
    pub batch_size: usize,
    pub dtype: Dtype,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FillReport {
    pub images: usize,
    pub computed: usize,
    pub cached: usize,
    pub skipped: usize,
    pub skipped_images: Vec<SkippedImage>,
    pub seconds: f64,
    /// Size of one newly written entry, when any was written.
    pub bytes_per_image: Option<usize>,
    /// Image keys of the entries this fill wrote.
    #[serde(skip)]
    pub written: Vec<String>,
}

enum Prepared {
    Cached,
    Skipped(String),
    Ready(String, Letterboxed),
}

fn prepare(cache: &FeatureCache, path: &Path, dtype: Dtype, imgsz: usize) -> Prepared {
    let bytes = match crate::fsutil::read_regular(path) {
        Ok(b) => b,
        Err(e) => return Prepared::Skipped(format!("cannot read it ({e})")),
    };
    let key = image_key(&bytes);
    if cache.get(&key, dtype).is_some() {
        return Prepared::Cached;
    }
    match preprocess::decode_bytes(&bytes) {
        Ok(img) => Prepared::Ready(key, preprocess::letterbox_owned(img, imgsz)),
        Err(e) => Prepared::Skipped(format!("{e:#}")),
    }
}

/// Computes every missing entry for `images`, running the engines side by
/// side on alternate batches (see `Engine::for_fill`).
pub fn fill(cache: &FeatureCache, engines: &mut [Engine], images: &[PathBuf], opts: &FillOptions) -> Result<FillReport> {
    assert!(!engines.is_empty(), "fill needs an engine");
    let start = Instant::now();
    let imgsz = cache.info.imgsz;
    let batch = opts.batch_size.max(1);
    let bar = if opts.progress { ProgressBar::with_draw_target(Some(images.len() as u64), ProgressDrawTarget::stderr()) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}").unwrap().progress_chars("=> "));
    let sessions = if engines.len() > 1 { format!(", {} sessions", engines.len()) } else { String::new() };
    bar.set_message(format!("caching features ({}{sessions})", engines[0].name()));
    let report = std::sync::Mutex::new(FillReport { images: images.len(), ..Default::default() });

    // Three stages so the engines never wait on the CPU work around them:
    // producer (read, hash, decode, letterbox, build the input tensor) →
    // engines (a thread each; they also encode each image's entry straight
    // from the engine's output memory) → writer (atomic writes).
    let plane = 3 * imgsz * imgsz;
    let (bytes_per_image, written) = std::thread::scope(|scope| -> Result<(Option<usize>, Vec<String>)> {
        let (tx, rx) = bounded::<(Vec<(PathBuf, Prepared)>, Option<Array4<f32>>)>(2);
        // input tensors go back to the producer for reuse: fresh ones cost
        // page faults and zeroing for nothing
        let (back_tx, back_rx) = unbounded::<Vec<f32>>();
        scope.spawn(move || {
            for chunk in images.chunks(batch) {
                let prepared: Vec<_> = chunk.par_iter().map(|p| (p.clone(), prepare(cache, p, opts.dtype, imgsz))).collect();
                let lbs: Vec<&Letterboxed> = prepared.iter().filter_map(|(_, p)| if let Prepared::Ready(_, lb) = p { Some(lb) } else { None }).collect();
                let input = (!lbs.is_empty()).then(|| {
                    let mut buf = back_rx.try_recv().unwrap_or_default();
                    buf.resize(lbs.len() * plane, 0.0);
                    buf.par_chunks_mut(plane).zip(&lbs).for_each(|(dst, lb)| lb.write_chw(dst));
                    Array4::from_shape_vec((lbs.len(), 3, imgsz, imgsz), buf).expect("input buffer has the batch's size")
                });
                if tx.send((prepared, input)).is_err() {
                    break; // the consumers failed; stop early
                }
            }
        });
        let (wtx, wrx) = bounded::<Vec<(String, Vec<u8>)>>(2);
        let writer = scope.spawn(move || -> Result<(Option<usize>, Vec<String>)> {
            let (mut bytes_per_image, mut written) = (None, Vec::new());
            for ready in wrx {
                for (key, bytes) in ready {
                    // entries carry a checksum: no need to wait for the disk
                    crate::fsutil::write_atomic_unsynced(&cache.entry_path(&key, opts.dtype), &bytes)?;
                    bytes_per_image = Some(bytes.len());
                    written.push(key);
                }
            }
            Ok((bytes_per_image, written))
        });
        let workers: Vec<_> = engines
            .iter_mut()
            .map(|engine| {
                let (rx, wtx, back_tx, bar, report) = (rx.clone(), wtx.clone(), back_tx.clone(), &bar, &report);
                scope.spawn(move || -> Result<()> {
                    for (chunk, input) in rx {
                        let mut ready = Vec::new();
                        {
                            let mut r = report.lock().unwrap();
                            for (path, p) in chunk {
                                match p {
                                    Prepared::Cached => r.cached += 1,
                                    Prepared::Skipped(reason) => {
                                        bar.suspend(|| eprintln!("warning: skipping {}: {reason}", path.display()));
                                        r.skipped_images.push(SkippedImage { path, reason });
                                    }
                                    Prepared::Ready(key, lb) => ready.push((key, lb.meta)),
                                }
                            }
                            bar.set_position((r.cached + r.skipped_images.len() + r.computed) as u64);
                        }
                        let Some(input) = input else { continue };
                        let entries = engine.run_images(input.view(), |b, levels| entry::encode(levels, ready[b].1, opts.dtype))?;
                        let _ = back_tx.send(input.into_raw_vec_and_offset().0);
                        {
                            let mut r = report.lock().unwrap();
                            r.computed += ready.len();
                            bar.set_position((r.cached + r.skipped_images.len() + r.computed) as u64);
                        }
                        let keyed = ready.into_iter().map(|(key, _)| key).zip(entries).collect();
                        if wtx.send(keyed).is_err() {
                            break; // the writer failed; its error is reported below
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop((rx, wtx, back_tx));
        let ran: Vec<Result<()>> = workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an engine thread panicked")))).collect();
        let written = writer.join().map_err(|_| anyhow::anyhow!("the cache writer thread panicked"))?;
        for r in ran {
            r?;
        }
        written
    })?;
    let mut report = report.into_inner().unwrap();
    report.bytes_per_image = bytes_per_image;
    report.written = written;
    report.skipped_images.sort_by(|a, b| a.path.cmp(&b.path));
    bar.finish_and_clear();
    report.skipped = report.skipped_images.len();
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
