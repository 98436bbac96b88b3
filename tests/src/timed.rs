//! Timing one rollout with watchers attached: the rollout is held at a gate before its first
//! instruction until every watcher is connected (the coordinator's `hotroll_watch_streams`
//! gauge says so), then let go. The time is the coordinator's: from opening the gates to the
//! rollout's final state (`created + duration` from `rollout list`).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};

use crate::cluster::Cluster;
use crate::metrics::scrape;
use crate::poll::poll;
use crate::scripts::{gate, open_gate_everywhere, script};
use crate::status;

/// How long a timed rollout may take.
pub const TIMED_ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The script of a timed rollout of `app`: a `go` gate, a check, a barrier, the point of no
/// return, then two rounds of hook + barrier; one node per wave after a canary of one. The
/// cluster must declare the `gate` ([`crate::scripts::gate_hook`]) and `ok` hooks.
pub fn timed_script(app: &str) -> String {
    script(
        app,
        "canary = 1\nmax_in_flight = 1\nbarrier_timeout = \"60s\"\nstep_timeout = \"60s\"",
        &[
            &gate("go"),
            r#"{ check = "ok" }"#,
            r#"{ sync_nodes = "staged" }"#,
            r#""point_of_no_return""#,
            r#"{ apply = "ok" }"#,
            r#"{ sync_nodes = "one" }"#,
            r#"{ apply = "ok" }"#,
            r#"{ sync_nodes = "two" }"#,
        ],
        &[],
    )
}

/// Start a rollout of [`timed_script`], call `attach(id)` to start `watchers` watchers, wait
/// until the coordinator counts them, open the gates and wait for the rollout to succeed.
/// Returns the coordinator's milliseconds from the gates to the end, and what `attach` gave.
pub fn timed_rollout<W>(
    cluster: &Cluster,
    metrics: SocketAddr,
    app: &str,
    watchers: usize,
    attach: impl FnOnce(&str) -> anyhow::Result<W>,
) -> anyhow::Result<(u64, W)> {
    let path = cluster.write_script(&format!("{app}.toml"), &timed_script(app))?;
    for i in 1..=cluster.len() {
        let _ = std::fs::remove_file(cluster.agent_info(i).dir.join("go-go"));
    }
    let baseline = scrape(metrics)?.value_or_zero("hotroll_watch_streams", &[]);
    let id = cluster.start_rollout(&path, &[])?;
    let attached = attach(&id)?;
    poll(
        "every watcher to attach",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let streams = scrape(metrics)?.value_or_zero("hotroll_watch_streams", &[]);
            Ok((streams >= baseline + watchers as f64).then_some(()))
        },
    )?;
    let opened = now_ms();
    open_gate_everywhere(cluster, "go")?;
    let status = cluster.wait_final(&id, TIMED_ROLLOUT_TIMEOUT)?;
    ensure!(status::rollout_state(&status)? == "succeeded", "{status:#}");
    let list = cluster
        .hotroll(&["rollout", "list", "--output", "json"])?
        .ok()?
        .json()?;
    let row = list
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id.as_str()))
        .with_context(|| format!("rollout {id} not listed: {list}"))?;
    let finished = row["created_unix_ms"].as_u64().unwrap_or_default()
        + row["duration_ms"].as_u64().unwrap_or_default();
    Ok((finished.saturating_sub(opened), attached))
}
