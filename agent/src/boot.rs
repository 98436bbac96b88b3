//! The boot generation: a counter in `<data_dir>/boot_generation`, incremented at every start,
//! that lets the coordinator tell a restarted agent from a reconnecting one.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::Path;

pub const FILE_NAME: &str = "boot_generation";

#[derive(Debug, thiserror::Error)]
#[error("boot generation file {}: {message}", path.display())]
pub struct BootGenerationError {
    pub path: std::path::PathBuf,
    pub message: String,
}

/// Read the previous generation (0 when there is none), write and return the next one.
pub fn next_generation(data_dir: &Path) -> Result<u64, BootGenerationError> {
    let path = data_dir.join(FILE_NAME);
    let err = |message: String| BootGenerationError {
        path: path.clone(),
        message,
    };
    let previous = match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| {
            err(format!(
                "cannot parse `{}` ({e}); the file must hold one number",
                text.trim()
            ))
        })?,
        Err(e) if e.kind() == ErrorKind::NotFound => 0,
        Err(e) => return Err(err(format!("cannot read: {e}"))),
    };
    let next = previous
        .checked_add(1)
        .ok_or_else(|| err("the counter overflowed".into()))?;
    write_atomically(&path, format!("{next}\n").as_bytes())
        .map_err(|e| err(format!("cannot write: {e}")))?;
    Ok(next)
}

/// tmp + fsync + rename + fsync of the directory: after a crash the file holds the old or the new
/// value, never a torn one.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_and_rejects_garbage() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        assert_eq!(next_generation(dir.path())?, 1);
        assert_eq!(next_generation(dir.path())?, 2);
        assert_eq!(fs::read_to_string(dir.path().join(FILE_NAME))?, "2\n");
        fs::write(dir.path().join(FILE_NAME), "x")?;
        assert!(next_generation(dir.path()).is_err());
        Ok(())
    }
}
