//! The coordinator's content store: `<data_dir>/cas/sha256/<hex>`, verified on the way in.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("`{0}` is not a digest of the form sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error("artifact {0} is not stored on the coordinator")]
    Missing(String),
    #[error("upload does not match its digest: declared {declared}, received {actual}")]
    Mismatch { declared: String, actual: String },
    #[error("upload is {received} bytes but declared {declared}")]
    SizeMismatch { declared: u64, received: u64 },
    #[error("upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("chunk at offset {got} where {expected} was expected")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("artifact store i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parse `sha256:<hex>` into the hex part, refusing anything else (the hex becomes a file name,
/// so nothing from the network gets near a path unless it is exactly 64 hex characters).
pub fn digest_hex(digest: &str) -> Result<&str, ArtifactError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ArtifactError::BadDigest(digest.to_string()))?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex)
    } else {
        Err(ArtifactError::BadDigest(digest.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    /// Largest artifact accepted.
    pub max_size: u64,
}

impl ArtifactStore {
    pub fn new(data_dir: &Path) -> Result<Self, ArtifactError> {
        let root = data_dir.join("cas").join("sha256");
        std::fs::create_dir_all(&root).map_err(|source| ArtifactError::Io {
            path: root.clone(),
            source,
        })?;
        Ok(Self {
            root,
            max_size: 1 << 30,
        })
    }

    pub fn path_of(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self.root.join(digest_hex(digest)?))
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.path_of(digest).is_ok_and(|p| p.is_file())
    }

    pub fn size_of(&self, digest: &str) -> Result<u64, ArtifactError> {
        let path = self.path_of(digest)?;
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|_| ArtifactError::Missing(digest.to_string()))
    }

    /// Start receiving an upload that claims `digest` and `size`.
    pub fn begin(&self, digest: &str, size: u64) -> Result<Upload, ArtifactError> {
        let final_path = self.path_of(digest)?;
        if size > self.max_size {
            return Err(ArtifactError::TooLarge {
                limit: self.max_size,
            });
        }
        let tmp =
            tempfile::NamedTempFile::new_in(&self.root).map_err(|source| ArtifactError::Io {
                path: self.root.clone(),
                source,
            })?;
        Ok(Upload {
            digest: digest.to_string(),
            size,
            received: 0,
            hasher: Sha256::new(),
            tmp,
            final_path,
        })
    }
}

/// An upload in progress: bytes go to a temp file and the hasher; nothing is visible in the
/// store until [`Upload::finish`] has verified the digest.
#[derive(Debug)]
pub struct Upload {
    digest: String,
    size: u64,
    received: u64,
    hasher: Sha256,
    tmp: tempfile::NamedTempFile,
    final_path: PathBuf,
}

impl Upload {
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ArtifactError> {
        if offset != self.received {
            return Err(ArtifactError::OutOfOrder {
                expected: self.received,
                got: offset,
            });
        }
        let len = data.len() as u64;
        if self.received + len > self.size {
            return Err(ArtifactError::SizeMismatch {
                declared: self.size,
                received: self.received + len,
            });
        }
        self.hasher.update(data);
        self.tmp
            .write_all(data)
            .map_err(|source| ArtifactError::Io {
                path: self.tmp.path().to_path_buf(),
                source,
            })?;
        self.received += len;
        Ok(())
    }

    pub fn finish(self) -> Result<(String, u64), ArtifactError> {
        if self.received != self.size {
            return Err(ArtifactError::SizeMismatch {
                declared: self.size,
                received: self.received,
            });
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if actual != self.digest {
            return Err(ArtifactError::Mismatch {
                declared: self.digest,
                actual,
            });
        }
        let io = |source| ArtifactError::Io {
            path: self.final_path.clone(),
            source,
        };
        self.tmp.as_file().sync_all().map_err(io)?;
        self.tmp
            .persist(&self.final_path)
            .map_err(|e| ArtifactError::Io {
                path: self.final_path.clone(),
                source: e.error,
            })?;
        Ok((self.digest, self.size))
    }
}
