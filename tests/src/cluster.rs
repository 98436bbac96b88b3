//! A local cluster: one coordinator (`hotroll serve`) and N agents (`hotroll-agent`), each a real
//! process, in one temp dir, on 127.0.0.1 with a free port.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::bins::{Binaries, binaries};
use crate::hooks::{Hook, Mark, read_marks};
use crate::poll::poll;
pub use crate::ports::free_port;
use crate::process::Process;
use crate::status;

/// How a cluster is set up. Build it with the methods; `Default` is what the e2e tests use.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `hotroll serve --heartbeat-interval`.
    pub heartbeat_interval: String,
    /// `hotroll serve --session-grace`.
    pub session_grace: String,
    /// `hotroll serve --step-slack`.
    pub step_slack: String,
    /// More arguments for `hotroll serve`.
    pub coordinator_args: Vec<String>,
    /// Hooks every agent declares.
    pub hooks: BTreeMap<String, Hook>,
    /// Per node (1-based): hooks that replace or add to [`ClusterOptions::hooks`].
    pub node_hooks: BTreeMap<usize, BTreeMap<String, Hook>>,
    /// Labels every agent has.
    pub labels: BTreeMap<String, String>,
    /// Per node (1-based): labels that replace or add to [`ClusterOptions::labels`].
    pub node_labels: BTreeMap<usize, BTreeMap<String, String>>,
    /// Raw TOML appended to every `agent.toml` (top-level keys must come before `[hooks]`, so
    /// this is for further tables). `{node}`, `{node_dir}`, `{cluster_dir}` and `{marks}` are
    /// replaced per node.
    pub agent_toml_extra: String,
    /// Per node (1-based): raw TOML appended after [`ClusterOptions::agent_toml_extra`].
    pub node_agent_toml_extra: BTreeMap<usize, String>,
    /// Environment for every process (coordinator and agents). `RUST_LOG` defaults to the
    /// test's own `RUST_LOG`, else `info`.
    pub env: Vec<(String, String)>,
    /// How long `start` waits for the coordinator to listen and every agent to connect.
    pub ready_timeout: Duration,
    /// Whether `start` waits for every agent to show as connected.
    pub wait_connected: bool,
    /// Plaintext, no authentication (`serve --insecure`, agents and CLI `--insecure`). The
    /// default is TLS: the coordinator makes its CA, every agent joins with a token of its own
    /// and the CLI runs with an operator token (see [`Cluster::cli_env`]).
    pub insecure: bool,
    /// The coordinator's `--data-dir`, when not `<dir>/coordinator/data` (e.g. a small
    /// filesystem, [`crate::small_disk::SmallDisk`]).
    pub coordinator_data_dir: Option<PathBuf>,
    /// A command the coordinator runs under, its arguments before `hotroll serve ...` (e.g.
    /// `nsenter --mount=...`, to see a filesystem mounted in another mount namespace).
    pub coordinator_wrapper: Vec<String>,
    /// A group of this many coordinators on a real 3-member etcd cluster (`serve --store
    /// etcd`), instead of one on redb; 0: one coordinator. See [`ClusterOptions::group`].
    pub group: usize,
    /// `serve --lease-ttl` of a group's coordinators.
    pub lease_ttl: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: "500ms".into(),
            session_grace: "3s".into(),
            step_slack: "5s".into(),
            coordinator_args: Vec::new(),
            hooks: BTreeMap::new(),
            node_hooks: BTreeMap::new(),
            labels: BTreeMap::new(),
            node_labels: BTreeMap::new(),
            agent_toml_extra: String::new(),
            node_agent_toml_extra: BTreeMap::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            wait_connected: true,
            insecure: false,
            coordinator_data_dir: None,
            coordinator_wrapper: Vec::new(),
            group: 0,
            lease_ttl: "2s".into(),
        }
    }
}

impl ClusterOptions {
    pub fn heartbeat_interval(mut self, d: &str) -> Self {
        self.heartbeat_interval = d.into();
        self
    }

    pub fn session_grace(mut self, d: &str) -> Self {
        self.session_grace = d.into();
        self
    }

    pub fn step_slack(mut self, d: &str) -> Self {
        self.step_slack = d.into();
        self
    }

    pub fn coordinator_arg(mut self, arg: &str) -> Self {
        self.coordinator_args.push(arg.into());
        self
    }

    /// Declare `name` on every agent.
    pub fn hook(mut self, name: &str, hook: Hook) -> Self {
        self.hooks.insert(name.into(), hook);
        self
    }

    /// Declare `name` on node `node` (1-based) only, or override the common one there.
    pub fn node_hook(mut self, node: usize, name: &str, hook: Hook) -> Self {
        self.node_hooks
            .entry(node)
            .or_default()
            .insert(name.into(), hook);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// A label of node `node` (1-based) only.
    pub fn node_label(mut self, node: usize, key: &str, value: &str) -> Self {
        self.node_labels
            .entry(node)
            .or_default()
            .insert(key.into(), value.into());
        self
    }

    pub fn agent_toml_extra(mut self, toml: &str) -> Self {
        self.agent_toml_extra.push_str(toml);
        self.agent_toml_extra.push('\n');
        self
    }

    /// Raw TOML appended to node `node`'s (1-based) `agent.toml` only, e.g. a `[[services]]`
    /// entry with a port of its own.
    pub fn node_agent_toml_extra(mut self, node: usize, toml: &str) -> Self {
        let extra = self.node_agent_toml_extra.entry(node).or_default();
        extra.push_str(toml);
        extra.push('\n');
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    pub fn wait_connected(mut self, wait: bool) -> Self {
        self.wait_connected = wait;
        self
    }

    /// Run the cluster without TLS (see [`ClusterOptions::insecure`]).
    /// See [`ClusterOptions::coordinator_data_dir`].
    pub fn coordinator_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.coordinator_data_dir = Some(dir.into());
        self
    }

    /// See [`ClusterOptions::coordinator_wrapper`].
    pub fn coordinator_wrapper(mut self, command: Vec<String>) -> Self {
        self.coordinator_wrapper = command;
        self
    }

    /// `coordinators` coordinators in a group on a real 3-member etcd cluster the harness
    /// starts: each `serve --store etcd` on a port of its own, advertising its URL. Agents list
    /// them all (`coordinator = [..]`) and so does the CLI (`HOTROLL_COORDINATOR=a,b,c`).
    /// With TLS (unless [`ClusterOptions::insecure`]) the group has one trust root: the first
    /// coordinator makes the CA, the others are given it (`--ca-cert`, `--ca-key`), each issues
    /// its own server certificate; tokens are the group's, in etcd (`token create
    /// --etcd-endpoints`), made once the group has a leader.
    pub fn group(mut self, coordinators: usize) -> Self {
        self.group = coordinators;
        self
    }

    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }
}

/// The credentials the harness made for a TLS cluster.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// An operator token (`hotroll token create --role operator`).
    pub token: String,
    /// The coordinator's CA certificate (`<data_dir>/tls/ca.pem`).
    pub ca: PathBuf,
    /// An operator client certificate and key (`hotroll cert issue`), for clients the tests
    /// open themselves.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One agent of a cluster.
#[derive(Debug)]
pub struct Agent {
    /// `node-<i>`.
    pub name: String,
    /// The node's directory (config, data dir, marker file).
    pub dir: PathBuf,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    /// The marker file the [`Hook::mark`] hooks append to.
    pub marks: PathBuf,
    pub process: Process,
}

/// What a `hotroll` client command did.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code; `None` when it was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The stdout parsed as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "output is not JSON (exit {:?})\nstdout: {}\nstderr: {}",
                self.code, self.stdout, self.stderr
            )
        })
    }

    /// Fail unless the command exited 0.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.code != Some(0) {
            bail!(
                "command exited {:?}\nstdout: {}\nstderr: {}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// The outcome of `hotroll rollout start FILE --wait --output json`.
#[derive(Debug, Clone)]
pub struct WaitedRollout {
    pub id: String,
    /// Exit code of the CLI (0 succeeded, 3 not succeeded, 1 error).
    pub code: Option<i32>,
    /// The final status the CLI printed.
    pub status: Value,
    pub output: CmdOutput,
}

impl WaitedRollout {
    /// The rollout ended in `state`; otherwise an error with its status and the CLI's stderr.
    pub fn ensure_state(&self, state: &str) -> anyhow::Result<()> {
        let actual = crate::status::rollout_state(&self.status)?;
        anyhow::ensure!(
            actual == state,
            "rollout is `{actual}`, expected `{state}`: {:#}\nstderr: {}",
            self.status,
            self.output.stderr
        );
        Ok(())
    }
}

/// A running cluster. Dropping it kills every process; when the thread is panicking (a failed
/// test) it first prints the tail of every process's log. Set `HOTROLL_KEEP_TEMP=1` to keep the
/// temp dir (its path is printed).
#[derive(Debug)]
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    port: u16,
    url: String,
    bins: Binaries,
    coordinator: Process,
    agents: Vec<Agent>,
    options: ClusterOptions,
    credentials: Option<Credentials>,
    /// A group's etcd cluster and its coordinators after the first (which is `coordinator`).
    etcd: Option<crate::etcd::EtcdCluster>,
    standbys: Vec<GroupMember>,
    /// The port of each of a group's coordinators, the first's included.
    group_ports: Vec<u16>,
}

/// A coordinator of a group besides the first.
#[derive(Debug)]
struct GroupMember {
    process: Process,
}

/// Default timeout of a client command.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

impl Cluster {
    /// Start a coordinator and `agents` agents named `node-1` ... `node-<agents>`, and wait until
    /// the coordinator lists all of them as connected.
    pub fn start(agents: usize, options: ClusterOptions) -> anyhow::Result<Self> {
        let bins = binaries()?.clone();
        let dir = tempfile::Builder::new()
            .prefix("hotroll-e2e-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let path = dir.path().to_path_buf();
        for sub in ["logs", "scripts", "coordinator"] {
            std::fs::create_dir_all(path.join(sub))?;
        }
        let placeholder = Process::new(
            "coordinator",
            &bins.hotroll,
            Vec::<String>::new(),
            &path,
            path.join("logs/coordinator.log"),
        );
        let mut cluster = Self {
            dir: Some(dir),
            path,
            port: 0,
            url: String::new(),
            bins,
            coordinator: placeholder,
            agents: Vec::new(),
            options,
            credentials: None,
            etcd: None,
            standbys: Vec::new(),
            group_ports: Vec::new(),
        };
        if let Err(e) = cluster.boot(agents) {
            let logs = cluster.log_tails(40);
            return Err(e.context(format!("the cluster did not start; logs:\n{logs}")));
        }
        Ok(cluster)
    }

    fn boot(&mut self, agents: usize) -> anyhow::Result<()> {
        if self.options.group > 0 {
            self.start_group()?;
        } else {
            self.start_coordinator()?;
        }
        if !self.options.insecure {
            self.credentials = Some(self.issue_credentials()?);
        }
        for i in 1..=agents {
            let agent = self.make_agent(i)?;
            self.agents.push(agent);
            let agent = self.agents.last_mut().context("no agent")?;
            agent.process.start()?;
        }
        if self.options.wait_connected {
            self.wait_ready(self.options.ready_timeout)?;
        }
        Ok(())
    }

    /// Wait until every agent shows as connected; fails at once if one of them exits.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let names = self.node_names();
        let deadline = Instant::now() + timeout;
        loop {
            for agent in &mut self.agents {
                if let Some(status) = agent.process.exit_status() {
                    bail!("agent {} exited: {status}", agent.name);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let step = remaining.min(Duration::from_millis(500));
            match self.wait_connected(&names, step) {
                Ok(()) => return Ok(()),
                Err(e) if remaining <= step => {
                    return Err(e.context(format!("agents not connected after {timeout:?}")));
                }
                Err(_) => {}
            }
        }
    }

    /// Pick a free port, start `hotroll serve` on it and wait until it accepts connections;
    /// on a lost race for the port, try another one.
    fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let data_dir = self.coordinator_data_dir();
        let mut last_error = None;
        for _attempt in 0..5 {
            let port = free_port()?;
            let listen = format!("127.0.0.1:{port}");
            let mut args = vec![
                "serve".to_string(),
                "--listen".into(),
                listen,
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--heartbeat-interval".into(),
                self.options.heartbeat_interval.clone(),
                "--session-grace".into(),
                self.options.session_grace.clone(),
                "--step-slack".into(),
                self.options.step_slack.clone(),
            ];
            if self.options.insecure {
                args.push("--insecure".into());
            }
            args.extend(self.options.coordinator_args.iter().cloned());
            let (program, args) = match self.options.coordinator_wrapper.split_first() {
                Some((wrapper, before)) => {
                    let mut all = before.to_vec();
                    all.push(self.bins.hotroll.display().to_string());
                    all.extend(args);
                    (PathBuf::from(wrapper), all)
                }
                None => (self.bins.hotroll.clone(), args),
            };
            let mut process = Process::new(
                "coordinator",
                &program,
                args,
                &self.path,
                self.path.join("logs/coordinator.log"),
            );
            self.apply_env(&mut process);
            process.start()?;
            self.port = port;
            self.url = if self.options.insecure {
                format!("http://127.0.0.1:{port}")
            } else {
                format!("https://127.0.0.1:{port}")
            };
            self.coordinator = process;
            match self.wait_listening(self.options.ready_timeout) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let log = self.coordinator.log_tail(20);
                    let lost_race =
                        log.contains("cannot listen") || log.contains("Address already in use");
                    self.coordinator.kill()?;
                    if !lost_race {
                        return Err(e.context(format!("coordinator log:\n{log}")));
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no free port")))
            .context("cannot start the coordinator")
    }

    /// A group: etcd, then every coordinator, each waited for until it listens.
    fn start_group(&mut self) -> anyhow::Result<()> {
        let etcd = crate::etcd::EtcdCluster::start(3)?;
        let endpoints = etcd.endpoints_arg();
        self.etcd = Some(etcd);
        let ports = (0..self.options.group)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.group_ports = ports.clone();
        for (i, port) in ports.iter().enumerate() {
            let name = format!("coordinator-{}", i + 1);
            let data_dir = self.group_data_dir(i);
            let mut args = vec![
                "serve".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--heartbeat-interval".into(),
                self.options.heartbeat_interval.clone(),
                "--session-grace".into(),
                self.options.session_grace.clone(),
                "--step-slack".into(),
                self.options.step_slack.clone(),
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                endpoints.clone(),
                "--advertise".into(),
                self.group_url(i),
                "--lease-ttl".into(),
                self.options.lease_ttl.clone(),
            ];
            if self.options.insecure {
                args.push("--insecure".into());
            } else if i > 0 {
                // The group's one trust root: the first coordinator's CA (made as it started).
                let tls = self.group_data_dir(0).join("tls");
                args.extend([
                    "--ca-cert".into(),
                    tls.join("ca.pem").display().to_string(),
                    "--ca-key".into(),
                    tls.join("ca.key.pem").display().to_string(),
                ]);
            }
            args.extend(self.options.coordinator_args.iter().cloned());
            let mut process = Process::new(
                name.clone(),
                &self.bins.hotroll,
                args,
                &self.path,
                self.path.join(format!("logs/{name}.log")),
            );
            self.apply_env(&mut process);
            process.start()?;
            wait_port(&mut process, *port, self.options.ready_timeout)?;
            if i == 0 {
                self.coordinator = process;
                self.port = *port;
            } else {
                self.standbys.push(GroupMember { process });
            }
        }
        self.url = (0..ports.len())
            .map(|i| self.group_url(i))
            .collect::<Vec<_>>()
            .join(",");
        if !self.options.insecure {
            // Tokens are written under the leader's epoch.
            self.wait_group_leader(None, self.options.ready_timeout)?;
        }
        Ok(())
    }

    /// The data dir of a group's coordinator `i` (0-based).
    fn group_data_dir(&self, i: usize) -> PathBuf {
        self.path.join(format!("coordinator-{}", i + 1))
    }

    /// Coordinator `i` (0-based) of a group; the first is [`Cluster::coordinator`].
    pub fn group_member(&mut self, i: usize) -> &mut Process {
        match i {
            0 => &mut self.coordinator,
            i => &mut self.standbys[i - 1].process,
        }
    }

    /// How many coordinators the group has (0: not a group).
    pub fn group_size(&self) -> usize {
        self.group_ports.len()
    }

    /// The first coordinator of the group (0-based) whose process has exited, if any.
    pub fn exited_group_member(&mut self) -> Option<usize> {
        (0..self.group_size()).find(|&i| self.group_member(i).exit_status().is_some())
    }

    /// SIGKILL coordinator `i` of the group if it runs, start it again on the same port and
    /// data dir (it comes back as a standby and campaigns), and wait until it listens.
    pub fn restart_group_member(&mut self, i: usize) -> anyhow::Result<()> {
        let port = self.group_ports[i];
        let timeout = self.options.ready_timeout;
        let member = self.group_member(i);
        member.restart()?;
        wait_port(member, port, timeout)
    }

    /// `https://127.0.0.1:<port>` of a group's coordinator `i` (0-based; `http://` with
    /// [`ClusterOptions::insecure`]).
    pub fn group_url(&self, i: usize) -> String {
        let scheme = if self.options.insecure {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://127.0.0.1:{}", self.group_ports[i])
    }

    /// The group's etcd cluster.
    pub fn etcd(&mut self) -> Option<&mut crate::etcd::EtcdCluster> {
        self.etcd.as_mut()
    }

    /// Which coordinator of the group leads now (0-based), as etcd's election says.
    pub fn group_leader(&self) -> anyhow::Result<Option<usize>> {
        let etcd = self.etcd.as_ref().context("not a group")?;
        let client =
            hotroll_etcd::EtcdClient::new(&hotroll_etcd::EtcdOptions::new(etcd.endpoints()))?;
        let reader = client.clone();
        let leader = client.block_on(async move { reader.leader(b"/hotroll/leader").await })?;
        Ok(leader.and_then(|kv| {
            let url = String::from_utf8_lossy(&kv.value).into_owned();
            (0..self.group_ports.len()).find(|&i| self.group_url(i) == url)
        }))
    }

    /// Wait until a coordinator of the group other than `not` leads; returns it.
    pub fn wait_group_leader(
        &self,
        not: Option<usize>,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        crate::poll::poll(
            "a coordinator of the group to lead",
            timeout,
            Duration::from_millis(100),
            || Ok(self.group_leader()?.filter(|i| Some(*i) != not)),
        )
    }

    /// Wait until the coordinator's port accepts TCP connections; fails at once if the
    /// coordinator exits.
    pub fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        wait_port(&mut self.coordinator, self.port, timeout)
    }

    /// The coordinator's data dir.
    pub fn coordinator_data_dir(&self) -> PathBuf {
        if self.options.group > 0 {
            // Where the group's CA was made.
            return self.group_data_dir(0);
        }
        self.options
            .coordinator_data_dir
            .clone()
            .unwrap_or_else(|| self.path.join("coordinator/data"))
    }

    /// `hotroll ARGS` run to completion against the coordinator's data dir (token and cert
    /// commands need no server).
    fn local_hotroll(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        let data_dir = self.coordinator_data_dir().display().to_string();
        let mut command = Command::new(&self.bins.hotroll);
        command.args(args).args(["--data-dir", &data_dir]);
        run_command(command, CLI_TIMEOUT)
            .with_context(|| format!("hotroll {}", args.join(" ")))?
            .ok()
    }

    /// A token made with `hotroll token create ARGS` (the coordinator's CA exists by now).
    pub fn create_token(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        // A group's tokens are the group's, in etcd.
        let endpoints = self.etcd.as_ref().map(|etcd| etcd.endpoints_arg());
        if let Some(endpoints) = &endpoints {
            all.extend(["--etcd-endpoints", endpoints]);
        }
        let output = self.local_hotroll(&all)?;
        let token = output.stdout.trim().to_string();
        if !token.starts_with("hr1.") {
            bail!("`hotroll token create` printed no token: {}", output.stdout);
        }
        Ok(token)
    }

    /// An operator token for the CLI and an operator client certificate for raw clients.
    fn issue_credentials(&self) -> anyhow::Result<Credentials> {
        let token = self.create_token(&["--role", "operator", "--ttl", "7d"])?;
        let out = self.path.join("cli");
        let out_text = out.display().to_string();
        self.local_hotroll(&[
            "cert", "issue", "--role", "operator", "--name", "e2e", "--out", &out_text,
        ])?;
        Ok(Credentials {
            token,
            ca: self.coordinator_data_dir().join("tls/ca.pem"),
            cert: out.join("e2e.pem"),
            key: out.join("e2e.key"),
        })
    }

    /// The credentials of a TLS cluster (`None` with [`ClusterOptions::insecure`]).
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The environment that points a `hotroll` client command at this cluster with the
    /// harness's operator credentials: `HOTROLL_COORDINATOR`, and `HOTROLL_TOKEN` +
    /// `HOTROLL_CA` (TLS) or `HOTROLL_INSECURE=1`.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("HOTROLL_COORDINATOR".to_string(), self.url.clone())];
        match &self.credentials {
            Some(c) => {
                env.push(("HOTROLL_TOKEN".into(), c.token.clone()));
                env.push(("HOTROLL_CA".into(), c.ca.display().to_string()));
            }
            None => env.push(("HOTROLL_INSECURE".into(), "1".into())),
        }
        env
    }

    /// A gRPC channel to the coordinator for a client the test runs itself: TLS with the
    /// harness's operator certificate (plaintext for an insecure cluster).
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let endpoint =
            tonic::transport::Endpoint::from_shared(hotroll_tls::client::channel_uri(&self.url))?;
        let Some(c) = &self.credentials else {
            return Ok(endpoint.connect().await?);
        };
        let tls = hotroll_tls::ClientTls::new(
            &hotroll_tls::Trust::Ca(hotroll_tls::files::read_certs(&c.ca)?),
            Some(hotroll_tls::client::ClientCert {
                chain: hotroll_tls::files::read_certs(&c.cert)?,
                key: hotroll_tls::files::read_key(&c.key)?,
            }),
        )?;
        Ok(tls.connect(endpoint).await?)
    }

    /// A `hotroll` command with [`Cluster::cli_env`] set, run in the cluster's dir.
    pub fn hotroll_command(&self) -> Command {
        let mut command = Command::new(&self.bins.hotroll);
        command
            .envs(self.cli_env())
            .env("NO_COLOR", "1")
            .current_dir(&self.path);
        command
    }

    fn apply_env(&self, process: &mut Process) {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        process.env("RUST_LOG", rust_log);
        process.env("NO_COLOR", "1");
        for (k, v) in &self.options.env {
            process.env(k, v);
        }
    }

    fn make_agent(&self, index: usize) -> anyhow::Result<Agent> {
        let name = node_name(index);
        let dir = self.path.join(&name);
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)?;
        let config = dir.join("agent.toml");
        let marks = dir.join("marks");
        let vars = [
            ("{marks}", marks.display().to_string()),
            ("{node}", name.clone()),
            ("{node_dir}", dir.display().to_string()),
            ("{cluster_dir}", self.path.display().to_string()),
        ];
        let mut labels = self.options.labels.clone();
        if let Some(extra) = self.options.node_labels.get(&index) {
            labels.extend(extra.clone());
        }
        let mut hooks = self.options.hooks.clone();
        if let Some(extra) = self.options.node_hooks.get(&index) {
            hooks.extend(extra.clone());
        }
        let mut doc = toml::Table::new();
        doc.insert("node".into(), name.clone().into());
        if self.options.group > 0 {
            let urls: Vec<toml::Value> = self.url.split(',').map(|u| u.into()).collect();
            doc.insert("coordinator".into(), toml::Value::Array(urls));
        } else {
            doc.insert("coordinator".into(), self.url.clone().into());
        }
        if self.options.insecure {
            doc.insert("insecure".into(), true.into());
        } else {
            // A single-use token of its own, bound to its name.
            let token = self.create_token(&["--role", "agent", "--node", &name, "--ttl", "1h"])?;
            doc.insert("join_token".into(), token.into());
        }
        doc.insert("data_dir".into(), data_dir.display().to_string().into());
        doc.insert(
            "labels".into(),
            toml::Value::Table(
                labels
                    .into_iter()
                    .map(|(k, v)| (k, toml::Value::String(v)))
                    .collect(),
            ),
        );
        doc.insert(
            "hooks".into(),
            toml::Value::Table(
                hooks
                    .iter()
                    .map(|(k, h)| (k.clone(), h.to_toml(&vars)))
                    .collect(),
            ),
        );
        let mut text = toml::to_string(&doc).context("cannot render agent.toml")?;
        if !self.options.agent_toml_extra.is_empty() {
            let mut extra = self.options.agent_toml_extra.clone();
            for (var, value) in &vars {
                extra = extra.replace(var, value);
            }
            text.push('\n');
            text.push_str(&extra);
        }
        if let Some(extra) = self.options.node_agent_toml_extra.get(&index) {
            text.push('\n');
            text.push_str(extra);
        }
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut process = Process::new(
            name.clone(),
            &self.bins.agent,
            ["--config".to_string(), config.display().to_string()],
            &dir,
            self.path.join(format!("logs/{name}.log")),
        );
        self.apply_env(&mut process);
        Ok(Agent {
            name,
            dir,
            config,
            data_dir,
            marks,
            process,
        })
    }

    /// The cluster's temp dir.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// `https://127.0.0.1:<port>` (`http://` with [`ClusterOptions::insecure`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// SIGKILL the coordinator, start it again on the same port and data dir, and wait until
    /// it listens (agents reconnect on their own; see [`Cluster::wait_all_connected`]).
    pub fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        self.coordinator.restart()?;
        self.wait_listening(self.options.ready_timeout)
    }

    /// The coordinator process.
    pub fn coordinator(&mut self) -> &mut Process {
        &mut self.coordinator
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The names of every node, `node-1` first.
    pub fn node_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }

    /// Agent `i` (1-based, matching `node-<i>`).
    pub fn agent_info(&self, i: usize) -> &Agent {
        assert!(
            (1..=self.agents.len()).contains(&i),
            "agent {i} does not exist (agents are 1..={})",
            self.agents.len()
        );
        &self.agents[i - 1]
    }

    /// The process of agent `i` (1-based).
    pub fn agent(&mut self, i: usize) -> &mut Process {
        let _ = self.agent_info(i);
        &mut self.agents[i - 1].process
    }

    /// Marks of node `i` (1-based), in the order they were written.
    pub fn marks(&self, i: usize) -> anyhow::Result<Vec<Mark>> {
        read_marks(&self.agent_info(i).marks)
    }

    /// The time (ns) of node `i`'s first mark labelled `label`.
    pub fn mark_time(&self, i: usize, label: &str) -> anyhow::Result<Option<u128>> {
        Ok(self
            .marks(i)?
            .into_iter()
            .find(|m| m.label == label)
            .map(|m| m.ns))
    }

    /// Write `text` to `scripts/<name>` in the cluster's dir and return its path.
    pub fn write_script(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.path.join("scripts").join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Run `hotroll ARGS` against this cluster's coordinator (`--coordinator` is added for the
    /// `nodes` and `rollout` commands, and [`Cluster::cli_env`] is set for all).
    pub fn hotroll(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        self.hotroll_timeout(args, CLI_TIMEOUT)
    }

    /// [`Cluster::hotroll`] with an explicit timeout (the command is killed after it).
    pub fn hotroll_timeout(&self, args: &[&str], timeout: Duration) -> anyhow::Result<CmdOutput> {
        let mut command = self.hotroll_command();
        command.args(args);
        if matches!(args.first(), Some(&"nodes") | Some(&"rollout")) {
            command.args(["--coordinator", &self.url]);
        }
        run_command(command, timeout).with_context(|| format!("hotroll {}", args.join(" ")))
    }

    /// `hotroll nodes --output json`.
    pub fn nodes(&self) -> anyhow::Result<Value> {
        self.hotroll(&["nodes", "--output", "json"])?.ok()?.json()
    }

    /// Wait until the named nodes are listed as connected.
    pub fn wait_connected(&self, names: &[String], timeout: Duration) -> anyhow::Result<()> {
        poll(
            &format!("{} to be connected", names.join(", ")),
            timeout,
            Duration::from_millis(100),
            || {
                let nodes = self.nodes()?;
                let connected = names.iter().all(|name| {
                    nodes.as_array().is_some_and(|all| {
                        all.iter()
                            .any(|n| n["name"] == name.as_str() && n["connected"] == true)
                    })
                });
                Ok(connected.then_some(()))
            },
        )
    }

    /// Wait until every agent of the cluster is listed as connected.
    pub fn wait_all_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_connected(&self.node_names(), timeout)
    }

    /// `hotroll rollout start SCRIPT EXTRA.. --output json` (no wait): the rollout id.
    pub fn start_rollout(&self, script: &Path, extra: &[&str]) -> anyhow::Result<String> {
        let script = script.display().to_string();
        let mut args = vec!["rollout", "start", script.as_str(), "--output", "json"];
        args.extend_from_slice(extra);
        let output = self.hotroll(&args)?.ok()?;
        let json = output.json()?;
        json["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no `id` in {json}"))
    }

    /// `hotroll rollout start SCRIPT EXTRA.. --wait --output json`, killed after `timeout`.
    pub fn run_rollout(
        &self,
        script: &Path,
        extra: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<WaitedRollout> {
        let script = script.display().to_string();
        let wait_timeout = format!("{}s", timeout.as_secs().max(1));
        let mut args = vec![
            "rollout",
            "start",
            script.as_str(),
            "--wait",
            "--wait-timeout",
            wait_timeout.as_str(),
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let output = self.hotroll_timeout(&args, timeout + Duration::from_secs(10))?;
        let status = output.json()?;
        let id = status["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no `id` in {status}"))?;
        Ok(WaitedRollout {
            id,
            code: output.code,
            status,
            output,
        })
    }

    /// `hotroll rollout status ID --output json`.
    pub fn status(&self, id: &str) -> anyhow::Result<Value> {
        self.hotroll(&["rollout", "status", id, "--output", "json"])?
            .ok()?
            .json()
    }

    /// Poll the status until the rollout is in a final state; returns that status.
    pub fn wait_final(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let mut last = Value::Null;
        poll(
            &format!("rollout {id} to reach a final state"),
            timeout,
            Duration::from_millis(100),
            || {
                let status = self.status(id)?;
                let done = status::is_final(status::rollout_state(&status)?);
                last = status.clone();
                Ok(done.then_some(status))
            },
        )
        .with_context(|| format!("last status: {last}"))
    }

    /// Poll the status until `done(status)` holds; returns that status.
    pub fn wait_status(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let mut last = Value::Null;
        poll(what, timeout, Duration::from_millis(100), || {
            let status = self.status(id)?;
            let ok = done(&status);
            last = status.clone();
            Ok(ok.then_some(status))
        })
        .with_context(|| format!("last status: {last}"))
    }

    /// Run a test body against the cluster. When it fails, print the tail of every log (the
    /// test runner shows it with the failure) and name the cluster's dir in the error, then
    /// stop the cluster. Panics are covered by `Drop` already; this covers `Err` returns,
    /// after which the cluster would otherwise be dropped silently.
    pub fn run<T>(
        mut self,
        body: impl FnOnce(&mut Cluster) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let result = body(&mut self);
        if result.is_err() {
            self.dump_logs(60);
        }
        result.with_context(|| {
            format!(
                "in cluster {} (HOTROLL_KEEP_TEMP=1 keeps it)",
                self.path.display()
            )
        })
    }

    /// The tail of every process's log (and every marker file), as one text.
    pub fn log_tails(&self, lines: usize) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "===== cluster in {}", self.path.display());
        let _ = writeln!(
            out,
            "----- coordinator ({}) -----\n{}",
            self.coordinator.log_path().display(),
            self.coordinator.log_tail(lines)
        );
        for member in &self.standbys {
            let _ = writeln!(
                out,
                "----- {} ({}) -----\n{}",
                member.process.name(),
                member.process.log_path().display(),
                member.process.log_tail(lines)
            );
        }
        for agent in &self.agents {
            let _ = writeln!(
                out,
                "----- {} ({}) -----\n{}",
                agent.name,
                agent.process.log_path().display(),
                agent.process.log_tail(lines)
            );
            if let Ok(marks) = std::fs::read_to_string(&agent.marks) {
                let _ = writeln!(out, "----- {} marks -----\n{marks}", agent.name);
            }
        }
        out
    }

    /// Print [`Cluster::log_tails`] to stderr (shown by the test runner on failure).
    pub fn dump_logs(&self, lines: usize) {
        eprintln!("{}", self.log_tails(lines));
    }

    /// SIGCONT, SIGKILL and reap every process (agents first, then the services they left).
    pub fn shutdown(&mut self) {
        for agent in &mut self.agents {
            if agent.process.is_stopped() {
                let _ = agent.process.cont();
            }
            let _ = agent.process.kill();
            // The services a SIGKILLed agent supervised (process runtime) keep running.
            crate::process::kill_leftover_services(&agent.data_dir);
        }
        if self.coordinator.is_stopped() {
            let _ = self.coordinator.cont();
        }
        let _ = self.coordinator.kill();
        for member in &mut self.standbys {
            if member.process.is_stopped() {
                let _ = member.process.cont();
            }
            let _ = member.process.kill();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(60);
        }
        self.shutdown();
        if std::env::var_os("HOTROLL_KEEP_TEMP").is_some()
            && let Some(dir) = self.dir.take()
        {
            let path = dir.keep();
            eprintln!("kept cluster dir {}", path.display());
        }
    }
}

/// Wait until `port` on 127.0.0.1 accepts connections; fails at once if `process` exits.
fn wait_port(process: &mut Process, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exit_status() {
            bail!(
                "{} exited: {status}; log:\n{}",
                process.name(),
                process.log_tail(20)
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            // A connection to someone else's listener would be followed by our exit.
            std::thread::sleep(Duration::from_millis(20));
            if let Some(status) = process.exit_status() {
                bail!("{} exited: {status}", process.name());
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not listen on {addr} after {timeout:?}",
                process.name()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `node-<i>`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Run a command to completion with captured output, killing it after `timeout`.
pub fn run_command(mut command: Command, timeout: Duration) -> anyhow::Result<CmdOutput> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("cannot start the command")?;
    let mut out = child.stdout.take().context("no stdout pipe")?;
    let mut err = child.stderr.take().context("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        bail!("timed out after {timeout:?}\nstdout: {stdout}\nstderr: {stderr}");
    };
    Ok(CmdOutput {
        code: status.code(),
        stdout,
        stderr,
    })
}
