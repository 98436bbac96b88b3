//! One agent of a local fleet, ready to run: its config and, optionally, the runtime it drives.
//!
//! [`AgentSpec::run`] is the only place in this crate that starts an agent, so a change of the
//! agent's entry point is a change here only.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use hotroll_agent::{AgentError, Config, Dialer, Runtime};

/// Makes the runtime an agent drives, each time it starts (a restarted agent gets a fresh one).
pub type RuntimeFactory = Arc<dyn Fn(&Config) -> Arc<dyn Runtime> + Send + Sync>;

/// Everything an agent needs but its connection to the coordinator.
#[derive(Clone)]
pub struct AgentSpec {
    config: Config,
    runtime: Option<RuntimeFactory>,
}

impl std::fmt::Debug for AgentSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSpec")
            .field("config", &self.config)
            .field("runtime", &self.runtime.as_ref().map(|_| "given"))
            .finish()
    }
}

impl AgentSpec {
    /// An agent with the runtimes its config declares (process for `[[services]]`, BEAM for
    /// `[[beam]]`) unless `runtime` makes one.
    pub fn new(config: Config, runtime: Option<RuntimeFactory>) -> Self {
        Self { config, runtime }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn name(&self) -> &str {
        &self.config.node
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Run the agent until `shutdown` resolves. `dialer`: how it reaches the coordinator (a
    /// network simulation's); `None`: as its config says (TCP, or TLS with the node's
    /// certificate, joining with its token first and renewing the certificate meanwhile).
    pub async fn run(
        self,
        dialer: Option<Dialer>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let runtime = self.runtime.map(|make| make(&self.config));
        let mut agent = hotroll_agent::Agent::builder(self.config);
        if let Some(runtime) = runtime {
            agent = agent.runtime(runtime);
        }
        if let Some(dialer) = dialer {
            agent = agent.dialer(dialer);
        }
        agent.build().run(shutdown).await
    }
}
