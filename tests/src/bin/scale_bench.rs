//! `scale-bench`: one coordinator (the real `hotroll serve` process) and N agents (the real
//! session and executor code, `hotroll_agent::Agent` with a runtime that does nothing) over
//! real gRPC on 127.0.0.1, spread over a few worker processes.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin scale-bench -- --agents 100,1000,10000 [--rounds 3]
//!     [--heartbeat-interval 2s] [--workers 4] [--json scale.json] [--perf rollout]
//! ```
//!
//! For each N, with a fresh coordinator (its store on disk, in a temp dir):
//! 1. **connect**: start the workers (the bench re-executed as `scale-bench worker ...`, each
//!    running its share of the agents) and time until `hotroll_connected_agents` reaches N;
//! 2. **memory**: coordinator RSS (`/proc/PID/status`) after it started and after every agent is
//!    connected and the sessions settled: (idle − before) / N;
//! 3. **idle CPU**: coordinator utime+stime (`/proc/PID/stat`) over `--idle` seconds, as % of
//!    one core (and the same for all the worker processes together);
//! 4. **rollouts**: `--rounds` rollouts of [`SCRIPT`](hotroll_tests::scale::run::SCRIPT) (b1, b2,
//!    point of no return, b3), each timed by the coordinator (created → finished);
//! 5. **barrier release latency**: from the agents' own tracing events (see
//!    `hotroll_tests::scale::marks`), per barrier the last arrival, then per node its release
//!    minus that ("per node") and the last release minus it ("last node").
//!
//! The file-descriptor limit is raised to its hard limit (inherited by every child). Agents'
//! data dirs (redb journals, fsynced at every step) go to `--agent-data-dir`, by default a temp
//! dir in /dev/shm: 10,000 journals fsyncing on one disk would measure the disk, not hotroll.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use hotroll_etcd::{EtcdClient, EtcdOptions};
use hotroll_tests::etcd::EtcdCluster;
use hotroll_tests::scale::floor::{WireFloor, wire_fanout};
use hotroll_tests::scale::run::{RunOptions, RunResult, run};
use hotroll_tests::scale::worker::{self, WorkerArgs};
use hotroll_tests::scale::{Stats, raise_fd_limit};

#[derive(Debug, Parser)]
#[command(
    name = "scale-bench",
    about = "One coordinator and thousands of agents: connect time, memory, idle CPU, rollout \
             time and barrier release latency"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Number of agents; a comma-separated list runs the bench once per value.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    agents: Vec<usize>,
    /// Worker processes the agents are spread over.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Tokio worker threads per worker process.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Tokio blocking threads per worker process (the agents' journal writes).
    #[arg(long, default_value_t = 8)]
    blocking_threads: usize,
    /// Session heartbeat interval (`hotroll serve --heartbeat-interval`, and the agents').
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Rollouts per N.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Wait after every agent connected before measuring memory and idle CPU (default: two
    /// heartbeat intervals, at least 3 s, and 3 s more per 1,000 agents: right after a big
    /// connect the node records are still written behind and stragglers still reconnect).
    #[arg(long, value_parser = parse_duration)]
    settle: Option<Duration>,
    /// How long idle CPU is measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    idle: Duration,
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    connect_timeout: Duration,
    #[arg(long, default_value = "900s", value_parser = parse_duration)]
    rollout_timeout: Duration,
    /// Parent of the agents' data dirs (default: /dev/shm when it exists, else the temp dir).
    #[arg(long)]
    agent_data_dir: Option<PathBuf>,
    /// Where the coordinator keeps its state: `redb` (its data dir) or `etcd` (a real 3-member
    /// etcd cluster on 127.0.0.1 the bench starts, fresh for every run; its size is reported
    /// after the rollouts). A comma-separated list runs the bench once per store.
    #[arg(long, value_delimiter = ',', default_value = "redb", value_parser = ["redb", "etcd"])]
    store: Vec<String>,
    /// Extra argument for `hotroll serve` (repeat for several), e.g. `--coordinator-arg=--insecure`.
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    coordinator_args: Vec<String>,
    /// `perf record` the coordinator during one phase: connect, idle or rollout; or the
    /// agents' worker processes during the rollouts: agents-rollout.
    #[arg(long, value_parser = ["connect", "idle", "rollout", "agents-rollout"])]
    perf: Option<String>,
    /// Where perf data files go.
    #[arg(long, default_value = ".")]
    perf_dir: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the temp dirs (coordinator store, logs).
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// (internal) Run agents in this process for the bench.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    hotroll_script::parse_duration(text).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Sub::Worker(worker_args)) = args.command {
        return worker::run(worker_args.into());
    }
    ensure!(!args.agents.is_empty(), "--agents is empty");
    let fd_limit = raise_fd_limit()?;
    let needed = args.agents.iter().copied().max().unwrap_or(0) as u64 + 256;
    if fd_limit < needed {
        bail!(
            "the open-file limit is {fd_limit} (hard limit included); {needed} are needed: raise \
             it (ulimit -Hn) first"
        );
    }
    let bins = hotroll_tests::binaries()?;
    let mut results = Vec::new();
    let runs: Vec<(String, usize)> = args
        .store
        .iter()
        .flat_map(|store| args.agents.iter().map(move |&n| (store.clone(), n)))
        .collect();
    for (store, n) in runs {
        let etcd = match store.as_str() {
            "etcd" => Some(EtcdCluster::start(3)?),
            _ => None,
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("hotroll-scale-{n}-"))
            .tempdir()
            .context("cannot create a temp dir")?;
        let agent_parent = args.agent_data_dir.clone().unwrap_or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() {
                shm
            } else {
                std::env::temp_dir()
            }
        });
        let agent_dir = tempfile::Builder::new()
            .prefix(&format!("hotroll-scale-agents-{n}-"))
            .tempdir_in(&agent_parent)
            .with_context(|| format!("cannot create a dir in {}", agent_parent.display()))?;
        let settle = args.settle.unwrap_or_else(|| {
            let per_thousand = Duration::from_secs(3) * u32::try_from(n / 1000).unwrap_or(0);
            (args.heartbeat_interval * 2).max(Duration::from_secs(3)) + per_thousand
        });
        eprintln!(
            "scale-bench: {n} agents on {store}, {} workers, heartbeat {:?}, logs in {}",
            args.workers,
            args.heartbeat_interval,
            dir.path().display()
        );
        let options = RunOptions {
            agents: n,
            workers: args.workers,
            worker_threads: args.worker_threads,
            blocking_threads: args.blocking_threads,
            heartbeat: args.heartbeat_interval,
            rounds: args.rounds,
            settle,
            idle: args.idle,
            connect_timeout: args.connect_timeout,
            rollout_timeout: args.rollout_timeout,
            agent_data_root: agent_dir.path().to_path_buf(),
            coordinator_args: args.coordinator_args.clone(),
            etcd_endpoints: etcd.as_ref().map(EtcdCluster::endpoints_arg),
            perf: args.perf.clone(),
            perf_dir: args.perf_dir.clone(),
        };
        // The floor first, on a machine nothing of the run is using yet.
        // Both ends of every socket are in this process: at most half the spare descriptors.
        let floor_sockets = n.min(usize::try_from(fd_limit.saturating_sub(512) / 2).unwrap_or(n));
        let floor = wire_fanout(floor_sockets.max(1), FLOOR_ROUNDS)?;
        let result = run(&bins.hotroll, dir.path(), options);
        if args.keep || result.is_err() {
            let kept = dir.keep();
            let _ = agent_dir.keep();
            eprintln!("scale-bench: kept {}", kept.display());
        }
        let result = result?;
        let size = match &etcd {
            Some(etcd) => Some(etcd_size(etcd)?),
            None => None,
        };
        print_one(&result, size.as_ref());
        results.push(Measured {
            store,
            run: result,
            etcd: size,
            floor,
        });
    }
    print_table(&results);
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "bench": "scale-bench",
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "script": hotroll_tests::scale::run::SCRIPT,
            "runs": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("scale-bench: wrote {}", path.display());
    }
    Ok(())
}

/// One run and, on etcd, what it left there.
#[derive(Debug, serde::Serialize)]
struct Measured {
    store: String,
    #[serde(flatten)]
    run: RunResult,
    etcd: Option<EtcdSize>,
    /// The wire's floor for a fan-out to this many sockets, measured just before the run.
    floor: WireFloor,
}

/// Rounds of the wire floor per run.
const FLOOR_ROUNDS: usize = 20;

/// etcd's size after a run: the database files (the largest member's; bbolt does not shrink
/// without a defrag), the part of them in use, and the live keys under the prefix.
#[derive(Debug, serde::Serialize)]
struct EtcdSize {
    db_bytes: i64,
    db_in_use_bytes: i64,
    live_keys: usize,
    live_bytes: usize,
}

fn etcd_size(etcd: &EtcdCluster) -> anyhow::Result<EtcdSize> {
    let client = EtcdClient::new(&EtcdOptions::new(etcd.endpoints()))?;
    let mut db_bytes = 0;
    let mut db_in_use_bytes = 0;
    for endpoint in etcd.endpoints() {
        let one = EtcdClient::new(&EtcdOptions::new(vec![endpoint]))?;
        let asked = one.clone();
        let status = one.block_on(async move { asked.status().await })?;
        db_bytes = db_bytes.max(status.db_size);
        db_in_use_bytes = db_in_use_bytes.max(status.db_size_in_use);
    }
    let asked = client.clone();
    let keys = client.block_on(async move { asked.get_prefix(b"/hotroll/").await })?;
    let live_bytes = keys.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
    Ok(EtcdSize {
        db_bytes,
        db_in_use_bytes,
        live_keys: keys.len(),
        live_bytes,
    })
}

fn print_one(r: &RunResult, etcd: Option<&EtcdSize>) {
    if let Some(size) = etcd {
        eprintln!(
            "  etcd after {} rollouts of {} agents: db {:.2} MiB ({:.2} MiB in use), {} live keys \
             of {:.1} KiB",
            r.rounds.len(),
            r.options.agents,
            size.db_bytes as f64 / 1048576.0,
            size.db_in_use_bytes as f64 / 1048576.0,
            size.live_keys,
            size.live_bytes as f64 / 1024.0
        );
    }
    eprintln!(
        "  {} agents: connected in {:.2} s, {:.1} KiB/agent, idle CPU {:.2} % (agents {:.1} %), \
         rollout p50 {:.0} ms, release p99 {:.2} ms (coordinator fan-out p99 {:.2} ms, agent \
         frame -> next step p99 {:.2} ms) (load before: {})",
        r.options.agents,
        r.connect_s,
        r.kib_per_agent,
        r.idle_cpu_percent,
        r.idle_workers_cpu_percent,
        r.rollout_ms.p50,
        r.release_per_node_ms.p99,
        r.coordinator_fanout_ms.p99,
        r.agent_release_to_next_step_ms.p99,
        r.loadavg_before
    );
}

fn print_table(measured: &[Measured]) {
    let results: Vec<&RunResult> = measured.iter().map(|m| &m.run).collect();
    let heartbeat = results
        .first()
        .map(|r| format!("{:?}", r.options.heartbeat))
        .unwrap_or_default();
    println!(
        "hotroll scale bench ({} build, {} cores, heartbeat {heartbeat}, script: b1, b2, \
         point_of_no_return, b3)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut header = format!("{:<44}", "agents");
    for r in &results {
        header.push_str(&format!(" {:>12}", r.options.agents));
    }
    println!("{header}");
    let row = |name: &str, value: &dyn Fn(&RunResult) -> String| {
        let mut line = format!("{name:<44}");
        for r in &results {
            line.push_str(&format!(" {:>12}", value(r)));
        }
        println!("{line}");
    };
    let mut stores = format!("{:<44}", "store");
    for m in measured {
        stores.push_str(&format!(" {:>12}", m.store));
    }
    println!("{stores}");
    let stat = |name: &str, get: fn(&RunResult) -> Stats| {
        for (label, pick) in [
            ("p50", (|s: &Stats| s.p50) as fn(&Stats) -> f64),
            ("p99", |s: &Stats| s.p99),
            ("max", |s: &Stats| s.max),
        ] {
            row(&format!("{name} {label}"), &|r| {
                format!("{:.2}", pick(&get(r)))
            });
        }
    };
    row("time to connect all agents (s)", &|r| {
        format!("{:.2}", r.connect_s)
    });
    row("rollouts", &|r| r.rounds.len().to_string());
    stat("rollout wall time (ms)", |r| r.rollout_ms);
    stat("barrier release, per node (ms)", |r| r.release_per_node_ms);
    stat("barrier release, last node (ms)", |r| {
        r.release_last_node_ms
    });
    stat("coordinator fan-out (ms)", |r| r.coordinator_fanout_ms);
    stat("  of which: arrival -> durable (ms)", |r| {
        r.fanout_durable_ms
    });
    stat("    of which: store commit (ms)", |r| r.fanout_commit_ms);
    stat("  arrival -> all queued (ms)", |r| r.fanout_queued_ms);
    stat("agent: release -> next step (ms)", |r| {
        r.agent_release_to_next_step_ms
    });
    row("coordinator RSS before agents (MiB)", &|r| {
        format!("{:.1}", r.coordinator_rss_kib_before as f64 / 1024.0)
    });
    row("coordinator RSS, agents idle (MiB)", &|r| {
        format!("{:.1}", r.coordinator_rss_kib_idle as f64 / 1024.0)
    });
    row("coordinator memory per agent (KiB)", &|r| {
        format!("{:.1}", r.kib_per_agent)
    });
    row("coordinator RSS after last rollout (MiB)", &|r| {
        r.rounds
            .last()
            .map(|x| format!("{:.1}", x.coordinator_rss_kib_after as f64 / 1024.0))
            .unwrap_or_default()
    });
    row("coordinator idle CPU (% of a core)", &|r| {
        format!("{:.2}", r.idle_cpu_percent)
    });
    row("agents' idle CPU, all workers (%)", &|r| {
        format!("{:.1}", r.idle_workers_cpu_percent)
    });
    row("coordinator CPU per rollout (s)", &|r| {
        let total: f64 = r.rounds.iter().map(|x| x.coordinator_cpu_s).sum();
        format!("{:.2}", total / r.rounds.len().max(1) as f64)
    });
    row("agents' CPU per rollout (s)", &|r| {
        let total: f64 = r.rounds.iter().map(|x| x.workers_cpu_s).sum();
        format!("{:.2}", total / r.rounds.len().max(1) as f64)
    });
    for m in measured {
        let (floor, run) = (&m.floor, &m.run);
        // A floor measured on fewer sockets than agents (the descriptor limit) is scaled up
        // linearly: its cost is one write per socket.
        let scale = run.options.agents as f64 / floor.sockets.max(1) as f64;
        let ratio = |hotroll: f64, floor: f64| {
            if floor > 0.0 {
                format!("{:.1}x", hotroll / (floor * scale))
            } else {
                "-".into()
            }
        };
        println!(
            "wire floor, {} loopback sockets (one thread writes 32 bytes to each, then all are \
             read): written p50 {:.2} / p99 {:.2} ms, all read p50 {:.2} / p99 {:.2} ms",
            floor.sockets,
            floor.written_ms.p50,
            floor.written_ms.p99,
            floor.all_read_ms.p50,
            floor.all_read_ms.p99
        );
        println!(
            "  against it{}: coordinator fan-out p50 {} / p99 {} the floor's writes; barrier \
             release per node p99 {}, last node p99 {} the floor's last read",
            if scale > 1.0 {
                format!(" (scaled to {} sockets)", run.options.agents)
            } else {
                String::new()
            },
            ratio(run.coordinator_fanout_ms.p50, floor.written_ms.p50),
            ratio(run.coordinator_fanout_ms.p99, floor.written_ms.p99),
            ratio(run.release_per_node_ms.p99, floor.all_read_ms.p99),
            ratio(run.release_last_node_ms.p99, floor.all_read_ms.p99)
        );
    }
    for m in measured {
        if let Some(size) = &m.etcd {
            println!(
                "etcd after {} rollouts of {} agents: db {} bytes ({} in use), {} live keys of \
                 {} bytes, {:.0} db bytes per node per rollout",
                m.run.rounds.len(),
                m.run.options.agents,
                size.db_bytes,
                size.db_in_use_bytes,
                size.live_keys,
                size.live_bytes,
                size.db_bytes as f64 / (m.run.rounds.len().max(1) * m.run.options.agents) as f64
            );
        }
    }
    for r in &results {
        for e in &r.worker_errors {
            println!("warning ({} agents): {e}", r.options.agents);
        }
    }
}
