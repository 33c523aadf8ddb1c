//! A dataset in the Ultralytics layout in (data.yaml + images/ + labels/*.txt);
//! class names, image lists per split and parsed labels out.
//!
//! As in YOLOv5, a split is a directory, a `.txt` list of images, or a list of
//! either; a label file is the image path with the last `/images/` replaced by
//! `/labels/` and the extension by `.txt`. A relative `path:` is taken relative
//! to the yaml file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub const IMG_FORMATS: &[&str] = &["bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"];

#[derive(Debug, Clone)]
pub struct Dataset {
    pub yaml: PathBuf,
    pub root: PathBuf,
    pub names: Vec<String>,
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
        let mut splits = BTreeMap::new();
        for (key, value) in [("train", &raw.train), ("val", &raw.val), ("test", &raw.test)] {
            if let Some(v) = value {
                let entries: Vec<String> = match v {
                    serde_yaml::Value::Sequence(s) => s.iter().map(yaml_scalar).collect(),
                    serde_yaml::Value::Null => continue,
                    other => vec![yaml_scalar(other)],
                };
                splits.insert(key.to_string(), entries.iter().map(|e| if Path::new(e).is_absolute() { PathBuf::from(e) } else { root.join(e) }).collect());
            }
        }
        Ok(Dataset { yaml: yaml.to_path_buf(), root, names, splits })
    }

    pub fn nc(&self) -> usize {
        self.names.len()
    }

    /// All images of a split, sorted, as YOLOv5 lists them.
    pub fn images(&self, split: &str) -> Result<Vec<PathBuf>> {
        let sources = self.splits.get(split).with_context(|| format!("{} has no `{split}` split", self.yaml.display()))?;
        let mut files = Vec::new();
        for src in sources {
            if src.is_dir() {
                collect_images(src, &mut files).with_context(|| format!("cannot list {}", src.display()))?;
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
        files.retain(|f| is_image(f));
        files.sort();
        files.dedup();
        Ok(files)
    }
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

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
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

/// One box: class and normalised `x, y, w, h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Label {
    pub class: usize,
    pub xywh: [f32; 4],
}

/// A label file, with the lines that were skipped and why.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub boxes: Vec<Label>,
    /// `(line number, reason)`
    pub skipped: Vec<(usize, String)>,
}

/// Reads a YOLO label file; a missing file means no objects (a background
/// image). Bad lines are skipped with a reason, as YOLOv5's `verify_image_label`
/// rejects them; duplicate rows are dropped as YOLOv5 does.
pub fn read_labels(path: &Path, nc: usize) -> Result<Labels> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Labels::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = Labels::default();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        match parse_label(&fields, nc) {
            Ok(l) => {
                if !out.boxes.contains(&l) {
                    out.boxes.push(l)
                }
            }
            Err(reason) => out.skipped.push((i + 1, reason)),
        }
    }
    Ok(out)
}

fn parse_label(fields: &[&str], nc: usize) -> std::result::Result<Label, String> {
    if fields.len() != 5 {
        return Err(format!("expected 5 values (class x y w h), found {} (segments are not supported)", fields.len()));
    }
    let v: Vec<f32> = fields.iter().map(|f| f.parse::<f32>().map_err(|_| format!("`{f}` is not a number"))).collect::<std::result::Result<_, _>>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err("a value is NaN or infinite".into());
    }
    if v[0] < 0.0 || v[0].fract() != 0.0 {
        return Err(format!("class `{}` is not a non-negative integer", fields[0]));
    }
    let class = v[0] as usize;
    if class >= nc {
        return Err(format!("class {class} is not below nc = {nc}"));
    }
    if v[1..].iter().any(|&x| !(0.0..=1.0).contains(&x)) {
        return Err("coordinates are not normalised to [0, 1]".into());
    }
    Ok(Label { class, xywh: [v[1], v[2], v[3], v[4]] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_path_swaps_the_last_images_dir() {
        assert_eq!(label_path(Path::new("/d/images/train/images/a.jpg")), PathBuf::from("/d/images/train/labels/a.txt"));
    }

    #[test]
    fn bad_label_lines_are_skipped_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n1 1.5 0.5 0.1 0.1\n1 nan 0.5 0.1 0.1\n1 0.5 0.5\n0 0.5 0.5 0.1 0.1\n").unwrap();
        let l = read_labels(&p, 5).unwrap();
        assert_eq!(l.boxes.len(), 1);
        assert_eq!(l.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    }
}
