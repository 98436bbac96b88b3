//! The coordinator's content store: `<data_dir>/cas/sha256/<hex>`, verified on the way in.

use std::io::Write;
use std::path::{Path, PathBuf};

use hotroll_script::Sha256Digest;
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

/// Check a digest that arrived as text (from a message): the store takes only [`Sha256Digest`]s,
/// so nothing from the network gets near a path unless it is exactly 64 hex characters.
pub fn parse_digest(digest: &str) -> Result<Sha256Digest, ArtifactError> {
    Sha256Digest::parse(digest).map_err(|_| ArtifactError::BadDigest(digest.to_string()))
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

    pub fn path_of(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join(digest.hex())
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.path_of(digest).is_file()
    }

    pub fn size_of(&self, digest: &Sha256Digest) -> Result<u64, ArtifactError> {
        let path = self.path_of(digest);
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|_| ArtifactError::Missing(digest.to_string()))
    }

    /// Start receiving an upload that claims `digest` and `size`.
    pub fn begin(&self, digest: &Sha256Digest, size: u64) -> Result<Upload, ArtifactError> {
        let final_path = self.path_of(digest);
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
            digest: digest.clone(),
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
    digest: Sha256Digest,
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

    pub fn finish(self) -> Result<(Sha256Digest, u64), ArtifactError> {
        if self.received != self.size {
            return Err(ArtifactError::SizeMismatch {
                declared: self.size,
                received: self.received,
            });
        }
        let actual = Sha256Digest::from_bytes(self.hasher.finalize().into());
        if actual != self.digest {
            return Err(ArtifactError::Mismatch {
                declared: self.digest.to_string(),
                actual: actual.to_string(),
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
