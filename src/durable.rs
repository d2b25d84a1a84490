//! Durable file replacement, shared by every part that writes small files it must not leave
//! half written (adapter checkpoints, the embedded index's live pointer, progress files).

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` via a temp file in the same directory, fsynced, then renamed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}
