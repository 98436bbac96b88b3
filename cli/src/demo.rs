//! `hotroll demo`: a whole local fleet in one process — a coordinator and N agents on 127.0.0.1
//! in a temp dir, each supervising the demo service `primes` (a prime miner that keeps every
//! prime it found in memory) — and the story hotroll is for:
//!
//! 1. install primes 1.0.0 everywhere (a first-install rollout) and let it mine;
//! 2. under load (clients on every node), the hot upgrade 1.0.0 → 2.0.0: staging, a barrier,
//!    the point of no return, suspend / load / code_change / resume — the state handover of
//!    `docs/handover.md` — health and a final barrier, canary first, watched live; then a
//!    summary: versions, primes before and after (none lost), requests sent and failed during
//!    the upgrade, latency, the suspend window of every node;
//! 3. 2.0.0 → 3.0.0, whose code_change fails: the canary node hands its state to 3.0.0, which
//!    refuses it; the node is rolled back with its old instance still serving every prime,
//!    and the policy (no failure allowed) stops the rollout before the other nodes change.
//!
//! It exits 0 when everything behaved as described (1 otherwise, saying what did not).
//!
//! The fleet is `hotroll_local`'s: the real agent library talking real gRPC to the real
//! coordinator; only those processes are folded into one. The `primes`
//! instances are real processes, found or built by [`primes_bin`].
//!
//! The fleet uses TLS like any other: the embedded coordinator makes its CA and server
//! certificate in the temp dir, each agent joins with a single-use join token (and gets its node
//! certificate), and the demo's own client uses an operator token. Everything stays on
//! 127.0.0.1.

mod load;
mod primes_bin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hotroll_proto::v1 as pb;

use super::client::{Client, CoordinatorArgs, connect, status_error, upload_artifacts};
use super::states::{node_state_name, rollout_state_name};
use super::watch::{FollowEnd, FollowMsg, GrpcSource, Until, spawn_follow};
use super::{Output, exit, watch};
use hotroll_local::{Fleet, NodeSlot};
use load::{Load, Tally, all_primes, stats};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes (agents, each supervising one `primes`) in the local fleet.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub nodes: u32,
    /// Keep the fleet's temp dir (stores, journals, releases, service logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// Clients per node while the upgrades run.
const CLIENTS_PER_NODE: usize = 2;
/// How long the fleet mines before the upgrade, and how long the load runs before it.
const MINE_FOR: Duration = Duration::from_secs(3);
const STEADY_FOR: Duration = Duration::from_secs(2);
/// How long the load goes on after an upgrade.
const AFTER_FOR: Duration = Duration::from_secs(1);
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// The first install: nothing runs yet, so nothing to hand over.
fn install_script(primes: &Path) -> String {
    format!(
        r#"# hotroll demo: install primes 1.0.0 on every node.
app = "primes"
from = "none"
to = "1.0.0"
description = "install primes 1.0.0"

[[artifacts]]
name = "bin/primes"
source = "{primes}"
mode = "0755"

[[artifacts]]
name = "VERSION"
source = "build/1.0.0/VERSION"

[rollout]
select = {{ role = "miner" }}
max_in_flight = 0
on_failure = "rollback_node"
barrier_timeout = "30s"
step_timeout = "30s"

[script]
up = [
  {{ load_object_code = ["bin/primes", "VERSION"] }},
  "point_of_no_return",
  {{ load = "primes" }},
  {{ health = {{ service = "primes", timeout = "20s" }} }},
]
"#,
        primes = primes.display()
    )
}

/// The hot upgrade (the same shape as `deploy/examples/hot-upgrade.toml`).
fn upgrade_script(primes: &Path, from: &str, to: &str, description: &str, policy: &str) -> String {
    format!(
        r#"# hotroll demo: {description}
app = "primes"
from = "{from}"
to = "{to}"
description = "{description}"

[[artifacts]]
name = "bin/primes"
source = "{primes}"
mode = "0755"

[[artifacts]]
name = "VERSION"
source = "build/{to}/VERSION"

[rollout]
select = {{ role = "miner" }}
canary = 1
max_in_flight = 2
{policy}
barrier_timeout = "30s"
step_timeout = "30s"

[script]
up = [
  {{ load_object_code = ["bin/primes", "VERSION"] }},
  {{ check = "disk_space" }},
  {{ sync_nodes = "staged" }},
  "point_of_no_return",
  {{ suspend = ["primes"] }},
  {{ load = "primes" }},
  {{ code_change = {{ service = "primes", extra = "{to}", timeout = "15s" }} }},
  {{ resume = ["primes"] }},
  {{ health = {{ service = "primes", timeout = "10s" }} }},
  {{ sync_nodes = {{ id = "upgraded", timeout = "30s" }} }},
]
"#,
        primes = primes.display()
    )
}

/// One node's agent: `primes` as a handover service on its own port.
fn agent_toml(node: &NodeSlot, port: u16) -> String {
    format!(
        r#"node = "{name}"
coordinator = "{url}"
data_dir = "{data_dir}"
labels = {{ role = "miner", zone = "{zone}" }}

[hooks]
disk_space = {{ command = ["sh", "-c", "test -w ."], timeout = "5s" }}

[[services]]
name = "primes"
app = "primes"
command = ["bin/primes"]
listen = ["tcp://127.0.0.1:{port}"]
ready = "notify"
handover = true
stop_signal = "SIGTERM"
stop_timeout = "5s"
"#,
        name = node.name,
        url = node.coordinator_url,
        data_dir = node.data_dir.display(),
        zone = if (node.index + 1).is_multiple_of(2) {
            "b"
        } else {
            "a"
        },
    )
}

/// A free port on 127.0.0.1 (bound and released; the agent binds it again right away).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

pub async fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let text = args.output == Output::Text;
    let say = |line: &str| {
        if text {
            println!("{line}");
        }
    };
    let primes = primes_bin::locate(say)?;
    let dir = tempfile::Builder::new()
        .prefix("hotroll-demo-")
        .tempdir()
        .context("cannot create a temp dir for the demo fleet")?;
    let root: PathBuf = dir.path().to_path_buf();

    let ports = (0..args.nodes)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let toml_ports = ports.clone();
    // TLS like any fleet: a CA, a join token per agent, an operator token for the client.
    let fleet = Fleet::builder()
        .agents(ports.len())
        .root(&root)
        .server_config(|config| config.heartbeat_interval = Duration::from_millis(500))
        .agent_toml(move |node| agent_toml(node, toml_ports[node.index]))
        .build()
        .await?;
    let url = fleet.url().to_string();
    say(&format!(
        "hotroll demo: a local fleet of {} node(s), each supervising `primes`, a prime miner that \
         keeps every prime it finds in memory\n  coordinator {url} (TLS, 127.0.0.1 only), \
         files in {}\n  primes: {}",
        args.nodes,
        root.display(),
        primes.display()
    ));

    let mut access = CoordinatorArgs::new(&url);
    access.token = fleet.operator_token().map(str::to_string);
    access.ca = Some(fleet.ca_path()?);
    let story = Story {
        access,
        root: root.clone(),
        primes,
        ports,
        output: args.output,
    };
    let result = tokio::select! {
        result = story.run() => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping the fleet");
            Ok(super::watch::INTERRUPTED)
        }
    };

    // The agents stop the services they supervise when they shut down.
    if let Err(e) = fleet.shutdown().await {
        tracing::warn!(error = %e, "the demo fleet did not stop cleanly");
    }
    if args.keep {
        let kept = dir.keep();
        say(&format!("kept the fleet's files in {}", kept.display()));
    }
    result
}

struct Story {
    /// How the story's client reaches the coordinator (TLS, operator token).
    access: CoordinatorArgs,
    root: PathBuf,
    primes: PathBuf,
    ports: Vec<u16>,
    output: Output,
}

/// One node as the clients see it.
#[derive(Debug, Clone, Default)]
struct Seen {
    version: String,
    code: u64,
    pid: u64,
    count: u64,
    primes: Vec<u64>,
}

async fn seen(port: u16) -> anyhow::Result<Seen> {
    let stats = stats(port).await?;
    let primes = all_primes(port).await?;
    Ok(Seen {
        version: stats["version"].as_str().unwrap_or_default().to_string(),
        code: stats["code"].as_u64().unwrap_or_default(),
        pid: stats["pid"].as_u64().unwrap_or_default(),
        count: primes.len() as u64,
        primes,
    })
}

/// Whether every prime of `before` is still in `after`, in place (the miner only appends).
fn kept(before: &[u64], after: &[u64]) -> bool {
    after.len() >= before.len() && before.iter().zip(after).all(|(a, b)| a == b)
}

/// One rollout under load, as the summary needs it.
struct Phase {
    status: pb::RolloutStatus,
    before: Vec<Seen>,
    after: Vec<Seen>,
    steady: Vec<Tally>,
    during: Vec<Tally>,
    /// Agent-measured suspend → resume, per node name (ms).
    windows: BTreeMap<String, u64>,
}

impl Story {
    fn text(&self) -> bool {
        self.output == Output::Text
    }

    fn say(&self, line: &str) {
        if self.text() {
            println!("{line}");
        }
    }

    fn node(i: usize) -> String {
        format!("node-{}", i + 1)
    }

    async fn run(&self) -> anyhow::Result<u8> {
        let mut client = connect(&self.access).await?;
        self.wait_connected(&mut client).await?;
        for version in ["1.0.0", "2.0.0", "3.0.0"] {
            let dir = self.root.join("build").join(version);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("VERSION"), format!("{version}\n"))?;
        }

        // 1. Install 1.0.0 and let it mine.
        let install = self
            .rollout(
                &mut client,
                "install-1.0.0.toml",
                &install_script(&self.primes),
                false,
            )
            .await?;
        anyhow::ensure!(
            install.state == pb::RolloutState::Succeeded as i32,
            "installing primes 1.0.0 did not succeed: {} {}",
            rollout_state_name(install.state),
            install.error
        );
        for &port in &self.ports {
            wait_code(port, 1).await?;
        }
        self.say(&format!(
            "installed primes 1.0.0 on {} node(s); letting them mine for {}s",
            self.ports.len(),
            MINE_FOR.as_secs()
        ));
        tokio::time::sleep(MINE_FOR).await;
        if self.text() {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header([
                "NODE", "VERSION", "PID", "PRIMES", "LARGEST", "STRATEGY", "PRIMES/S",
            ]);
            for (i, &port) in self.ports.iter().enumerate() {
                let s = stats(port).await?;
                table.add_row([
                    Self::node(i),
                    s["version"].as_str().unwrap_or("?").to_string(),
                    s["pid"].to_string(),
                    s["count"].to_string(),
                    s["largest"].to_string(),
                    s["strategy"].as_str().unwrap_or("?").to_string(),
                    s["primes_per_second"].to_string(),
                ]);
            }
            println!("{table}");
        }

        // 2. v1 -> v2 under load.
        let load = Load::start(&self.ports, CLIENTS_PER_NODE);
        self.say(&format!(
            "\nload: {CLIENTS_PER_NODE} clients per node, each `GET /stats` on a new connection, \
             from now until the end"
        ));
        tokio::time::sleep(STEADY_FOR).await;
        let upgrade = upgrade_script(
            &self.primes,
            "1.0.0",
            "2.0.0",
            "primes 2.0.0: a segmented sieve, twin primes, state format 2",
            "max_failures = 0\non_failure = \"rollback_all\"",
        );
        self.say(
            "\n== hot upgrade 1.0.0 -> 2.0.0: stage, barrier `staged`, point of no return, then \
             per wave (node-1 first) suspend / load / code_change (state handover) / resume, \
             health, barrier `upgraded`",
        );
        let steady_from = load.now();
        let first = self
            .phase(
                &mut client,
                &load,
                steady_from,
                "upgrade-2.0.0.toml",
                &upgrade,
            )
            .await?;
        let mut failures = Vec::new();
        self.check_upgrade(&first, &mut failures);
        self.print_upgrade(&first);

        // 3. v2 -> v3, whose code_change fails.
        let broken = upgrade_script(
            &self.primes,
            "2.0.0",
            "3.0.0",
            "primes 3.0.0: its code_change fails",
            "max_failures = 0\non_failure = \"rollback_node\"",
        );
        self.say(
            "\n== 2.0.0 -> 3.0.0, whose code_change refuses the state: the canary must roll back \
             with its state, and the policy (max_failures = 0) must stop the rest",
        );
        let steady_from = load.now();
        let second = self
            .phase(
                &mut client,
                &load,
                steady_from,
                "upgrade-3.0.0.toml",
                &broken,
            )
            .await?;
        self.check_failed_upgrade(&second, &mut failures);
        self.print_failed_upgrade(&second);

        let errors = load.errors();
        load.stop().await;
        if !errors.is_empty() {
            failures.push(format!("client errors: {}", errors.join("; ")));
        }
        if self.output == Output::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self.json(&first, &second, &failures))?
            );
        }
        if failures.is_empty() {
            self.say(
                "\neverything behaved as described: no request failed, no prime was lost, the \
                 failed upgrade was rolled back with its state",
            );
            Ok(exit::OK)
        } else {
            eprintln!("\nthe demo did not go as described:");
            for failure in &failures {
                eprintln!("  - {failure}");
            }
            Ok(exit::ERROR)
        }
    }

    async fn wait_connected(&self, client: &mut Client) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listed = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .nodes;
            let connected = listed.iter().filter(|n| n.connected).count();
            if connected == self.ports.len() {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "only {connected} of {} agents connected within 20s",
                self.ports.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start a rollout of `source` (written to `<root>/<name>`); watch it live when `watch`,
    /// else wait quietly. Returns its final status.
    async fn rollout(
        &self,
        client: &mut Client,
        name: &str,
        source: &str,
        live: bool,
    ) -> anyhow::Result<pb::RolloutStatus> {
        std::fs::write(self.root.join(name), source)?;
        let parsed = hotroll_script::parse(name, source)
            .map_err(|d| anyhow::anyhow!("the demo's script {name} is invalid:\n{d}"))?;
        let artifacts = upload_artifacts(client, &parsed.script, &self.root).await?;
        let started = client
            .start_rollout(pb::StartRolloutRequest {
                script_name: name.to_string(),
                script_source: source.to_string(),
                select: Default::default(),
                artifacts,
                skip_unreachable: false,
                dry_run: false,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if live {
            self.say(&format!(
                "rollout {} on {}",
                started.rollout_id,
                started.nodes.join(", ")
            ));
            // The same view as `hotroll rollout watch`: live on a terminal, one line per event
            // in a pipe, JSON events with --output json.
            let mode = watch::Mode::detect(self.output);
            watch::watch(
                client,
                None,
                &started.rollout_id,
                mode,
                0,
                Some(ROLLOUT_TIMEOUT),
            )
            .await?;
        }
        let status = watch::wait_final(client, &started.rollout_id, ROLLOUT_TIMEOUT).await?;
        Ok(self.settled(client, status).await)
    }

    /// The status once every node reports a settled state (the last reports may trail the
    /// rollout's final state a little).
    async fn settled(&self, client: &mut Client, status: pb::RolloutStatus) -> pb::RolloutStatus {
        let settled = |s: &pb::RolloutStatus| {
            s.nodes.iter().all(|n| {
                matches!(
                    pb::NodeState::try_from(n.state),
                    Ok(pb::NodeState::Committed
                        | pb::NodeState::RolledBack
                        | pb::NodeState::Aborted
                        | pb::NodeState::Failed)
                )
            })
        };
        let mut status = status;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !settled(&status) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(s) = client
                .get_rollout(pb::GetRolloutRequest {
                    rollout_id: status.id.clone(),
                })
                .await
            {
                status = s.into_inner();
            }
        }
        status
    }

    /// One rollout under the running load: the nodes before and after, the request tallies of
    /// the steady state before it and of the rollout itself, the suspend windows.
    async fn phase(
        &self,
        client: &mut Client,
        load: &Load,
        steady_from: Duration,
        name: &str,
        source: &str,
    ) -> anyhow::Result<Phase> {
        let mut before = Vec::new();
        for &port in &self.ports {
            before.push(seen(port).await?);
        }
        let from = load.now();
        let status = self.rollout(client, name, source, true).await?;
        let to = load.now();
        tokio::time::sleep(AFTER_FOR).await;
        let mut after = Vec::new();
        for &port in &self.ports {
            after.push(seen(port).await?);
        }
        let steady = (0..self.ports.len())
            .map(|i| Tally::of(&load.window(i, steady_from, from)))
            .collect();
        let during = (0..self.ports.len())
            .map(|i| Tally::of(&load.window(i, from, to)))
            .collect();
        let windows = suspend_windows(client, &status.id).await;
        Ok(Phase {
            status,
            before,
            after,
            steady,
            during,
            windows,
        })
    }

    fn node_state(phase: &Phase, i: usize) -> &'static str {
        let name = Self::node(i);
        phase
            .status
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map_or("unknown", |n| node_state_name(n.state))
    }

    fn check_upgrade(&self, phase: &Phase, failures: &mut Vec<String>) {
        if phase.status.state != pb::RolloutState::Succeeded as i32 {
            failures.push(format!(
                "the upgrade to 2.0.0 ended {}, not succeeded: {}",
                rollout_state_name(phase.status.state),
                phase.status.error
            ));
        }
        for (i, (before, after)) in phase.before.iter().zip(&phase.after).enumerate() {
            let node = Self::node(i);
            if after.code != 2 {
                failures.push(format!("{node} serves {} after the upgrade", after.version));
            }
            if !kept(&before.primes, &after.primes) {
                failures.push(format!(
                    "{node} lost primes: {} before, {} after",
                    before.count, after.count
                ));
            }
            let during = phase.during[i];
            if during.failed > 0 || phase.steady[i].failed > 0 {
                failures.push(format!(
                    "{node}: {} of {} requests failed during the upgrade",
                    during.failed, during.sent
                ));
            }
        }
    }

    fn check_failed_upgrade(&self, phase: &Phase, failures: &mut Vec<String>) {
        if phase.status.state == pb::RolloutState::Succeeded as i32 {
            failures.push("the upgrade to 3.0.0 succeeded, but its code_change fails".into());
        }
        for (i, (before, after)) in phase.before.iter().zip(&phase.after).enumerate() {
            let node = Self::node(i);
            let state = Self::node_state(phase, i);
            if i == 0 && state != "rolled_back" {
                failures.push(format!(
                    "{node} (the canary) ended {state}, not rolled_back"
                ));
            }
            if i > 0 && state == "committed" {
                failures.push(format!("{node} committed to 3.0.0"));
            }
            if after.code != 2 || after.pid != before.pid {
                failures.push(format!(
                    "{node}: the 2.0.0 instance (pid {}) does not serve any more (now {} pid {})",
                    before.pid, after.version, after.pid
                ));
            }
            if !kept(&before.primes, &after.primes) {
                failures.push(format!(
                    "{node} lost primes: {} before, {} after",
                    before.count, after.count
                ));
            }
            if phase.during[i].failed > 0 {
                failures.push(format!(
                    "{node}: {} of {} requests failed during the failed upgrade",
                    phase.during[i].failed, phase.during[i].sent
                ));
            }
        }
    }

    fn print_upgrade(&self, phase: &Phase) {
        if !self.text() {
            return;
        }
        println!(
            "\nrollout {}: {}",
            phase.status.id,
            rollout_state_name(phase.status.state)
        );
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header([
            "NODE",
            "VERSION before -> after",
            "PRIMES before -> after",
            "LOST",
            "REQUESTS during / failed",
            "ANSWERED BY v1 / v2",
            "LATENCY steady p50/p99",
            "LATENCY during p50/p99/max",
            "SUSPEND WINDOW",
        ]);
        for (i, (before, after)) in phase.before.iter().zip(&phase.after).enumerate() {
            let node = Self::node(i);
            let (steady, during) = (phase.steady[i], phase.during[i]);
            table.add_row([
                node.clone(),
                format!("{} -> {}", before.version, after.version),
                format!("{} -> {}", before.count, after.count),
                if kept(&before.primes, &after.primes) {
                    "none".to_string()
                } else {
                    "SOME".to_string()
                },
                format!("{} / {}", during.sent, during.failed),
                format!("{} / {}", during.by_code[1], during.by_code[2]),
                format!("{:.1} / {:.1} ms", steady.p50_ms, steady.p99_ms),
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    during.p50_ms, during.p99_ms, during.max_ms
                ),
                phase
                    .windows
                    .get(&node)
                    .map_or("-".to_string(), |ms| format!("{ms} ms")),
            ]);
        }
        println!("{table}");
        let total: usize = phase.during.iter().map(|t| t.sent).sum();
        let failed: usize = phase.during.iter().map(|t| t.failed).sum();
        println!(
            "{total} requests during the upgrade, {failed} failed. The suspend window is suspend \
             -> resume as the agents measured it; connections that arrived meanwhile waited in \
             the listen queue the agent holds (the max latency), none was refused."
        );
        if let Some(after) = phase.after.first() {
            println!(
                "primes 2.0.0 ({}) took over each node's primes in state format 1 and converted \
                 them to format 2 in its code_change; it now also counts twin primes.",
                after.version
            );
        }
    }

    fn print_failed_upgrade(&self, phase: &Phase) {
        if !self.text() {
            return;
        }
        println!(
            "\nrollout {}: {}{}",
            phase.status.id,
            rollout_state_name(phase.status.state),
            if phase.status.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", phase.status.error)
            }
        );
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header([
            "NODE",
            "NODE STATE",
            "SERVES",
            "PID before -> after",
            "PRIMES before -> after",
            "LOST",
            "REQUESTS during / failed",
        ]);
        for (i, (before, after)) in phase.before.iter().zip(&phase.after).enumerate() {
            let during = phase.during[i];
            table.add_row([
                Self::node(i),
                Self::node_state(phase, i).to_string(),
                after.version.clone(),
                format!("{} -> {}", before.pid, after.pid),
                format!("{} -> {}", before.count, after.count),
                if kept(&before.primes, &after.primes) {
                    "none".to_string()
                } else {
                    "SOME".to_string()
                },
                format!("{} / {}", during.sent, during.failed),
            ]);
        }
        println!("{table}");
        if let Some(error) = phase
            .status
            .nodes
            .iter()
            .find(|n| n.name == Self::node(0))
            .map(|n| n.error.clone())
            .filter(|e| !e.is_empty())
        {
            println!("node-1: {error}");
        }
        println!(
            "node-1 was rolled back: its 2.0.0 instance kept serving with its state (same pid) \
             while 3.0.0 refused the handover; the others never went past the point of no \
             return, so nothing changed on them."
        );
    }

    fn json(&self, first: &Phase, second: &Phase, failures: &[String]) -> serde_json::Value {
        let phase = |p: &Phase| {
            let nodes: Vec<serde_json::Value> = p
                .before
                .iter()
                .zip(&p.after)
                .enumerate()
                .map(|(i, (b, a))| {
                    serde_json::json!({
                        "node": Self::node(i),
                        "state": Self::node_state(p, i),
                        "version_before": b.version,
                        "version_after": a.version,
                        "pid_before": b.pid,
                        "pid_after": a.pid,
                        "primes_before": b.count,
                        "primes_after": a.count,
                        "primes_lost": !kept(&b.primes, &a.primes),
                        "requests_during": p.during[i].sent,
                        "failed_during": p.during[i].failed,
                        "steady_p50_ms": p.steady[i].p50_ms,
                        "steady_p99_ms": p.steady[i].p99_ms,
                        "during_p50_ms": p.during[i].p50_ms,
                        "during_p99_ms": p.during[i].p99_ms,
                        "during_max_ms": p.during[i].max_ms,
                        "suspend_window_ms": p.windows.get(&Self::node(i)),
                    })
                })
                .collect();
            serde_json::json!({
                "rollout": p.status.id,
                "state": rollout_state_name(p.status.state),
                "nodes": nodes,
            })
        };
        serde_json::json!({
            "upgrade": phase(first),
            "failed_upgrade": phase(second),
            "ok": failures.is_empty(),
            "failures": failures,
        })
    }
}

/// Wait until the service on `port` serves code `code`.
async fn wait_code(port: u16, code: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = stats(port).await
            && s["code"].as_u64() == Some(code)
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "primes on port {port} does not serve v{code}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Per node: the agent-measured durations of suspend, load, code_change and resume, added up
/// (suspend's start to resume's end; the gaps between steps are negligible).
async fn suspend_windows(client: &mut Client, id: &str) -> BTreeMap<String, u64> {
    let mut rx = spawn_follow(GrpcSource::new(client.clone(), id), 0, Until::Now);
    let mut windows = BTreeMap::new();
    let collect = async {
        while let Some(msg) = rx.recv().await {
            match msg {
                FollowMsg::Event(event) => {
                    let window_step = ["suspend", "load", "code_change", "resume"]
                        .contains(&event.instruction.as_str());
                    if event.kind == "step"
                        && event.step_phase == pb::StepPhase::Succeeded as i32
                        && window_step
                    {
                        *windows.entry(event.node.clone()).or_insert(0) += event.duration_ms;
                    }
                }
                FollowMsg::Notice(_) => {}
                FollowMsg::End(
                    FollowEnd::Final(_) | FollowEnd::CaughtUp | FollowEnd::Failed(_),
                ) => {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), collect).await;
    windows
}
