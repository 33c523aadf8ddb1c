//! Run directories as YOLOv5 names them: a project folder and a run name in;
//! the first free path `exp`, `exp2`, `exp3`, ... out. Shared by `predict`
//! and the trainer; nothing is created here, so the caller decides when.

use std::path::{Path, PathBuf};

/// YOLOv5's `increment_path(Path(project) / name, exist_ok=False)` with
/// `sep=''`: `project/name` if free, else `project/name2`, `name3`, ...
pub fn increment_path(project: &Path, name: &str) -> PathBuf {
    let path = project.join(name);
    if !path.exists() {
        return path;
    }
    (2..).map(|n| project.join(format!("{name}{n}"))).find(|p| !p.exists()).expect("an unused run name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_like_yolov5() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(increment_path(dir.path(), "exp"), dir.path().join("exp"));
        assert!(!dir.path().join("exp").exists(), "nothing is created");
        std::fs::create_dir(dir.path().join("exp")).unwrap();
        assert_eq!(increment_path(dir.path(), "exp"), dir.path().join("exp2"));
        std::fs::create_dir(dir.path().join("exp2")).unwrap();
        assert_eq!(increment_path(dir.path(), "exp"), dir.path().join("exp3"));
    }
}
