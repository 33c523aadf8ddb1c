//! A large synthetic dataset for cache benchmarks: arguments in; the demo's
//! shapes at another size (default 640), as JPEG (or PNG), under OUT with a
//! data.yaml, out. The frozen forward does not care what is in the images,
//! so they stand in for a real dataset of the same size and format.
//!
//! cargo run --features tools --example make_synth -- OUT N_TRAIN [N_VAL] [--imgsz 640] [--png] [--quality 90] [--seed 0]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use freezesplit::demo::synth::{ImageFormat, large_dataset};

fn main() -> Result<()> {
    let mut pos = Vec::new();
    let (mut size, mut png, mut quality, mut seed) = (640u32, false, 90u8, 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--imgsz" => size = value("--imgsz")?.parse().context("--imgsz must be a whole number")?,
            "--quality" => quality = value("--quality")?.parse().context("--quality must be 1 to 100")?,
            "--seed" => seed = value("--seed")?.parse().context("--seed must be a whole number")?,
            "--png" => png = true,
            f if f.starts_with("--") => bail!("unknown flag {f}; see the usage line at the top of tools/make_synth.rs"),
            _ => pos.push(a),
        }
    }
    let [out, n_train, rest @ ..] = &pos[..] else { bail!("usage: make_synth OUT N_TRAIN [N_VAL] [--imgsz 640] [--png] [--quality 90] [--seed 0]") };
    let n_train: usize = n_train.parse().context("N_TRAIN must be a whole number")?;
    let n_val: usize = rest.first().map_or(Ok(0), |v| v.parse()).context("N_VAL must be a whole number")?;
    let format = if png { ImageFormat::Png } else { ImageFormat::Jpeg(quality) };
    let start = std::time::Instant::now();
    let yaml = large_dataset(&PathBuf::from(out), n_train, n_val, seed, size, format)?;
    eprintln!("{} + {} images at {size} in {:.1}s: {}", n_train, n_val, start.elapsed().as_secs_f64(), yaml.display());
    Ok(())
}
