//! Verifying and unpacking a release archive, safely.
//!
//! `<sha256>.tar.gz` is checked against its name's SHA-256 *before* a byte of it is
//! decompressed, then unpacked into a fresh temporary directory beside the cache entry
//! and renamed into place, so a cache entry is either complete or absent. Only regular
//! files and directories are accepted, with plain relative names: absolute paths, `..`,
//! symbolic and hard links, devices and FIFOs fail the whole archive, as do archives over
//! the file-count or unpacked-size limits (a tar bomb is an error, not an outage). File
//! modes are not applied: everything is written 0644 / 0755 by this process.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Limits on one archive.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_files: u64,
    pub max_unpacked_bytes: u64,
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive SHA-256 is {actual}, not the release's {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("archive entry `{path}` is refused: {reason}")]
    Entry { path: String, reason: &'static str },
    #[error("archive has more than {0} entries")]
    TooManyFiles(u64),
    #[error("archive unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error("archive is not a valid .tar.gz: {0}")]
    Format(#[source] std::io::Error),
    #[error("cannot write the unpacked release under {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Lower-case hex of 32 bytes (a release's name).
pub fn hex(b: &[u8; 32]) -> String {
    crate::schema::Sha256(*b).to_string()
}

/// The SHA-256 of a file's contents.
pub fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Verifies `archive` against `expected` and unpacks it to `dest` (which must not
/// exist; its parent must). On any error nothing is left at `dest`.
pub fn verify_and_unpack(archive: &Path, expected: &[u8; 32], dest: &Path, limits: Limits) -> Result<(), UnpackError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| UnpackError::Io { path, source }
    };
    let actual = file_sha256(archive).map_err(io(archive))?;
    if actual != *expected {
        return Err(UnpackError::HashMismatch { expected: hex(expected), actual: hex(&actual) });
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}-{}-{}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = unpack_into(archive, &tmp, limits).and_then(|()| {
        // fsync is skipped on purpose: a cache entry lost to a crash is fetched again.
        std::fs::rename(&tmp, dest).map_err(io(dest))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A relative path of normal components only, as UTF-8.
fn safe_relative(p: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => {
                let s = n.to_str().ok_or("the name is not UTF-8")?;
                if s.contains('\\') || s.chars().any(char::is_control) {
                    return Err("the name has a backslash or control character");
                }
                out.push(s);
            }
            Component::CurDir => {}
            Component::ParentDir => return Err("it climbs out with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("the path is absolute"),
        }
    }
    Ok(out)
}

fn unpack_into(archive: &Path, root: &Path, limits: Limits) -> Result<(), UnpackError> {
    let f = std::fs::File::open(archive).map_err(|source| UnpackError::Io { path: archive.to_owned(), source })?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let mut files = 0u64;
    let mut total = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 64 << 10];
    for entry in ar.entries().map_err(UnpackError::Format)? {
        let mut entry = entry.map_err(UnpackError::Format)?;
        let raw_path = entry.path().map_err(UnpackError::Format)?.into_owned();
        let shown = raw_path.to_string_lossy().into_owned();
        let refuse = |reason| UnpackError::Entry { path: shown.clone(), reason };
        files += 1;
        if files > limits.max_files {
            return Err(UnpackError::TooManyFiles(limits.max_files));
        }
        let rel = safe_relative(&raw_path).map_err(refuse)?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                continue; // `./`
            }
            return Err(refuse("it has no name"));
        }
        let target = root.join(&rel);
        let io = |source| UnpackError::Io { path: target.clone(), source };
        match kind {
            k if k.is_dir() => std::fs::create_dir_all(&target).map_err(io)?,
            k if k.is_file() => {
                if !seen.insert(rel.clone()) {
                    return Err(refuse("it appears twice"));
                }
                let size = entry.header().size().map_err(UnpackError::Format)?;
                total = total.saturating_add(size);
                if total > limits.max_unpacked_bytes {
                    return Err(UnpackError::TooLarge(limits.max_unpacked_bytes));
                }
                if let Some(dir) = target.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(io)?;
                let mut left = size;
                while left > 0 {
                    let want = buf.len().min(left as usize);
                    let n = entry.read(&mut buf[..want]).map_err(UnpackError::Format)?;
                    if n == 0 {
                        return Err(UnpackError::Format(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated entry")));
                    }
                    out.write_all(&buf[..n]).map_err(io)?;
                    left -= n as u64;
                }
            }
            k if k.is_symlink() => return Err(refuse("symbolic links are not allowed")),
            k if k.is_hard_link() => return Err(refuse("hard links are not allowed")),
            k if k.is_character_special() || k.is_block_special() => return Err(refuse("devices are not allowed")),
            k if k.is_fifo() => return Err(refuse("FIFOs are not allowed")),
            _ => return Err(refuse("only regular files and directories are allowed")),
        }
    }
    Ok(())
}
