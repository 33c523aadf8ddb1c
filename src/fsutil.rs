//! Crash-safe file writes: bytes in, a file that is either absent or complete.
//!
//! Every artefact (cache entries, heads, checkpoints) is written to a unique
//! temporary name in the same directory and renamed into place, so a kill at
//! any moment leaves the old file or the new one, never half of one, and two
//! processes writing the same name both succeed. `read_regular` refuses what
//! is not a regular file (a FIFO, a device) before reading it.

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
