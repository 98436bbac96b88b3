//! PEM files and how secrets are written: private keys 0600, every file atomically (a temp file
//! in the same directory, fsync, rename), so that a crash leaves the old file or the new one.

use std::io::Write;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|e| file_error(path, e))?;
    parse_certs(&text).map_err(|e| file_error(path, e))
}

/// Every certificate in PEM text (at least one).
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate("no PEM certificate".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = std::fs::read(path).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_slice(&text)
        .map_err(|e| file_error(path, format!("no private key: {e}")))
}

/// Write `bytes` to `path` atomically with `mode` (0o600 for keys and token records).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .ok_or_else(|| file_error(path, "no parent directory"))?;
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| file_error(path, "no file name"))?;
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<_, std::io::Error>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_error(path, e));
    }
    Ok(())
}

/// [`write_atomic`] for secrets: 0600.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_atomic(path, bytes, 0o600)
}

/// [`write_atomic`] for certificates: 0644.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_atomic(path, bytes, 0o644)
}

/// A directory only its owner can enter (0700), created if missing.
pub fn private_dir(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(|e| file_error(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_0600_and_replace_atomically() -> Result<(), TlsError> {
        let dir = tempfile_dir();
        let path = dir.join("key.pem");
        write_secret(&path, b"one")?;
        write_secret(&path, b"two")?;
        let meta = std::fs::metadata(&path).map_err(|e| file_error(&path, e))?;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).ok(), Some(b"two".to_vec()));
        let leftovers = std::fs::read_dir(&dir)
            .map_err(|e| file_error(&dir, e))?
            .count();
        assert_eq!(leftovers, 1);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hotroll-tls-{:016x}", rand::random::<u64>()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    }
}
