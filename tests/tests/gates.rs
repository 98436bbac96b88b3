//! Issue 18, test 3: metric gates against a real Prometheus (Debian's `prometheus`, started on
//! 127.0.0.1 with a config the test writes) scraping a test service's `errors_total` every
//! second. A real coordinator (`hotroll serve --prometheus URL`) and two real agents; the
//! fleet gate `rate(errors_total[5s]) < 0.5` must hold for 3 s after each wave.
//!
//! (a) errors stay low: the gate passes after each wave, the rollout succeeds, and the history
//!     has the gate's values. (b) the "new release" raises the error rate (a hook of its `up`
//!     creates the flag file that makes the counter climb): the gate fails after the canary
//!     wave, the canary rolls back, the other node aborts, the rollout is rolled back, and the
//!     history shows the value seen. (c) Prometheus is stopped: the gate fails with "connection
//!     refused" and never passes.

use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::prometheus::{ErrorCounter, Prometheus};
use hotroll_tests::{Cluster, ClusterOptions, Hook, status};
use serde_json::Value;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);
const RATE: &str = "rate(errors_total[5s])";

/// Two nodes, a canary wave of one, the fleet gate after each wave; `bad_release` is a hook the
/// new release runs after the point of no return.
fn script() -> String {
    format!(
        r#"app = "demo"
from = "1.0.0"
to = "2.0.0"

[rollout]
canary = 1
on_failure = "rollback_node"
max_failures = 0
step_timeout = "10s"

[[rollout.gates]]
name = "error-rate"
query = "{RATE}"
pass_if = "< 0.5"
hold = "3s"
interval = "1s"
timeout = "20s"

[script]
up = [
  {{ check = "ok" }},
  "point_of_no_return",
  {{ apply = "release" }},
]
down = [
  {{ apply = "ok" }},
]
"#
    )
}

/// The cluster, with `release` running `release_hook` on every node.
fn cluster(prometheus: &str, release_hook: Hook) -> anyhow::Result<Cluster> {
    Cluster::start(
        2,
        ClusterOptions::default()
            .coordinator_arg("--prometheus")
            .coordinator_arg(prometheus)
            .hook("ok", Hook::ok())
            .hook("release", release_hook),
    )
}

/// The gate events of the rollout's history (`rollout events --output json`).
fn gate_events(cluster: &Cluster, id: &str) -> anyhow::Result<Vec<Value>> {
    let output = cluster
        .hotroll(&["rollout", "events", id, "--output", "json"])?
        .ok()?;
    let mut gates = Vec::new();
    for line in output.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).with_context(|| format!("event {line}"))?;
        if event["kind"] == "gate" {
            gates.push(event);
        }
    }
    Ok(gates)
}

fn phases(gates: &[Value]) -> Vec<(u64, String)> {
    gates
        .iter()
        .map(|g| {
            (
                g["wave"].as_u64().unwrap_or_default(),
                g["gate_phase"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_gate_that_holds_while_errors_stay_low_lets_every_wave_through() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let counter = ErrorCounter::start(dir.path().join("errors-climb"))?;
    let prometheus = Prometheus::start(&[counter.target()])?;
    // rate() over 5 s needs two scrapes: wait for them before the first gate asks.
    prometheus.wait_for_data(RATE, Duration::from_secs(20))?;
    cluster(&prometheus.url(), Hook::ok())?.run(|cluster| {
        let path = cluster.write_script("gated.toml", &script())?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("succeeded")?;
        let gates = gate_events(cluster, &run.id)?;
        ensure!(
            phases(&gates)
                == [
                    (1, "started".to_string()),
                    (1, "passed".to_string()),
                    (2, "started".to_string()),
                    (2, "passed".to_string()),
                ],
            "the gate runs and passes after each wave: {gates:#?}"
        );
        for passed in gates.iter().filter(|g| g["gate_phase"] == "passed") {
            let value: f64 = passed["gate_value"]
                .as_str()
                .context("a passed gate records the value seen")?
                .parse()?;
            ensure!(value < 0.5, "passed with {value}: {passed}");
            let message = passed["message"].as_str().unwrap_or_default();
            ensure!(
                message.contains("held < 0.5 for"),
                "the reason says it held: {message}"
            );
        }
        Ok(())
    })
}

#[test]
fn a_release_that_raises_the_error_rate_fails_the_gate_and_rolls_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let counter = ErrorCounter::start(dir.path().join("errors-climb"))?;
    let prometheus = Prometheus::start(&[counter.target()])?;
    prometheus.wait_for_data(RATE, Duration::from_secs(20))?;
    // The new release "serves errors": from the moment it is running, the counter climbs.
    let bad_release = Hook::sh(&format!("touch '{}'", counter.flag().display()));
    cluster(&prometheus.url(), bad_release)?.run(|cluster| {
        let path = cluster.write_script("gated.toml", &script())?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("rolled_back")?;
        ensure!(
            status::node_wave(&run.status, "node-1")? == 1,
            "node-1 is the canary: {:#}",
            run.status
        );
        ensure!(
            status::node_state(&run.status, "node-1")? == "rolled_back",
            "the canary rolls back: {:#}",
            run.status
        );
        ensure!(
            status::node_state(&run.status, "node-2")? == "aborted",
            "the second wave never commits: {:#}",
            run.status
        );
        let gates = gate_events(cluster, &run.id)?;
        ensure!(
            phases(&gates) == [(1, "started".to_string()), (1, "failed".to_string())],
            "{gates:#?}"
        );
        let failed = &gates[1];
        let value: f64 = failed["gate_value"]
            .as_str()
            .context("a failed gate records the value seen")?
            .parse()?;
        ensure!(value >= 0.5, "failed with {value}: {failed}");
        let error = failed["error"].as_str().unwrap_or_default();
        ensure!(
            error.contains(&format!(
                "`{RATE}` = {}, not < 0.5",
                failed["gate_value"].as_str().unwrap_or_default()
            )),
            "the error says which value broke the condition: {error}"
        );
        let rollout_error = run.status["error"].as_str().unwrap_or_default();
        ensure!(
            rollout_error.contains("gate `error-rate` failed after wave 1"),
            "the rollout says the gate failed it: {rollout_error}"
        );
        Ok(())
    })
}

#[test]
fn a_stopped_prometheus_fails_the_gate_with_connection_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let counter = ErrorCounter::start(dir.path().join("errors-climb"))?;
    let mut prometheus = Prometheus::start(&[counter.target()])?;
    prometheus.wait_for_data(RATE, Duration::from_secs(20))?;
    let url = prometheus.url();
    prometheus.stop()?;
    cluster(&url, Hook::ok())?.run(|cluster| {
        let path = cluster.write_script("gated.toml", &script())?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("rolled_back")?;
        let gates = gate_events(cluster, &run.id)?;
        ensure!(
            phases(&gates) == [(1, "started".to_string()), (1, "failed".to_string())],
            "the gate never passes: {gates:#?}"
        );
        let error = gates[1]["error"].as_str().unwrap_or_default();
        ensure!(
            error.contains(&format!("cannot reach Prometheus at {url}"))
                && error.contains("Connection refused"),
            "the gate fails with the connection error: {error}"
        );
        ensure!(
            gates[1]["gate_value"].is_null(),
            "no value was seen: {}",
            gates[1]
        );
        Ok(())
    })
}

/// A node gate (`{ gate = {…} }` in `up`, run by each agent against the Prometheus its own
/// config declares, `$node` its name): node-1's errors stay low and it commits; node-2's new
/// release raises its own error rate, its gate fails and it rolls back; node-3 declares no
/// `[prometheus]`, so its gate step fails saying so. The budget tolerates both failures.
#[test]
fn node_gates_query_the_agents_own_prometheus_for_their_own_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let counters =
        [1, 2, 3].map(|i| ErrorCounter::start(dir.path().join(format!("node-{i}-errors-climb"))));
    let [one, two, three] = counters;
    let (one, two, three) = (one?, two?, three?);
    let prometheus = Prometheus::start_labelled(&[
        (one.target(), Some("node-1".to_string())),
        (two.target(), Some("node-2".to_string())),
        (three.target(), Some("node-3".to_string())),
    ])?;
    // Each gated node's own series: Prometheus scrapes the targets one by one, so one node's
    // data says nothing about the other's.
    for node in ["node-1", "node-2"] {
        let per_node = format!("rate(errors_total{{node=\"{node}\"}}[5s])");
        prometheus.wait_for_data(&per_node, Duration::from_secs(20))?;
    }
    let declares = format!("[prometheus]\nurl = \"{}\"\n", prometheus.url());
    let options = ClusterOptions::default()
        .hook("ok", Hook::ok())
        .hook("release", Hook::ok())
        .node_hook(
            2,
            "release",
            Hook::sh(&format!("touch '{}'", two.flag().display())),
        )
        .node_agent_toml_extra(1, &declares)
        .node_agent_toml_extra(2, &declares);
    Cluster::start(3, options)?.run(|cluster| {
        let text = r#"app = "demo"
from = "1.0.0"
to = "2.0.0"

[rollout]
on_failure = "rollback_node"
max_failures = 2
step_timeout = "10s"

[script]
up = [
  { check = "ok" },
  "point_of_no_return",
  { apply = "release" },
  { gate = { query = "rate(errors_total{node=\"$node\"}[5s])", pass_if = "< 0.5", hold = "3s", interval = "1s", timeout = "20s" } },
]
down = [
  { apply = "ok" },
]
"#;
        let path = cluster.write_script("node-gate.toml", text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("partially_rolled_back")?;
        let states: Vec<(&str, String)> = ["node-1", "node-2", "node-3"]
            .into_iter()
            .map(|n| Ok((n, status::node_state(&run.status, n)?.to_string())))
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            states
                == [
                    ("node-1", "committed".to_string()),
                    ("node-2", "rolled_back".to_string()),
                    ("node-3", "rolled_back".to_string()),
                ],
            "{states:?}: {:#}",
            run.status
        );
        let error = |node: &str| -> anyhow::Result<String> {
            Ok(status::node_error(&run.status, node)?
                .unwrap_or_default()
                .to_string())
        };
        let two_error = error("node-2")?;
        ensure!(
            two_error.contains("gate failed: `rate(errors_total{node=\"node-2\"}[5s])` =")
                && two_error.contains("not < 0.5"),
            "node-2's gate names its own series and the value: {two_error}"
        );
        let three_error = error("node-3")?;
        ensure!(
            three_error.contains("this agent's config has no [prometheus] url"),
            "node-3 says why it cannot gate: {three_error}"
        );
        Ok(())
    })
}
