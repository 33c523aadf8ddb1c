//! Crash-safe file writes: bytes in, a file that is either absent or complete.
//!
//! Every artefact (cache entries, heads, checkpoints) is written to a unique
//! temporary name (`.tmp-*`) in the same directory and renamed into place, so
//! a kill at any moment leaves the old file or the new one, never half of one,
//! and two processes writing the same name both succeed.
//!
//! Files get the mode `open(2)` gives a plain new file, 0666 minus the umask
//! (tempfile alone would make them 0600), so a cache or run directory shared
//! between users stays readable by them. A writer holds an exclusive advisory
//! lock (flock) on its temporary file until the rename; `remove_orphans` uses
//! that to tell the leftovers of killed writers from files still being written
//! by another process. `read_regular` refuses what is not a regular file (a
//! FIFO, a device) before reading it.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// Prefix of the temporary files (also what `remove_orphans` looks for).
pub const TMP_PREFIX: &str = ".tmp-";

/// A temporary file younger than this is never taken for an orphan: it may
/// belong to a writer between creating the file and locking it.
pub const ORPHAN_MIN_AGE: Duration = Duration::from_secs(30);

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write(path, bytes, true)
}

/// `write_atomic` without waiting for the disk: for files whose reader checks
/// a checksum (cache entries), where an OS crash that loses the data is caught
/// on read and the entry recomputed. A killed process loses nothing either way.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    write(path, bytes, false)
}

/// A new temporary directory under the system's (TMPDIR), named `prefix…`;
/// the error says which directory failed and what to do.
pub fn temp_dir(prefix: &str, what: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir().with_context(|| {
        format!("cannot create a temporary directory for {what} in {}; set TMPDIR to a writable directory", std::env::temp_dir().display())
    })
}

/// A new, locked temporary file in `dir`, mode 0666 minus the umask.
fn create_tmp(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let mut b = tempfile::Builder::new();
    b.prefix(TMP_PREFIX);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // the kernel applies the umask to the mode given at creation
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = b.tempfile_in(dir).with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    // held until the file is renamed and closed; a filesystem without locks
    // only loses the orphan cleanup's protection, not the write
    let _ = tmp.as_file().lock();
    Ok(tmp)
}

fn write(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = create_tmp(dir)?;
    tmp.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    if sync {
        tmp.as_file().sync_data().ok();
    }
    tmp.persist(path).with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}

/// Reads a file that must be a regular file (a symlink to one is fine): a
/// FIFO would block forever and `/dev/zero` grow until the process is killed.
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let m = std::fs::metadata(path)?;
    if !m.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, not_regular_reason(&m)));
    }
    std::fs::read(path)
}

/// Why a path that exists is not a regular file, for messages.
pub fn not_regular_reason(m: &std::fs::Metadata) -> String {
    let kind = if m.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_socket() {
                "a socket"
            } else {
                "a special file"
            }
        }
        #[cfg(not(unix))]
        {
            "a special file"
        }
    };
    format!("it is {kind}, not a regular file")
}

/// Whether `path` is a temporary file left by a killed writer: older than
/// `min_age` and not locked by any process.
pub fn is_orphan(path: &Path, min_age: Duration) -> bool {
    let old = std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
    // a lock we get means no writer holds one; ours goes with the handle
    old && std::fs::File::open(path).is_ok_and(|f| f.try_lock().is_ok())
}

/// Removes the orphaned temporary files directly in `dir` (see `is_orphan`);
/// returns how many. A live writer's file is never touched.
pub fn remove_orphans(dir: &Path, min_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(TMP_PREFIX)))
        .filter(|e| is_orphan(&e.path(), min_age) && std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process umask, read without changing it (Linux).
    fn umask() -> Option<u32> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with("Umask:"))?;
        u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
    }

    #[cfg(unix)]
    #[test]
    fn written_files_get_0666_minus_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let Some(mask) = umask() else {
            eprintln!("skipping: no Umask line in /proc/self/status");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/file.bin");
        write_atomic(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !mask, "mode {mode:o} with umask {mask:o}");
    }

    #[test]
    fn a_live_writers_file_is_kept_and_an_orphan_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        // a writer still at work: its handle (and lock) is open
        let live = create_tmp(dir.path()).unwrap();
        live.as_file().set_modified(old).unwrap();
        // a killed writer: the file stays, the lock went with the process
        let (f, orphan) = create_tmp(dir.path()).unwrap().keep().unwrap();
        f.set_modified(old).unwrap();
        drop(f);
        // a fresh orphan could still be a writer that has not locked yet
        let (f, young) = create_tmp(dir.path()).unwrap().keep().unwrap();
        drop(f);
        assert!(!is_orphan(live.path(), ORPHAN_MIN_AGE) && is_orphan(&orphan, ORPHAN_MIN_AGE) && !is_orphan(&young, ORPHAN_MIN_AGE));
        assert_eq!(remove_orphans(dir.path(), ORPHAN_MIN_AGE), 1);
        assert!(live.path().exists() && !orphan.exists() && young.exists());
        // the live writer still finishes
        let target = dir.path().join("done");
        live.persist(&target).unwrap();
        assert!(target.exists());
    }
}
