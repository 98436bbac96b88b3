//! The fleet: its builder (options → [`FleetBuilder::build`]) and the handle of the running
//! coordinator and agents ([`Fleet`]), which stops them on [`Fleet::shutdown`] (aborts them on
//! drop).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hotroll_agent::{AgentError, Config, Runtime};
use hotroll_coordinator::auth::TokenRole;
use hotroll_coordinator::server::{ServerConfig, ServerError};
use hotroll_coordinator::store::{RedbStore, Store};
use hotroll_coordinator::tls::TlsOptions;
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::control_client::ControlClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::access::{self, Bearer, OperatorClient};
use crate::agent::{AgentSpec, RuntimeFactory};
use crate::coordinator::CoordinatorSpec;
use crate::credentials::LocalFleetTls;
use crate::error::FleetError;
use crate::running::Running;

/// How long an agent may take to stop (its services with it) before it is aborted.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the coordinator may take to stop before it is aborted.
const COORDINATOR_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One node of the fleet, as the per-node options see it.
#[derive(Debug, Clone)]
pub struct NodeSlot {
    /// 0-based; the node is named `node-{index + 1}`.
    pub index: usize,
    pub name: String,
    /// The coordinator's URL (https:// with TLS, http:// without).
    pub coordinator_url: String,
    /// The agent's data dir (`<root>/<name>`).
    pub data_dir: PathBuf,
}

type ServerAdjust = Box<dyn FnOnce(&mut ServerConfig) + Send>;
type TlsAdjust = Box<dyn FnOnce(&mut TlsOptions) + Send>;
type AgentToml = Box<dyn Fn(&NodeSlot) -> String + Send + Sync>;
type AgentAdjust = Box<dyn Fn(&NodeSlot, &mut Config) + Send + Sync>;

/// The options of a local fleet; see [`Fleet::builder`].
pub struct FleetBuilder {
    agents: usize,
    root: Option<PathBuf>,
    tls: bool,
    store: Option<Arc<dyn Store>>,
    server: Vec<ServerAdjust>,
    tls_options: Vec<TlsAdjust>,
    agent_toml: Option<AgentToml>,
    agent_config: Vec<AgentAdjust>,
    labels: BTreeMap<String, String>,
    runtime: Option<RuntimeFactory>,
    prometheus: Option<String>,
}

impl std::fmt::Debug for FleetBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetBuilder")
            .field("agents", &self.agents)
            .field("root", &self.root)
            .field("tls", &self.tls)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Default for FleetBuilder {
    fn default() -> Self {
        Self {
            agents: 1,
            root: None,
            tls: true,
            store: None,
            server: Vec::new(),
            tls_options: Vec::new(),
            agent_toml: None,
            agent_config: Vec::new(),
            labels: BTreeMap::new(),
            runtime: None,
            prometheus: None,
        }
    }
}

impl FleetBuilder {
    /// How many nodes (agents) to run, `node-1`..; 0: the coordinator alone. Default 1.
    pub fn agents(mut self, count: usize) -> Self {
        self.agents = count;
        self
    }

    /// Where the fleet's files go (`coordinator/`, `node-N/`); default: a temp dir the fleet
    /// owns and removes. A given dir is left in place.
    pub fn root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.root = Some(dir.into());
        self
    }

    /// Plaintext and no authentication (http://), instead of TLS with tokens and certificates.
    pub fn insecure(mut self) -> Self {
        self.tls = false;
        self
    }

    /// The coordinator's store; default: a [`RedbStore`] in its data dir.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Adjust the coordinator's config (heartbeat, grace, step slack...) after the fleet set
    /// its data dir and TLS.
    pub fn server_config(
        mut self,
        adjust: impl FnOnce(&mut ServerConfig) + Send + 'static,
    ) -> Self {
        self.server.push(Box::new(adjust));
        self
    }

    /// The Prometheus the coordinator's fleet gates query (`hotroll serve --prometheus URL`).
    pub fn prometheus(mut self, url: impl Into<String>) -> Self {
        self.prometheus = Some(url.into());
        self
    }

    /// Adjust the coordinator's TLS options (e.g. the node certificate lifetime).
    pub fn tls_options(mut self, adjust: impl FnOnce(&mut TlsOptions) + Send + 'static) -> Self {
        self.tls_options.push(Box::new(adjust));
        self
    }

    /// Each node's agent.toml text (it names the coordinator's URL and the node's data dir from
    /// the slot); default: `hotroll_agent::Config::new` for the slot.
    pub fn agent_toml(
        mut self,
        toml: impl Fn(&NodeSlot) -> String + Send + Sync + 'static,
    ) -> Self {
        self.agent_toml = Some(Box::new(toml));
        self
    }

    /// Adjust each node's agent config (after its agent.toml, before the join token is added).
    pub fn agent_config(
        mut self,
        adjust: impl Fn(&NodeSlot, &mut Config) + Send + Sync + 'static,
    ) -> Self {
        self.agent_config.push(Box::new(adjust));
        self
    }

    /// A label every node has.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The runtime every agent drives, made afresh at each start; default: the ones its config
    /// declares.
    pub fn runtime<R: Runtime>(
        mut self,
        make: impl Fn(&Config) -> R + Send + Sync + 'static,
    ) -> Self {
        self.runtime = Some(Arc::new(move |config: &Config| {
            Arc::new(make(config)) as Arc<dyn Runtime>
        }));
        self
    }

    /// Start the coordinator on 127.0.0.1 and the agents (which connect on their own; the
    /// operator's client sees them as they do).
    pub async fn build(self) -> Result<Fleet, FleetError> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = local_addr(&listener)?;
        let scheme = if self.tls { "https" } else { "http" };
        let plan = self.plan(&format!("{scheme}://{addr}"))?;
        Ok(Fleet::start(plan, listener, addr))
    }

    /// The whole set-up with nothing started: the files and credentials, the coordinator and
    /// the agents as specs, the agents told to reach the coordinator at `url`. What
    /// [`FleetBuilder::build`] starts; a network simulation runs the specs on its own hosts.
    pub fn plan(mut self, url: &str) -> Result<FleetPlan, FleetError> {
        if let Some(prometheus) = self.prometheus.take() {
            let prometheus = hotroll_coordinator::gate::Prometheus::new(&prometheus)?;
            self.server.insert(
                0,
                Box::new(move |config: &mut ServerConfig| config.prometheus = Some(prometheus)),
            );
        }
        let root = match &self.root {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| FleetError::Io {
                    what: format!("create {}", dir.display()),
                    source,
                })?;
                Root::Given(dir.clone())
            }
            None => Root::Owned(
                tempfile::Builder::new()
                    .prefix("hotroll-local-")
                    .tempdir()
                    .map_err(|source| FleetError::Io {
                        what: "create a temp dir for the fleet".into(),
                        source,
                    })?,
            ),
        };
        let coordinator_dir = root.path().join("coordinator");
        let credentials = if self.tls {
            let mut options = TlsOptions::new(coordinator_dir.clone(), None, &[]);
            for adjust in self.tls_options {
                adjust(&mut options);
            }
            Some(LocalFleetTls::with_options(options)?)
        } else {
            None
        };
        let store = match self.store {
            Some(store) => store,
            None => Arc::new(RedbStore::open(&coordinator_dir)?),
        };
        let mut config = ServerConfig::new(coordinator_dir);
        config.tls = credentials.as_ref().map(LocalFleetTls::server);
        for adjust in self.server {
            adjust(&mut config);
        }
        let mut agents = Vec::with_capacity(self.agents);
        for index in 0..self.agents {
            let name = format!("node-{}", index + 1);
            let slot = NodeSlot {
                index,
                data_dir: root.path().join(&name),
                name,
                coordinator_url: url.to_string(),
            };
            let mut agent = match &self.agent_toml {
                Some(toml) => {
                    let path = root.path().join(format!("{}.toml", slot.name));
                    Config::from_toml(&path, &toml(&slot)).map_err(|source| {
                        FleetError::AgentConfig {
                            node: slot.name.clone(),
                            path,
                            source: Box::new(source),
                        }
                    })?
                }
                None => Config::new(&slot.name, url, slot.data_dir.clone()),
            };
            agent.labels.extend(self.labels.clone());
            for adjust in &self.agent_config {
                adjust(&slot, &mut agent);
            }
            if let Some(credentials) = &credentials
                && agent.join_token.is_none()
            {
                agent.join_token = Some(credentials.join_token(&agent.node)?);
            }
            agents.push(AgentSpec::new(agent, self.runtime.clone()));
        }
        Ok(FleetPlan {
            url: url.to_string(),
            coordinator: CoordinatorSpec::new(store, config),
            agents,
            credentials,
            root,
        })
    }
}

/// Where the fleet's files are.
enum Root {
    Owned(tempfile::TempDir),
    Given(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Owned(dir) => dir.path(),
            Root::Given(dir) => dir,
        }
    }
}

/// A fleet set up but not started (see [`FleetBuilder::plan`]); it owns the fleet's root.
pub struct FleetPlan {
    pub url: String,
    pub coordinator: CoordinatorSpec,
    /// `node-1`.. in order.
    pub agents: Vec<AgentSpec>,
    pub credentials: Option<LocalFleetTls>,
    root: Root,
}

impl std::fmt::Debug for FleetPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetPlan")
            .field("url", &self.url)
            .field("root", &self.root())
            .field("coordinator", &self.coordinator)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl FleetPlan {
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

struct AgentSlot {
    spec: AgentSpec,
    running: Option<Running<Result<(), AgentError>>>,
}

/// A running local fleet: the coordinator on 127.0.0.1 and its agents.
pub struct Fleet {
    addr: SocketAddr,
    coordinator: Option<Running<Result<(), ServerError>>>,
    agents: Vec<AgentSlot>,
    // Declared last: the tasks are aborted (dropped) before the root is removed.
    plan: FleetPlan,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("addr", &self.addr)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    pub fn builder() -> FleetBuilder {
        FleetBuilder::default()
    }

    fn start(plan: FleetPlan, listener: TcpListener, addr: SocketAddr) -> Self {
        let coordinator = spawn_coordinator(&plan.coordinator, listener);
        let agents = plan
            .agents
            .iter()
            .map(|spec| AgentSlot {
                running: Some(spawn_agent(spec)),
                spec: spec.clone(),
            })
            .collect();
        Self {
            addr,
            coordinator: Some(coordinator),
            agents,
            plan,
        }
    }

    /// The coordinator's URL (https:// with TLS, http:// without).
    pub fn url(&self) -> &str {
        &self.plan.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn root(&self) -> &Path {
        self.plan.root()
    }

    /// The coordinator's data dir (CA, tokens, artifacts; its redb store by default).
    pub fn coordinator_dir(&self) -> &Path {
        self.plan.coordinator.data_dir()
    }

    /// How many agents the fleet has (running or stopped).
    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// Agent `index`'s spec (name, config, data dir).
    pub fn agent(&self, index: usize) -> Result<&AgentSpec, FleetError> {
        self.agents
            .get(index)
            .map(|slot| &slot.spec)
            .ok_or(FleetError::NoSuchAgent(index))
    }

    /// The fleet's credentials; `None` for an insecure fleet.
    pub fn credentials(&self) -> Option<&LocalFleetTls> {
        self.plan.credentials.as_ref()
    }

    fn secure(&self) -> Result<&LocalFleetTls, FleetError> {
        self.credentials().ok_or(FleetError::Insecure)
    }

    /// The CA certificate clients trust.
    pub fn ca_path(&self) -> Result<PathBuf, FleetError> {
        Ok(self.secure()?.ca_path())
    }

    /// The SHA-256 of the CA certificate (what tokens name).
    pub fn ca_pin(&self) -> Result<[u8; 32], FleetError> {
        Ok(self.secure()?.ca_pin())
    }

    /// A token of `role` valid for `ttl` (an agent token bound to `node` when given).
    pub fn token(
        &self,
        role: TokenRole,
        ttl: Duration,
        node: Option<&str>,
    ) -> Result<String, FleetError> {
        self.secure()?.token(role, ttl, node)
    }

    /// The operator token the fleet made (valid for a day); `None` for an insecure fleet.
    pub fn operator_token(&self) -> Option<&str> {
        self.credentials().map(LocalFleetTls::operator_token)
    }

    /// A connected channel to the coordinator: TLS trusting the fleet's CA, no client
    /// certificate and no token (plaintext for an insecure fleet).
    pub async fn channel(&self) -> Result<Channel, FleetError> {
        let ca = self.credentials().map(LocalFleetTls::ca_path);
        access::channel(self.url(), ca.as_deref()).await
    }

    /// A Control client for an operator (the fleet's operator token on every request).
    pub async fn control(&self) -> Result<OperatorClient, FleetError> {
        let bearer = Bearer::new(self.operator_token())?;
        Ok(ControlClient::with_interceptor(
            self.channel().await?,
            bearer,
        ))
    }

    /// Wait until exactly `count` agents are connected, as the coordinator lists them.
    pub async fn wait_connected(&self, count: usize, within: Duration) -> Result<(), FleetError> {
        let mut control = self.control().await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let nodes = control
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            let connected = nodes.iter().filter(|n| n.connected).count();
            if connected == count {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FleetError::Timeout(format!(
                    "{connected} agents connected after {within:?}, expected {count}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop agent `index` (its services stop with it) and wait for it.
    pub async fn stop_agent(&mut self, index: usize) -> Result<(), FleetError> {
        let slot = self
            .agents
            .get_mut(index)
            .ok_or(FleetError::NoSuchAgent(index))?;
        match slot.running.take() {
            Some(running) => {
                agent_stopped(slot.spec.name(), running.stop(AGENT_STOP_TIMEOUT).await)
            }
            None => Ok(()),
        }
    }

    /// Start agent `index` again, from the same config and data dir.
    pub fn start_agent(&mut self, index: usize) -> Result<(), FleetError> {
        let slot = self
            .agents
            .get_mut(index)
            .ok_or(FleetError::NoSuchAgent(index))?;
        if slot.running.is_some() {
            return Err(FleetError::AgentRunning(slot.spec.name().to_string()));
        }
        slot.running = Some(spawn_agent(&slot.spec));
        Ok(())
    }

    /// Stop the coordinator and start it again on the same address, store and data dir.
    pub async fn restart_coordinator(&mut self) -> Result<(), FleetError> {
        let stopped = match self.coordinator.take() {
            Some(running) => coordinator_stopped(running.stop(COORDINATOR_STOP_TIMEOUT).await),
            None => Ok(()),
        };
        let listener = bind(self.addr).await?;
        self.coordinator = Some(spawn_coordinator(&self.plan.coordinator, listener));
        stopped
    }

    /// Stop every agent (and thereby their services), then the coordinator; the first error
    /// any of them ended with.
    pub async fn shutdown(mut self) -> Result<(), FleetError> {
        let mut agents: Vec<_> = self
            .agents
            .iter_mut()
            .filter_map(|slot| Some((slot.spec.name().to_string(), slot.running.take()?)))
            .collect();
        // Every agent is told first, so they stop side by side.
        for (_, running) in &mut agents {
            running.signal();
        }
        let mut result = Ok(());
        for (name, running) in agents {
            let stopped = agent_stopped(&name, running.stop(AGENT_STOP_TIMEOUT).await);
            result = result.and(stopped);
        }
        if let Some(running) = self.coordinator.take() {
            let stopped = coordinator_stopped(running.stop(COORDINATOR_STOP_TIMEOUT).await);
            result = result.and(stopped);
        }
        result
    }
}

fn spawn_coordinator(
    spec: &CoordinatorSpec,
    listener: TcpListener,
) -> Running<Result<(), ServerError>> {
    let spec = spec.clone();
    Running::spawn(move |stopped| spec.run(listener, stopped.wait()))
}

fn spawn_agent(spec: &AgentSpec) -> Running<Result<(), AgentError>> {
    let spec = spec.clone();
    Running::spawn(move |stopped| spec.run(None, stopped.wait()))
}

fn agent_stopped(
    name: &str,
    stopped: Option<Result<Result<(), AgentError>, tokio::task::JoinError>>,
) -> Result<(), FleetError> {
    match stopped {
        None => {
            tracing::warn!(node = name, "the agent did not stop in time: aborted");
            Ok(())
        }
        Some(Ok(result)) => result.map_err(|source| FleetError::Agent {
            node: name.to_string(),
            source: Box::new(source),
        }),
        Some(Err(source)) => Err(FleetError::Task {
            what: format!("agent {name}"),
            source,
        }),
    }
}

fn coordinator_stopped(
    stopped: Option<Result<Result<(), ServerError>, tokio::task::JoinError>>,
) -> Result<(), FleetError> {
    match stopped {
        None => {
            tracing::warn!("the coordinator did not stop in time: aborted");
            Ok(())
        }
        Some(Ok(result)) => Ok(result?),
        Some(Err(source)) => Err(FleetError::Task {
            what: "the coordinator".into(),
            source,
        }),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, FleetError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| FleetError::Io {
            what: format!("listen on {addr}"),
            source,
        })
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, FleetError> {
    listener.local_addr().map_err(|source| FleetError::Io {
        what: "read the listener's address".into(),
        source,
    })
}
