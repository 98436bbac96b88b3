//! Connecting to the coordinator, and uploading a script's artifacts.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::control_client::ControlClient;
use hotroll_script::Script;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// `--coordinator URL` shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Address of the coordinator.
    #[arg(
        long,
        env = "HOTROLL_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub coordinator: String,
}

pub async fn connect(args: &CoordinatorArgs) -> anyhow::Result<ControlClient<Channel>> {
    let endpoint = Channel::from_shared(args.coordinator.clone())
        .with_context(|| format!("`{}` is not a valid coordinator URL", args.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", args.coordinator))?;
    Ok(ControlClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES))
}

/// Turn a gRPC status into an error message an operator can act on.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// Hash every artifact of `script` (sources relative to `script_dir`), upload the ones the
/// coordinator does not have, and return the bindings for StartRollout.
pub async fn upload_artifacts(
    client: &mut ControlClient<Channel>,
    script: &Script,
    script_dir: &Path,
) -> anyhow::Result<Vec<pb::ScriptArtifact>> {
    let mut bindings = Vec::new();
    let mut files = Vec::new();
    for artifact in &script.artifacts {
        let path = script_dir.join(&artifact.source.value);
        let bytes = tokio::fs::read(&path).await.with_context(|| {
            format!(
                "artifact `{}`: cannot read {}",
                artifact.name.value,
                path.display()
            )
        })?;
        let hex = hex::encode(Sha256::digest(&bytes));
        if let Some(expected) = &artifact.sha256
            && !expected.value.eq_ignore_ascii_case(&hex)
        {
            bail!(
                "artifact `{}`: {} has sha256 {hex} but the script expects {}",
                artifact.name.value,
                path.display(),
                expected.value
            );
        }
        let digest = format!("sha256:{hex}");
        bindings.push(pb::ScriptArtifact {
            name: artifact.name.value.clone(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            mode: artifact.mode.unwrap_or(0),
            unpack: artifact.unpack,
        });
        files.push((digest, bytes));
    }
    let present = client
        .has_artifacts(pb::HasArtifactsRequest {
            digests: files.iter().map(|(d, _)| d.clone()).collect(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .present;
    for (digest, bytes) in files {
        if present.contains(&digest) {
            continue;
        }
        let total = bytes.len() as u64;
        let chunks: Vec<pb::ArtifactChunk> = if bytes.is_empty() {
            vec![pb::ArtifactChunk {
                digest: digest.clone(),
                offset: 0,
                data: Vec::new(),
                total_size: 0,
            }]
        } else {
            bytes
                .chunks(hotroll_proto::ARTIFACT_CHUNK_SIZE)
                .enumerate()
                .map(|(i, data)| pb::ArtifactChunk {
                    digest: digest.clone(),
                    offset: (i * hotroll_proto::ARTIFACT_CHUNK_SIZE) as u64,
                    data: data.to_vec(),
                    total_size: total,
                })
                .collect()
        };
        client
            .upload_artifact(tokio_stream::iter(chunks))
            .await
            .map_err(status_error)
            .with_context(|| format!("uploading {digest}"))?;
    }
    Ok(bindings)
}
