//! Run directories as YOLOv5 names them: `runs/train/exp`, `exp2`, `exp3`, ...

use std::path::{Path, PathBuf};

/// The first of `project/name`, `project/name2`, ... that does not exist yet.
/// Creates nothing.
pub fn increment_path(project: &Path, name: &str) -> PathBuf {
    let first = project.join(name);
    if !first.exists() {
        return first;
    }
    (2..).map(|n| project.join(format!("{name}{n}"))).find(|p| !p.exists()).unwrap()
}
