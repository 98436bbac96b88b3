//! One worker process of the scale bench: M agents in this process, each the real
//! `hotroll_agent::Agent` (session, executor, journal) with the hooks-only runtime, which
//! does nothing for `sync_nodes`, `point_of_no_return` and make-permanent.
//!
//! Protocol with the bench (one JSON object per stdout line): `{"event":"started",...}` once
//! every agent task is spawned; then, after a `stop` line (or EOF) on stdin, the agents say
//! Goodbye and stop, and a `{"event":"report",...}` line carries their barrier marks.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hotroll_agent::{Agent, Config, HooksOnlyRuntime, Runtime, tcp_dialer};
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use super::marks::{BarrierMarks, MarkLayer};

/// How long agents get to say Goodbye and stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The hidden `worker` subcommand of the benches that run a scale fleet: the flags the fleet's
/// runner passes to each worker process.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    index: usize,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    agents: usize,
    #[arg(long)]
    coordinator: String,
    #[arg(long)]
    data_root: PathBuf,
    #[arg(long)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 8)]
    blocking_threads: usize,
}

impl From<WorkerArgs> for WorkerOptions {
    fn from(args: WorkerArgs) -> Self {
        Self {
            index: args.index,
            first: args.first,
            agents: args.agents,
            coordinator: args.coordinator,
            data_root: args.data_root,
            heartbeat: Duration::from_millis(args.heartbeat_ms),
            threads: args.threads,
            blocking_threads: args.blocking_threads,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub index: usize,
    /// Number (1-based) of this worker's first node; nodes are `node-<n>`.
    pub first: usize,
    pub agents: usize,
    /// `http://127.0.0.1:PORT`.
    pub coordinator: String,
    /// Each agent's data dir is `<data_root>/<node>`.
    pub data_root: PathBuf,
    /// The agents' configured heartbeat interval (also their HTTP/2 keepalive interval); the
    /// coordinator's Welcome sets the session heartbeat.
    pub heartbeat: Duration,
    /// Tokio worker threads.
    pub threads: usize,
    /// Tokio blocking threads (journal writes).
    pub blocking_threads: usize,
}

/// One line of a worker's stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerLine {
    Started {
        worker: usize,
        agents: usize,
    },
    Report {
        worker: usize,
        agents: usize,
        /// (rollout id, step of the barrier in `up`, marks).
        marks: Vec<(String, u64, BarrierMarks)>,
        /// Agents that returned an error, and the first few errors.
        failed_agents: usize,
        errors: Vec<String>,
        stop_ms: u64,
    },
}

/// Node name of agent `n` (1-based), zero-padded so names sort in number order.
pub fn node_name(n: usize) -> String {
    format!("node-{n:05}")
}

fn say(line: &WorkerLine) -> anyhow::Result<()> {
    let text = serde_json::to_string(line)?;
    println!("{text}");
    Ok(())
}

/// Run the worker until told to stop (see the module docs).
pub fn run(options: WorkerOptions) -> anyhow::Result<()> {
    super::raise_fd_limit()?;
    let marks = MarkLayer::new();
    tracing_subscriber::registry()
        .with(marks.clone().with_filter(filter_fn(MarkLayer::wants)))
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(LevelFilter::WARN),
        )
        .try_init()
        .context("cannot install the tracing subscriber")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads.max(1))
        .max_blocking_threads(options.blocking_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(agents(options, marks))
}

async fn agents(options: WorkerOptions, marks: MarkLayer) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent_runtime: Arc<dyn Runtime> = Arc::new(HooksOnlyRuntime);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..options.agents {
        let node = node_name(options.first + k);
        let mut config = Config::new(
            node.clone(),
            options.coordinator.clone(),
            options.data_root.join(&node),
        );
        config.heartbeat_interval = options.heartbeat;
        let mut stop = stop_rx.clone();
        let agent_runtime = agent_runtime.clone();
        tasks.spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            Agent::builder(config)
                .runtime(agent_runtime)
                .dialer(tcp_dialer())
                .build()
                .run(shutdown)
                .await
                .map_err(|e| format!("{node}: {e}"))
        });
    }
    say(&WorkerLine::Started {
        worker: options.index,
        agents: options.agents,
    })?;

    // Wait for `stop` (or the bench going away: EOF), on a thread of its own: a blocking-pool
    // thread would be held for the whole run, and with `--blocking-threads 1` the agents'
    // journal writes would then never run.
    let (stdin_tx, stdin_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("worker-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line {
                    Ok(line) if line.trim() == "stop" => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = stdin_tx.send(());
        })
        .context("cannot start the stdin thread")?;
    let _ = stdin_rx.await;

    let stopping = Instant::now();
    let _ = stop_tx.send(true);
    let mut errors = Vec::new();
    let mut failed_agents = 0;
    let joined = tokio::time::timeout(STOP_TIMEOUT, async {
        while let Some(result) = tasks.join_next().await {
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => format!("agent task: {e}"),
            };
            failed_agents += 1;
            if errors.len() < 5 {
                errors.push(error);
            }
        }
    })
    .await;
    if joined.is_err() {
        errors.push(format!(
            "{} agents did not stop within {STOP_TIMEOUT:?}",
            tasks.len()
        ));
        tasks.abort_all();
    }
    say(&WorkerLine::Report {
        worker: options.index,
        agents: options.agents,
        marks: marks
            .marks()
            .into_iter()
            .flat_map(|(rollout, steps)| {
                steps
                    .into_iter()
                    .map(move |(step, m)| (rollout.clone(), step, m))
            })
            .collect(),
        failed_agents,
        errors,
        stop_ms: u64::try_from(stopping.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}
