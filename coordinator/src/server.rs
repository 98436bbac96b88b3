//! The coordinator daemon: one [`run`] entry point that `main`, the tests and simulations call.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hotroll_proto::v1::agent_server::AgentServer;
use hotroll_proto::v1::control_server::ControlServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::control::ControlService;
use crate::registry::Registry;
use crate::rollouts::{RolloutTiming, Rollouts};
use crate::session::AgentService;
use crate::store::{Store, StoreError};

/// Limit on one decoded gRPC message; artifacts travel in 256 KiB chunks, scripts are <= 1 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where artifacts are kept (`<data_dir>/cas`).
    pub data_dir: PathBuf,
    /// How often each side of a session sends a heartbeat; three silent intervals end it.
    pub heartbeat_interval: Duration,
    /// How long a node whose session dropped may take to come back during a rollout.
    pub session_grace: Duration,
    /// Time granted over an instruction's own deadline before a silent node counts as failed.
    pub step_slack: Duration,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            heartbeat_interval: Duration::from_secs(2),
            session_grace: Duration::from_secs(10),
            step_slack: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serve the Agent and Control services on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "coordinator listening");
    }
    // Accepted sockets need TCP_NODELAY set here: the builder's option only reaches sockets
    // tonic accepts itself. Without it a barrier release can sit ~40 ms behind Nagle and
    // delayed ACKs.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        accepted
    });
    serve(incoming, store, config, shutdown).await
}

/// [`run`] over any stream of connections: what network simulations (turmoil) call.
pub async fn serve<I, IO, IE>(
    incoming: I,
    store: Arc<dyn Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError>
where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let registry = Arc::new(Registry::load(store.clone())?);
    let rollouts = Arc::new(Rollouts::new(
        store.clone(),
        registry.clone(),
        RolloutTiming {
            session_grace: config.session_grace,
            step_slack: config.step_slack,
        },
    ));
    let artifacts = ArtifactStore::new(&config.data_dir)?;
    let agent = AgentService {
        registry: registry.clone(),
        rollouts: rollouts.clone(),
        artifacts: artifacts.clone(),
        heartbeat_interval: config.heartbeat_interval,
        coordinator_id: uuid::Uuid::now_v7().to_string(),
    };
    let control = ControlService {
        registry,
        rollouts,
        artifacts,
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.heartbeat_interval))
        .http2_keepalive_timeout(Some(config.heartbeat_interval * 3))
        .tcp_nodelay(true)
        .add_service(
            AgentServer::new(agent)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ControlServer::new(control)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
