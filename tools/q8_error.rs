// Diagnostic (not a test): how much `--dtype q8` loses against f16 on real
// features, for both codes `cache::q8` can make (affine: a zero point per
// channel; symmetric: none), on the entries of an f16 cache directory.
// In: a cache graph directory (CACHE_DIR/<graph key>, an f16/ subdirectory of
// entries) and how many entries to read. Out: per level the RMS error over
// the RMS value, the largest error over the channel's range, and the share
// of codes used per channel, for each code.
// Run: cargo run --release --features tools --example q8_error -- CACHE_DIR/<key> [N]

use std::path::PathBuf;

use freezesplit::cache::Entry;
use freezesplit::cache::q8::{Q8Mode, quantise};
use freezesplit::features::Q8Slice;

#[derive(Default, Clone)]
struct Stats {
    err2: f64,
    val2: f64,
    worst_rel: f64,
    codes_used: f64,
    channels: usize,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).ok_or_else(|| anyhow::anyhow!("usage: q8_error CACHE_DIR/<graph key> [N]"))?);
    let n: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let mut files: Vec<PathBuf> = walk(&dir.join("f16"))?;
    files.sort();
    files.truncate(n);
    anyhow::ensure!(!files.is_empty(), "no f16 entries under {}", dir.join("f16").display());
    let modes = [Q8Mode::Affine, Q8Mode::Symmetric];
    let mut stats: Vec<[Stats; 2]> = Vec::new();
    for f in &files {
        let e = Entry::open(f)?;
        for (i, &[c, h, w]) in e.header.shapes.iter().enumerate() {
            if stats.len() <= i {
                stats.push(Default::default());
            }
            let x = e.level(i);
            let x = x.as_slice().unwrap();
            let sp = h * w;
            for (m, mode) in modes.iter().enumerate() {
                let (mut s, mut z, mut q) = (vec![0.0; c], vec![0.0; c], vec![0u8; c * sp]);
                quantise(x, sp, *mode, &mut s, &mut z, &mut q);
                let mut back = vec![0.0; c * sp];
                Q8Slice { q: &q, scale: &s, offset: &z }.dequantise_into(&mut back);
                let st = &mut stats[i][m];
                for ch in 0..c {
                    let r = ch * sp..(ch + 1) * sp;
                    let (lo, hi) = x[r.clone()].iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                    let (mut used, mut worst) = ([false; 256], 0f64);
                    for (k, (a, b)) in x[r.clone()].iter().zip(&back[r.clone()]).enumerate() {
                        let d = (a - b) as f64;
                        st.err2 += d * d;
                        st.val2 += (*a as f64) * (*a as f64);
                        worst = worst.max(d.abs());
                        used[q[r.start + k] as usize] = true;
                    }
                    if hi > lo {
                        st.worst_rel = st.worst_rel.max(worst / (hi - lo) as f64);
                    }
                    st.codes_used += used.iter().filter(|&&u| u).count() as f64 / 256.0;
                    st.channels += 1;
                }
            }
        }
    }
    println!("{} entries of {}", files.len(), dir.display());
    println!("level  code       rms err / rms value  max err / channel range  codes used per channel");
    for (i, lv) in stats.iter().enumerate() {
        for (m, st) in lv.iter().enumerate() {
            println!("{i:>5}  {:<9}  {:>19.5}  {:>23.5}  {:>22.3}", format!("{:?}", modes[m]), (st.err2 / st.val2).sqrt(), st.worst_rel, st.codes_used / st.channels as f64);
        }
    }
    Ok(())
}

fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir)? {
        let p = d?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else if p.extension().is_some_and(|e| e == "feat") {
            out.push(p);
        }
    }
    Ok(out)
}
