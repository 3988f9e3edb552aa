//! Durable writes of whole small files: a file is replaced so readers see the old one or
//! the new one, never a part, and the replacement survives a crash once this returns.
//! Used for keys, tokens, certificates, ledgers, the usage counters and snapshots. Also
//! the process's limit on open files, which the server raises and the releases budget by.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path`: a temp file beside it (created with `mode`), fsync, rename,
/// fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(dir);
    Ok(())
}

/// Makes renames and new files in `dir` durable (best effort: not every file system
/// lets a directory be synced).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The process's limit on open files (soft, hard), if the system tells it.
pub fn open_files_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid resource and a pointer to a live rlimit.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some((lim.rlim_cur, lim.rlim_max))
}
