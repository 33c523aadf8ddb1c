//! A dataset in the Ultralytics layout in (data.yaml + images/ + labels/*.txt);
//! class names and image lists per split out; the label files themselves are
//! read by `labels.rs`.
//!
//! As in YOLOv5, a split is a directory, a `.txt` list of images, or a list of
//! either; a label file is the image path with the last `/images/` replaced by
//! `/labels/` and the extension by `.txt`. A relative `path:` is taken relative
//! to the yaml file; a split `../x` that does not exist is retried as `x`, as
//! YOLOv5's `check_dataset` does (Roboflow's data.yaml says `train:
//! ../train/images` next to a `train/` folder).
//!
//! Only regular files are listed as images (a FIFO or device named `x.jpg`
//! would hang or never end), and a directory is listed once however many
//! symlinks lead to it. Label problems never abort a run: a bad line, a
//! duplicate row or an unreadable file is skipped with a reason and counted.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

mod labels;
pub use labels::{Label, LabelScan, Labels, read_labels, scan_labels, skip_message};

pub const IMG_FORMATS: &[&str] = &["bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"];

#[derive(Debug, Clone)]
pub struct Dataset {
    pub yaml: PathBuf,
    pub root: PathBuf,
    pub names: Vec<String>,
    /// What `load` resolved differently from the yaml's words (also printed).
    pub notes: Vec<String>,
    splits: BTreeMap<String, Vec<PathBuf>>,
}

#[derive(Deserialize)]
struct RawYaml {
    path: Option<String>,
    train: Option<serde_yaml::Value>,
    val: Option<serde_yaml::Value>,
    test: Option<serde_yaml::Value>,
    nc: Option<usize>,
    names: Option<serde_yaml::Value>,
}

impl Dataset {
    pub fn load(yaml: &Path) -> Result<Dataset> {
        let text = std::fs::read_to_string(yaml).with_context(|| format!("cannot read the dataset file {}", yaml.display()))?;
        let raw: RawYaml = serde_yaml::from_str(&text).with_context(|| format!("{} is not a valid data.yaml", yaml.display()))?;
        let base = yaml.parent().unwrap_or(Path::new("."));
        let root = match raw.path.as_deref().filter(|p| !p.is_empty()) {
            Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
            Some(".") | Some("./") => base.to_path_buf(),
            Some(p) => base.join(p),
            None => base.to_path_buf(),
        };
        let names = class_names(&raw, yaml)?;
        let mut splits = BTreeMap::new();
        let mut notes = Vec::new();
        for (key, value) in [("train", &raw.train), ("val", &raw.val), ("test", &raw.test)] {
            if let Some(v) = value {
                let entries: Vec<String> = match v {
                    serde_yaml::Value::Sequence(s) => s.iter().map(yaml_scalar).collect(),
                    serde_yaml::Value::Null => continue,
                    other => vec![yaml_scalar(other)],
                };
                let paths = entries.iter().map(|e| split_path(&root, key, e, yaml, &mut notes)).collect();
                splits.insert(key.to_string(), paths);
            }
        }
        for n in &notes {
            eprintln!("note: {n}");
        }
        Ok(Dataset { yaml: yaml.to_path_buf(), root, names, notes, splits })
    }

    pub fn nc(&self) -> usize {
        self.names.len()
    }

    /// The split names the yaml defines, in order.
    pub fn split_names(&self) -> Vec<&str> {
        self.splits.keys().map(String::as_str).collect()
    }

    /// All images of a split, sorted, as YOLOv5 lists them.
    pub fn images(&self, split: &str) -> Result<Vec<PathBuf>> {
        let Some(sources) = self.splits.get(split) else {
            let have = self.split_names();
            let have = if have.is_empty() { "none".to_string() } else { have.join(", ") };
            bail!("{} has no `{split}` split; the splits it defines: {have}", self.yaml.display());
        };
        let mut files = Vec::new();
        for src in sources {
            if src.is_dir() {
                collect_images(src, &mut files, &mut HashSet::new()).with_context(|| format!("cannot list {}", src.display()))?;
            } else if src.extension().is_some_and(|e| e == "txt") && src.is_file() {
                let parent = src.parent().unwrap_or(Path::new("."));
                for line in std::fs::read_to_string(src)?.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let p = Path::new(line);
                    files.push(if p.is_absolute() { p.to_path_buf() } else { parent.join(p) });
                }
            } else {
                bail!("{}: the `{split}` path {} does not exist", self.yaml.display(), src.display());
            }
        }
        files.retain(|f| is_image(f) && !not_a_regular_file(f));
        files.sort();
        files.dedup();
        Ok(files)
    }

    /// The images of a split that labels are read for (training and
    /// validation). Refuses, as YOLOv5's dataloader does, a split where no
    /// image has a label file: that trains to zero losses and validates to
    /// zero metrics. Prints one line of label counts when any label was
    /// converted, dropped or not found.
    pub fn labelled_images(&self, split: &str) -> Result<Vec<PathBuf>> {
        let images = self.images(split)?;
        let scan = scan_labels(&images, self.nc());
        if !images.is_empty() && scan.found == scan.bad_files {
            bail!("{}", no_labels_message(split, &self.yaml, &images, scan.bad_files));
        }
        if let Some(line) = scan.summary(split) {
            eprintln!("{line}");
        }
        Ok(images)
    }
}

/// A train/val/test entry of the yaml as a path, retried without a leading
/// `../` when it does not exist (YOLOv5's `check_dataset`, for Roboflow).
fn split_path(root: &Path, key: &str, entry: &str, yaml: &Path, notes: &mut Vec<String>) -> PathBuf {
    if Path::new(entry).is_absolute() {
        return PathBuf::from(entry);
    }
    let p = root.join(entry);
    if !p.exists()
        && let Some(rest) = entry.strip_prefix("../")
        && root.join(rest).exists()
    {
        let alt = root.join(rest);
        notes.push(format!(
            "{}: `{key}: {entry}` does not exist; using {} instead (YOLOv5 retries without the leading ../, the layout of Roboflow exports)",
            yaml.display(),
            alt.display()
        ));
        return alt;
    }
    p
}

fn class_names(raw: &RawYaml, yaml: &Path) -> Result<Vec<String>> {
    let names: Vec<String> = match &raw.names {
        Some(serde_yaml::Value::Sequence(s)) => s.iter().map(yaml_scalar).collect(),
        Some(serde_yaml::Value::Mapping(m)) => {
            let mut pairs: Vec<(usize, String)> = m
                .iter()
                .map(|(k, v)| Ok((k.as_u64().with_context(|| format!("{}: class ids in `names` must be integers", yaml.display()))? as usize, yaml_scalar(v))))
                .collect::<Result<_>>()?;
            pairs.sort();
            if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
                bail!("{}: `names` must number classes 0..nc-1 without gaps", yaml.display());
            }
            pairs.into_iter().map(|(_, n)| n).collect()
        }
        Some(_) => bail!("{}: `names` must be a list or a mapping", yaml.display()),
        None => match raw.nc {
            Some(nc) => (0..nc).map(|i| format!("class{i}")).collect(),
            None => bail!("{}: neither `names` nor `nc` is given", yaml.display()),
        },
    };
    if let Some(nc) = raw.nc
        && nc != names.len()
    {
        bail!("{}: nc is {nc} but `names` lists {} classes", yaml.display(), names.len());
    }
    Ok(names)
}

fn yaml_scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
    }
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMG_FORMATS.contains(&e.to_ascii_lowercase().as_str()))
}

/// True (with a warning) for a path that exists but is no regular file, e.g.
/// a FIFO or `/dev/zero` behind an image name: reading it would hang or never
/// end. A missing file is left to the reader, which skips and counts it.
fn not_a_regular_file(p: &Path) -> bool {
    match std::fs::metadata(p) {
        Ok(m) if !m.is_file() => {
            eprintln!("warning: skipping {}: {}", p.display(), crate::fsutil::not_regular_reason(&m));
            true
        }
        _ => false,
    }
}

/// Lists images under `dir`; `seen` holds the directories already listed (by
/// their real path), so a symlink loop or two links to one folder list it once.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<()> {
    if !seen.insert(std::fs::canonicalize(dir)?) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    // sorted, so that which of two links to one folder is kept does not
    // depend on the directory's order
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_images(&p, out, seen)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// "no labels found" for a split, naming where labels were looked for.
fn no_labels_message(split: &str, yaml: &Path, images: &[PathBuf], unreadable: usize) -> String {
    let mut dirs: Vec<PathBuf> = images.iter().filter_map(|i| label_path(i).parent().map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    let more = if dirs.len() > 3 { format!(" and {} more folders", dirs.len() - 3) } else { String::new() };
    let shown: Vec<String> = dirs.iter().take(3).map(|d| d.display().to_string()).collect();
    let (img, lbl) = (&images[0], label_path(&images[0]));
    let unreadable = if unreadable > 0 { format!(" ({unreadable} cannot be read)") } else { String::new() };
    format!(
        "no labels found in {}{more}: expected labels/… next to images/…, one .txt per image (e.g. {} for {}); none of the {} `{split}` images of {} has a readable one{unreadable}",
        shown.join(", "),
        lbl.display(),
        img.display(),
        images.len(),
        yaml.display()
    )
}

/// YOLOv5's `img2label_paths`.
pub fn label_path(image: &Path) -> PathBuf {
    let s = image.to_string_lossy();
    let sep = std::path::MAIN_SEPARATOR;
    let (img_dir, lbl_dir) = (format!("{sep}images{sep}"), format!("{sep}labels{sep}"));
    let replaced = match s.rfind(&img_dir) {
        Some(i) => format!("{}{}{}", &s[..i], lbl_dir, &s[i + img_dir.len()..]),
        None => s.to_string(),
    };
    Path::new(&replaced).with_extension("txt")
}

/// Dataset trees for the tests of this module and `labels`.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    /// Writes `text` to `p`, creating its directories.
    pub fn write(p: &Path, text: &[u8]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// `images/a.jpg`.. under `dir` (the bytes are never decoded here).
    pub fn images(dir: &Path, names: &[&str]) {
        for n in names {
            write(&dir.join("images").join(n), b"not decoded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{images, write};

    #[test]
    fn label_path_swaps_the_last_images_dir() {
        assert_eq!(label_path(Path::new("/d/images/train/images/a.jpg")), PathBuf::from("/d/images/train/labels/a.txt"));
    }

    /// A Roboflow "YOLOv5 PyTorch" zip as it ships: data.yaml at the top
    /// saying `../train/images`, and train/, valid/, test/ beside it.
    #[test]
    fn roboflow_exports_resolve_without_the_leading_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("data.yaml"), b"train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: 2\nnames: ['car', 'truck']\n\nroboflow:\n  workspace: w\n  project: p\n  version: 1\n  license: CC BY 4.0\n  url: https://universe.roboflow.com/w/p/dataset/1\n");
        for (split, n) in [("train", 3), ("valid", 2), ("test", 1)] {
            for i in 0..n {
                write(&d.join(format!("{split}/images/{split}{i}_jpg.rf.abc.jpg")), b"x");
                write(&d.join(format!("{split}/labels/{split}{i}_jpg.rf.abc.txt")), b"0 0.5 0.5 0.2 0.2\n");
            }
        }
        let data = Dataset::load(&d.join("data.yaml")).unwrap();
        assert_eq!(data.names, ["car", "truck"]);
        let counts: Vec<usize> = ["train", "val", "test"].iter().map(|s| data.labelled_images(s).unwrap().len()).collect();
        assert_eq!(counts, [3, 2, 1]);
        assert_eq!(data.notes.len(), 3);
        assert!(data.notes[0].contains("`train: ../train/images` does not exist; using") && data.notes[0].contains("Roboflow"), "{}", data.notes[0]);
        // a ../ that does exist is taken as written
        let sub = d.join("yamls");
        write(&sub.join("data.yaml"), b"train: ../train/images\nval: ../valid/images\nnames: [car, truck]\n");
        let data = Dataset::load(&sub.join("data.yaml")).unwrap();
        assert!(data.notes.is_empty());
        assert_eq!(data.images("train").unwrap()[0], sub.join("../train/images/train0_jpg.rf.abc.jpg"));
    }

    #[test]
    fn a_missing_split_names_the_splits_there_are() {
        let dir = tempfile::tempdir().unwrap();
        images(dir.path(), &["a.jpg"]);
        write(&dir.path().join("data.yaml"), b"train: images\nval: images\nnames: [a]\n");
        let data = Dataset::load(&dir.path().join("data.yaml")).unwrap();
        let err = format!("{:#}", data.images("valid").unwrap_err());
        assert!(err.ends_with("has no `valid` split; the splits it defines: train, val"), "{err}");
    }

    #[test]
    fn a_split_without_any_label_file_is_refused_naming_where_they_were_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        images(dir.path(), &["a.jpg", "b.png"]);
        std::fs::create_dir_all(dir.path().join("labels")).unwrap();
        write(&dir.path().join("data.yaml"), b"train: images\nval: images\nnames: [a]\n");
        let data = Dataset::load(&dir.path().join("data.yaml")).unwrap();
        let err = format!("{:#}", data.labelled_images("train").unwrap_err());
        let lbl = dir.path().join("labels");
        assert!(err.starts_with(&format!("no labels found in {}: expected labels/… next to images/…", lbl.display())), "{err}");
        assert!(err.contains(&lbl.join("a.txt").display().to_string()) && err.contains("none of the 2 `train` images"), "{err}");
        // label paths that are folders are no labels either
        std::fs::create_dir_all(lbl.join("a.txt")).unwrap();
        let err = format!("{:#}", data.labelled_images("train").unwrap_err());
        assert!(err.ends_with("has a readable one (1 cannot be read)"), "{err}");
        std::fs::remove_dir(lbl.join("a.txt")).unwrap();
        // one empty label file (a background image) is a labelled split
        write(&lbl.join("b.txt"), b"");
        assert_eq!(data.labelled_images("train").unwrap().len(), 2);
        // the plain listing (what `cache` reads) never needed labels
        std::fs::remove_file(lbl.join("b.txt")).unwrap();
        assert_eq!(data.images("train").unwrap().len(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_and_fifos_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        images(d, &["a.jpg", "sub/b.jpg"]);
        std::os::unix::fs::symlink(d.join("images"), d.join("images/sub/loop")).unwrap();
        std::os::unix::fs::symlink(d.join("images/sub"), d.join("images/again")).unwrap();
        let fifo = d.join("images/pipe.jpg");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        std::os::unix::fs::symlink("/dev/zero", d.join("images/zero.png")).unwrap();
        write(&d.join("data.yaml"), b"train: images\nnames: [a]\n");
        let data = Dataset::load(&d.join("data.yaml")).unwrap();
        let listed = data.images("train").unwrap();
        assert_eq!(listed, [d.join("images/a.jpg"), d.join("images/again/b.jpg")]);
        let err = crate::fsutil::read_regular(&fifo).unwrap_err();
        assert_eq!(err.to_string(), "it is a FIFO, not a regular file");
        assert_eq!(crate::fsutil::read_regular(Path::new("/dev/zero")).unwrap_err().to_string(), "it is a device, not a regular file");
    }
}
