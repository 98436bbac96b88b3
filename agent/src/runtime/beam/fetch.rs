//! Artifact bytes for the BEAM runtime, from the agent's shared content store and fetcher
//! ([`crate::artifacts`]: `Agent.FetchArtifact`, resumable, verified against the digest before
//! a byte is used).

use crate::artifacts::Fetcher;
use crate::cancel::CancelToken;
use crate::runtime::{ArtifactRef, BoxFuture, RolloutContext};

use super::ArtifactSource;

/// A `.beam` file is small; anything above this is refused before it is fetched.
const MAX_SIZE: u64 = 64 * 1024 * 1024;

/// [`ArtifactSource`] over the shared [`Fetcher`].
#[derive(Debug, Clone)]
pub struct StoreArtifacts {
    pub fetcher: Fetcher,
}

impl ArtifactSource for StoreArtifacts {
    fn bytes<'a>(
        &'a self,
        _rollout: &'a RolloutContext,
        artifact: &'a ArtifactRef,
        cancel: &'a CancelToken,
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            if artifact.size > MAX_SIZE {
                return Err(format!("{} bytes is too large for a module", artifact.size));
            }
            let path = self
                .fetcher
                .ensure(&artifact.digest, artifact.size, cancel)
                .await
                .map_err(|e| e.to_string())?
                .path;
            tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        })
    }
}
