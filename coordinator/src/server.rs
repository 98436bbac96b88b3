//! The coordinator daemon: one [`run`] entry point that `main`, the tests and simulations call.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hotroll_proto::frames::agent_server::AgentServer;
use hotroll_proto::v1::control_server::ControlServer;
use hotroll_proto::v1::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::auth::{Guarded, IdentityService};
use crate::control::ControlService;
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rollouts::{RolloutTiming, Rollouts};
use crate::session::AgentService;
use crate::stopping::Stopping;
use crate::store::{Store, StoreError};

/// Limit on one decoded gRPC message; artifacts travel in 256 KiB chunks, scripts are <= 1 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Limit on one message of the Identity service (a CSR, a certificate): nothing near this big.
pub const MAX_IDENTITY_MESSAGE_BYTES: usize = 64 << 10;

/// HTTP/2 streams one connection may have open (watchers, sessions, uploads).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Size of the request headers of one RPC.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// Default of [`ServerConfig::watch_buffer`] (the rollouts' own default).
pub use crate::rollouts::DEFAULT_WATCH_BUFFER;

/// How often idle sessions are sent a heartbeat unless configured otherwise. Rare on purpose:
/// each costs the coordinator a write and a read per agent (docs/performance.md, "Idle
/// fleets"); a node a rollout starts to target is beaten at the short pace from the next sweep.
pub const DEFAULT_IDLE_HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where artifacts are kept (`<data_dir>/cas`).
    pub data_dir: PathBuf,
    /// How often a session of a node some running rollout targets is sent a heartbeat; a
    /// heartbeat unanswered for three intervals ends the session.
    pub heartbeat_interval: Duration,
    /// How often an idle node's session is sent one (agents of protocol 2; older agents are
    /// beaten every `heartbeat_interval`). At least `heartbeat_interval`.
    pub idle_heartbeat_interval: Duration,
    /// How long a node whose session dropped may take to come back during a rollout.
    pub session_grace: Duration,
    /// Time granted over an instruction's own deadline before a silent node counts as failed.
    pub step_slack: Duration,
    /// Where to serve Prometheus metrics on `/metrics` (HTTP); `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the web console (HTTP, or HTTPS when `tls` is set); `None`: not served.
    pub ui_listen: Option<SocketAddr>,
    /// Events buffered per rollout for live watchers. A watcher that falls further behind is
    /// told so (`DATA_LOSS`) and reconnects from its last event; the rollout never waits for it.
    pub watch_buffer: usize,
    /// TLS with node identity and authenticated clients (docs/security.md); `None`: plaintext
    /// and no authentication, what `hotroll serve --insecure`, in-process tests and network
    /// simulations use. `hotroll serve` sets it unless `--insecure` is given.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// The leader epoch of a coordinator group on etcd, told to every agent (`group`); 0 for a
    /// single coordinator.
    pub leader_epoch: u64,
    /// In a group: where a rollout's artifacts are copied before it starts (`group`).
    pub replication: Option<crate::replication::Replication>,
    /// The Prometheus fleet gates query (`hotroll serve --prometheus URL`); `None`: a rollout
    /// whose script has `[[rollout.gates]]` does not start.
    pub prometheus: Option<hotroll_gate::Prometheus>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            heartbeat_interval: Duration::from_secs(2),
            idle_heartbeat_interval: DEFAULT_IDLE_HEARTBEAT,
            session_grace: Duration::from_secs(10),
            step_slack: Duration::from_secs(10),
            metrics_listen: None,
            ui_listen: None,
            watch_buffer: DEFAULT_WATCH_BUFFER,
            tls: None,
            leader_epoch: 0,
            replication: None,
            prometheus: None,
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
    /// The coordinator group on etcd (`group`) cannot be set up.
    #[error("coordinator group: {0}")]
    Group(String),
    #[error("TLS needs a TCP listener: use `run`, or no TLS with `serve`")]
    TlsNeedsTcp,
    #[error("cannot serve the web console on {addr}: {source}")]
    Console {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("web console TLS: {0}")]
    ConsoleTls(#[from] crate::tls::TlsSetupError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Serve the Agent and Control services on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, data_dir = %config.data_dir.display(), tls = config.tls.is_some(), "coordinator listening");
    }
    if let Some(tls) = config.tls.clone() {
        let auth = Arc::new(crate::auth::Auth::secure(tls.clone()));
        let incoming = tls.incoming(listener, auth.throttle.clone());
        return serve_with(incoming, store, config, shutdown, auth).await;
    }
    // Accepted sockets are set up here: the builder's options only reach sockets tonic
    // accepts itself.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            crate::accepted::tune(stream);
        }
        accepted
    });
    serve_with(
        incoming,
        store,
        config,
        shutdown,
        Arc::new(crate::auth::Auth::insecure()),
    )
    .await
}

/// [`run`] over any stream of connections: what network simulations (turmoil) call. The metrics
/// endpoint, when configured, listens on a real socket of its own and stops with the server.
/// Plaintext only ([`ServerConfig::tls`] must be `None`).
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
    if config.tls.is_some() {
        return Err(ServerError::TlsNeedsTcp);
    }
    let auth = Arc::new(crate::auth::Auth::insecure());
    serve_with(incoming, store, config, shutdown, auth).await
}

pub(crate) async fn serve_with<I, IO, IE>(
    incoming: I,
    store: Arc<dyn Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
    auth: Arc<crate::auth::Auth>,
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
    let metrics = Arc::new(Metrics::new());
    for rollout in store.list_rollouts()? {
        metrics.rollout_state_changed(None, rollout.status.state);
    }
    let mut rollouts = Rollouts::new(
        store.clone(),
        registry.clone(),
        RolloutTiming {
            session_grace: config.session_grace,
            step_slack: config.step_slack,
        },
    )
    .with_metrics(metrics.clone())
    .with_watch_buffer(config.watch_buffer);
    if let Some(prometheus) = &config.prometheus {
        rollouts = rollouts.with_prometheus(prometheus.clone());
    }
    let rollouts = Arc::new(rollouts);
    // Rollouts in flight when the coordinator last stopped continue as their nodes reconnect.
    let recovered = rollouts.recover()?;
    if !recovered.is_empty() {
        tracing::info!(rollouts = ?recovered, "recovered rollouts in flight");
    }
    let artifacts = ArtifactStore::new(&config.data_dir)?;
    let (stop_streams, stopping) = Stopping::new();
    let liveness = Liveness::new(config.heartbeat_interval, config.idle_heartbeat_interval);
    tokio::spawn(liveness.clone().run(rollouts.clone(), stopping.wait()));
    let agent = AgentService {
        registry: registry.clone(),
        rollouts: rollouts.clone(),
        artifacts: artifacts.clone(),
        heartbeat_interval: config.heartbeat_interval,
        coordinator_id: uuid::Uuid::now_v7().to_string(),
        leader_epoch: config.leader_epoch,
        metrics: metrics.clone(),
        stopping: stopping.clone(),
        liveness,
    };
    let control = ControlService {
        registry: registry.clone(),
        rollouts: rollouts.clone(),
        artifacts,
        metrics: metrics.clone(),
        stopping,
        replication: config.replication.clone(),
    };
    // When told to stop, end every session and watch stream first: graceful shutdown waits
    // for the streams in flight, and these would never end on their own.
    let shutdown = async move {
        shutdown.await;
        tracing::info!("coordinator stopping: ending agent sessions and watch streams");
        stop_streams.stop();
    };

    // The metrics endpoint stops when the gRPC server does, whichever way that ends.
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Metrics { addr, source })?;
            let mut stopped = metrics_stopped;
            let stop = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics,
                registry.clone(),
                stop,
            )))
        }
        None => None,
    };

    // The web console stops with the gRPC server too.
    let console_server = match config.ui_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Console { addr, source })?;
            let tls = match &config.tls {
                Some(tls) => Some(tls.https_config()?),
                None => None,
            };
            let tokens = auth
                .tokens()
                .cloned()
                .unwrap_or_else(|| crate::auth::TokenStore::new(&config.data_dir));
            let console = hotroll_console::Console {
                rollouts: rollouts.clone(),
                registry: registry.clone(),
                tokens: Arc::new(crate::console::ConsoleLogin {
                    tokens,
                    throttle: auth.throttle.clone(),
                }),
                tls,
            };
            let mut stopped = stop_metrics.subscribe();
            let stop = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            Some(tokio::spawn(console.serve(listener, stop)))
        }
        None => None,
    };

    // The server certificate is renewed (or reloaded) while the server runs.
    if let Some(tls) = config.tls.clone() {
        let mut stopped = stop_metrics.subscribe();
        tokio::spawn(tls.refresh_loop(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
    }

    // Every RPC is authorized (and limited) by its guard, from the table of methods
    // (`auth::METHODS`), before the service sees it.
    let result = tonic::transport::Server::builder()
        // Agent sessions are watched by their heartbeats (`liveness`); the HTTP/2 ping is the
        // backstop for other connections (CLI, watch streams). hyper pings a connection it has
        // read nothing from for the interval, so it must be longer than the idle heartbeat
        // pace (which stretches with the fleet, `liveness::IDLE_BEATS_PER_SECOND`), or every
        // idle agent's connection would be pinged in between: at 10,000 agents each frame per
        // interval costs CPU.
        .http2_keepalive_interval(Some(
            (config.heartbeat_interval * 4).max(config.idle_heartbeat_interval * 4),
        ))
        .http2_keepalive_timeout(Some(config.heartbeat_interval * 3))
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .add_service(Guarded::new(
            AgentServer::new(agent)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(Guarded::new(
            ControlServer::new(control)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(Guarded::new(
            IdentityServer::new(IdentityService { auth: auth.clone() })
                .max_decoding_message_size(MAX_IDENTITY_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_IDENTITY_MESSAGE_BYTES),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_metrics.send(true);
    if let Some(task) = metrics_server {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics server failed"),
            Err(e) => tracing::warn!(error = %e, "metrics server task failed"),
        }
    }
    if let Some(task) = console_server {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "web console failed"),
            Err(e) => tracing::warn!(error = %e, "web console task failed"),
        }
    }
    // Node records are written behind (see `registry`): have them in the store before a
    // restarted server reads it.
    registry.flush();
    result?;
    Ok(())
}
