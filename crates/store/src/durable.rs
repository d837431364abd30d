//! Small files written atomically and durably: the whole new content or the
//! old, never a torn mix, and on disk when the call returns.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`: a temporary file beside it, fsync, rename over
/// `path`, fsync of the directory.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}
