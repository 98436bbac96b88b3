//! Artifacts on two coordinators before a rollout starts (docs/ha.md, "Artifacts").
//!
//! Artifacts are not kept in etcd (a tarball would not fit its request limit, and the database
//! would grow by every release ever shipped). Each coordinator keeps them in its own content
//! store; the leader, before it starts a rollout, makes sure each of the rollout's digests is
//! held by at least [`REQUIRED_HOLDERS`] coordinators of the group: it asks every other member
//! (the candidates of the etcd election, each with its advertised URL) which digests it has
//! (`HasArtifacts`, which a standby answers from its own store) and uploads the missing ones to
//! it (`UploadArtifact`, which a standby accepts: the digest is verified on the way in, as for
//! any upload). Pushing at start, to every member that answers, means a new leader elected in
//! the middle of the rollout already holds what its agents will fetch.
//!
//! With TLS the leader calls its peers with a client certificate it issues itself from the
//! group's CA (the one trust root every coordinator is given), as an operator.

use std::time::Duration;

use hotroll_etcd::{EtcdClient, EtcdError};
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::control_client::ControlClient;
use hotroll_script::Sha256Digest;
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::artifacts::ArtifactStore;

/// A rollout starts only when this many coordinators of the group hold each of its artifacts.
pub const REQUIRED_HOLDERS: usize = 2;

/// Connecting to a peer, and asking it what it holds.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// One artifact's upload to a peer (artifacts are up to 1 GiB).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot list the coordinators of the group in etcd: {0}")]
    Members(#[from] EtcdError),
    #[error(
        "artifact {digest} is held by {held} coordinator(s) of the group; a rollout starts only \
         when {REQUIRED_HOLDERS} hold it (so that a new leader has it): {why}"
    )]
    TooFewHolders {
        digest: String,
        held: usize,
        why: String,
    },
    #[error("peer TLS: {0}")]
    Tls(String),
}

/// The leader's view of its peers, for artifact replication.
#[derive(Clone)]
pub struct Replication {
    client: EtcdClient,
    /// The etcd election's name: every campaigning coordinator has a key under it.
    election: Vec<u8>,
    advertise: String,
    /// The group's CA, to issue this coordinator's client certificate from (per replication,
    /// so it never outlives its validity).
    tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("advertise", &self.advertise)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Replication {
    pub fn new(
        client: EtcdClient,
        election: Vec<u8>,
        advertise: String,
        tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    ) -> Self {
        Self {
            client,
            election,
            advertise,
            tls,
        }
    }

    /// The advertised URLs of the group's other coordinators: every candidate of the election
    /// (the leader's key and each standby's) but this one.
    pub async fn peers(&self) -> Result<Vec<String>, EtcdError> {
        let mut prefix = self.election.clone();
        prefix.push(b'/');
        let candidates = self.client.get_prefix(&prefix).await?;
        let mut peers: Vec<String> = candidates
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .filter(|url| *url != self.advertise)
            .collect();
        peers.sort();
        peers.dedup();
        Ok(peers)
    }

    /// Make sure every one of `digests` (held here) is held by [`REQUIRED_HOLDERS`]
    /// coordinators: upload it to every peer that lacks it. Every peer that answers gets it;
    /// an error names each digest held by too few, and why each peer did not take it.
    pub async fn ensure(
        &self,
        store: &ArtifactStore,
        digests: &[Sha256Digest],
    ) -> Result<(), ReplicationError> {
        if digests.is_empty() {
            return Ok(());
        }
        let peers = self.peers().await?;
        let tls = self.tls.as_deref().map(peer_tls).transpose()?;
        let results = futures::future::join_all(
            peers
                .iter()
                .map(|peer| replicate_to(tls.as_ref(), peer, store, digests)),
        )
        .await;
        for digest in digests {
            let mut held = 1;
            let mut why = Vec::new();
            for (peer, result) in peers.iter().zip(&results) {
                match result {
                    Ok(holds) if holds.contains(digest) => held += 1,
                    Ok(_) => why.push(format!("{peer} did not take it")),
                    Err(e) => why.push(format!("{peer}: {e}")),
                }
            }
            if held < REQUIRED_HOLDERS {
                if peers.is_empty() {
                    why.push("no other coordinator of the group is running".into());
                }
                return Err(ReplicationError::TooFewHolders {
                    digest: digest.to_string(),
                    held,
                    why: why.join("; "),
                });
            }
            tracing::info!(%digest, held, "artifact replicated");
        }
        Ok(())
    }
}

/// Upload to `peer` what it lacks of `digests`; the digests it holds afterwards.
async fn replicate_to(
    tls: Option<&ClientTlsConfig>,
    peer: &str,
    store: &ArtifactStore,
    digests: &[Sha256Digest],
) -> Result<Vec<Sha256Digest>, String> {
    let channel = connect(tls, peer).await?;
    // Chunks are ARTIFACT_CHUNK_SIZE and the answers small: tonic's default limits fit.
    let mut control = ControlClient::new(channel);
    let asked = pb::HasArtifactsRequest {
        digests: digests.iter().map(ToString::to_string).collect(),
    };
    let present = tokio::time::timeout(PEER_TIMEOUT, control.has_artifacts(asked))
        .await
        .map_err(|_| format!("no answer within {PEER_TIMEOUT:?}"))?
        .map_err(|status| status.message().to_string())?
        .into_inner()
        .present;
    let mut holds = Vec::new();
    for digest in digests {
        if present.iter().any(|p| *p == digest.to_string()) {
            holds.push(digest.clone());
            continue;
        }
        let chunks = file_chunks(store, digest).await?;
        let sent = tokio::time::timeout(UPLOAD_TIMEOUT, control.upload_artifact(chunks))
            .await
            .map_err(|_| format!("upload of {digest} not done within {UPLOAD_TIMEOUT:?}"))?
            .map_err(|status| format!("upload of {digest}: {}", status.message()))?
            .into_inner();
        if sent.digest != digest.to_string() {
            return Err(format!("uploaded {digest}, stored {}", sent.digest));
        }
        tracing::info!(%digest, %peer, size = sent.size, "artifact uploaded to a peer");
        holds.push(digest.clone());
    }
    Ok(holds)
}

async fn connect(tls: Option<&ClientTlsConfig>, peer: &str) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(peer.to_string())
        .map_err(|e| format!("not a URL: {e}"))?
        .connect_timeout(PEER_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))
}

/// The chunks of a stored artifact, read from disk as the upload goes.
async fn file_chunks(
    store: &ArtifactStore,
    digest: &Sha256Digest,
) -> Result<impl futures::Stream<Item = pb::ArtifactChunk> + Send + 'static, String> {
    let total = store.size_of(digest).map_err(|e| e.to_string())?;
    let path = store.path_of(digest);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let digest = digest.to_string();
    Ok(futures::stream::unfold(
        (file, 0u64, false),
        move |(mut file, offset, done)| {
            let digest = digest.clone();
            async move {
                if done {
                    return None;
                }
                let mut buf = vec![0u8; hotroll_proto::ARTIFACT_CHUNK_SIZE];
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        // The upload ends short; the peer refuses it (size mismatch).
                        tracing::warn!(%digest, error = %e, "cannot read an artifact to replicate");
                        return None;
                    }
                };
                // The first chunk is sent even for an empty artifact: it carries the digest.
                if n == 0 && offset > 0 {
                    return None;
                }
                buf.truncate(n);
                let chunk = pb::ArtifactChunk {
                    digest,
                    offset,
                    data: buf,
                    total_size: total,
                };
                let next = offset + n as u64;
                Some((chunk, (file, next, n == 0 || next >= total)))
            }
        },
    ))
}

/// A client certificate for this coordinator, issued from the group's CA, as an operator.
fn peer_tls(tls: &crate::tls::ServerTls) -> Result<ClientTlsConfig, ReplicationError> {
    let pki = tls.pki();
    let key = rcgen::KeyPair::generate().map_err(|e| ReplicationError::Tls(e.to_string()))?;
    let identity = hotroll_tls::Identity::new(hotroll_tls::Role::Operator, "hotroll-coordinator");
    let (cert, _) = pki
        .issue_client(&identity, &key, Duration::from_secs(30 * 24 * 3600))
        .map_err(|e| ReplicationError::Tls(e.to_string()))?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.ca_pem()))
        .identity(tonic::transport::Identity::from_pem(
            cert,
            key.serialize_pem(),
        )))
}
