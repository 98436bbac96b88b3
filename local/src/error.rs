//! What can go wrong while a local fleet starts, runs or stops.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the coordinator's store: {0}")]
    Store(#[from] hotroll_coordinator::store::StoreError),
    #[error("the coordinator's TLS: {0}")]
    Tls(#[from] hotroll_coordinator::tls::TlsSetupError),
    #[error("tokens: {0}")]
    Token(#[from] hotroll_coordinator::auth::TokenError),
    #[error("the client's TLS: {0}")]
    ClientTls(#[from] hotroll_tls::TlsError),
    #[error("cannot connect to the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the agent config of {node} ({}) is invalid: {source}", path.display())]
    AgentConfig {
        node: String,
        path: PathBuf,
        source: Box<hotroll_agent::ConfigError>,
    },
    #[error("agent {node}: {source}")]
    Agent {
        node: String,
        source: Box<hotroll_agent::AgentError>,
    },
    #[error("the coordinator's Prometheus: {0}")]
    Prometheus(#[from] hotroll_coordinator::gate::UrlError),
    #[error("the coordinator: {0}")]
    Server(#[from] hotroll_coordinator::server::ServerError),
    #[error("{what} panicked or was cancelled: {source}")]
    Task {
        what: String,
        source: tokio::task::JoinError,
    },
    #[error("the fleet runs without TLS: it has no CA and no tokens")]
    Insecure,
    #[error("the fleet has no agent {0}")]
    NoSuchAgent(usize),
    #[error("agent {0} is already running")]
    AgentRunning(String),
    #[error("the token is not valid in a request header")]
    TokenHeader,
    #[error("the coordinator refused a request: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Timeout(String),
}
