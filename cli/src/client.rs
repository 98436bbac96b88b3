//! Connecting to the coordinator, and uploading a script's artifacts.
//!
//! Every client command talks TLS unless `--insecure` is given (docs/security.md). It proves
//! who it is with a bearer token (`--token`, `HOTROLL_TOKEN`) or a client certificate
//! (`--cert`/`--key`), and trusts the coordinator's CA from `--ca`/`HOTROLL_CA`, else
//! `~/.config/hotroll/ca.pem` when that exists, else the CA the token pins.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::control_client::ControlClient;
use hotroll_script::Script;
use hotroll_tls::client::{ClientCert, channel_uri, is_tls_url};
use hotroll_tls::{ClientTls, Token, Trust, error_chain, files};
use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// `--coordinator URL` and the credentials, shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Address of the coordinator: https://HOST:PORT (http:// only with --insecure). For a
    /// group of coordinators on etcd, any of them or a comma-separated list: a standby sends
    /// the CLI on to the leader.
    #[arg(
        long,
        env = "HOTROLL_COORDINATOR",
        default_value = "https://127.0.0.1:7070",
        global = true
    )]
    pub coordinator: String,
    /// Bearer token (`hotroll token create --role operator|viewer` on the coordinator).
    #[arg(long, env = "HOTROLL_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// CA certificate to trust (the coordinator's `<data_dir>/tls/ca.pem`); default
    /// ~/.config/hotroll/ca.pem when it exists, else the CA the token names.
    #[arg(long, env = "HOTROLL_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (`hotroll cert issue`), instead of a token.
    #[arg(long, env = "HOTROLL_CERT", value_name = "FILE", global = true)]
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, env = "HOTROLL_KEY", value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
    /// Talk plaintext HTTP/2 to a coordinator started with `serve --insecure` (no TLS, no
    /// authentication).
    // Boolish: `HOTROLL_INSECURE=1` as documented, also true/yes/on.
    #[arg(long, env = "HOTROLL_INSECURE", global = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

impl CoordinatorArgs {
    /// `url` with no credentials (plaintext when it is http://).
    pub fn new(url: impl Into<String>) -> Self {
        let coordinator = url.into();
        Self {
            insecure: !is_tls_url(&coordinator),
            coordinator,
            token: None,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request when there is a token.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// The CLI's Control client.
pub type Client = ControlClient<InterceptedService<Channel, Credentials>>;

/// `~/.config/hotroll/ca.pem`.
fn default_ca_path() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("hotroll").join("ca.pem"))
}

fn read_ca(path: &Path) -> anyhow::Result<Trust> {
    Ok(Trust::Ca(files::read_certs(path).with_context(|| {
        format!("cannot read the CA certificate {}", path.display())
    })?))
}

/// The TLS client config and bearer token `args` ask for.
pub fn client_tls(args: &CoordinatorArgs) -> anyhow::Result<(ClientTls, Credentials)> {
    let token = match &args.token {
        Some(text) => Some(Token::parse(text).context("--token / HOTROLL_TOKEN")?),
        None => None,
    };
    let trust = match (&args.ca, default_ca_path().filter(|p| p.is_file()), &token) {
        (Some(ca), _, _) => read_ca(ca)?,
        (None, Some(ca), _) => read_ca(&ca)?,
        (None, None, Some(token)) => Trust::Pin(token.ca_pin()),
        (None, None, None) => bail!(
            "no CA to check the coordinator's certificate against: pass --ca FILE (the \
             coordinator's <data_dir>/tls/ca.pem) or a token (--token, from `hotroll token \
             create`); or --insecure for a coordinator started with --insecure"
        ),
    };
    let cert = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(ClientCert {
            chain: files::read_certs(cert)?,
            key: files::read_key(key)?,
        }),
        (None, None) => None,
        _ => bail!("--cert and --key go together"),
    };
    if cert.is_none() && token.is_none() {
        bail!(
            "no credentials: pass --token (or HOTROLL_TOKEN; `hotroll token create --role \
             operator` on the coordinator makes one) or --cert and --key"
        );
    }
    let bearer = match &token {
        Some(token) => Some(
            format!("Bearer {}", token.expose())
                .parse()
                .context("the token cannot be sent as a header")?,
        ),
        None => None,
    };
    Ok((ClientTls::new(&trust, cert)?, Credentials { bearer }))
}

/// How long the CLI looks for a group's leader (an election after a failover takes about the
/// leader's lease).
const FIND_LEADER_FOR: Duration = Duration::from_secs(15);
/// How long one coordinator may take to say whether it leads.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connect to the coordinator that leads: the one `--coordinator` names, or for a group the
/// one a standby names (followed when it is in the list or over TLS, where it must still prove
/// its certificate), trying the listed coordinators in turn while none answers.
pub async fn connect(args: &CoordinatorArgs) -> anyhow::Result<Client> {
    let listed: Vec<String> = args
        .coordinator
        .split(',')
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty())
        .collect();
    let Some(first) = listed.first().cloned() else {
        bail!("--coordinator names no coordinator");
    };
    let deadline = tokio::time::Instant::now() + FIND_LEADER_FOR;
    let mut next = 0usize;
    let mut candidate = first;
    loop {
        let (leader, error) = match connect_one(args, &candidate).await {
            Ok(mut client) => {
                // Cheap, and allowed to every role that may read: the leader answers it (with
                // NOT_FOUND for the empty id), a standby "not the leader". (Not HasArtifacts:
                // a standby serves that one, for the leader's replication.)
                let probe = client.get_rollout(pb::GetRolloutRequest {
                    rollout_id: String::new(),
                });
                match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    // A coordinator that accepts connections but does not answer (paused,
                    // overloaded): try another.
                    Err(_) => (
                        None,
                        anyhow::anyhow!("{candidate}: no answer within {PROBE_TIMEOUT:?}"),
                    ),
                    Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                        let leader = status
                            .metadata()
                            .get(hotroll_proto::LEADER_METADATA)
                            .and_then(|value| value.to_str().ok())
                            .map(str::to_string);
                        (
                            leader,
                            anyhow::anyhow!("{}: {}", candidate, status.message()),
                        )
                    }
                    Ok(_) => return Ok(client),
                }
            }
            Err(e) => (None, e),
        };
        if let Some(leader) = leader
            && leader != candidate
            && (listed.contains(&leader) || is_tls_url(&leader))
        {
            candidate = leader;
            continue;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(error.context(format!(
                "no coordinator of {} leads after {FIND_LEADER_FOR:?}",
                args.coordinator
            )));
        }
        if listed.len() == 1 && !error.to_string().contains("not the leader") {
            // One coordinator that cannot be reached: say so at once, as always.
            return Err(error);
        }
        next = (next + 1) % listed.len();
        if next == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        candidate = listed[next].clone();
    }
}

async fn connect_one(args: &CoordinatorArgs, url: &str) -> anyhow::Result<Client> {
    let tls = is_tls_url(url);
    if !tls && !args.insecure {
        bail!(
            "refusing to talk plaintext to {}: use https://, or pass --insecure for a \
             coordinator started with `serve --insecure`",
            url
        );
    }
    if tls && args.insecure {
        bail!(
            "--insecure talks plaintext: give the coordinator as http://, not {}",
            url
        );
    }
    let endpoint = Endpoint::from_shared(channel_uri(url))
        .with_context(|| format!("`{}` is not a valid coordinator URL", url))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let (channel, credentials) = if tls {
        let (client_tls, credentials) = client_tls(args)?;
        let channel = client_tls
            .connect(endpoint)
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
            .with_context(|| format!("cannot reach the coordinator at {}", url))?;
        (channel, credentials)
    } else {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
            .with_context(|| format!("cannot reach the coordinator at {}", url))?;
        (channel, Credentials::default())
    };
    Ok(ControlClient::with_interceptor(channel, credentials)
        .max_decoding_message_size(hotroll_coordinator::server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(hotroll_coordinator::server::MAX_MESSAGE_BYTES))
}

/// Turn a gRPC status into an error message an operator can act on.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// Hash every artifact of `script` (sources relative to `script_dir`), upload the ones the
/// coordinator does not have, and return the bindings for StartRollout.
pub async fn upload_artifacts(
    client: &mut Client,
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
