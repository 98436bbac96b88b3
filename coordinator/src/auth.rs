//! Who may call what (docs/security.md), and the limits on what one caller may ask for.
//!
//! * [`TokenStore`]: join and bearer tokens as files in `<data_dir>/tokens/`, one per token,
//!   named by the SHA-256 of its secret (the secret itself is never stored), 0600 in a 0700
//!   directory. `hotroll token create` writes them without the server (file access to the data
//!   dir is the admin credential); the server reads them per request. A join token is
//!   single-use: redeeming renames its file into `used/`, which only one caller can do.
//! * [`AuthThrottle`]: failed authentications per peer address; after a few, the address must
//!   wait (exponential, bounded) and is refused without its credential being looked at.
//! * [`Auth`]: the checks. With TLS off (`--insecure`) everyone is [`Principal::Anonymous`] and
//!   may do everything; the limits still apply.
//! * [`GuardedControl`], [`GuardedAgent`], [`IdentityService`]: the gRPC services as the server
//!   mounts them. The first two wrap the real services: every RPC is authorized (and limited)
//!   here before the wrapped service sees it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use hotroll_proto::v1 as pb;
use hotroll_tls::identity::{unix_ms, valid_name};
use hotroll_tls::token::short_id;
use hotroll_tls::{CertInfo, Identity, Role, Token, files};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::control::ControlService;
use crate::session::AgentService;
use crate::tls::ServerTls;

/// Artifacts one script may bind (and digests one HasArtifacts may ask about).
pub const MAX_ARTIFACTS_PER_SCRIPT: usize = 256;
/// Uploads one client may have in flight at once.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// Bounds on a Hello: labels, apps, journal entries, and the length of any one string in it.
pub const MAX_HELLO_LABELS: usize = 128;
pub const MAX_HELLO_APPS: usize = 1024;
pub const MAX_HELLO_JOURNAL: usize = 4096;
pub const MAX_HELLO_STRING: usize = 1024;
/// Failed authentications an address may make before it has to wait.
pub const FREE_FAILURES: u32 = 3;
/// The first wait; it doubles with every further failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Addresses remembered by the throttle (the oldest are forgotten first).
const MAX_TRACKED_PEERS: usize = 16_384;
/// Default lifetime of a token created without `--ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Tokens

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Join once as a node (`hotroll-agent --join`).
    Agent,
    /// Use the CLI for everything.
    Operator,
    /// Use the CLI to list, show and watch only.
    Viewer,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Agent => "agent",
            TokenRole::Operator => "operator",
            TokenRole::Viewer => "viewer",
        }
    }
}

/// A token's record at rest (`<data_dir>/tokens/<sha256 of the secret>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub role: TokenRole,
    /// For an agent token: the only node name it may join as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_unix_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown token (never issued by this coordinator, or revoked)")]
    Unknown,
    #[error("the token expired at {} (unix ms)", .0)]
    Expired(u64),
    #[error("the join token was already used (by node `{by}`); join tokens are single-use")]
    Used { by: String },
    #[error("this is an {0} token; it cannot be used here")]
    WrongRole(&'static str),
    #[error("this join token is for node `{0}`")]
    WrongNode(String),
    #[error("token store: {0}")]
    Io(String),
}

/// A token listed by `hotroll token list`.
#[derive(Debug, Clone, Serialize)]
pub struct ListedToken {
    /// The first 12 hex characters of the token's id (the SHA-256 of its secret).
    pub id: String,
    #[serde(flatten)]
    pub record: TokenRecord,
    pub used: bool,
    pub expired: bool,
}

/// Tokens at rest, as files.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tokens"),
        }
    }

    fn live_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn used_path(&self, id: &str) -> PathBuf {
        self.dir.join("used").join(format!("{id}.json"))
    }

    fn read(path: &Path) -> Result<Option<TokenRecord>, TokenError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| TokenError::Io(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TokenError::Io(format!("{}: {e}", path.display()))),
        }
    }

    /// Issue a token for the CA `ca_pin`, valid for `ttl`.
    pub fn create(
        &self,
        ca_pin: [u8; 32],
        role: TokenRole,
        ttl: Duration,
        node: Option<String>,
    ) -> Result<(Token, TokenRecord), TokenError> {
        files::private_dir(&self.dir).map_err(|e| TokenError::Io(e.to_string()))?;
        let token = Token::generate(ca_pin);
        let now = SystemTime::now();
        let record = TokenRecord {
            role,
            node,
            created_unix_ms: unix_ms(now),
            expires_unix_ms: unix_ms(now + ttl),
            used_by: None,
            used_unix_ms: None,
        };
        let bytes =
            serde_json::to_vec_pretty(&record).map_err(|e| TokenError::Io(e.to_string()))?;
        files::write_secret(&self.live_path(&token.id()), &bytes)
            .map_err(|e| TokenError::Io(e.to_string()))?;
        Ok((token, record))
    }

    /// The live record of `token` for a use by `role`, checked for expiry and role.
    pub fn check(&self, token: &Token, roles: &[TokenRole]) -> Result<TokenRecord, TokenError> {
        let id = token.id();
        let Some(record) = Self::read(&self.live_path(&id))? else {
            return Err(match Self::read(&self.used_path(&id))? {
                Some(used) => TokenError::Used {
                    by: used.used_by.unwrap_or_default(),
                },
                None => TokenError::Unknown,
            });
        };
        if unix_ms(SystemTime::now()) >= record.expires_unix_ms {
            return Err(TokenError::Expired(record.expires_unix_ms));
        }
        if !roles.contains(&record.role) {
            return Err(TokenError::WrongRole(record.role.as_str()));
        }
        Ok(record)
    }

    /// Use up a join token for `node`: of concurrent callers exactly one succeeds.
    pub fn redeem(&self, token: &Token, node: &str) -> Result<(), TokenError> {
        let id = token.id();
        let used = self.used_path(&id);
        files::private_dir(&self.dir.join("used")).map_err(|e| TokenError::Io(e.to_string()))?;
        match std::fs::rename(self.live_path(&id), &used) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenError::Used {
                    by: Self::read(&used)?
                        .and_then(|r| r.used_by)
                        .unwrap_or_default(),
                });
            }
            Err(e) => return Err(TokenError::Io(e.to_string())),
        }
        // Who used it, for `hotroll token list` and the error of a second attempt.
        if let Ok(Some(mut record)) = Self::read(&used) {
            record.used_by = Some(node.to_string());
            record.used_unix_ms = Some(unix_ms(SystemTime::now()));
            if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
                let _ = files::write_secret(&used, &bytes);
            }
        }
        Ok(())
    }

    /// Every token, live and used.
    pub fn list(&self) -> Result<Vec<ListedToken>, TokenError> {
        let now = unix_ms(SystemTime::now());
        let mut out = Vec::new();
        for (dir, used) in [(self.dir.clone(), false), (self.dir.join("used"), true)] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(TokenError::Io(format!("{}: {e}", dir.display()))),
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                if id.starts_with('.') {
                    continue;
                }
                if let Some(record) = Self::read(&entry.path())? {
                    out.push(ListedToken {
                        id: short_id(id).to_string(),
                        expired: now >= record.expires_unix_ms,
                        record,
                        used,
                    });
                }
            }
        }
        out.sort_by_key(|t| t.record.created_unix_ms);
        Ok(out)
    }

    /// Revoke the live tokens whose id starts with `prefix` (at least 8 characters); returns
    /// how many.
    pub fn revoke(&self, prefix: &str) -> Result<usize, TokenError> {
        if prefix.len() < 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Io(
                "give at least 8 hex characters of the token id (see `hotroll token list`)".into(),
            ));
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
                    std::fs::remove_file(entry.path())
                        .map_err(|e| TokenError::Io(e.to_string()))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

// ---------------------------------------------------------------------------------------------
// Issued node certificates

/// The latest certificate issued to each node (`<data_dir>/tls/nodes/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCert {
    pub serial: String,
    pub not_after_unix_ms: u64,
    pub issued_unix_ms: u64,
}

fn issued_path(data_dir: &Path, node: &str) -> PathBuf {
    crate::tls::tls_dir(data_dir)
        .join("nodes")
        .join(format!("{node}.json"))
}

fn read_issued(data_dir: &Path, node: &str) -> Option<IssuedCert> {
    let bytes = std::fs::read(issued_path(data_dir, node)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn record_issued(data_dir: &Path, node: &str, info: &CertInfo) {
    let record = IssuedCert {
        serial: info.serial.clone(),
        not_after_unix_ms: info.not_after_unix_ms(),
        issued_unix_ms: unix_ms(SystemTime::now()),
    };
    let path = issued_path(data_dir, node);
    let result = serde_json::to_vec_pretty(&record)
        .map_err(|e| e.to_string())
        .and_then(|bytes| files::write_public(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = result {
        tracing::error!(node, error = %e, "cannot record the issued certificate");
    }
}

// ---------------------------------------------------------------------------------------------
// Throttle

#[derive(Debug, Clone, Copy)]
struct PeerFailures {
    failures: u32,
    blocked_until: Instant,
    last: Instant,
}

/// Failed authentications per peer address, and the wait they impose.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    peers: Mutex<HashMap<IpAddr, PeerFailures>>,
}

impl AuthThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerFailures>> {
        match self.peers.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        }
    }

    /// `Err(wait left)` while `ip` must wait.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        match self.lock().get(&ip) {
            Some(p) if p.blocked_until > now => Err(p.blocked_until - now),
            _ => Ok(()),
        }
    }

    /// Count a failure of `ip`; returns the wait it now has (zero for the first few).
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut peers = self.lock();
        if peers.len() >= MAX_TRACKED_PEERS && !peers.contains_key(&ip) {
            let stale = MAX_BACKOFF * 4;
            peers.retain(|_, p| now.duration_since(p.last) < stale);
            if peers.len() >= MAX_TRACKED_PEERS
                && let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last).map(|(ip, _)| *ip)
            {
                peers.remove(&oldest);
            }
        }
        let entry = peers.entry(ip).or_insert(PeerFailures {
            failures: 0,
            blocked_until: now,
            last: now,
        });
        // A quiet spell of a few maximum waits forgives the past.
        if now.duration_since(entry.last) > MAX_BACKOFF * 4 {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
        let wait = backoff(entry.failures);
        entry.blocked_until = now + wait;
        wait
    }

    /// A successful authentication of `ip` clears its failures.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut peers = self.lock();
        if peers.contains_key(&ip) {
            peers.remove(&ip);
        }
    }

    /// A failed TLS handshake: logged (a client that just closes is not worth a warning), and
    /// counted when it is a certificate problem.
    pub fn handshake_failed(&self, ip: IpAddr, error: &std::io::Error) {
        let text = error.to_string();
        if !text.to_ascii_lowercase().contains("certificate") {
            tracing::debug!(peer = %ip, error = %text, "TLS handshake failed");
            return;
        }
        let wait = self.failed(ip);
        let failures = self.lock().get(&ip).map_or(1, |p| p.failures);
        // A flood is logged at its start and then at every doubling, not once per attempt.
        if failures <= FREE_FAILURES + 1 || failures.is_power_of_two() {
            tracing::warn!(peer = %ip, failures, backoff = ?wait, error = %text, "TLS handshake refused");
        } else {
            tracing::debug!(peer = %ip, failures, error = %text, "TLS handshake refused");
        }
    }
}

/// The wait after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    if failures <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES - 1).min(16);
    BASE_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

// ---------------------------------------------------------------------------------------------
// Principals and checks

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// TLS is off: no identity, every right.
    Anonymous(Option<IpAddr>),
    /// A client certificate's identity.
    Cert(Identity),
    /// A bearer token (its short id) and its role.
    Token { id: String, role: TokenRole },
}

impl Principal {
    /// Whether this principal may do what needs `access`.
    fn may(&self, access: Access) -> bool {
        match self {
            Principal::Anonymous(_) => true,
            Principal::Cert(id) => match access {
                Access::Read => matches!(id.role, Role::Operator | Role::Viewer),
                Access::Write => id.role == Role::Operator,
            },
            Principal::Token { role, .. } => match access {
                Access::Read => matches!(role, TokenRole::Operator | TokenRole::Viewer),
                Access::Write => *role == TokenRole::Operator,
            },
        }
    }

    /// The key per-client limits are counted under.
    fn client_key(&self) -> String {
        match self {
            Principal::Anonymous(Some(ip)) => format!("ip:{ip}"),
            Principal::Anonymous(None) => "anonymous".into(),
            Principal::Cert(id) => format!("cert:{}", id.uri()),
            Principal::Token { id, .. } => format!("token:{id}"),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous(_) => f.write_str("anonymous (TLS off)"),
            Principal::Cert(id) => write!(f, "{id} (certificate)"),
            Principal::Token { id, role } => write!(f, "{} token {id}…", role.as_str()),
        }
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// List, show, watch.
    Read,
    /// Upload, start, abort, pause, resume, promote.
    Write,
}

/// The node a session's certificate names, put in the request's extensions by
/// [`GuardedAgent`] for the session handler to compare with the Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub not_after: SystemTime,
}

/// Refuse a Hello whose node name is not the certificate's, or that is out of bounds.
#[allow(clippy::result_large_err)]
pub fn check_hello(
    identity: Option<&NodeIdentity>,
    hello: &pb::Hello,
    peer: &str,
) -> Result<(), Status> {
    if let Some(identity) = identity
        && identity.name != hello.node
    {
        tracing::warn!(%peer, certificate = %identity.name, hello = %hello.node, "session refused: the Hello names another node than the certificate");
        return Err(Status::permission_denied(format!(
            "this agent's certificate is for node `{}`, but its Hello says `{}`; an agent may \
             only speak for the node its certificate names",
            identity.name,
            hello.node.escape_debug()
        )));
    }
    let too_long = |s: &String| s.len() > MAX_HELLO_STRING;
    let problem = if hello.labels.len() > MAX_HELLO_LABELS {
        Some(format!(
            "{} labels (at most {MAX_HELLO_LABELS})",
            hello.labels.len()
        ))
    } else if hello.apps.len() > MAX_HELLO_APPS {
        Some(format!(
            "{} apps (at most {MAX_HELLO_APPS})",
            hello.apps.len()
        ))
    } else if hello.journal.len() > MAX_HELLO_JOURNAL {
        Some(format!(
            "{} journal entries (at most {MAX_HELLO_JOURNAL})",
            hello.journal.len()
        ))
    } else if hello.labels.iter().any(|(k, v)| too_long(k) || too_long(v))
        || hello
            .apps
            .iter()
            .any(|a| too_long(&a.app) || too_long(&a.current) || too_long(&a.permanent))
        || hello
            .journal
            .iter()
            .any(|j| too_long(&j.rollout_id) || j.error.len() > 64 * 1024)
        || too_long(&hello.agent_version)
    {
        Some(format!("a value longer than {MAX_HELLO_STRING} bytes"))
    } else {
        None
    };
    if let Some(problem) = problem {
        tracing::warn!(%peer, node = %hello.node, %problem, "session refused: Hello out of bounds");
        return Err(Status::invalid_argument(format!("the Hello has {problem}")));
    }
    Ok(())
}

/// Uploads in flight per client.
#[derive(Debug, Default)]
struct UploadLimiter {
    clients: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl UploadLimiter {
    fn acquire(&self, client: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = {
            let mut clients = match self.clients.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            if clients.len() > 4096 {
                clients.retain(|_, s| s.available_permits() < MAX_CONCURRENT_UPLOADS);
            }
            clients
                .entry(client.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONCURRENT_UPLOADS)))
                .clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

/// The checks, for every service.
#[derive(Debug)]
pub struct Auth {
    tls: Option<Arc<ServerTls>>,
    tokens: Option<TokenStore>,
    pub throttle: Arc<AuthThrottle>,
    uploads: UploadLimiter,
}

fn peer_ip<T>(request: &Request<T>) -> Option<IpAddr> {
    request.remote_addr().map(|a| a.ip())
}

fn peer_text<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown peer".to_string(), |a| a.to_string())
}

/// The identity and info of the peer's certificate, when it presented one of ours.
fn peer_cert<T>(request: &Request<T>) -> Option<(Identity, CertInfo)> {
    let certs = request.peer_certs()?;
    let info = hotroll_tls::identity::inspect(certs.first()?).ok()?;
    Some((info.identity.clone()?, info))
}

fn backing_off(ip: IpAddr, wait: Duration) -> Status {
    Status::resource_exhausted(format!(
        "too many failed authentication attempts from {ip}; retry in {:.1}s",
        wait.as_secs_f64()
    ))
}

impl Auth {
    /// No TLS: everyone may do everything (limits still apply).
    pub fn insecure() -> Self {
        Self {
            tls: None,
            tokens: None,
            throttle: Arc::default(),
            uploads: UploadLimiter::default(),
        }
    }

    pub fn secure(tls: Arc<ServerTls>) -> Self {
        let tokens = TokenStore::new(tls.data_dir());
        Self {
            tls: Some(tls),
            tokens: Some(tokens),
            throttle: Arc::default(),
            uploads: UploadLimiter::default(),
        }
    }

    pub fn is_secure(&self) -> bool {
        self.tls.is_some()
    }

    /// Authenticate a token-bearing request from `ip`: the throttle first, then the token.
    #[allow(clippy::result_large_err)]
    fn token_from(
        &self,
        ip: Option<IpAddr>,
        text: &str,
        roles: &[TokenRole],
        what: &str,
        peer: &str,
    ) -> Result<(Token, TokenRecord), Status> {
        let tokens = self
            .tokens
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this coordinator runs without TLS"))?;
        if let Some(ip) = ip
            && let Err(wait) = self.throttle.check(ip)
        {
            tracing::debug!(%peer, what, "refused while backing off");
            return Err(backing_off(ip, wait));
        }
        let checked = Token::parse(text)
            .map_err(|e| TokenError::Io(e.to_string()))
            .and_then(|token| tokens.check(&token, roles).map(|record| (token, record)));
        match checked {
            Ok(ok) => Ok(ok),
            Err(e) => {
                let wait = ip.map(|ip| self.throttle.failed(ip)).unwrap_or_default();
                tracing::warn!(%peer, what, error = %e, backoff = ?wait, "authentication failed");
                let message = match e {
                    TokenError::Io(m) if m.starts_with("not a hotroll token") => m,
                    TokenError::Io(_) => "the token could not be checked".to_string(),
                    other => other.to_string(),
                };
                Err(Status::unauthenticated(message))
            }
        }
    }

    /// Who calls the Control service, if they may do what needs `access`.
    #[allow(clippy::result_large_err)]
    pub fn control<T>(
        &self,
        request: &Request<T>,
        access: Access,
        method: &str,
    ) -> Result<Principal, Status> {
        let ip = peer_ip(request);
        if !self.is_secure() {
            return Ok(Principal::Anonymous(ip));
        }
        let peer = peer_text(request);
        let principal = if let Some((identity, _)) = peer_cert(request) {
            if identity.role == Role::Node {
                tracing::warn!(%peer, %identity, method, "Control call with a node certificate refused");
                return Err(Status::permission_denied(format!(
                    "{identity} has a node certificate, which only opens agent sessions; use an \
                     operator or viewer credential for the CLI"
                )));
            }
            Principal::Cert(identity)
        } else if let Some(value) = request.metadata().get("authorization") {
            let text = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
            let (token, record) = self.token_from(
                ip,
                text,
                &[TokenRole::Operator, TokenRole::Viewer, TokenRole::Agent],
                method,
                &peer,
            )?;
            if record.role == TokenRole::Agent {
                if let Some(ip) = ip {
                    self.throttle.failed(ip);
                }
                tracing::warn!(%peer, method, token = short_id(&token.id()), "an agent join token was used as a CLI credential");
                return Err(Status::unauthenticated(
                    "this is an agent join token; the CLI needs an operator or viewer token",
                ));
            }
            if let Some(ip) = ip {
                self.throttle.succeeded(ip);
            }
            Principal::Token {
                id: short_id(&token.id()).to_string(),
                role: record.role,
            }
        } else {
            tracing::warn!(%peer, method, "Control call without credentials refused");
            return Err(Status::unauthenticated(
                "no credentials: pass a token (--token or HOTROLL_TOKEN; `hotroll token create \
                 --role operator` on the coordinator makes one) or a client certificate \
                 (--cert/--key)",
            ));
        };
        if !principal.may(access) {
            tracing::warn!(%peer, %principal, method, "refused: not allowed for this role");
            return Err(Status::permission_denied(format!(
                "{principal} may not {}: a viewer can list, show and watch rollouts and list \
                 nodes, but not start, abort, pause, resume or promote",
                method.replace('_', " ")
            )));
        }
        Ok(principal)
    }

    /// The node calling the Agent service.
    #[allow(clippy::result_large_err)]
    pub fn node<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<Option<NodeIdentity>, Status> {
        if !self.is_secure() {
            return Ok(None);
        }
        let peer = peer_text(request);
        match peer_cert(request) {
            Some((identity, info)) if identity.role == Role::Node => Ok(Some(NodeIdentity {
                name: identity.name,
                not_after: info.not_after,
            })),
            Some((identity, _)) => {
                tracing::warn!(%peer, %identity, method, "Agent call with a non-node certificate refused");
                Err(Status::permission_denied(format!(
                    "{identity} is not a node: the Agent service needs a node certificate"
                )))
            }
            None => {
                tracing::warn!(%peer, method, "Agent call without a node certificate refused");
                Err(Status::unauthenticated(
                    "the Agent service needs a node certificate: start the agent once with \
                     --join TOKEN (`hotroll token create --role agent` on the coordinator)",
                ))
            }
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

// ---------------------------------------------------------------------------------------------
// Control

/// The Control service behind [`Auth::control`] and the per-client limits.
pub struct GuardedControl {
    pub inner: ControlService,
    pub auth: Arc<Auth>,
}

impl std::fmt::Debug for GuardedControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedControl").finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for GuardedControl {
    type WatchRolloutStream = BoxStream<pb::RolloutEvent>;

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::ArtifactChunk>>,
    ) -> Result<Response<pb::ArtifactRef>, Status> {
        let principal = self.auth.control(
            &request,
            Access::Write,
            "start_rollout (upload its artifacts)",
        )?;
        let Some(_permit) = self.auth.uploads.acquire(&principal.client_key()) else {
            tracing::warn!(%principal, "upload refused: too many uploads in flight");
            return Err(Status::resource_exhausted(format!(
                "at most {MAX_CONCURRENT_UPLOADS} uploads at a time per client"
            )));
        };
        self.inner.upload_artifact(request).await
    }

    async fn has_artifacts(
        &self,
        request: Request<pb::HasArtifactsRequest>,
    ) -> Result<Response<pb::HasArtifactsResponse>, Status> {
        self.auth.control(
            &request,
            Access::Write,
            "start_rollout (check its artifacts)",
        )?;
        if request.get_ref().digests.len() > MAX_ARTIFACTS_PER_SCRIPT {
            return Err(Status::invalid_argument(format!(
                "{} digests asked about; at most {MAX_ARTIFACTS_PER_SCRIPT}",
                request.get_ref().digests.len()
            )));
        }
        self.inner.has_artifacts(request).await
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        let principal = self
            .auth
            .control(&request, Access::Write, "start_rollout")?;
        let artifacts = request.get_ref().artifacts.len();
        if artifacts > MAX_ARTIFACTS_PER_SCRIPT {
            tracing::warn!(%principal, artifacts, "start refused: too many artifacts");
            return Err(Status::invalid_argument(format!(
                "the script binds {artifacts} artifacts; at most {MAX_ARTIFACTS_PER_SCRIPT}"
            )));
        }
        tracing::info!(%principal, "start_rollout");
        self.inner.start_rollout(request).await
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.auth.control(&request, Access::Read, "get_rollout")?;
        self.inner.get_rollout(request).await
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.auth.control(&request, Access::Read, "list_rollouts")?;
        self.inner.list_rollouts(request).await
    }

    async fn watch_rollout(
        &self,
        request: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.auth.control(&request, Access::Read, "watch_rollout")?;
        self.inner.watch_rollout(request).await
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.auth.control(&request, Access::Read, "list_nodes")?;
        self.inner.list_nodes(request).await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = self
            .auth
            .control(&request, Access::Write, "abort_rollout")?;
        tracing::info!(%principal, rollout = %request.get_ref().rollout_id, "abort_rollout");
        self.inner.abort_rollout(request).await
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = self
            .auth
            .control(&request, Access::Write, "pause_rollout")?;
        tracing::info!(%principal, rollout = %request.get_ref().rollout_id, "pause_rollout");
        self.inner.pause_rollout(request).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = self
            .auth
            .control(&request, Access::Write, "resume_rollout")?;
        tracing::info!(%principal, rollout = %request.get_ref().rollout_id, "resume_rollout");
        self.inner.resume_rollout(request).await
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let principal = self
            .auth
            .control(&request, Access::Write, "promote_rollout")?;
        tracing::info!(%principal, rollout = %request.get_ref().rollout_id, "promote_rollout");
        self.inner.promote_rollout(request).await
    }
}

// ---------------------------------------------------------------------------------------------
// Agent

/// The Agent service behind [`Auth::node`]: a session's certificate names its node (checked
/// against the Hello by the session handler), and the session ends when the certificate
/// expires (the agent has renewed by then and reconnects with the new one).
pub struct GuardedAgent {
    pub inner: AgentService,
    pub auth: Arc<Auth>,
}

impl std::fmt::Debug for GuardedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedAgent").finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for GuardedAgent {
    type SessionStream = BoxStream<pb::CoordinatorMessage>;
    type FetchArtifactStream = BoxStream<pb::ArtifactChunk>;

    async fn session(
        &self,
        mut request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let Some(identity) = self.auth.node(&request, "session")? else {
            return self.inner.session(request).await;
        };
        let left = identity
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        request.extensions_mut().insert(identity);
        let response = self.inner.session(request).await?;
        let deadline = Instant::now() + left;
        Ok(response.map(|stream| until_expiry(stream, deadline)))
    }

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        if let Some(identity) = self.auth.node(&request, "fetch_artifact")?
            && !request.get_ref().node.is_empty()
            && request.get_ref().node != identity.name
        {
            tracing::warn!(peer = %peer_text(&request), certificate = %identity.name, asked = %request.get_ref().node, "artifact fetch for another node refused");
            return Err(Status::permission_denied(format!(
                "this certificate is for node `{}`",
                identity.name
            )));
        }
        self.inner.fetch_artifact(request).await
    }
}

/// `stream` until `deadline`, then an UNAVAILABLE that makes the agent reconnect.
fn until_expiry(
    stream: BoxStream<pb::CoordinatorMessage>,
    deadline: Instant,
) -> BoxStream<pb::CoordinatorMessage> {
    let expiry = Box::pin(tokio::time::sleep_until(deadline));
    Box::pin(futures::stream::unfold(
        (stream, expiry, false),
        |(mut stream, mut expiry, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                item = stream.next() => item.map(|item| (item, (stream, expiry, false))),
                () = &mut expiry => Some((
                    Err(Status::unavailable(
                        "the node certificate of this session expired; reconnect with the renewed one",
                    )),
                    (stream, expiry, true),
                )),
            }
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Identity: Join and Renew

/// `Join` (token + CSR → node certificate) and `Renew` (current certificate + CSR → new one).
#[derive(Debug)]
pub struct IdentityService {
    pub auth: Arc<Auth>,
}

#[allow(clippy::result_large_err)]
fn parse_csr(pem: &str) -> Result<rcgen::CertificateSigningRequestParams, Status> {
    if pem.len() > 16 * 1024 {
        return Err(Status::invalid_argument("the CSR is larger than 16 KiB"));
    }
    rcgen::CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        Status::invalid_argument(format!(
            "not a valid certificate signing request (PEM PKCS#10, signed by its key): {e}"
        ))
    })
}

impl IdentityService {
    #[allow(clippy::result_large_err)]
    fn tls(&self) -> Result<&Arc<ServerTls>, Status> {
        self.auth.tls.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator runs without TLS (--insecure): nodes need no certificate",
            )
        })
    }

    #[allow(clippy::result_large_err)]
    fn issue(
        &self,
        tls: &ServerTls,
        node: &str,
        csr: &rcgen::CertificateSigningRequestParams,
    ) -> Result<(pb::CertificateResponse, CertInfo), Status> {
        let (pem, info) = tls
            .pki()
            .issue_client(
                &Identity::new(Role::Node, node),
                &csr.public_key,
                tls.node_cert_ttl(),
            )
            .map_err(|e| Status::internal(format!("cannot issue the certificate: {e}")))?;
        Ok((
            pb::CertificateResponse {
                certificate_pem: pem,
                ca_pem: tls.pki().ca_pem().to_string(),
                not_after_unix_ms: info.not_after_unix_ms(),
            },
            info,
        ))
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let tls = self.tls()?.clone();
        let ip = peer_ip(&request);
        let peer = peer_text(&request);
        let join = request.into_inner();
        let (token, record) =
            self.auth
                .token_from(ip, &join.token, &[TokenRole::Agent], "join", &peer)?;
        let fail = |status: Status| {
            if let Some(ip) = ip {
                self.auth.throttle.failed(ip);
            }
            status
        };
        if !valid_name(&join.node) {
            return Err(Status::invalid_argument(format!(
                "node name `{}` is not valid: use 1-253 characters of [A-Za-z0-9._-]",
                join.node.escape_debug()
            )));
        }
        if let Some(bound) = &record.node
            && *bound != join.node
        {
            tracing::warn!(%peer, node = %join.node, token = short_id(&token.id()), "join refused: token bound to another node");
            return Err(fail(Status::permission_denied(
                TokenError::WrongNode(bound.clone()).to_string(),
            )));
        }
        if record.node.is_none()
            && let Some(issued) = read_issued(tls.data_dir(), &join.node)
            && issued.not_after_unix_ms > unix_ms(SystemTime::now())
        {
            tracing::warn!(%peer, node = %join.node, "join refused: the node already has a certificate");
            return Err(Status::already_exists(format!(
                "node `{}` already has a certificate (serial {}); to give it a new one, create \
                 a token bound to it: `hotroll token create --role agent --node {}`",
                join.node, issued.serial, join.node
            )));
        }
        let csr = parse_csr(&join.csr_pem)?;
        let (response, info) = self.issue(&tls, &join.node, &csr)?;
        // Only now is the token used up; of two concurrent joins with one token, one wins.
        if let Err(e) = self
            .auth
            .tokens
            .as_ref()
            .map_or(Ok(()), |t| t.redeem(&token, &join.node))
        {
            tracing::warn!(%peer, node = %join.node, error = %e, "join refused");
            return Err(fail(Status::unauthenticated(e.to_string())));
        }
        record_issued(tls.data_dir(), &join.node, &info);
        if let Some(ip) = ip {
            self.auth.throttle.succeeded(ip);
        }
        tracing::info!(%peer, node = %join.node, token = short_id(&token.id()), serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "node joined: certificate issued");
        Ok(Response::new(response))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let tls = self.tls()?.clone();
        let Some(identity) = self.auth.node(&request, "renew")? else {
            return Err(Status::unauthenticated(
                "renewal needs the current node certificate",
            ));
        };
        let peer = peer_text(&request);
        let csr = parse_csr(&request.get_ref().csr_pem)?;
        let (response, info) = self.issue(&tls, &identity.name, &csr)?;
        record_issued(tls.data_dir(), &identity.name, &info);
        tracing::info!(%peer, node = %identity.name, serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "node certificate renewed");
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_free_then_exponential_and_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(FREE_FAILURES), Duration::ZERO);
        assert_eq!(backoff(FREE_FAILURES + 1), BASE_BACKOFF);
        assert_eq!(backoff(FREE_FAILURES + 2), BASE_BACKOFF * 2);
        assert_eq!(backoff(FREE_FAILURES + 3), BASE_BACKOFF * 4);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_blocks_one_address_only() {
        let throttle = AuthThrottle::default();
        let bad: IpAddr = [127, 0, 0, 2].into();
        let good: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..FREE_FAILURES {
            assert_eq!(throttle.failed(bad), Duration::ZERO);
            assert!(throttle.check(bad).is_ok());
        }
        assert_eq!(throttle.failed(bad), BASE_BACKOFF);
        assert!(throttle.check(bad).is_err());
        assert!(throttle.check(good).is_ok());
        tokio::time::advance(BASE_BACKOFF).await;
        assert!(throttle.check(bad).is_ok());
        throttle.succeeded(bad);
        assert_eq!(throttle.failed(bad), Duration::ZERO);
    }

    #[test]
    fn tokens_expire_are_single_use_and_keep_no_secret() -> Result<(), TokenError> {
        let dir = tempfile::tempdir().map_err(|e| TokenError::Io(e.to_string()))?;
        let store = TokenStore::new(dir.path());
        let (token, _) = store.create([1; 32], TokenRole::Agent, DEFAULT_TOKEN_TTL, None)?;
        let secret = token.expose();
        for entry in std::fs::read_dir(dir.path().join("tokens"))
            .map_err(|e| TokenError::Io(e.to_string()))?
        {
            let entry = entry.map_err(|e| TokenError::Io(e.to_string()))?;
            if entry.path().is_file() {
                let text = std::fs::read_to_string(entry.path())
                    .map_err(|e| TokenError::Io(e.to_string()))?;
                assert!(!text.contains(&secret[4..68]));
                use std::os::unix::fs::PermissionsExt;
                let mode = entry
                    .metadata()
                    .map_err(|e| TokenError::Io(e.to_string()))?
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
        assert!(store.check(&token, &[TokenRole::Operator]).is_err());
        store.check(&token, &[TokenRole::Agent])?;
        store.redeem(&token, "node-1")?;
        assert!(
            matches!(store.redeem(&token, "node-2"), Err(TokenError::Used { by }) if by == "node-1")
        );
        assert!(matches!(
            store.check(&token, &[TokenRole::Agent]),
            Err(TokenError::Used { .. })
        ));

        let (expired, _) = store.create([1; 32], TokenRole::Operator, Duration::ZERO, None)?;
        assert!(matches!(
            store.check(&expired, &[TokenRole::Operator]),
            Err(TokenError::Expired(_))
        ));
        let other = Token::generate([1; 32]);
        assert!(matches!(
            store.check(&other, &[TokenRole::Operator]),
            Err(TokenError::Unknown)
        ));

        let listed = store.list()?;
        assert_eq!(listed.len(), 2);
        assert_eq!(store.revoke(&expired.id()[..12])?, 1);
        Ok(())
    }
}
