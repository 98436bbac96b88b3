//! One scale-bench run: a fresh coordinator, N agents in worker processes, idle measurements,
//! then `rounds` rollouts of [`SCRIPT`], and the figures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hotroll_proto::v1 as pb;
use hotroll_proto::v1::control_client::ControlClient;
use serde::Serialize;

use super::Stats;
use super::marks::BarrierMarks;
use super::perf::Perf;
use super::procfs;
use super::worker::WorkerLine;
use crate::{Process, free_port};

/// The rollout: three barriers, two before the point of no return and one after it, and nothing
/// else, so what is measured is the coordination itself. Generous timeouts: on a 2-core machine
/// 10,000 agents take a while to get through a step, and a timeout would end the bench early.
pub const SCRIPT: &str = r#"app = "scale"
from = "1.0.0"
to = "2.0.0"

[rollout]
barrier_timeout = "600s"
step_timeout = "600s"

[script]
up = [
  { sync_nodes = "b1" },
  { sync_nodes = "b2" },
  "point_of_no_return",
  { sync_nodes = "b3" },
]
"#;

/// Step indexes of the barriers in [`SCRIPT`]'s `up`.
pub const BARRIER_STEPS: [u64; 3] = [0, 1, 3];

/// How one run is set up.
#[derive(Debug, Clone, Serialize)]
pub struct RunOptions {
    pub agents: usize,
    pub workers: usize,
    pub worker_threads: usize,
    pub blocking_threads: usize,
    /// Passed to `hotroll serve --heartbeat-interval` and to the agents' configs.
    pub heartbeat: Duration,
    pub rounds: usize,
    pub settle: Duration,
    pub idle: Duration,
    pub connect_timeout: Duration,
    pub rollout_timeout: Duration,
    /// Where the agents' data dirs go (journals are fsynced at every step).
    pub agent_data_root: PathBuf,
    /// Extra `hotroll serve` arguments.
    pub coordinator_args: Vec<String>,
    /// `Some(endpoints)`: the coordinator keeps its state in etcd there (`serve --store etcd`,
    /// a group of one), instead of its redb file.
    pub etcd_endpoints: Option<String>,
    /// `perf record` the coordinator during this phase (`connect`, `idle`, `rollout`), or the
    /// agents' workers during the rollouts (`agents-rollout`).
    pub perf: Option<String>,
    pub perf_dir: PathBuf,
}

/// One rollout's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RoundResult {
    pub rollout_id: String,
    pub state: String,
    /// The coordinator's own created -> finished time.
    pub rollout_ms: u64,
    /// From the bench's StartRollout call until it saw the final state (polls every 50 ms).
    pub wall_ms: u64,
    pub coordinator_cpu_s: f64,
    pub workers_cpu_s: f64,
    pub coordinator_rss_kib_after: u64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub options: RunOptions,
    pub loadavg_before: String,
    pub connect_s: f64,
    pub coordinator_rss_kib_before: u64,
    pub coordinator_rss_kib_idle: u64,
    pub kib_per_agent: f64,
    /// Coordinator CPU while idle, % of one core.
    pub idle_cpu_percent: f64,
    /// The worker processes (all agents) while idle, % of one core.
    pub idle_workers_cpu_percent: f64,
    pub rounds: Vec<RoundResult>,
    /// Per node and barrier: its release minus the barrier's last arrival, ms.
    pub release_per_node_ms: Stats,
    /// Per barrier: last release minus last arrival, ms.
    pub release_last_node_ms: Stats,
    /// The coordinator's part, per barrier: from the last arrival reaching its rollouts to the
    /// last release handed to a connection (its log's `fanout_us`), ms.
    pub coordinator_fanout_ms: Stats,
    /// The fan-out's first part: from the last arrival to its release durable (the driver's
    /// queue, the engine, the commit), ms.
    pub fanout_durable_ms: Stats,
    /// The store commit's own time within `fanout_durable_ms`, ms.
    pub fanout_commit_ms: Stats,
    /// From the last arrival to every release queued to its session, ms.
    pub fanout_queued_ms: Stats,
    /// The agents' part, per node and barrier (not the last step): from the release frame
    /// decoded to the next step started, ms.
    pub agent_release_to_next_step_ms: Stats,
    pub rollout_ms: Stats,
    pub worker_errors: Vec<String>,
}

/// A worker process; killed and reaped on drop.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<anyhow::Result<WorkerLine>>,
}

impl Worker {
    fn spawn(
        index: usize,
        first: usize,
        agents: usize,
        url: &str,
        options: &RunOptions,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the bench executable")?;
        let log = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(exe)
            .arg("worker")
            .args(["--index", &index.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--agents", &agents.to_string()])
            .args(["--coordinator", url])
            .arg("--data-root")
            .arg(&options.agent_data_root)
            .args(["--heartbeat-ms", &options.heartbeat.as_millis().to_string()])
            .args(["--threads", &options.worker_threads.to_string()])
            .args(["--blocking-threads", &options.blocking_threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start a worker process")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no worker stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let parsed = line.context("reading a worker's stdout").and_then(|l| {
                    serde_json::from_str(&l).with_context(|| format!("worker said `{l}`"))
                });
                if tx.send(parsed).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn next_line(&self, timeout: Duration) -> anyhow::Result<WorkerLine> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("worker {} said nothing for {timeout:?}", self.pid())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("worker {} exited", self.pid()),
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("worker already stopped")?;
        stdin.write_all(b"stop\n")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn connected(metrics: SocketAddr) -> anyhow::Result<usize> {
    let scrape = crate::metrics::scrape(metrics)?;
    Ok(scrape.value_or_zero("hotroll_connected_agents", &[]) as usize)
}

fn ms_between(from: Instant) -> u64 {
    u64::try_from(from.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Run the bench once with `options`; `dir` holds the coordinator's data and every log.
pub fn run(hotroll: &Path, dir: &Path, options: RunOptions) -> anyhow::Result<RunResult> {
    ensure!(options.agents >= 1, "at least one agent");
    let workers = options.workers.clamp(1, options.agents);
    let loadavg_before = loadavg();
    let port = free_port()?;
    let metrics_port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, metrics_port));
    let heartbeat = format!("{}ms", options.heartbeat.as_millis());
    let data_dir = dir.join("coordinator");
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--heartbeat-interval".into(),
        heartbeat,
        "--metrics-listen".into(),
        metrics_addr.to_string(),
        // The scale run's agents speak plaintext (their `Config::new` with an http:// URL);
        // TLS is on by default since the security work.
        "--insecure".into(),
    ];
    if let Some(endpoints) = &options.etcd_endpoints {
        args.extend([
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            endpoints.clone(),
            "--advertise".into(),
            url.clone(),
        ]);
    }
    args.extend(options.coordinator_args.iter().cloned());
    let mut coordinator = Process::new(
        "coordinator",
        hotroll,
        args,
        dir,
        dir.join("coordinator.log"),
    );
    coordinator.start()?;
    let pid = coordinator
        .pid()
        .context("the coordinator is not running")?;
    crate::poll(
        "the coordinator's metrics endpoint",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || Ok(connected(metrics_addr).ok()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = procfs::rss_kib(pid)?;

    // Connect.
    let perf_file = |phase: &str| {
        options
            .perf_dir
            .join(format!("perf-{}-{phase}.data", options.agents))
    };
    let perf = match options.perf.as_deref() {
        Some("connect") => Some(Perf::attach(pid, &perf_file("connect"))?),
        _ => None,
    };
    let started = Instant::now();
    let mut procs = Vec::new();
    let per = options.agents.div_ceil(workers);
    let mut first = 1;
    for w in 0..workers {
        let count = per.min(options.agents + 1 - first);
        if count == 0 {
            break;
        }
        procs.push(Worker::spawn(
            w,
            first,
            count,
            &url,
            &options,
            &dir.join(format!("worker-{w}.log")),
        )?);
        first += count;
    }
    for w in &procs {
        match w.next_line(Duration::from_secs(120))? {
            WorkerLine::Started { .. } => {}
            other => bail!("worker: expected started, got {other:?}"),
        }
    }
    let mut last = 0;
    let connect = crate::poll(
        "every agent connected",
        options.connect_timeout,
        Duration::from_millis(100),
        || {
            let now = connected(metrics_addr).unwrap_or(last);
            last = now;
            Ok((now >= options.agents).then(|| started.elapsed()))
        },
    )
    .with_context(|| format!("{last} of {} agents connected", options.agents))?;
    drop(perf);

    // Idle.
    std::thread::sleep(options.settle);
    let rss_idle = procfs::rss_kib(pid)?;
    let perf = match options.perf.as_deref() {
        Some("idle") => Some(Perf::attach(pid, &perf_file("idle"))?),
        _ => None,
    };
    let workers_cpu = |procs: &[Worker]| -> f64 {
        procs
            .iter()
            .map(|w| procfs::cpu_seconds(w.pid()).unwrap_or(0.0))
            .sum()
    };
    let cpu0 = procfs::cpu_seconds(pid)?;
    let wcpu0 = workers_cpu(&procs);
    let idle_started = Instant::now();
    std::thread::sleep(options.idle);
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let idle_cpu = (procfs::cpu_seconds(pid)? - cpu0) / idle_secs * 100.0;
    let idle_workers_cpu = (workers_cpu(&procs) - wcpu0) / idle_secs * 100.0;
    drop(perf);
    eprintln!(
        "  connected {} agents in {:.2} s; coordinator RSS {rss_before} -> {rss_idle} KiB \
         ({:.1} KiB/agent); idle CPU {idle_cpu:.2} % of a core (agents: {idle_workers_cpu:.1} %)",
        options.agents,
        connect.as_secs_f64(),
        (rss_idle as f64 - rss_before as f64) / options.agents as f64,
    );
    let still = connected(metrics_addr)?;
    ensure!(
        still == options.agents,
        "only {still} of {} agents still connected after the idle period",
        options.agents
    );

    // Rollouts.
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client = tokio.block_on(async {
        ControlClient::connect(url.clone())
            .await
            .map(|c| c.max_decoding_message_size(256 << 20))
    })?;
    let perf = match options.perf.as_deref() {
        Some("rollout") => Some(Perf::attach(pid, &perf_file("rollout"))?),
        Some("agents-rollout") => {
            let pids: Vec<u32> = procs.iter().map(Worker::pid).collect();
            Some(Perf::attach_all(&pids, &perf_file("agents-rollout"))?)
        }
        _ => None,
    };
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        let cpu0 = procfs::cpu_seconds(pid)?;
        let wcpu0 = workers_cpu(&procs);
        let t0 = Instant::now();
        let response = tokio
            .block_on(client.start_rollout(pb::StartRolloutRequest {
                script_name: format!("scale-{round}.toml"),
                script_source: SCRIPT.to_string(),
                select: Default::default(),
                artifacts: Vec::new(),
                skip_unreachable: false,
                dry_run: false,
            }))
            .context("StartRollout")?
            .into_inner();
        ensure!(
            response.nodes.len() == options.agents,
            "the rollout targets {} nodes, not {}",
            response.nodes.len(),
            options.agents
        );
        let id = response.rollout_id;
        let deadline = Instant::now() + options.rollout_timeout;
        let summary = loop {
            let list = tokio
                .block_on(client.list_rollouts(pb::ListRolloutsRequest { limit: 1 }))
                .context("ListRollouts")?
                .into_inner();
            if let Some(summary) = list.rollouts.into_iter().find(|r| r.id == id)
                && summary.finished_unix_ms != 0
            {
                break summary;
            }
            ensure!(
                Instant::now() < deadline,
                "rollout {id} did not finish within {:?}",
                options.rollout_timeout
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let wall_ms = ms_between(t0);
        let state = pb::RolloutState::try_from(summary.state)
            .map(|s| s.as_str_name().to_string())
            .unwrap_or_else(|_| summary.state.to_string());
        let result = RoundResult {
            rollout_id: id.clone(),
            state: state.clone(),
            rollout_ms: summary
                .finished_unix_ms
                .saturating_sub(summary.created_unix_ms),
            wall_ms,
            coordinator_cpu_s: procfs::cpu_seconds(pid)? - cpu0,
            workers_cpu_s: workers_cpu(&procs) - wcpu0,
            coordinator_rss_kib_after: procfs::rss_kib(pid)?,
        };
        eprintln!(
            "  round {}: {state} in {} ms (coordinator CPU {:.2} s, agents CPU {:.2} s)",
            round + 1,
            result.rollout_ms,
            result.coordinator_cpu_s,
            result.workers_cpu_s
        );
        rounds.push(result);
        ensure!(
            state == "ROLLOUT_STATE_SUCCEEDED",
            "rollout {id} ended {state}; see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(perf);

    // Stop the agents and collect their marks.
    for w in &mut procs {
        w.stop()?;
    }
    let mut marks: BTreeMap<(String, u64), BarrierMarks> = BTreeMap::new();
    let mut worker_errors = Vec::new();
    for w in &procs {
        loop {
            match w.next_line(Duration::from_secs(120))? {
                WorkerLine::Report {
                    marks: reported,
                    failed_agents,
                    errors,
                    ..
                } => {
                    for (rollout, step, m) in reported {
                        marks.entry((rollout, step)).or_default().merge(m);
                    }
                    if failed_agents > 0 {
                        worker_errors.push(format!("{failed_agents} agents failed: {errors:?}"));
                    } else {
                        worker_errors.extend(errors);
                    }
                    break;
                }
                WorkerLine::Started { .. } => {}
            }
        }
    }
    drop(procs);
    let _ = coordinator.terminate(Duration::from_secs(30));

    let (per_node, last_node) = barrier_latencies(&rounds, &marks, options.agents)?;
    let log = dir.join("coordinator.log");
    let coordinator_fanout_ms = fanouts(&log, &rounds, "fanout_us")?;
    let fanout_durable_ms = fanouts(&log, &rounds, "durable_us")?;
    let fanout_commit_ms = fanouts(&log, &rounds, "commit_us")?;
    let fanout_queued_ms = fanouts(&log, &rounds, "queued_us")?;
    let agent_release_to_next_step_ms = Stats::of(
        marks
            .values()
            .flat_map(|m| m.agent_ns.iter().map(|&ns| ns as f64 / 1e6))
            .collect(),
    );
    let rollout_ms = Stats::of(rounds.iter().map(|r| r.rollout_ms as f64).collect());
    Ok(RunResult {
        loadavg_before,
        connect_s: connect.as_secs_f64(),
        coordinator_rss_kib_before: rss_before,
        coordinator_rss_kib_idle: rss_idle,
        kib_per_agent: (rss_idle as f64 - rss_before as f64) / options.agents as f64,
        idle_cpu_percent: idle_cpu,
        idle_workers_cpu_percent: idle_workers_cpu,
        rounds,
        release_per_node_ms: per_node,
        release_last_node_ms: last_node,
        coordinator_fanout_ms,
        fanout_durable_ms,
        fanout_commit_ms,
        fanout_queued_ms,
        agent_release_to_next_step_ms,
        rollout_ms,
        worker_errors,
        options,
    })
}

/// One of the coordinator's fan-out times (`field`, in µs) of the rounds' barriers, off its log
/// lines `barrier release handed to every node's connection ... fanout_us=N` (see
/// `hotroll_rollouts::outbound::FanoutProbe`).
fn fanouts(log: &Path, rounds: &[RoundResult], field_name: &str) -> anyhow::Result<Stats> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let ids: std::collections::HashSet<&str> =
        rounds.iter().map(|r| r.rollout_id.as_str()).collect();
    let mut samples = Vec::new();
    for line in text.lines() {
        if !line.contains("barrier release handed to every node") {
            continue;
        }
        let line = strip_ansi(line);
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_string())
        };
        let (Some(rollout), Some(us)) = (field("rollout"), field(field_name)) else {
            continue;
        };
        if ids.contains(rollout.as_str())
            && let Ok(us) = us.parse::<u64>()
        {
            samples.push(us as f64 / 1e3);
        }
    }
    ensure!(
        !samples.is_empty() || rounds.is_empty(),
        "no fan-out lines in {}: did the coordinator's message change (see \
         hotroll_rollouts::outbound::FanoutProbe)?",
        log.display()
    );
    Ok(Stats::of(samples))
}

/// `line` without terminal colour escapes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Per-node and per-barrier release latency over every round's barriers.
fn barrier_latencies(
    rounds: &[RoundResult],
    marks: &BTreeMap<(String, u64), BarrierMarks>,
    agents: usize,
) -> anyhow::Result<(Stats, Stats)> {
    let mut per_node = Vec::new();
    let mut last_node = Vec::new();
    for round in rounds {
        for step in BARRIER_STEPS {
            let m = marks
                .get(&(round.rollout_id.clone(), step))
                .with_context(|| {
                    format!(
                        "no barrier marks for rollout {} step {step}: did the agent's log \
                         messages change (see scale::marks)?",
                        round.rollout_id
                    )
                })?;
            ensure!(
                m.arrivals.len() == agents && m.releases.len() == agents && m.failed == 0,
                "rollout {} step {step}: {} arrivals, {} releases, {} failures for {agents} agents",
                round.rollout_id,
                m.arrivals.len(),
                m.releases.len(),
                m.failed
            );
            let last_arrival = m.arrivals.iter().copied().max().unwrap_or_default();
            let first_release = m.releases.iter().copied().min().unwrap_or_default();
            ensure!(
                first_release >= last_arrival,
                "rollout {} step {step}: a node was released before the last one arrived",
                round.rollout_id
            );
            for &r in &m.releases {
                per_node.push((r - last_arrival) as f64 / 1e6);
            }
            let last_release = m.releases.iter().copied().max().unwrap_or_default();
            last_node.push((last_release - last_arrival) as f64 / 1e6);
        }
    }
    Ok((Stats::of(per_node), Stats::of(last_node)))
}
