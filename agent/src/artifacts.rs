//! The agent's content store and artifact download (docs/design.md §6, §7).
//!
//! `<data_dir>/cas/sha256/<hex>` holds verified artifacts only: bytes arrive in
//! `<hex>.partial`, are hashed as they arrive, and the file is renamed to `<hex>` only once the
//! whole artifact hashes to its digest. Nothing reads a `.partial` file except the download
//! that resumes it, so no unverified byte is ever used.
//!
//! Downloads go over their own gRPC channel to the coordinator (`Agent.FetchArtifact`, 256 KiB
//! chunks), opened with the same [`Dialer`] the session uses and kept for the next download
//! (the artifacts of one rollout share one connection and one TLS handshake) until it fails,
//! the coordinator changes or it is [`DOWNLOAD_CHANNEL_REUSE`] old. A broken stream is resumed at the
//! last offset written; so is a download interrupted by an agent restart, since the `.partial`
//! file stays (its prefix is re-hashed before the download continues). A digest the store
//! already has is not fetched at all.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotroll_proto::v1 as pb;
use hotroll_proto::v1::agent_client::AgentClient;
use hotroll_script::Sha256Digest;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Endpoint;

use crate::cancel::CancelToken;
use crate::coordinators::Coordinators;
use crate::dialer::Dialer;

/// TCP connect bound of a download connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A download stream that delivers nothing for this long is dropped and resumed.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts in a row that make no progress before the download gives up.
const MAX_ATTEMPTS_WITHOUT_PROGRESS: u32 = 8;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Largest chunk accepted from the coordinator (it sends 256 KiB).
const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("`{0}` is not a digest of the form sha256:<64 lowercase hex>")]
    BadDigest(String),
    #[error(
        "artifact {digest}: the {size} bytes received hash to {actual}, not to the digest the \
         rollout names; the download was discarded"
    )]
    Mismatch {
        digest: String,
        size: u64,
        actual: String,
    },
    #[error("artifact {digest}: the coordinator has {actual} bytes, the rollout says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("artifact {digest}: the coordinator refused the download ({code:?}): {message}")]
    Refused {
        digest: String,
        code: Code,
        message: String,
    },
    #[error(
        "artifact {digest}: download failed {attempts} times in a row at offset {offset}; last \
         error: {last}"
    )]
    Unreachable {
        digest: String,
        attempts: u32,
        offset: u64,
        last: String,
    },
    #[error("artifact {digest}: download stopped at offset {offset} of {size}")]
    Cancelled {
        digest: String,
        offset: u64,
        size: u64,
    },
    #[error("content store i/o on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Check a digest that arrived as text (in a command): the store takes only [`Sha256Digest`]s,
/// so nothing from the network reaches a path unless it is exactly 64 lowercase hex characters.
pub fn parse_digest(digest: &str) -> Result<Sha256Digest, ArtifactError> {
    Sha256Digest::parse(digest).map_err(|_| ArtifactError::BadDigest(digest.to_string()))
}

/// What making an artifact available took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub digest: String,
    /// Where the verified bytes are.
    pub path: PathBuf,
    pub size: u64,
    /// Bytes received from the coordinator by this call.
    pub fetched: u64,
    /// Where the download started when it resumed an earlier partial download.
    pub resumed_at: Option<u64>,
    /// The store had the artifact already: nothing was fetched.
    pub already_present: bool,
    /// Download attempts (streams opened) by this call.
    pub attempts: u32,
}

impl Fetched {
    /// One line for a step report, e.g. `fetched 1048576 of 4194304 bytes, resumed at offset
    /// 3145728`.
    pub fn describe(&self) -> String {
        if self.already_present {
            return format!(
                "fetched 0 of {} bytes (already in the content store)",
                self.size
            );
        }
        let mut text = format!("fetched {} of {} bytes", self.fetched, self.size);
        if let Some(offset) = self.resumed_at {
            text.push_str(&format!(", resumed at offset {offset}"));
        }
        if self.attempts > 1 {
            text.push_str(&format!(" ({} attempts)", self.attempts));
        }
        text
    }
}

/// `<data_dir>/cas/sha256`: verified artifacts by digest.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("cas").join("sha256"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the verified artifact `digest` lives (whether or not it is there).
    pub fn path_of(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join(digest.hex())
    }

    /// Where a download of `digest` in progress keeps its bytes.
    pub fn partial_path_of(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join(format!("{}.partial", digest.hex()))
    }

    /// Whether the store has `digest` (of `size` bytes).
    pub fn contains(&self, digest: &Sha256Digest, size: u64) -> bool {
        std::fs::metadata(self.path_of(digest))
            .ok()
            .is_some_and(|m| m.is_file() && m.len() == size)
    }
}

/// How long a download channel is reused: a rollout's downloads share it, and a renewed node
/// certificate is used by the next rollout's.
const DOWNLOAD_CHANNEL_REUSE: Duration = Duration::from_secs(60);

/// The download channel kept between downloads.
struct CachedChannel {
    coordinator: String,
    channel: tonic::transport::Channel,
    opened: std::time::Instant,
}

/// Downloads artifacts from the coordinator into an [`ArtifactStore`].
#[derive(Clone)]
pub struct Fetcher {
    store: ArtifactStore,
    /// Downloads go to the coordinator the session talks to (the group's leader).
    coordinators: Coordinators,
    node: String,
    dialer: Dialer,
    /// One download per digest at a time (two artifacts of a script may share bytes).
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    channel: Arc<tokio::sync::Mutex<Option<CachedChannel>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("store", &self.store)
            .field("coordinators", &self.coordinators)
            .finish_non_exhaustive()
    }
}

/// How one download attempt ended without completing.
enum AttemptError {
    /// Try again (resuming at the current offset).
    Retry(String),
    Fatal(ArtifactError),
}

impl Fetcher {
    pub fn new(
        store: ArtifactStore,
        coordinators: Coordinators,
        node: String,
        dialer: Dialer,
    ) -> Self {
        Self {
            store,
            coordinators,
            node,
            dialer,
            locks: Arc::default(),
            channel: Arc::default(),
        }
    }

    /// The download channel to `coordinator`: the kept one when it is fresh, else a new one.
    async fn channel(
        &self,
        coordinator: &str,
        digest: &str,
        offset: u64,
        size: u64,
        cancel: &CancelToken,
    ) -> Result<tonic::transport::Channel, AttemptError> {
        let mut cached = self.channel.lock().await;
        if let Some(kept) = cached.as_ref()
            && kept.coordinator == coordinator
            && kept.opened.elapsed() < DOWNLOAD_CHANNEL_REUSE
        {
            return Ok(kept.channel.clone());
        }
        *cached = None;
        let endpoint = Endpoint::from_shared(hotroll_tls::client::channel_uri(coordinator))
            .map_err(|e| {
                AttemptError::Fatal(ArtifactError::Refused {
                    digest: digest.to_string(),
                    code: Code::InvalidArgument,
                    message: format!("invalid coordinator address: {e}"),
                })
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = tokio::select! {
            channel = (self.dialer)(endpoint) => channel
                .map_err(|e| AttemptError::Retry(format!("cannot connect to the coordinator: {e}")))?,
            () = cancel.cancelled() => return Err(self.cancelled(digest, offset, size)),
        };
        *cached = Some(CachedChannel {
            coordinator: coordinator.to_string(),
            channel: channel.clone(),
            opened: std::time::Instant::now(),
        });
        Ok(channel)
    }

    /// A download on the kept channel broke: the next one dials again.
    async fn forget_channel(&self) {
        *self.channel.lock().await = None;
    }

    pub fn store(&self) -> &ArtifactStore {
        &self.store
    }

    fn lock_for(&self, hex: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(locks) => locks,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(locks.entry(hex.to_string()).or_default())
    }

    /// Make `digest` (`size` bytes) available in the store: nothing to do when it is there,
    /// else download it (resuming a partial download) and verify it. Returns once the verified
    /// file is in place, or with an error (a mismatch deletes the partial download, so the
    /// next attempt starts clean).
    pub async fn ensure(
        &self,
        digest: &str,
        size: u64,
        cancel: &CancelToken,
    ) -> Result<Fetched, ArtifactError> {
        let checked = parse_digest(digest)?;
        let lock = self.lock_for(checked.hex());
        let _guard = lock.lock().await;

        let final_path = self.store.path_of(&checked);
        let root = self.store.root.clone();
        std::fs::create_dir_all(&root).map_err(io_error(&root))?;
        match std::fs::metadata(&final_path) {
            Ok(meta) if meta.is_file() && meta.len() == size => {
                tracing::info!(%digest, size, "artifact already in the content store; nothing fetched");
                return Ok(Fetched {
                    digest: digest.to_string(),
                    path: final_path,
                    size,
                    fetched: 0,
                    resumed_at: None,
                    already_present: true,
                    attempts: 0,
                });
            }
            Ok(meta) => {
                // Not what this rollout names (a different size can only be damage): fetch it
                // again rather than use it.
                tracing::warn!(%digest, expected = size, found = meta.len(), "stored artifact has the wrong size; fetching it again");
                std::fs::remove_file(&final_path).map_err(io_error(&final_path))?;
            }
            Err(_) => {}
        }

        let partial_path = self.store.partial_path_of(&checked);
        let (mut file, mut hasher, mut offset) = open_partial(&partial_path, size).await?;
        let resumed_at = (offset > 0).then_some(offset);
        if let Some(at) = resumed_at {
            tracing::info!(%digest, size, offset = at, "resuming an interrupted artifact download");
        }

        let mut fetched = 0u64;
        let mut attempts = 0u32;
        let mut failures = 0u32;
        let mut delay = FIRST_RETRY_DELAY;
        while offset < size {
            if cancel.is_cancelled() {
                return Err(ArtifactError::Cancelled {
                    digest: digest.to_string(),
                    offset,
                    size,
                });
            }
            attempts += 1;
            let before = offset;
            let result = self
                .attempt(
                    digest,
                    size,
                    &partial_path,
                    &mut file,
                    &mut hasher,
                    &mut offset,
                    cancel,
                )
                .await;
            fetched += offset - before;
            match result {
                Ok(()) => {}
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Retry(reason)) => {
                    self.forget_channel().await;
                    if offset > before {
                        failures = 0;
                        delay = FIRST_RETRY_DELAY;
                    }
                    failures += 1;
                    if failures >= MAX_ATTEMPTS_WITHOUT_PROGRESS {
                        return Err(ArtifactError::Unreachable {
                            digest: digest.to_string(),
                            attempts: failures,
                            offset,
                            last: reason,
                        });
                    }
                    tracing::warn!(%digest, offset, size, %reason, ?delay, "artifact download interrupted; resuming");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => {}
                    }
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }

        let actual = Sha256Digest::from_bytes(hasher.finalize().into());
        if actual != checked {
            drop(file);
            let _ = std::fs::remove_file(&partial_path);
            tracing::error!(%digest, %actual, size, "artifact does not match its digest; discarded");
            return Err(ArtifactError::Mismatch {
                digest: digest.to_string(),
                size,
                actual: actual.to_string(),
            });
        }
        file.sync_all().map_err(io_error(&partial_path))?;
        drop(file);
        std::fs::rename(&partial_path, &final_path).map_err(io_error(&final_path))?;
        sync_dir(&root);
        let fetched = Fetched {
            digest: digest.to_string(),
            path: final_path,
            size,
            fetched,
            resumed_at,
            already_present: false,
            attempts,
        };
        tracing::info!(%digest, size, bytes_fetched = fetched.fetched, resumed_at = ?resumed_at, attempts, "artifact fetched and verified");
        Ok(fetched)
    }

    /// One download stream from `*offset`: appends to `file` and `hasher` and advances
    /// `*offset` chunk by chunk, so that whatever arrived counts even when the stream breaks.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        digest: &str,
        size: u64,
        partial_path: &Path,
        file: &mut std::fs::File,
        hasher: &mut Sha256,
        offset: &mut u64,
        cancel: &CancelToken,
    ) -> Result<(), AttemptError> {
        let coordinator = self.coordinators.current();
        let channel = self
            .channel(&coordinator, digest, *offset, size, cancel)
            .await?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let request = pb::FetchArtifactRequest {
            digest: digest.to_string(),
            offset: *offset,
            node: self.node.clone(),
        };
        let response = tokio::select! {
            r = client.fetch_artifact(request) => r,
            () = cancel.cancelled() => return Err(self.cancelled(digest, *offset, size)),
        };
        let mut stream = match response {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(classify(digest, status)),
        };
        loop {
            let message = tokio::select! {
                m = tokio::time::timeout(STALL_TIMEOUT, stream.message()) => match m {
                    Ok(m) => m,
                    Err(_) => return Err(AttemptError::Retry(format!("no data for {STALL_TIMEOUT:?}"))),
                },
                () = cancel.cancelled() => return Err(self.cancelled(digest, *offset, size)),
            };
            let chunk = match message {
                Ok(Some(chunk)) => chunk,
                Ok(None) if *offset == size => return Ok(()),
                Ok(None) => {
                    return Err(AttemptError::Retry(format!(
                        "the stream ended at offset {offset} of {size}"
                    )));
                }
                Err(status) => return Err(classify(digest, status)),
            };
            if chunk.total_size != size {
                return Err(AttemptError::Fatal(ArtifactError::SizeMismatch {
                    digest: digest.to_string(),
                    expected: size,
                    actual: chunk.total_size,
                }));
            }
            if chunk.offset != *offset {
                return Err(AttemptError::Retry(format!(
                    "chunk at offset {} where {offset} was expected",
                    chunk.offset
                )));
            }
            let len = chunk.data.len() as u64;
            if len > size - *offset {
                return Err(AttemptError::Fatal(ArtifactError::SizeMismatch {
                    digest: digest.to_string(),
                    expected: size,
                    actual: *offset + len,
                }));
            }
            file.write_all(&chunk.data)
                .map_err(|e| AttemptError::Fatal(io_error(partial_path)(e)))?;
            hasher.update(&chunk.data);
            *offset += len;
        }
    }

    fn cancelled(&self, digest: &str, offset: u64, size: u64) -> AttemptError {
        AttemptError::Fatal(ArtifactError::Cancelled {
            digest: digest.to_string(),
            offset,
            size,
        })
    }
}

/// A gRPC error of a download: statuses that retrying cannot fix end it.
fn classify(digest: &str, status: tonic::Status) -> AttemptError {
    match status.code() {
        Code::NotFound
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => AttemptError::Fatal(ArtifactError::Refused {
            digest: digest.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }),
        code => AttemptError::Retry(format!("{code:?}: {}", status.message())),
    }
}

/// Open (or create) the partial download and hash what it already holds. A partial file longer
/// than the artifact cannot be a prefix of it and is started over.
async fn open_partial(
    path: &Path,
    size: u64,
) -> Result<(std::fs::File, Sha256, u64), ArtifactError> {
    let path = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || -> Result<_, ArtifactError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let len = file.metadata().map_err(io_error(&path))?.len();
        let mut hasher = Sha256::new();
        if len > size {
            file.set_len(0).map_err(io_error(&path))?;
            return Ok((file, hasher, 0));
        }
        if len == 0 {
            // A fresh download, the usual case: no buffer to zero (a 1 MiB one was a tenth of
            // an agent's CPU in a 100-node fleet upgrade).
            return Ok((file, hasher, 0));
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut read = 0u64;
        let mut reader = std::fs::File::open(&path).map_err(io_error(&path))?;
        while read < len {
            let n = reader.read(&mut buf).map_err(io_error(&path))?;
            if n == 0 {
                break;
            }
            let n = n.min(usize::try_from(len - read).unwrap_or(usize::MAX));
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        if read != len {
            // The file shrank while we read it: nobody else writes it, so start over.
            file.set_len(0).map_err(io_error(&path))?;
            return Ok((file, Sha256::new(), 0));
        }
        Ok((file, hasher, len))
    })
    .await;
    match opened {
        Ok(result) => result,
        Err(e) => Err(ArtifactError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("hashing task failed: {e}")),
        }),
    }
}

/// fsync a directory so that a rename in it is durable; failures are only logged (the rename
/// itself succeeded).
pub fn sync_dir(dir: &Path) {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Ok(()) => {}
        Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot fsync directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_before_they_become_paths() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(parse_digest(&good).is_ok());
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}/", "a".repeat(63)),
            String::new(),
        ] {
            assert!(parse_digest(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn describe_says_what_was_fetched() {
        let mut f = Fetched {
            digest: String::new(),
            path: PathBuf::new(),
            size: 4_194_304,
            fetched: 1_048_576,
            resumed_at: Some(3_145_728),
            already_present: false,
            attempts: 1,
        };
        assert_eq!(
            f.describe(),
            "fetched 1048576 of 4194304 bytes, resumed at offset 3145728"
        );
        f.already_present = true;
        assert!(f.describe().starts_with("fetched 0 of 4194304 bytes"));
    }

    #[tokio::test]
    async fn partial_prefix_is_hashed_on_resume() -> Result<(), ArtifactError> {
        let dir = tempfile::tempdir().map_err(io_error(Path::new("tmp")))?;
        let path = dir.path().join("x.partial");
        std::fs::write(&path, b"hello ").map_err(io_error(&path))?;
        let (mut file, mut hasher, offset) = open_partial(&path, 11).await?;
        assert_eq!(offset, 6);
        file.write_all(b"world").map_err(io_error(&path))?;
        hasher.update(b"world");
        assert_eq!(
            hex::encode(hasher.finalize()),
            hex::encode(Sha256::digest(b"hello world"))
        );
        // Longer than the artifact: not a prefix, start over.
        let (_, _, offset) = open_partial(&path, 3).await?;
        assert_eq!(offset, 0);
        Ok(())
    }
}
