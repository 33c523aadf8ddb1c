//! Run directories as YOLOv5 names them: a project folder and a run name in;
//! a claimed directory `exp`, `exp2`, `exp3`, ... out, and a lock that keeps
//! two live runs out of one directory. Shared by `predict`, `train` and the demo.
//!
//! The name is claimed by creating the directory (`create_dir`, which fails on
//! an existing one), so two runs started at the same moment with the same
//! `--project/--name` never share a directory: the loser takes the next number.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// YOLOv5's `increment_path(Path(project) / name, exist_ok, mkdir=True)` with
/// `sep=''`, made atomic: creates and returns `project/name` if free, else
/// `project/name2`, `name3`, ...; with `exist_ok` `project/name` itself,
/// existing or not.
pub fn claim(project: &Path, name: &str, exist_ok: bool) -> Result<PathBuf> {
    let first = project.join(name);
    let parent = first.parent().unwrap_or(project);
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create the project directory {}", parent.display()))?;
    if exist_ok {
        std::fs::create_dir_all(&first).with_context(|| format!("cannot create the run directory {}", first.display()))?;
        return Ok(first);
    }
    for n in 1usize.. {
        let path = if n == 1 { first.clone() } else { project.join(format!("{name}{n}")) };
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            // taken, by an earlier run or one racing this one: try the next
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create the run directory {}", path.display())),
        }
    }
    unreachable!("an unused run name")
}

/// An exclusive lock on a run directory for as long as the value lives. The
/// operating system drops it when the process dies, so a killed run never
/// leaves a stale lock behind that would block `--resume`.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the run directory {}", dir.display()))?;
        let path = dir.join(".lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("cannot create the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(TryLockError::WouldBlock) => bail!("the run directory {} is in use by another live run; wait for it to finish or choose another --name", dir.display()),
            Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_increment_like_yolov5() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(claim(dir.path(), "exp", false).unwrap(), dir.path().join("exp"));
        assert!(dir.path().join("exp").is_dir(), "the claim creates the directory");
        assert_eq!(claim(dir.path(), "exp", false).unwrap(), dir.path().join("exp2"));
        assert_eq!(claim(dir.path(), "exp", false).unwrap(), dir.path().join("exp3"));
        assert_eq!(claim(dir.path(), "exp", true).unwrap(), dir.path().join("exp"), "exist_ok reuses the name");
        assert_eq!(claim(&dir.path().join("new/project"), "a/b", false).unwrap(), dir.path().join("new/project/a/b"));
    }

    #[test]
    fn racing_claims_get_distinct_directories() {
        let dir = tempfile::tempdir().unwrap();
        let n = 16;
        let barrier = std::sync::Barrier::new(n);
        let got: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        claim(dir.path(), "exp", false).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let distinct: std::collections::BTreeSet<_> = got.iter().collect();
        assert_eq!(distinct.len(), n, "two claims got the same directory: {got:?}");
    }

    #[test]
    fn a_locked_run_directory_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).err().expect("a second live run must be refused");
        assert!(format!("{e:#}").contains("in use by another live run"), "{e:#}");
        drop(lock);
        RunLock::acquire(dir.path()).unwrap();
    }
}
