//! `watch-bench`: does watching a rollout slow it down? Rollout time on a local cluster of
//! real processes (coordinator + agents on 127.0.0.1) with no watcher, and with `--watchers`
//! watchers attached to the rollout's event stream.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin watch-bench -- --watchers 50 --rounds 7 [--output json]
//! ```
//!
//! Each round runs one rollout per variant, in a rotating order:
//! * `none`: no watcher;
//! * `streams`: `--watchers` `WatchRollout` streams opened from this process, each on its own
//!   connection, every event decoded and counted: the coordinator's own cost of serving them;
//! * `cli`: `--watchers` `hotroll rollout watch ID --output json` processes, their output read
//!   by this process: what fifty operators' terminals cost, client processes included. On a
//!   small machine they compete with the agents for the CPU.
//!
//! A rollout ([`hotroll_tests::timed`]) waits at a gate until every watcher is connected, so
//! only the rollout itself is timed, on the coordinator's clock: from opening the gates to the
//! final state. Reported per variant: median, min and max over the rounds.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Parser;
use hotroll_proto::v1 as pb;
use hotroll_tests::background::Background;
use hotroll_tests::scripts::gate_hook;
use hotroll_tests::timed::timed_rollout;
use hotroll_tests::{Cluster, ClusterOptions, Hook, free_port};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "watch-bench",
    about = "Rollout time with and without watchers on a local hotroll cluster"
)]
struct Args {
    /// Number of agents.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Watchers per watched rollout.
    #[arg(long, default_value_t = 50)]
    watchers: usize,
    /// Rollouts per variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Which variants to run besides `none`: `streams`, `cli` or `both`.
    #[arg(long, default_value = "both", value_parser = ["streams", "cli", "both"])]
    mode: String,
    /// `text` (a table) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    None,
    Streams,
    Cli,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Streams => "streams",
            Variant::Cli => "cli",
        }
    }
}

/// Open `n` watch streams, each on its own connection; the tasks end with the number of
/// events they received (up to and including the final state).
async fn open_streams(
    cluster: &Cluster,
    id: &str,
    n: usize,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<usize>>>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let channel = cluster
            .channel()
            .await
            .context("cannot connect to the coordinator")?;
        let mut client = pb::control_client::ControlClient::new(channel);
        let mut stream = client
            .watch_rollout(pb::WatchRolloutRequest {
                rollout_id: id.to_string(),
                from_seq: 0,
            })
            .await?
            .into_inner();
        tasks.push(tokio::spawn(async move {
            let mut events = 0;
            while let Some(event) = stream.message().await? {
                events += 1;
                let _ = event.seq;
            }
            Ok(events)
        }));
    }
    Ok(tasks)
}

fn run_one(
    runtime: &tokio::runtime::Runtime,
    cluster: &Cluster,
    metrics: SocketAddr,
    variant: Variant,
    round: usize,
    watchers: usize,
) -> anyhow::Result<(u64, usize)> {
    let app = format!("bench-{}-{round}", variant.name());
    match variant {
        Variant::None => {
            let (ms, ()) = timed_rollout(cluster, metrics, &app, 0, |_| Ok(()))?;
            Ok((ms, 0))
        }
        Variant::Streams => {
            let (ms, tasks) = timed_rollout(cluster, metrics, &app, watchers, |id| {
                runtime.block_on(open_streams(cluster, id, watchers))
            })?;
            let mut events = Vec::new();
            for task in tasks {
                events.push(runtime.block_on(task)??);
            }
            ensure!(
                events.windows(2).all(|w| w[0] == w[1]),
                "watchers saw different histories: {events:?}"
            );
            Ok((ms, events.first().copied().unwrap_or_default()))
        }
        Variant::Cli => {
            let (ms, running) = timed_rollout(cluster, metrics, &app, watchers, |id| {
                (0..watchers)
                    .map(|_| {
                        Background::hotroll(cluster, &["rollout", "watch", id, "--output", "json"])
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            let mut events = Vec::new();
            for watcher in running {
                let output = watcher.wait(Duration::from_secs(60))?.ok()?;
                events.push(output.stdout.lines().count());
            }
            ensure!(
                events.windows(2).all(|w| w[0] == w[1]),
                "watchers saw different histories: {events:?}"
            );
            Ok((ms, events.first().copied().unwrap_or_default()))
        }
    }
}

fn summary(samples: &[u64]) -> (u64, u64, u64) {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    (
        median,
        sorted.first().copied().unwrap_or_default(),
        sorted.last().copied().unwrap_or_default(),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.agents >= 1, "--agents must be at least 1");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let mut variants = vec![Variant::None];
    if args.mode != "cli" {
        variants.push(Variant::Streams);
    }
    if args.mode != "streams" {
        variants.push(Variant::Cli);
    }
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let cluster = Cluster::start(
        args.agents,
        ClusterOptions::default()
            .hook("ok", Hook::ok())
            .hook("gate", gate_hook())
            .coordinator_arg("--metrics-listen")
            .coordinator_arg(&metrics.to_string()),
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); variants.len()];
    let mut events = 0;
    for round in 0..args.rounds {
        for k in 0..variants.len() {
            // Rotate the order so that no variant always runs first (or right after another).
            let v = (k + round) % variants.len();
            let (ms, seen) = run_one(
                &runtime,
                &cluster,
                metrics,
                variants[v],
                round,
                args.watchers,
            )?;
            times[v].push(ms);
            events = events.max(seen);
        }
    }
    drop(cluster);

    if args.output == "json" {
        let mut doc = serde_json::Map::new();
        doc.insert("agents".into(), json!(args.agents));
        doc.insert("watchers".into(), json!(args.watchers));
        doc.insert("rounds".into(), json!(args.rounds));
        doc.insert("events_per_rollout".into(), json!(events));
        for (v, samples) in variants.iter().zip(&times) {
            let (median, min, max) = summary(samples);
            doc.insert(
                v.name().into(),
                json!({ "median_ms": median, "min_ms": min, "max_ms": max, "samples_ms": samples }),
            );
        }
        println!("{}", serde_json::Value::Object(doc));
    } else {
        println!(
            "rollout time, gates open -> final state ({} agents, {} rounds, {} events per rollout)",
            args.agents, args.rounds, events
        );
        println!(
            "{:<28} {:>8} {:>8} {:>8}",
            "watchers", "median", "min", "max"
        );
        for (v, samples) in variants.iter().zip(&times) {
            let (median, min, max) = summary(samples);
            let label = match v {
                Variant::None => "none".to_string(),
                Variant::Streams => format!("{} streams (one process)", args.watchers),
                Variant::Cli => format!("{} `hotroll rollout watch`", args.watchers),
            };
            println!("{label:<28} {median:>6}ms {min:>6}ms {max:>6}ms");
        }
    }
    Ok(())
}
