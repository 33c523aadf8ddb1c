//! A seed in; a synthetic detection dataset out, in the Ultralytics layout.
//!
//! The images are those the demo model was pretrained on
//! (tools/make_demo_model.py): 256x256, a noisy two-colour gradient background,
//! 1–4 filled, anti-aliased circles, squares and triangles of 28–72 px in red,
//! green or blue. `large_dataset` draws the same scenes at another size
//! (objects scaled with it) as PNG or JPEG, in parallel, for cache benchmarks
//! of many images (tools/make_synth.rs). The pretrained model names them by colour and shape (9
//! classes, "red circle" …); the demo's dataset names the same objects by
//! colour only, a new class set for the head to learn.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const SIZE: u32 = 256;
pub const COLOURS: [(&str, [u8; 3]); 3] = [("red", [220, 40, 40]), ("green", [40, 180, 60]), ("blue", [40, 80, 220])];

#[derive(Debug, Clone, Copy)]
struct Object {
    shape: usize,
    colour: usize,
    /// x1, y1, side
    x: f32,
    y: f32,
    s: f32,
}

fn iou(a: &Object, b: &Object) -> f32 {
    let ix = (a.x + a.s).min(b.x + b.s) - a.x.max(b.x);
    let iy = (a.y + a.s).min(b.y + b.s) - a.y.max(b.y);
    let inter = ix.max(0.0) * iy.max(0.0);
    inter / (a.s * a.s + b.s * b.s - inter)
}

fn inside(o: &Object, px: f32, py: f32) -> bool {
    let (cx, cy, r) = (o.x + o.s / 2.0, o.y + o.s / 2.0, o.s / 2.0);
    match o.shape {
        0 => (px - cx).powi(2) + (py - cy).powi(2) <= r * r,
        1 => px >= o.x && px <= o.x + o.s && py >= o.y && py <= o.y + o.s,
        _ => {
            // apex at top centre, base along the bottom edge
            let t = (py - o.y) / o.s;
            (0.0..=1.0).contains(&t) && (px - cx).abs() <= t * r
        }
    }
}

/// One image and its objects.
fn image(rng: &mut ChaCha8Rng) -> (RgbImage, Vec<Object>) {
    image_at(rng, SIZE)
}

/// One `size`x`size` image; objects are 28–72 px scaled by `size / 256`.
/// At 256 it draws exactly the demo's images (the background noise draws
/// one number per pixel, so other sizes give other scenes).
fn image_at(rng: &mut ChaCha8Rng, size: u32) -> (RgbImage, Vec<Object>) {
    let scale = size as f32 / SIZE as f32;
    let c0: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let c1: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let mut img = RgbImage::new(size, size);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let t = ((x as f32 / size as f32 - 0.5) * dx + (y as f32 / size as f32 - 0.5) * dy + 0.71) / 1.42;
        *p = Rgb(std::array::from_fn(|c| (c0[c] * (1.0 - t) + c1[c] * t + rng.random_range(-20.0..20.0)).clamp(0.0, 255.0) as u8));
    }
    let n = rng.random_range(1..=4);
    let mut objects: Vec<Object> = Vec::new();
    let mut tries = 0;
    while objects.len() < n && tries < 100 {
        tries += 1;
        let s = rng.random_range(28.0..72.0f32) * scale;
        let o = Object { shape: rng.random_range(0..3), colour: rng.random_range(0..3), x: rng.random_range(0.0..size as f32 - s), y: rng.random_range(0.0..size as f32 - s), s };
        if objects.iter().all(|p| iou(p, &o) <= 0.1) {
            objects.push(o);
        }
    }
    for o in &objects {
        let base = COLOURS[o.colour].1;
        let fill: [u8; 3] = std::array::from_fn(|c| (base[c] as i32 + rng.random_range(-20..=20)).clamp(0, 255) as u8);
        // Edges anti-aliased by 4x4 supersampled coverage, like the
        // pretraining images (OpenCV's LINE_AA): a detector trained on soft
        // edges finds hard-edged shapes less well.
        for y in o.y as u32..((o.y + o.s).ceil() as u32).min(size) {
            for x in o.x as u32..((o.x + o.s).ceil() as u32).min(size) {
                let hits = (0..16).filter(|k| inside(o, x as f32 + (k % 4) as f32 / 4.0 + 0.125, y as f32 + (k / 4) as f32 / 4.0 + 0.125)).count();
                if hits > 0 {
                    let cov = hits as f32 / 16.0;
                    let bg = img.get_pixel(x, y).0;
                    img.put_pixel(x, y, Rgb(std::array::from_fn(|c| (bg[c] as f32 * (1.0 - cov) + fill[c] as f32 * cov).round() as u8)));
                }
            }
        }
    }
    (img, objects)
}

/// Writes `n_train` + `n_val` images labelled by colour under `root` and
/// returns the data.yaml path.
pub fn colour_dataset(root: &Path, n_train: usize, n_val: usize, seed: u64) -> Result<PathBuf> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (split, n) in [("train", n_train), ("val", n_val)] {
        let (idir, ldir) = split_dirs(root, split)?;
        for i in 0..n {
            let (img, objects) = image(&mut rng);
            img.save(idir.join(format!("{split}{i:04}.png")))?;
            std::fs::write(ldir.join(format!("{split}{i:04}.txt")), label_lines(&objects, SIZE))?;
        }
    }
    write_yaml(root)
}

/// Image format of `large_dataset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    /// JPEG at this quality (1–100).
    Jpeg(u8),
}

/// Writes `n_train` + `n_val` `size`x`size` images like the demo's (objects
/// scaled with the size) under `root`, in parallel, and returns the
/// data.yaml path. Image `i` of a split draws from its own ChaCha stream of
/// `seed`, so the result does not depend on the thread count; it is not the
/// demo's dataset even at 256.
pub fn large_dataset(root: &Path, n_train: usize, n_val: usize, seed: u64, size: u32, format: ImageFormat) -> Result<PathBuf> {
    use rayon::prelude::*;
    anyhow::ensure!((32..=8192).contains(&size), "synthetic image size {size} is out of range: give 32 to 8192 pixels");
    let ext = if format == ImageFormat::Png { "png" } else { "jpg" };
    for (s, (split, n)) in [("train", n_train), ("val", n_val)].into_iter().enumerate() {
        let (idir, ldir) = split_dirs(root, split)?;
        (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(((s as u64) << 40) | i as u64);
            let (img, objects) = image_at(&mut rng, size);
            let path = idir.join(format!("{split}{i:06}.{ext}"));
            match format {
                ImageFormat::Png => img.save(&path)?,
                ImageFormat::Jpeg(q) => {
                    let f = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?);
                    img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(f, q.clamp(1, 100)))?;
                }
            }
            std::fs::write(ldir.join(format!("{split}{i:06}.txt")), label_lines(&objects, size))?;
            Ok(())
        })?;
    }
    write_yaml(root)
}

fn split_dirs(root: &Path, split: &str) -> Result<(PathBuf, PathBuf)> {
    let (idir, ldir) = (root.join("images").join(split), root.join("labels").join(split));
    std::fs::create_dir_all(&idir).with_context(|| format!("cannot create {}", idir.display()))?;
    std::fs::create_dir_all(&ldir).with_context(|| format!("cannot create {}", ldir.display()))?;
    Ok((idir, ldir))
}

/// YOLO label rows (class, normalised centre and size) of an image's objects.
fn label_lines(objects: &[Object], size: u32) -> String {
    let z = size as f32;
    objects.iter().map(|o| format!("{} {:.6} {:.6} {:.6} {:.6}\n", o.colour, (o.x + o.s / 2.0) / z, (o.y + o.s / 2.0) / z, o.s / z, o.s / z)).collect()
}

fn write_yaml(root: &Path) -> Result<PathBuf> {
    let yaml = root.join("data.yaml");
    let names: Vec<String> = COLOURS.iter().enumerate().map(|(i, (n, _))| format!("  {i}: {n}")).collect();
    std::fs::write(&yaml, format!("# synthetic shapes labelled by colour (freezesplit demo)\npath: .\ntrain: images/train\nval: images/val\nnames:\n{}\n", names.join("\n")))?;
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_dataset() {
        let (a, oa) = image(&mut ChaCha8Rng::seed_from_u64(3));
        let (b, ob) = image(&mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(a, b);
        assert_eq!(oa.len(), ob.len());
        assert!((1..=4).contains(&oa.len()));
        for o in &oa {
            assert!(o.x >= 0.0 && o.x + o.s <= SIZE as f32 && (28.0..72.0).contains(&o.s));
        }
    }

    #[test]
    fn larger_images_scale_their_objects() {
        let (a, oa) = image(&mut ChaCha8Rng::seed_from_u64(5));
        assert_eq!((a, oa.len()), { let (b, ob) = image_at(&mut ChaCha8Rng::seed_from_u64(5), 256); (b, ob.len()) });
        for seed in 0..4 {
            let (b, ob) = image_at(&mut ChaCha8Rng::seed_from_u64(seed), 640);
            assert_eq!(b.dimensions(), (640, 640));
            assert!((1..=4).contains(&ob.len()));
            for q in &ob {
                assert!((70.0..180.0).contains(&q.s) && q.x >= 0.0 && q.y >= 0.0 && q.x + q.s <= 640.0 && q.y + q.s <= 640.0, "{q:?}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let yaml = large_dataset(dir.path(), 3, 1, 9, 640, ImageFormat::Jpeg(90)).unwrap();
        let img = image::open(dir.path().join("images/train/train000002.jpg")).unwrap();
        assert_eq!((img.width(), img.height()), (640, 640));
        let labels = std::fs::read_to_string(dir.path().join("labels/val/val000000.txt")).unwrap();
        assert!(!labels.is_empty() && labels.lines().all(|l| l.split(' ').count() == 5));
        assert!(std::fs::read_to_string(yaml).unwrap().contains("val: images/val"));
        // the same seed draws the same files, whatever the thread interleaving
        let again = tempfile::tempdir().unwrap();
        large_dataset(again.path(), 3, 1, 9, 640, ImageFormat::Jpeg(90)).unwrap();
        for f in ["images/train/train000000.jpg", "labels/train/train000001.txt"] {
            assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), std::fs::read(again.path().join(f)).unwrap());
        }
    }

    #[test]
    fn shapes_fill_their_box_as_described() {
        let o = Object { shape: 2, colour: 0, x: 10.0, y: 10.0, s: 40.0 };
        assert!(inside(&o, 30.0, 11.0)); // apex
        assert!(!inside(&o, 11.0, 11.0)); // top-left corner is outside a triangle
        assert!(inside(&o, 11.0, 49.5)); // bottom-left
        let c = Object { shape: 0, ..o };
        assert!(!inside(&c, 11.0, 11.0) && inside(&c, 30.0, 30.0));
    }
}
