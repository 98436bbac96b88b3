//! `barrier-bench`: barrier release latency and whole-rollout time on a local cluster of real
//! processes (coordinator + agents on 127.0.0.1).
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin barrier-bench -- --agents 3 --rounds 20 [--output json]
//! ```
//!
//! Barrier latency. Each round is one rollout of a script with `--barriers` `sync_nodes`
//! (half before the point of no return, half after), each between two `apply` hooks that log a
//! nanosecond timestamp: `mark before-bK`, `sync_nodes bK`, `mark after-bK`. For every barrier,
//! "release latency" is the last node's `after` mark minus the last node's `before` mark: from
//! the moment the last node was about to arrive until every node was through. It includes one
//! hook's overhead (the agent noticing the `before` hook exited, spawning `sh -c` and `date` for
//! the `after` hook), so the script also has two consecutive marks with nothing between them;
//! their gap ("hook overhead") is reported, and "net" is latency minus the median overhead.
//! "Release skew" is the last minus the first `after` mark of a barrier.
//!
//! Rollout time. The script of e2e test 1 (check, two barriers, the point of no return, five
//! hooks; no artificial delays) is run `--rounds` times; reported are the coordinator's own
//! duration (created -> final state, from `rollout list`) and the wall time of
//! `hotroll rollout start --wait` (which polls every 100 ms, so it is coarser).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use hotroll_tests::{Cluster, ClusterOptions, Hook, status};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "barrier-bench",
    about = "Barrier release latency and rollout time on a local hotroll cluster"
)]
struct Args {
    /// Number of agents.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Rollouts per measurement.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Barriers per latency rollout.
    #[arg(long, default_value_t = 4)]
    barriers: usize,
    /// `text` (a table) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.agents >= 1, "--agents must be at least 1");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.barriers >= 1, "--barriers must be at least 1");
    let cluster = Cluster::start(
        args.agents,
        ClusterOptions::default()
            .hook("mark", Hook::mark().timeout("10s"))
            .hook("ok", Hook::ok())
            .hook("delay_b1", Hook::ok())
            .hook("delay_b2", Hook::ok())
            .hook("maybe_fail", Hook::ok()),
    )?;
    let (latency, net, skew, overhead) = measure_barriers(&cluster, &args)?;
    let (coordinator_ms, wall_ms) = measure_rollouts(&cluster, &args)?;

    let rows = [
        ("barrier release latency", &latency),
        ("  net of hook overhead", &net),
        ("barrier release skew", &skew),
        ("hook overhead (mark->mark)", &overhead),
        ("test-1 rollout (coordinator)", &coordinator_ms),
        ("test-1 rollout (CLI --wait)", &wall_ms),
    ];
    if args.output == "json" {
        let mut doc = serde_json::Map::new();
        doc.insert("agents".into(), json!(args.agents));
        doc.insert("rounds".into(), json!(args.rounds));
        doc.insert("barriers_per_round".into(), json!(args.barriers));
        doc.insert(
            "profile".into(),
            json!(if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }),
        );
        for (key, stats) in [
            ("barrier_release_latency_ms", &latency),
            ("barrier_release_latency_net_ms", &net),
            ("barrier_release_skew_ms", &skew),
            ("hook_overhead_ms", &overhead),
            ("rollout_test1_coordinator_ms", &coordinator_ms),
            ("rollout_test1_cli_wall_ms", &wall_ms),
        ] {
            doc.insert(key.into(), stats.to_json());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "hotroll barrier bench: {} agents on 127.0.0.1, {} rounds, \
             {} barriers per round ({} build)",
            args.agents,
            args.rounds,
            args.barriers,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
        println!(
            "{:<30} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "metric (ms)", "n", "min", "p50", "p99", "max", "mean"
        );
        for (name, stats) in rows {
            println!(
                "{:<30} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, stats.n, stats.min, stats.p50, stats.p99, stats.max, stats.mean
            );
        }
    }
    Ok(())
}

/// Latency, net latency, skew and hook overhead samples, in ms.
fn measure_barriers(
    cluster: &Cluster,
    args: &Args,
) -> anyhow::Result<(Stats, Stats, Stats, Stats)> {
    let ponr_after = args.barriers.div_ceil(2);
    let mut latency = Vec::new();
    let mut skew = Vec::new();
    let mut overhead = Vec::new();
    for round in 0..args.rounds {
        let mark = |label: String| {
            format!(r#"{{ apply = {{ hook = "mark", args = ["r{round}-{label}"] }} }}"#)
        };
        let mut up = vec![r#"{ check = "ok" }"#.to_string()];
        for b in 1..=args.barriers {
            up.push(mark(format!("before-b{b}")));
            up.push(format!(r#"{{ sync_nodes = "b{b}" }}"#));
            up.push(mark(format!("after-b{b}")));
            if b == ponr_after {
                up.push(r#""point_of_no_return""#.to_string());
            }
        }
        up.push(mark("ctl-a".into()));
        up.push(mark("ctl-b".into()));
        let text = format!(
            "app = \"bench-{round}\"\nfrom = \"1.0.0\"\nto = \"2.0.0\"\n\n\
             [rollout]\nbarrier_timeout = \"30s\"\nstep_timeout = \"30s\"\n\n\
             [script]\nup = [\n{}\n]\n",
            up.iter()
                .map(|i| format!("  {i},"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let path = cluster.write_script(&format!("bench-{round}.toml"), &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        let state = status::rollout_state(&run.status)?;
        if state != "succeeded" {
            bail!("bench rollout {round} ended {state}: {:#}", run.status);
        }
        let mut marks = Vec::new();
        for i in 1..=cluster.len() {
            marks.push(cluster.marks(i)?);
        }
        let time = |node: usize, label: &str| -> anyhow::Result<u128> {
            let label = format!("r{round}-{label}");
            marks[node]
                .iter()
                .find(|m| m.label == label)
                .map(|m| m.ns)
                .with_context(|| format!("node-{} has no mark {label}", node + 1))
        };
        for b in 1..=args.barriers {
            let mut before = Vec::new();
            let mut after = Vec::new();
            for node in 0..cluster.len() {
                before.push(time(node, &format!("before-b{b}"))?);
                after.push(time(node, &format!("after-b{b}"))?);
            }
            let last_before = before.iter().copied().max().unwrap_or_default();
            let last_after = after.iter().copied().max().unwrap_or_default();
            let first_after = after.iter().copied().min().unwrap_or_default();
            ensure!(
                first_after > last_before,
                "round {round}: a node passed barrier b{b} before the last one arrived"
            );
            latency.push(ms(last_after - last_before));
            skew.push(ms(last_after - first_after));
        }
        for node in 0..cluster.len() {
            overhead.push(ms(time(node, "ctl-b")?.saturating_sub(time(node, "ctl-a")?)));
        }
    }
    let overhead = Stats::of(overhead);
    let net = Stats::of(
        latency
            .iter()
            .map(|l| (l - overhead.p50).max(0.0))
            .collect(),
    );
    Ok((Stats::of(latency), net, Stats::of(skew), overhead))
}

/// Coordinator-side and CLI wall time of the test-1 script, in ms.
fn measure_rollouts(cluster: &Cluster, args: &Args) -> anyhow::Result<(Stats, Stats)> {
    let mark = |label: &str| format!(r#"{{ apply = {{ hook = "mark", args = ["{label}"] }} }}"#);
    let mut coordinator = Vec::new();
    let mut wall = Vec::new();
    for round in 0..args.rounds {
        let up = [
            r#"{ check = "ok" }"#.to_string(),
            r#"{ apply = "delay_b1" }"#.to_string(),
            mark("before-b1"),
            r#"{ sync_nodes = "b1" }"#.to_string(),
            mark("after-b1"),
            r#""point_of_no_return""#.to_string(),
            r#"{ apply = "delay_b2" }"#.to_string(),
            mark("before-b2"),
            r#"{ sync_nodes = "b2" }"#.to_string(),
            mark("after-b2"),
            r#"{ apply = { hook = "maybe_fail" } }"#.to_string(),
        ];
        let text = format!(
            "app = \"test1-{round}\"\nfrom = \"1.0.0\"\nto = \"2.0.0\"\n\n\
             [rollout]\non_failure = \"rollback_node\"\n\
             barrier_timeout = \"10s\"\nstep_timeout = \"10s\"\n\n\
             [script]\nup = [\n{}\n]\ndown = [ {} ]\n",
            up.iter()
                .map(|i| format!("  {i},"))
                .collect::<Vec<_>>()
                .join("\n"),
            mark("down")
        );
        let path = cluster.write_script(&format!("test1-{round}.toml"), &text)?;
        let started = Instant::now();
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        wall.push(started.elapsed().as_secs_f64() * 1000.0);
        let state = status::rollout_state(&run.status)?;
        if state != "succeeded" {
            bail!("test-1 rollout {round} ended {state}: {:#}", run.status);
        }
        let limit = (args.rounds * 3 + 10).to_string();
        let list = cluster
            .hotroll(&["rollout", "list", "--limit", &limit, "--output", "json"])?
            .ok()?
            .json()?;
        let duration = list
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == run.id.as_str()))
            .and_then(|r| r["duration_ms"].as_f64())
            .with_context(|| {
                format!(
                    "rollout {} has no duration in `rollout list`: {list}",
                    run.id
                )
            })?;
        coordinator.push(duration);
    }
    Ok((Stats::of(coordinator), Stats::of(wall)))
}

fn ms(ns: u128) -> f64 {
    ns as f64 / 1e6
}

#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    n: usize,
    min: f64,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        // Nearest-rank percentile.
        let rank = |p: f64| {
            samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Self {
            n: samples.len(),
            min: samples[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
        }
    }

    fn to_json(self) -> serde_json::Value {
        json!({
            "n": self.n,
            "min": round2(self.min),
            "p50": round2(self.p50),
            "p99": round2(self.p99),
            "max": round2(self.max),
            "mean": round2(self.mean),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
