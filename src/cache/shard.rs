//! Which part of a split one of many cache-filling processes takes: a
//! `--shard I/N` flag or a scheduler's environment in; a `Shard` (I of N,
//! 1-based as GNU split's `-n K/N`) and the images it owns out.
//!
//! An image belongs to shard `1 + h mod N`, `h` the first 8 bytes (LE) of the
//! blake3 hash of its path relative to the dataset root, components joined by
//! `/`. Neither the machine, the mount point of a shared volume nor the order
//! of the listing enters, so N processes on N machines split a split the same
//! way without talking to each other; each reads only its own images. (Rust's
//! own hasher is seeded per process and would not do.)
//!
//! Without `--shard`, a Slurm job array task (`SLURM_ARRAY_TASK_ID` −
//! `SLURM_ARRAY_TASK_MIN`, divided by `SLURM_ARRAY_TASK_STEP` when set, + 1 of
//! `SLURM_ARRAY_TASK_COUNT`) or a Kubernetes Indexed Job pod
//! (`JOB_COMPLETION_INDEX` + 1 of `FREEZESPLIT_SHARD_COUNT`, which the
//! manifest sets to the Job's `completions`: the downward API cannot expose
//! it) takes its shard from the environment. The environment is a parameter
//! so that tests need not change the process's own.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};

/// The variable a Kubernetes Indexed Job's manifest sets to its `completions`.
pub const SHARD_COUNT_VAR: &str = "FREEZESPLIT_SHARD_COUNT";

/// Shard `index` of `count`, `1 <= index <= count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// A shard and where it came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardChoice {
    pub shard: Shard,
    /// `--shard`, or the variables and their values.
    pub source: String,
}

impl Shard {
    /// Parses `--shard I/N`.
    pub fn parse(s: &str) -> Result<Shard> {
        let Some((i, n)) = s.trim().split_once('/') else {
            bail!("--shard `{s}` is malformed: give it as I/N, shard I of N (for example 2/4)");
        };
        let (Ok(index), Ok(count)) = (i.trim().parse::<usize>(), n.trim().parse::<usize>()) else {
            bail!("--shard `{s}` is malformed: I and N in I/N must be whole numbers (for example 2/4)");
        };
        Shard::new(index, count, "--shard")
    }

    fn new(index: usize, count: usize, from: &str) -> Result<Shard> {
        if count == 0 {
            bail!("{from} gives {index}/0: the number of shards N must be at least 1");
        }
        if index == 0 || index > count {
            bail!("{from} gives shard {index} of {count}: I must be from 1 to {count} (shards count from 1, as in GNU split's -n K/N)");
        }
        Ok(Shard { index, count })
    }

    /// Whether the image at `rel` (relative to the dataset root) is this shard's.
    pub fn owns(&self, rel: &Path) -> bool {
        self.count == 1 || shard_of(rel, self.count) == self.index
    }
}

/// The shard (1-based) of `count` that owns the image at `rel`.
pub fn shard_of(rel: &Path, count: usize) -> usize {
    let mut h = blake3::Hasher::new();
    let mut first = true;
    for c in rel.components() {
        let part = match c {
            Component::Normal(p) => p.as_encoded_bytes(),
            Component::ParentDir => b"..",
            Component::CurDir => continue,
            // an absolute path (an image outside the root): hash it as written
            Component::RootDir | Component::Prefix(_) => b"",
        };
        if !first {
            h.update(b"/");
        }
        h.update(part);
        first = false;
    }
    let d = h.finalize();
    let x = u64::from_le_bytes(d.as_bytes()[..8].try_into().unwrap());
    (x % count as u64) as usize + 1
}

/// The images of `images` that `shard` owns, in their order. Paths are
/// taken relative to `root` (the dataset's root); an image outside it
/// (an absolute path in a `.txt` list) is hashed by its full path, which
/// must then be the same on every machine.
pub fn select(images: &[PathBuf], root: &Path, shard: Shard) -> Vec<PathBuf> {
    images.iter().filter(|p| shard.owns(p.strip_prefix(root).unwrap_or(p))).cloned().collect()
}

/// The shard to fill: `--shard` if given, else a Slurm array task's or a
/// Kubernetes Indexed Job pod's, else none (the whole split). `env` looks a
/// variable up (`|k| std::env::var(k).ok()` in the program).
pub fn resolve(flag: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<ShardChoice>> {
    if let Some(f) = flag {
        return Ok(Some(ShardChoice { shard: Shard::parse(f)?, source: "--shard".into() }));
    }
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(id) = var("SLURM_ARRAY_TASK_ID") {
        return slurm(&id, &var).map(Some);
    }
    if let Some(idx) = var("JOB_COMPLETION_INDEX") {
        let Some(count) = var(SHARD_COUNT_VAR) else {
            bail!("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but {SHARD_COUNT_VAR} is not: set it in the manifest to the Job's completions, or pass --shard I/N (--shard 1/1 for the whole split)");
        };
        let (i, n) = (number("JOB_COMPLETION_INDEX", &idx)?, number(SHARD_COUNT_VAR, &count)?);
        let source = format!("JOB_COMPLETION_INDEX={i}, {SHARD_COUNT_VAR}={n}");
        let shard = Shard::new(i + 1, n, &source)?;
        return Ok(Some(ShardChoice { shard, source }));
    }
    Ok(None)
}

fn slurm(id: &str, var: &dyn Fn(&str) -> Option<String>) -> Result<ShardChoice> {
    let need = |k: &str| match var(k) {
        Some(v) => number(k, &v),
        None => bail!("SLURM_ARRAY_TASK_ID is set (a Slurm job array) but {k} is not: run under sbatch --array, or pass --shard I/N (--shard 1/1 for the whole split)"),
    };
    let (id, min, count) = (number("SLURM_ARRAY_TASK_ID", id)?, need("SLURM_ARRAY_TASK_MIN")?, need("SLURM_ARRAY_TASK_COUNT")?);
    let step = match var("SLURM_ARRAY_TASK_STEP") {
        Some(s) => number("SLURM_ARRAY_TASK_STEP", &s)?.max(1),
        None => 1,
    };
    let mut source = format!("SLURM_ARRAY_TASK_ID={id}, SLURM_ARRAY_TASK_MIN={min}, SLURM_ARRAY_TASK_COUNT={count}");
    if step > 1 {
        source += &format!(", SLURM_ARRAY_TASK_STEP={step}");
    }
    if id < min || !(id - min).is_multiple_of(step) {
        bail!("{source} is not a task of a contiguous array: give sbatch a range such as --array=0-{}, or pass --shard I/N", count.saturating_sub(1));
    }
    let shard = Shard::new((id - min) / step + 1, count, &source).map_err(|e| anyhow::anyhow!("{e:#}; give sbatch a range such as --array=0-{} (not a list), or pass --shard I/N", count.saturating_sub(1)))?;
    Ok(ShardChoice { shard, source })
}

fn number(var: &str, v: &str) -> Result<usize> {
    v.trim().parse().map_err(|_| anyhow::anyhow!("{var}=`{v}` is not a whole number; fix the variable or pass --shard I/N"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    fn err(r: Result<impl fmt::Debug>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn parse_accepts_i_of_n_and_refuses_the_rest_clearly() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        assert_eq!(Shard::parse(" 1/1 ").unwrap(), Shard { index: 1, count: 1 });
        assert!(err(Shard::parse("0/4")).contains("I must be from 1 to 4"));
        assert!(err(Shard::parse("5/4")).contains("shard 5 of 4"));
        assert!(err(Shard::parse("1/0")).contains("at least 1"));
        assert!(err(Shard::parse("0/0")).contains("at least 1"));
        for bad in ["2", "a/4", "2/", "/4", "-1/4", "2/4/8", "1.5/4"] {
            let e = err(Shard::parse(bad));
            assert!(e.starts_with(&format!("--shard `{bad}` is malformed")), "{bad}: {e}");
        }
    }

    #[test]
    fn every_image_has_exactly_one_shard_and_they_are_balanced() {
        let imgs: Vec<PathBuf> = (0..4000).map(|i| PathBuf::from(format!("/mnt/a/data/images/train/{i:05}.jpg"))).collect();
        let root = Path::new("/mnt/a/data");
        let parts: Vec<Vec<PathBuf>> = (1..=4).map(|i| select(&imgs, root, Shard { index: i, count: 4 })).collect();
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), imgs.len());
        for p in &parts {
            assert!((900..1100).contains(&p.len()), "{}", p.len());
        }
        let mut all: Vec<_> = parts.concat();
        all.sort();
        assert_eq!(all, imgs);
        assert_eq!(select(&imgs, root, Shard { index: 1, count: 1 }), imgs);
    }

    #[test]
    fn the_shard_depends_on_the_relative_path_only() {
        let a = Path::new("/mnt/a/data/images/train/x.jpg");
        let b = Path::new("/scratch/data/images/train/x.jpg");
        let sa = select(&[a.into()], Path::new("/mnt/a/data"), Shard { index: shard_of(Path::new("images/train/x.jpg"), 7), count: 7 });
        let sb = select(&[b.into()], Path::new("/scratch/data"), Shard { index: shard_of(Path::new("images/train/x.jpg"), 7), count: 7 });
        assert_eq!((sa.len(), sb.len()), (1, 1));
        assert_eq!(shard_of(Path::new("./images/train/x.jpg"), 7), shard_of(Path::new("images/train/x.jpg"), 7));
        // pinned: the partition must never change between versions, or a
        // cache filled by one build is refilled by the next
        let got: Vec<usize> = (0..8).map(|i| shard_of(Path::new(&format!("images/train/{i}.jpg")), 4)).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [usize; 8] = [2, 4, 3, 4, 3, 2, 1, 4];

    #[test]
    fn slurm_arrays_give_id_minus_min_plus_one_of_count() {
        let e = env(&[("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_MIN", "4"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        let c = resolve(None, &e).unwrap().unwrap();
        assert_eq!(c.shard, Shard { index: 2, count: 4 });
        assert!(c.source.contains("SLURM_ARRAY_TASK_ID=5") && c.source.contains("SLURM_ARRAY_TASK_COUNT=4"), "{}", c.source);
        // --array=0-12:4 is tasks 0, 4, 8, 12
        let e = env(&[("SLURM_ARRAY_TASK_ID", "8"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_STEP", "4")]);
        assert_eq!(resolve(None, &e).unwrap().unwrap().shard, Shard { index: 3, count: 4 });
        // the flag wins over the environment
        assert_eq!(resolve(Some("1/1"), &e).unwrap().unwrap(), ShardChoice { shard: Shard { index: 1, count: 1 }, source: "--shard".into() });
        // --array=1,3,7: not contiguous
        let e = env(&[("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_COUNT", "3")]);
        assert!(err(resolve(None, &e)).contains("--array=0-2"));
        let e = env(&[("SLURM_ARRAY_TASK_ID", "3")]);
        assert!(err(resolve(None, &e)).contains("SLURM_ARRAY_TASK_MIN is not"));
        let e = env(&[("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_COUNT", "3")]);
        assert!(err(resolve(None, &e)).starts_with("SLURM_ARRAY_TASK_ID=`x` is not a whole number"));
    }

    #[test]
    fn kubernetes_indexed_jobs_give_index_plus_one_of_the_count_variable() {
        let e = env(&[("JOB_COMPLETION_INDEX", "0"), (SHARD_COUNT_VAR, "3")]);
        let c = resolve(None, &e).unwrap().unwrap();
        assert_eq!(c.shard, Shard { index: 1, count: 3 });
        assert_eq!(c.source, "JOB_COMPLETION_INDEX=0, FREEZESPLIT_SHARD_COUNT=3");
        assert!(err(resolve(None, &env(&[("JOB_COMPLETION_INDEX", "3"), (SHARD_COUNT_VAR, "3")]))).contains("shard 4 of 3"));
        assert!(err(resolve(None, &env(&[("JOB_COMPLETION_INDEX", "1")]))).contains("FREEZESPLIT_SHARD_COUNT is not"));
        // nothing set, or set empty: the whole split
        assert_eq!(resolve(None, &env(&[])).unwrap(), None);
        assert_eq!(resolve(None, &env(&[("SLURM_ARRAY_TASK_ID", ""), ("JOB_COMPLETION_INDEX", " ")])).unwrap(), None);
    }
}
