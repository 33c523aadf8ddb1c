//! A seed in; a synthetic detection dataset out, in the Ultralytics layout.
//!
//! The images are those the demo model was pretrained on
//! (tools/make_demo_model.py): 256x256, a noisy two-colour gradient background,
//! 1–4 filled, anti-aliased circles, squares and triangles of 28–72 px in red,
//! green or blue. The pretrained model names them by colour and shape (9
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
    let c0: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let c1: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let mut img = RgbImage::new(SIZE, SIZE);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let t = ((x as f32 / SIZE as f32 - 0.5) * dx + (y as f32 / SIZE as f32 - 0.5) * dy + 0.71) / 1.42;
        *p = Rgb(std::array::from_fn(|c| (c0[c] * (1.0 - t) + c1[c] * t + rng.random_range(-20.0..20.0)).clamp(0.0, 255.0) as u8));
    }
    let n = rng.random_range(1..=4);
    let mut objects: Vec<Object> = Vec::new();
    let mut tries = 0;
    while objects.len() < n && tries < 100 {
        tries += 1;
        let s = rng.random_range(28.0..72.0f32);
        let o = Object { shape: rng.random_range(0..3), colour: rng.random_range(0..3), x: rng.random_range(0.0..SIZE as f32 - s), y: rng.random_range(0.0..SIZE as f32 - s), s };
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
        for y in o.y as u32..((o.y + o.s).ceil() as u32).min(SIZE) {
            for x in o.x as u32..((o.x + o.s).ceil() as u32).min(SIZE) {
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
        let (idir, ldir) = (root.join("images").join(split), root.join("labels").join(split));
        std::fs::create_dir_all(&idir).with_context(|| format!("cannot create {}", idir.display()))?;
        std::fs::create_dir_all(&ldir)?;
        for i in 0..n {
            let (img, objects) = image(&mut rng);
            img.save(idir.join(format!("{split}{i:04}.png")))?;
            let lines: String = objects
                .iter()
                .map(|o| format!("{} {:.6} {:.6} {:.6} {:.6}\n", o.colour, (o.x + o.s / 2.0) / SIZE as f32, (o.y + o.s / 2.0) / SIZE as f32, o.s / SIZE as f32, o.s / SIZE as f32))
                .collect();
            std::fs::write(ldir.join(format!("{split}{i:04}.txt")), lines)?;
        }
    }
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
    fn shapes_fill_their_box_as_described() {
        let o = Object { shape: 2, colour: 0, x: 10.0, y: 10.0, s: 40.0 };
        assert!(inside(&o, 30.0, 11.0)); // apex
        assert!(!inside(&o, 11.0, 11.0)); // top-left corner is outside a triangle
        assert!(inside(&o, 11.0, 49.5)); // bottom-left
        let c = Object { shape: 0, ..o };
        assert!(!inside(&c, 11.0, 11.0) && inside(&c, 30.0, 30.0));
    }
}
