//! The node's identity (docs/security.md): a certificate the coordinator's CA issued for this
//! node's name, kept in `<data_dir>/tls/` (`node.key` 0600, `node.pem`, `ca.pem`).
//!
//! * First start: no certificate for this node yet, so the agent makes a key, sends a CSR with
//!   its join token to `Identity.Join` (trusting the coordinator whose chain holds the CA the
//!   token names, or `ca_file`), checks what comes back and stores it.
//! * Every connection after that is mutual TLS with that certificate ([`NodeIdentity::dialer`]).
//! * When a third of the certificate's life is left, [`NodeIdentity::renew_loop`] gets a new
//!   one (new key) from `Identity.Renew`, authenticated by the current one; new connections use
//!   it at once. The coordinator ends a session when the certificate it was opened with
//!   expires, and the agent reconnects with the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hotroll_proto::v1 as pb;
use hotroll_proto::v1::identity_client::IdentityClient;
use hotroll_tls::client::{ClientCert, channel_uri};
use hotroll_tls::{CertInfo, ClientTls, Identity, Role, Token, Trust, error_chain, files};
use tonic::Code;
use tonic::transport::Endpoint;

use crate::config::Config;
use crate::dialer::Dialer;

/// How long one Join or Renew attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Retry delays of Join (coordinator not reachable yet) and Renew.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Shortest wait between two renewals.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no node certificate for `{node}` in {dir} and no join token: run `hotroll token create \
         --role agent` on the coordinator and start the agent with --join TOKEN (or \
         `join_token` in the config)"
    )]
    NoCertificate { node: String, dir: String },
    #[error("the node certificate in {dir} {problem}, and there is no join token to get a new one")]
    Unusable { dir: String, problem: String },
    #[error("join refused by the coordinator ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error("the coordinator's answer to Join is not usable: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Tls(#[from] hotroll_tls::TlsError),
    #[error("cannot make a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
}

fn tls_dir(config: &Config) -> PathBuf {
    config.data_dir.join("tls")
}

/// The stored certificate, key and CA of a node, and the TLS client config made from them.
pub struct NodeIdentity {
    node: String,
    coordinator: String,
    dir: PathBuf,
    ca_file: Option<PathBuf>,
    current: RwLock<(Arc<ClientTls>, CertInfo)>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What is stored: certificate info, if it is a usable one for `node`.
fn stored(dir: &Path, node: &str) -> Result<(ClientCert, CertInfo), String> {
    let chain = files::read_certs(&dir.join("node.pem")).map_err(|e| e.to_string())?;
    let key = files::read_key(&dir.join("node.key")).map_err(|e| e.to_string())?;
    let info = hotroll_tls::identity::inspect(&chain[0]).map_err(|e| e.to_string())?;
    let expected = Identity::new(Role::Node, node);
    if info.identity.as_ref() != Some(&expected) {
        return Err(format!(
            "is for {} rather than node `{node}`",
            info.identity
                .as_ref()
                .map_or_else(|| "no hotroll identity".to_string(), ToString::to_string)
        ));
    }
    if SystemTime::now() > info.not_after {
        return Err("has expired".into());
    }
    Ok((ClientCert { chain, key }, info))
}

fn trust_of(dir: &Path, ca_file: Option<&Path>) -> Result<Trust, IdentityError> {
    let path = ca_file.map_or_else(|| dir.join("ca.pem"), Path::to_path_buf);
    Ok(Trust::Ca(files::read_certs(&path)?))
}

impl NodeIdentity {
    /// The identity of `config`'s node: the stored one, or one obtained with the join token.
    /// Retries a coordinator it cannot reach (with backoff, until the caller gives up); a
    /// refusal is an error.
    pub async fn establish(config: &Config) -> Result<Arc<Self>, IdentityError> {
        let dir = tls_dir(config);
        let problem = match stored(&dir, &config.node) {
            Ok((cert, info)) => {
                let trust = trust_of(&dir, config.ca_file.as_deref())?;
                let identity = Self::new(config, cert, info, &trust)?;
                return Ok(Arc::new(identity));
            }
            Err(problem) => problem,
        };
        let Some(token) = &config.join_token else {
            return Err(if dir.join("node.pem").exists() {
                IdentityError::Unusable {
                    dir: dir.display().to_string(),
                    problem,
                }
            } else {
                IdentityError::NoCertificate {
                    node: config.node.clone(),
                    dir: dir.display().to_string(),
                }
            });
        };
        let token = Token::parse(token)?;
        let trust = match &config.ca_file {
            Some(path) => Trust::Ca(files::read_certs(path)?),
            None => Trust::Pin(token.ca_pin()),
        };
        let mut delay = RETRY_MIN;
        loop {
            match join(config, &token, &trust).await {
                Ok((cert, info)) => {
                    let trust = trust_of(&dir, config.ca_file.as_deref())?;
                    let identity = Self::new(config, cert, info, &trust)?;
                    return Ok(Arc::new(identity));
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(reason)) => {
                    tracing::warn!(coordinator = %config.coordinator, %reason, "cannot join yet; retrying");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    fn new(
        config: &Config,
        cert: ClientCert,
        info: CertInfo,
        trust: &Trust,
    ) -> Result<Self, IdentityError> {
        let tls = ClientTls::new(trust, Some(cert))?;
        tracing::info!(node = %config.node, serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "node certificate loaded");
        Ok(Self {
            node: config.node.clone(),
            coordinator: config.coordinator.clone(),
            dir: tls_dir(config),
            ca_file: config.ca_file.clone(),
            current: RwLock::new((Arc::new(tls), info)),
        })
    }

    fn client(&self) -> Arc<ClientTls> {
        match self.current.read() {
            Ok(c) => c.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    /// The current certificate's info.
    pub fn info(&self) -> CertInfo {
        match self.current.read() {
            Ok(c) => c.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// Dial the coordinator with mutual TLS, with whatever certificate is current.
    pub fn dialer(self: &Arc<Self>) -> Dialer {
        let identity = Arc::clone(self);
        Arc::new(move |endpoint: Endpoint| {
            let tls = identity.client();
            Box::pin(async move { tls.connect(endpoint).await })
        })
    }

    /// Renew the certificate whenever a third of its life is left (runs until dropped).
    pub async fn renew_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let info = self.info();
            let due = info.not_after - info.lifetime() / 3;
            let wait = if failures == 0 {
                // Never in a tight loop, whatever the certificate says.
                due.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(MIN_RENEW_INTERVAL)
            } else {
                RETRY_MIN
                    .saturating_mul(1 << failures.min(7))
                    .min(RETRY_MAX)
            };
            tokio::time::sleep(wait).await;
            match self.renew().await {
                Ok(info) => {
                    failures = 0;
                    tracing::info!(node = %self.node, serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "node certificate renewed");
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(node = %self.node, error = %e, "cannot renew the node certificate; retrying");
                }
            }
        }
    }

    /// One renewal: new key, CSR, `Identity.Renew` over mutual TLS with the current
    /// certificate; the answer is checked, stored and made current.
    pub async fn renew(&self) -> Result<CertInfo, IdentityError> {
        let key = rcgen::KeyPair::generate()?;
        let csr = csr_pem(&self.node, &key)?;
        let endpoint = endpoint(&self.coordinator)?;
        let tls = self.client();
        let call = async {
            let channel = tls
                .connect(endpoint)
                .await
                .map_err(|e| IdentityError::BadAnswer(format!("cannot connect: {e}")))?;
            IdentityClient::new(channel)
                .renew(pb::RenewRequest { csr_pem: csr })
                .await
                .map_err(|s| IdentityError::Refused {
                    code: s.code(),
                    message: s.message().to_string(),
                })
        };
        let response = tokio::time::timeout(ATTEMPT_TIMEOUT, call)
            .await
            .map_err(|_| IdentityError::BadAnswer("no answer in time".into()))??
            .into_inner();
        let trust = trust_of(&self.dir, self.ca_file.as_deref())?;
        let (cert, info) = accept(&self.dir, &self.node, &key, &response, None)?;
        let tls = ClientTls::new(&trust, Some(cert))?;
        match self.current.write() {
            Ok(mut c) => *c = (Arc::new(tls), info.clone()),
            Err(p) => *p.into_inner() = (Arc::new(tls), info.clone()),
        }
        Ok(info)
    }
}

enum Attempt {
    Retry(String),
    Fatal(IdentityError),
}

fn endpoint(coordinator: &str) -> Result<Endpoint, IdentityError> {
    Endpoint::from_shared(channel_uri(coordinator))
        .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
        .map_err(|e| IdentityError::BadAnswer(format!("invalid coordinator address: {e}")))
}

fn csr_pem(node: &str, key: &rcgen::KeyPair) -> Result<String, IdentityError> {
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, node);
    params.distinguished_name = name;
    Ok(params.serialize_request(key)?.pem()?)
}

/// One Join attempt.
async fn join(
    config: &Config,
    token: &Token,
    trust: &Trust,
) -> Result<(ClientCert, CertInfo), Attempt> {
    let fatal = Attempt::Fatal;
    let key = rcgen::KeyPair::generate().map_err(|e| fatal(e.into()))?;
    let csr = csr_pem(&config.node, &key).map_err(fatal)?;
    let endpoint = endpoint(&config.coordinator).map_err(fatal)?;
    let tls = ClientTls::new(trust, None).map_err(|e| fatal(e.into()))?;
    let call = async {
        let channel = tls
            .connect(endpoint)
            .await
            .map_err(|e| Attempt::Retry(format!("cannot connect: {}", error_chain(&e))))?;
        IdentityClient::new(channel)
            .join(pb::JoinRequest {
                token: token.expose(),
                node: config.node.clone(),
                csr_pem: csr,
            })
            .await
            .map_err(|s| match s.code() {
                Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => {
                    Attempt::Retry(format!("{:?}: {}", s.code(), s.message()))
                }
                code => Attempt::Fatal(IdentityError::Refused {
                    code,
                    message: s.message().to_string(),
                }),
            })
    };
    let response = tokio::time::timeout(ATTEMPT_TIMEOUT, call)
        .await
        .map_err(|_| Attempt::Retry("no answer in time".into()))??
        .into_inner();
    let pin = match trust {
        Trust::Pin(pin) => Some(*pin),
        Trust::Ca(_) => None,
    };
    let accepted = accept(&tls_dir(config), &config.node, &key, &response, pin).map_err(fatal)?;
    tracing::info!(node = %config.node, serial = %accepted.1.serial, "joined: node certificate stored");
    Ok(accepted)
}

/// Check a certificate the coordinator issued (for this node, for this key, from the pinned
/// CA when there is a pin) and store it with its key and the CA.
fn accept(
    dir: &Path,
    node: &str,
    key: &rcgen::KeyPair,
    response: &pb::CertificateResponse,
    pin: Option<[u8; 32]>,
) -> Result<(ClientCert, CertInfo), IdentityError> {
    let chain = files::parse_certs(response.certificate_pem.as_bytes())?;
    let info = hotroll_tls::identity::inspect(&chain[0])?;
    if info.identity != Some(Identity::new(Role::Node, node)) {
        return Err(IdentityError::BadAnswer(format!(
            "the certificate is not for node `{node}`"
        )));
    }
    let ca = files::parse_certs(response.ca_pem.as_bytes())?;
    if let Some(pin) = pin
        && !ca.iter().any(|c| hotroll_tls::fingerprint(c) == pin)
    {
        return Err(IdentityError::BadAnswer(
            "the CA sent is not the one the join token names".into(),
        ));
    }
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // The certificate must be for our key.
    rustls::sign::CertifiedKey::from_der(
        chain.clone(),
        key_der.clone_key(),
        &hotroll_tls::provider(),
    )
    .map_err(|e| IdentityError::BadAnswer(format!("the certificate is not for our key: {e}")))?;
    files::private_dir(dir)?;
    files::write_secret(&dir.join("node.key"), key.serialize_pem().as_bytes())?;
    files::write_public(&dir.join("node.pem"), response.certificate_pem.as_bytes())?;
    files::write_public(&dir.join("ca.pem"), response.ca_pem.as_bytes())?;
    Ok((
        ClientCert {
            chain,
            key: key_der,
        },
        info,
    ))
}
