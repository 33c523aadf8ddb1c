//! Crash-safe file writes: bytes in, a file that is either absent or complete.
//!
//! Every artefact (cache entries, heads, checkpoints) is written to a unique
//! temporary name in the same directory and renamed into place, so a kill at
//! any moment leaves the old file or the new one, never half of one, and two
//! processes writing the same name both succeed.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write(path, bytes, true)
}

/// `write_atomic` without waiting for the disk: for files whose reader checks
/// a checksum (cache entries), where an OS crash that loses the data is caught
/// on read and the entry recomputed. A killed process loses nothing either way.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    write(path, bytes, false)
}

fn write(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    if sync {
        tmp.as_file().sync_data().ok();
    }
    tmp.persist(path).with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}
