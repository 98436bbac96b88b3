//! The agent as a whole: [`Agent::builder`] takes the config, optionally the runtime and the
//! way to reach the coordinator, and [`Agent::run`] runs it until shutdown — the session, the
//! executor, the journal and the runtimes.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::cancel::CancelSource;
use crate::config::{Config, ConfigError};
use crate::coordinators::Coordinators;
use crate::dialer::{Dialer, tcp_dialer};
use crate::executor::{Env, Node};
use crate::identity::{IdentityError, NodeIdentity};
use crate::journal::{Journal, JournalError};
use crate::outbox::Outbox;
use crate::runtime::{Runtime, RuntimeDispatch, RuntimeError};
use crate::{boot, executor, session};

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
    Journal(#[from] JournalError),
    #[error("cannot start the runtime: {0}")]
    RuntimeBoot(RuntimeError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// What [`Agent::run`] runs with; see [`Agent::builder`].
#[derive(Clone)]
pub struct AgentBuilder {
    config: Config,
    runtime: Option<Arc<dyn Runtime>>,
    dialer: Option<Dialer>,
}

impl std::fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("node", &self.config.node)
            .field("runtime", &self.runtime.as_ref().map(|r| r.name()))
            .field("dialer", &self.dialer.as_ref().map(|_| "given"))
            .finish()
    }
}

impl AgentBuilder {
    /// Run scripts through `runtime` instead of the runtimes the config declares (tests,
    /// simulations, benches).
    pub fn runtime(mut self, runtime: Arc<dyn Runtime>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Reach the coordinator through `dialer` instead of the config's transport (plaintext for
    /// an `insecure` config, else mutual TLS with the node identity). The config's transport is
    /// then not checked and no node identity is made or renewed.
    pub fn dialer(mut self, dialer: Dialer) -> Self {
        self.dialer = Some(dialer);
        self
    }

    pub fn build(self) -> Agent {
        Agent { builder: self }
    }
}

/// A node agent, ready to [`run`](Agent::run).
#[derive(Debug)]
pub struct Agent {
    builder: AgentBuilder,
}

impl Agent {
    /// An agent for `config`. By default it runs the runtimes the config declares (the process
    /// runtime for `[[services]]`, the BEAM runtime for `[[beam]]`) and reaches its coordinator
    /// in plaintext for an `insecure` config, else with mutual TLS: the node certificate is
    /// obtained first with the join token when the data dir has none (retried while the
    /// coordinator cannot be reached) and renewed in the background.
    pub fn builder(config: Config) -> AgentBuilder {
        AgentBuilder {
            config,
            runtime: None,
            dialer: None,
        }
    }

    /// Run until `shutdown` resolves; then say Goodbye, stop the running rollout's step
    /// (killing its hook), stop the runtimes and return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let AgentBuilder {
            config,
            runtime,
            dialer,
        } = self.builder;
        let mut shutdown = std::pin::pin!(shutdown);
        let (dialer, identity) = match dialer {
            Some(dialer) => (dialer, None),
            None => match default_dialer(&config, shutdown.as_mut()).await? {
                Some(established) => established,
                None => return Ok(()),
            },
        };
        let coordinators = Coordinators::new(config.coordinators.clone(), config.data_dir.clone());
        let runtime = runtime.unwrap_or_else(|| {
            Arc::new(RuntimeDispatch::declared_by(
                &config,
                &dialer,
                &coordinators,
            ))
        });
        let renewal = identity.map(|identity| tokio::spawn(identity.renew_loop()));
        let result = serve(config, runtime, dialer, coordinators, shutdown).await;
        if let Some(renewal) = renewal {
            renewal.abort();
        }
        result
    }
}

/// The config's transport: plaintext TCP for an `insecure` http:// config, else mutual TLS
/// with the node's certificate (see [`Agent::builder`]). `None` when `shutdown` resolves first.
async fn default_dialer(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Option<(Dialer, Option<Arc<NodeIdentity>>)>, AgentError> {
    config.check_transport()?;
    if config.insecure {
        return Ok(Some((tcp_dialer(), None)));
    }
    tokio::select! {
        established = NodeIdentity::establish(config) => {
            let identity = established?;
            Ok(Some((identity.dialer(), Some(identity))))
        }
        () = shutdown => Ok(None),
    }
}

/// Own the data dir, boot the runtime, recover, then keep sessions until `shutdown`.
async fn serve(
    config: Config,
    runtime: Arc<dyn Runtime>,
    dialer: Dialer,
    coordinators: Coordinators,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|error| AgentError::DataDir {
        path: config.data_dir.clone(),
        error,
    })?;
    // The journal first: it locks the data dir, so a second agent on the same data_dir stops here
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
    // Settle what a previous agent process left in progress (docs/design.md §5) before the first
    // Hello, which then reports the outcome.
    executor::recovery::recover(&env).await;
    let mut node = Node::new(env.clone());
    let stop = CancelSource::new();
    let stop_token = stop.token();
    let sessions = session::Sessions {
        env: &env,
        boot_generation,
        dialer,
        coordinators,
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
