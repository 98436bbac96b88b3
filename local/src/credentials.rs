//! TLS for a fleet run in one process on 127.0.0.1: the CA and server certificate in the
//! coordinator's data dir, a join token per agent, an operator token for the client. The same
//! set-up as `hotroll serve` + `hotroll token create`, without the processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hotroll_coordinator::auth::{DEFAULT_TOKEN_TTL, TokenRole, TokenStore};
use hotroll_coordinator::tls::{ServerTls, TlsOptions, ca_cert_path};

use crate::error::FleetError;

/// How long the operator token made with the credentials stays valid.
const OPERATOR_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct LocalFleetTls {
    tls: Arc<ServerTls>,
    data_dir: PathBuf,
    ca_pin: [u8; 32],
    operator: String,
}

impl std::fmt::Debug for LocalFleetTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFleetTls")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl LocalFleetTls {
    /// Make (or load) the CA and the server certificate in `coordinator_data_dir`, and an
    /// operator token.
    pub fn new(coordinator_data_dir: &Path) -> Result<Self, FleetError> {
        Self::with_options(TlsOptions::new(
            coordinator_data_dir.to_path_buf(),
            None,
            &[],
        ))
    }

    /// [`LocalFleetTls::new`] with the coordinator's TLS options given (e.g. a short node
    /// certificate lifetime); the data dir is `options.data_dir`.
    pub fn with_options(options: TlsOptions) -> Result<Self, FleetError> {
        let data_dir = options.data_dir.clone();
        let tls = Arc::new(ServerTls::new(options)?);
        let ca_pin = tls.pki().ca_pin();
        let (operator, _) = TokenStore::new(&data_dir).create(
            ca_pin,
            TokenRole::Operator,
            OPERATOR_TOKEN_TTL,
            None,
        )?;
        Ok(Self {
            tls,
            data_dir,
            ca_pin,
            operator: operator.expose(),
        })
    }

    /// For [`hotroll_coordinator::ServerConfig::tls`].
    pub fn server(&self) -> Arc<ServerTls> {
        self.tls.clone()
    }

    /// The SHA-256 of the CA certificate, which every token names.
    pub fn ca_pin(&self) -> [u8; 32] {
        self.ca_pin
    }

    /// The CA certificate a client trusts (`<data_dir>/tls/ca.pem`).
    pub fn ca_path(&self) -> PathBuf {
        ca_cert_path(&self.data_dir)
    }

    /// The operator token made with the credentials (valid for a day).
    pub fn operator_token(&self) -> &str {
        &self.operator
    }

    /// A single-use join token for `node` (for `hotroll_agent::Config::join_token`).
    pub fn join_token(&self, node: &str) -> Result<String, FleetError> {
        self.token(TokenRole::Agent, DEFAULT_TOKEN_TTL, Some(node))
    }

    /// A token of `role`, valid for `ttl`; an agent token bound to `node` when given.
    pub fn token(
        &self,
        role: TokenRole,
        ttl: Duration,
        node: Option<&str>,
    ) -> Result<String, FleetError> {
        let (token, _) = TokenStore::new(&self.data_dir).create(
            self.ca_pin,
            role,
            ttl,
            node.map(str::to_string),
        )?;
        Ok(token.expose())
    }
}
