//! `failover-bench`: how long a coordinator group on etcd takes to move a rollout on after its
//! leader is SIGKILLed (issue 16), on a local cluster of real processes: a real 3-member etcd,
//! `--coordinators` coordinators, `--agents` agents on 127.0.0.1.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin failover-bench -- --kills 20 [--output json]
//! ```
//!
//! Each round is one rollout: `mark prepare`, a gate on the last node (a hook that waits for a
//! file), `sync_nodes staged`, the point of no return, `mark committed`. Once every node has
//! marked `prepare` (the others wait at the barrier), the bench SIGKILLs the leader and opens
//! the gate at once. "Failover" is the kill to the first `committed` mark: the new leader has
//! been elected, rebuilt the rollout from etcd, taken the last node's arrival and released the
//! barrier. The floor, measured in the same run with the same script and no kill, is the gate
//! opening to the first `committed` mark. The killed coordinator is started again (as a standby)
//! before the next round.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use clap::Parser;
use hotroll_tests::{Cluster, ClusterOptions, Hook, poll, status};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "failover-bench",
    about = "Leader SIGKILLed -> next rollout step taken by the new leader, on a local group on etcd"
)]
struct Args {
    /// Leader kills (one rollout each); as many rounds without a kill give the floor.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// The leader's lease (`serve --lease-ttl`).
    #[arg(long, default_value = "2s")]
    lease_ttl: String,
    /// `text` or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn script(round: usize, agents: usize) -> String {
    format!(
        "app = \"bench{round}\"\nfrom = \"1\"\nto = \"2\"\n\n\
         [rollout]\nbarrier_timeout = \"60s\"\nstep_timeout = \"60s\"\n\n\
         [script]\nup = [\n\
           {{ apply = {{ hook = \"mark\", args = [\"prepare\"] }} }},\n\
           {{ apply = {{ hook = \"gate\", args = [\"{round}\"] }} }},\n\
           {{ sync_nodes = \"staged\" }},\n\
           \"point_of_no_return\",\n\
           {{ apply = {{ hook = \"mark\", args = [\"committed-{round}\"] }} }},\n\
         ]\n# {agents} nodes\n"
    )
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One round: returns the time from `trigger` (kill or gate) to the first `committed` mark.
fn round(
    cluster: &mut Cluster,
    round: usize,
    agents: usize,
    kill: bool,
) -> anyhow::Result<Duration> {
    let path = cluster.write_script(&format!("r{round}.toml"), &script(round, agents))?;
    let id = cluster.start_rollout(&path, &[])?;
    poll(
        "every node to mark prepare",
        TIMEOUT,
        Duration::from_millis(20),
        || {
            for i in 1..=agents {
                let prepared = cluster
                    .marks(i)?
                    .iter()
                    .filter(|m| m.label == "prepare")
                    .count();
                if prepared < round + 1 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    let leader = cluster.wait_group_leader(None, TIMEOUT)?;
    // Nodes that marked `prepare` are at the barrier (or about to be) but the gated one.
    std::thread::sleep(Duration::from_millis(100));
    let started = now_ns();
    if kill {
        cluster.group_member(leader).kill()?;
    }
    std::fs::write(cluster.dir().join(format!("gate-{round}")), "open")?;
    let label = format!("committed-{round}");
    let first = poll(
        "a node to mark committed",
        TIMEOUT,
        Duration::from_millis(5),
        || {
            let mut first = None::<u128>;
            for i in 1..=agents {
                if let Some(ns) = cluster.mark_time(i, &label)? {
                    first = Some(first.map_or(ns, |f| f.min(ns)));
                }
            }
            Ok(first)
        },
    )?;
    let run = cluster.wait_final(&id, TIMEOUT)?;
    ensure!(
        status::rollout_state(&run)? == "succeeded",
        "round {round} did not succeed: {run:#}"
    );
    if kill {
        cluster.group_member(leader).start()?;
    }
    let nanos = u64::try_from(first.saturating_sub(started)).unwrap_or(u64::MAX);
    Ok(Duration::from_nanos(nanos))
}

/// What the group keeps in etcd after the bench's rollouts (all final): live bytes under the
/// prefix by kind of key, and etcd's own database size.
fn etcd_size(
    cluster: &mut Cluster,
    rollouts: usize,
    agents: usize,
) -> anyhow::Result<serde_json::Value> {
    let etcd = cluster.etcd().context("not a group")?;
    let client = hotroll_etcd::EtcdClient::new(&hotroll_etcd::EtcdOptions::new(etcd.endpoints()))?;
    let reader = client.clone();
    let kvs = client.block_on(async move { reader.get_prefix(b"/hotroll/").await })?;
    let reader = client.clone();
    let member = client.block_on(async move { reader.status().await })?;
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    let mut live = 0usize;
    for kv in &kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let kind = key.split('/').nth(2).unwrap_or("other").to_string();
        let bytes = kv.key.len() + kv.value.len();
        *by_kind.entry(kind).or_default() += bytes;
        live += bytes;
    }
    for kind in ["rollouts", "events", "inputs", "nodes"] {
        by_kind.entry(kind.to_string()).or_default();
    }
    Ok(json!({
        "rollouts": rollouts,
        "live_bytes": live,
        "bytes_per_node_per_rollout": live as f64 / (rollouts.max(1) * agents.max(1)) as f64,
        "by_kind": by_kind,
        "db_size": member.db_size,
        "db_size_in_use": member.db_size_in_use,
    }))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.kills >= 1, "--kills must be at least 1");
    ensure!(args.coordinators >= 2, "--coordinators must be at least 2");
    ensure!(args.agents >= 2, "--agents must be at least 2");
    let mut options = ClusterOptions::default()
        .group(args.coordinators)
        .session_grace("30s")
        .hook("mark", Hook::mark().timeout("10s"))
        .node_hook(
            args.agents,
            "gate",
            Hook::sh("while [ ! -f {cluster_dir}/gate-$1 ]; do sleep 0.01; done").timeout("60s"),
        )
        .hook("gate", Hook::ok());
    options.lease_ttl = args.lease_ttl.clone();
    let mut cluster = Cluster::start(args.agents, options).context("cannot start the cluster")?;
    let mut floor = Vec::new();
    let mut failover = Vec::new();
    for i in 0..args.kills * 2 {
        let kill = i % 2 == 1;
        let took = round(&mut cluster, i, args.agents, kill)?;
        if kill {
            failover.push(took);
        } else {
            floor.push(took);
        }
        eprintln!(
            "round {i}: {} {:.1} ms",
            if kill { "failover" } else { "floor" },
            ms(took)
        );
    }
    let size = etcd_size(&mut cluster, args.kills * 2, args.agents)?;
    floor.sort();
    failover.sort();
    let (f50, f99) = (percentile(&floor, 50.0), percentile(&floor, 99.0));
    let (k50, k99) = (percentile(&failover, 50.0), percentile(&failover, 99.0));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    if args.output == "json" {
        println!(
            "{}",
            json!({
                "kills": args.kills, "coordinators": args.coordinators, "agents": args.agents,
                "lease_ttl": args.lease_ttl,
                "floor_ms": {"p50": ms(f50), "p99": ms(f99)},
                "failover_ms": {"p50": ms(k50), "p99": ms(k99)},
                "failover_over_floor": {"p50": ratio(k50, f50), "p99": ratio(k99, f99)},
                "etcd": size,
            })
        );
    } else {
        println!(
            "failover-bench: {} kills, {} coordinators, {} agents, lease TTL {}",
            args.kills, args.coordinators, args.agents, args.lease_ttl
        );
        println!(
            "  floor (gate -> first committed, no kill): p50 {:.1} ms  p99 {:.1} ms",
            ms(f50),
            ms(f99)
        );
        println!(
            "  failover (SIGKILL leader -> first committed): p50 {:.1} ms  p99 {:.1} ms",
            ms(k50),
            ms(k99)
        );
        println!(
            "  failover / floor: p50 {:.1}x  p99 {:.1}x",
            ratio(k50, f50),
            ratio(k99, f99)
        );
        println!(
            "  etcd after {} final rollouts of {} nodes: {} live bytes under /hotroll ({:.0} per node per rollout: rollouts {}, events {}, inputs {}, nodes {}); db size {} B, {} B in use",
            size["rollouts"],
            args.agents,
            size["live_bytes"],
            size["bytes_per_node_per_rollout"].as_f64().unwrap_or(0.0),
            size["by_kind"]["rollouts"],
            size["by_kind"]["events"],
            size["by_kind"]["inputs"],
            size["by_kind"]["nodes"],
            size["db_size"],
            size["db_size_in_use"]
        );
    }
    Ok(())
}
