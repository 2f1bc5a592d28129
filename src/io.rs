//! Crash-safe file output: everything qtune writes (checkpoints, exported models, summaries) goes through
//! [`write_atomic`], so an interrupted run leaves either the old file or the complete new one, never a torn one.
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `path` by filling a temporary file beside it, fsyncing it, and renaming it over `path`.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create directory: {e}")))?;
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all().map_err(|e| Error::file(&tmp, format!("fsync failed: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot rename into place: {e}")))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] for a byte buffer.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| Ok(f.write_all(bytes)?))
}

/// Whether two paths name the same existing file or folder (an output that does not exist yet is no input).
pub fn same_path(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_bytes_atomic(&p, b"first").unwrap();
        write_bytes_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        // A failing writer leaves the previous content and no temporary behind.
        let r = write_atomic(&p, |f| {
            f.write_all(b"partial")?;
            Err(Error::Msg("interrupted".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
