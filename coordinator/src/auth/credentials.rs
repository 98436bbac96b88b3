//! [`Auth`]: who a caller is, from what it presents (a client certificate, a bearer token), and
//! whether that may call a method. With TLS off (`--insecure`) everyone is
//! [`Principal::Anonymous`] and may do everything; the limits still apply.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hotroll_tls::token::short_id;
use hotroll_tls::{CertInfo, Identity, Role, Token};
use rustls::pki_types::CertificateDer;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::limits::UploadLimiter;
use super::policy::{MethodRule, NodeIdentity, Principal};
use super::tokens::{TokenError, TokenRecord, TokenRole, TokenStore};
use crate::throttle::AuthThrottle;
use crate::tls::ServerTls;

/// What the connection tells about the caller of one request.
#[derive(Debug, Clone, Default)]
pub(super) struct Caller {
    addr: Option<SocketAddr>,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Caller {
    /// The caller of an HTTP request, from the connection info tonic puts in its extensions.
    pub fn of(extensions: &http::Extensions) -> Self {
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let addr = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| tls.and_then(|info| info.get_ref().remote_addr()));
        Self {
            addr,
            certs: tls.and_then(TlsConnectInfo::peer_certs),
        }
    }

    /// A caller known by its address only (a service's view of its request).
    pub fn at(addr: Option<SocketAddr>) -> Self {
        Self { addr, certs: None }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.addr.map(|a| a.ip())
    }

    /// The caller's address, for the log.
    pub fn peer(&self) -> String {
        self.addr
            .map_or_else(|| "unknown peer".to_string(), |a| a.to_string())
    }

    /// The identity and info of the caller's certificate, when it presented one of ours.
    fn cert(&self) -> Option<(Identity, CertInfo)> {
        let info = hotroll_tls::identity::inspect(self.certs.as_ref()?.first()?).ok()?;
        Some((info.identity.clone()?, info))
    }
}

fn backing_off(ip: IpAddr, wait: Duration) -> Status {
    Status::resource_exhausted(format!(
        "too many failed authentication attempts from {ip}; retry in {:.1}s",
        wait.as_secs_f64()
    ))
}

/// The checks, for every service.
#[derive(Debug)]
pub struct Auth {
    pub(super) tls: Option<Arc<ServerTls>>,
    pub(super) tokens: Option<TokenStore>,
    pub throttle: Arc<AuthThrottle>,
    pub(super) uploads: UploadLimiter,
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

    /// TLS, with the tokens of the data dir.
    pub fn secure(tls: Arc<ServerTls>) -> Self {
        let tokens = TokenStore::new(tls.data_dir());
        Self::secure_with(tls, tokens)
    }

    /// TLS, with the tokens of `tokens` (a group's, in etcd).
    pub fn secure_with(tls: Arc<ServerTls>, tokens: TokenStore) -> Self {
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

    /// The tokens callers authenticate with (`None` without TLS).
    pub fn tokens(&self) -> Option<&TokenStore> {
        self.tokens.as_ref()
    }

    /// Authenticate a token the caller presents: the throttle first, then the token.
    #[allow(clippy::result_large_err)]
    pub(super) fn token_from(
        &self,
        caller: &Caller,
        text: &str,
        roles: &[TokenRole],
        what: &str,
    ) -> Result<(Token, TokenRecord), Status> {
        let tokens = self
            .tokens
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this coordinator runs without TLS"))?;
        let ip = caller.ip();
        let peer = caller.peer();
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

    /// Who calls a client method (one that needs [`Read`](super::policy::Access::Read) or
    /// [`Write`](super::policy::Access::Write)), if they may; `authorization` is the request's
    /// header of that name.
    #[allow(clippy::result_large_err)]
    pub(super) fn client(
        &self,
        caller: &Caller,
        authorization: Option<&http::HeaderValue>,
        rule: &MethodRule,
    ) -> Result<Principal, Status> {
        if !self.is_secure() {
            return Ok(Principal::Anonymous(caller.ip()));
        }
        let peer = caller.peer();
        let method = rule.path;
        let principal = if let Some((identity, _)) = caller.cert() {
            if identity.role == Role::Node {
                tracing::warn!(%peer, %identity, method, "Control call with a node certificate refused");
                return Err(Status::permission_denied(format!(
                    "{identity} has a node certificate, which only opens agent sessions; use an \
                     operator or viewer credential for the CLI"
                )));
            }
            Principal::Cert(identity)
        } else if let Some(value) = authorization {
            let text = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
            let (token, record) = self.token_from(
                caller,
                text,
                &[TokenRole::Operator, TokenRole::Viewer, TokenRole::Agent],
                method,
            )?;
            let ip = caller.ip();
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
        if !principal.may(rule.access) {
            tracing::warn!(%peer, %principal, method, "refused: not allowed for this role");
            return Err(Status::permission_denied(format!(
                "{principal} may not {}: a viewer can list, show and watch rollouts and list \
                 nodes, but not start, abort, pause, resume or promote",
                rule.action
            )));
        }
        Ok(principal)
    }

    /// The node calling a method that needs [`Node`](super::policy::Access::Node) access;
    /// `None` with TLS off.
    #[allow(clippy::result_large_err)]
    pub(super) fn node(
        &self,
        caller: &Caller,
        rule: &MethodRule,
    ) -> Result<Option<NodeIdentity>, Status> {
        if !self.is_secure() {
            return Ok(None);
        }
        let peer = caller.peer();
        let method = rule.path;
        match caller.cert() {
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
