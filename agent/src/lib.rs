//! hotroll's node agent (DESIGN §5): keeps a session with the coordinator, runs the upgrade
//! scripts it receives through a [`Runtime`], journals every step, and never executes anything
//! its own config ([`Config`]) does not declare.
//!
//! [`run`] is the one entry point; the binary and the tests call it.

pub mod artifacts;
pub mod boot;
pub mod cancel;
pub mod config;
pub mod executor;
pub use hotroll_fault as fault;
pub mod hooks;
pub mod identity;
pub mod journal;
pub mod outbox;
pub mod recovery;
pub mod report;
pub mod runtime;
mod session;

pub use session::{Dialer, tcp_dialer};
mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use config::{Config, ConfigError, HookConfig, ServiceConfig};
pub use runtime::{HooksOnlyRuntime, Runtime, RuntimeSet};
pub use session::INITIAL_BACKOFF;

use crate::cancel::CancelSource;
use crate::executor::{Env, Node};
use crate::journal::Journal;
use crate::outbox::Outbox;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the data directory {}: {error}", path.display())]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    BootGeneration(#[from] boot::BootGenerationError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Process(#[from] runtime::process::ProcessError),
    #[error("cannot start the runtime: {0}")]
    RuntimeBoot(runtime::RuntimeError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

/// Run the agent (the process runtime for `[[services]]`, the BEAM runtime for `[[beam]]`) until
/// `shutdown` resolves; then say Goodbye, stop
/// the running rollout's step (killing its hook) and return.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let Some((dialer, identity)) = secure_dialer(&config, shutdown.as_mut()).await? else {
        return Ok(());
    };
    let mut runtimes = RuntimeSet {
        process: Arc::new(runtime::process::ProcessRuntime::new(
            &config,
            dialer.clone(),
        )?),
        ..RuntimeSet::default()
    };
    if let Some(beam) = beam_runtime_with(&config, dialer.clone()).await {
        runtimes.beam = beam;
    }
    run_renewing(config, Arc::new(runtimes), dialer, identity, shutdown).await
}

/// How this agent reaches its coordinator: plaintext TCP for an `insecure` http:// config;
/// else mutual TLS with the node's certificate, obtained first with the join token when the
/// data dir has none (retried while the coordinator cannot be reached; `None` when `shutdown`
/// resolves first).
pub async fn secure_dialer(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Option<(Dialer, Option<Arc<identity::NodeIdentity>>)>, AgentError> {
    config.check_transport()?;
    if config.insecure {
        return Ok(Some((tcp_dialer(), None)));
    }
    tokio::select! {
        established = identity::NodeIdentity::establish(config) => {
            let identity = established?;
            Ok(Some((identity.dialer(), Some(identity))))
        }
        () = shutdown => Ok(None),
    }
}

/// [`run_with`], renewing the node certificate (if any) while it runs.
async fn run_renewing(
    config: Config,
    runtime: Arc<dyn Runtime>,
    dialer: Dialer,
    identity: Option<Arc<identity::NodeIdentity>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let renewal = identity.map(|identity| tokio::spawn(identity.renew_loop()));
    let result = run_with(config, runtime, dialer, shutdown).await;
    if let Some(renewal) = renewal {
        renewal.abort();
    }
    result
}

/// The BEAM runtime for the `[[beam]]` apps of `config` (none declared: `None`). An upgrade an
/// earlier agent process left unfinished is rolled back first (DESIGN §5).
pub async fn beam_runtime(config: &Config) -> Option<Arc<dyn Runtime>> {
    beam_runtime_with(config, tcp_dialer()).await
}

/// [`beam_runtime`] fetching artifacts through `dialer`.
pub async fn beam_runtime_with(config: &Config, dialer: Dialer) -> Option<Arc<dyn Runtime>> {
    use runtime::beam::{BeamRuntime, fetch::StoreArtifacts};
    if config.beam.is_empty() {
        return None;
    }
    let artifacts = Arc::new(StoreArtifacts {
        fetcher: artifacts::Fetcher::new(
            artifacts::ArtifactStore::new(&config.data_dir),
            config.coordinator.clone(),
            config.node.clone(),
            dialer,
        ),
    });
    let beam = BeamRuntime::new(config, artifacts);
    beam.recover().await;
    Some(Arc::new(beam))
}

/// [`run`] with a given runtime.
pub async fn run_with_runtime(
    config: Config,
    runtime: Arc<dyn Runtime>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let Some((dialer, identity)) = secure_dialer(&config, shutdown.as_mut()).await? else {
        return Ok(());
    };
    run_renewing(config, runtime, dialer, identity, shutdown).await
}

/// [`run`] with a given runtime and a given way to reach the coordinator (network simulations).
pub async fn run_with(
    config: Config,
    runtime: Arc<dyn Runtime>,
    dialer: Dialer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|error| AgentError::DataDir {
        path: config.data_dir.clone(),
        error,
    })?;
    // The journal first: redb locks it, so a second agent on the same data_dir stops here
    // before it touches the boot generation.
    let journal = Journal::open(&config.data_dir)?;
    let boot_generation = boot::next_generation(&config.data_dir)?;
    tracing::info!(
        node = %config.node,
        coordinator = %config.coordinator,
        data_dir = %config.data_dir.display(),
        boot_generation,
        runtime = runtime.name(),
        hooks = ?config.hooks.keys().collect::<Vec<_>>(),
        "hotroll agent starting"
    );

    // Only now that this agent owns the data dir may the runtimes start services in it.
    runtime.boot().await.map_err(AgentError::RuntimeBoot)?;
    // Under systemd (Type=notify): started. The services got NOTIFY_SOCKETs of their own.
    notify_ready();

    let env = Env {
        config: Arc::new(config),
        runtime,
        journal,
        outbox: Arc::new(Outbox::default()),
    };
    // Settle what a previous agent process left in progress (DESIGN §5) before the first
    // Hello, which then reports the outcome.
    recovery::recover(&env).await;
    let mut node = Node::new(env.clone());
    let stop = CancelSource::new();
    let stop_token = stop.token();
    let sessions = session::Sessions {
        env: &env,
        boot_generation,
        dialer,
    };
    // The session loop returns only once `stop` fires, which happens only after `shutdown`
    // resolved, so joining the two ends.
    tokio::join!(
        async {
            shutdown.await;
            tracing::info!("shutting down");
            stop.cancel();
        },
        sessions.run(&mut node, &stop_token),
    );
    node.shutdown().await;
    // Services the agent supervises stop with it (see `runtime::process`).
    env.runtime.shutdown().await;
    tracing::info!("hotroll agent stopped");
    Ok(())
}

/// `READY=1` on `$NOTIFY_SOCKET` when the agent runs under a service manager that asked for it
/// (systemd `Type=notify`); nothing otherwise.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|socket| {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        match path.as_bytes().strip_prefix(b"@") {
            // An abstract socket.
            Some(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(b"READY=1", &addr)
            }
            None => socket.send_to(b"READY=1", std::path::Path::new(&path)),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
