//! End-to-end tests of issue 7 ("Zero-downtime hot upgrade"): real coordinator and agent
//! processes, and the real demo service `primes` (package `hotroll-primes`), which mines primes
//! into memory and hands them over to its next version (`docs/handover.md`). Releases "1.0.0",
//! "2.0.0", "3.0.0" are the same binary next to different `VERSION` files; the version picks
//! the code (v2: faster strategy, a new field, a new state format; v3: a failing code_change).
//!
//! 1. Under load (clients on every node, thousands of requests spanning the upgrade): no
//!    failed request, no refused connection, and every prime known before is still there after.
//! 2. A failing code_change: the old instance keeps serving with its state; the node is rolled
//!    back.
//! 3. A new instance that never becomes ready: timeout, the old instance keeps serving with its
//!    state; the node is rolled back.
//! 4. A failure after a successful handover: the default rollback hands the state back down to
//!    the permanent release.
//! 5. `hotroll demo` itself (the README's first command) exits 0.
//!
//! Each test prints what it measured (latency percentiles, suspend windows) on stderr; run with
//! `--nocapture` (or `nextest --no-capture`) to see it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::primes::{self, LoadLoop, LoadReport, all_primes, ensure_kept, primes_binary};
use hotroll_tests::services::{current_release, permanent_release};
use hotroll_tests::{Cluster, ClusterOptions, Hook, free_port, node_name, run_command, status};
use serde_json::Value;

const APP: &str = "primes";
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);
const SERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests each node's clients send at least, spanning the upgrade.
const REQUESTS_PER_NODE: usize = 2_000;

/// Options for `nodes` agents, each with `primes` (handover) on a port of its own.
fn fleet(nodes: usize) -> anyhow::Result<(ClusterOptions, Vec<u16>)> {
    let mut options = ClusterOptions::default()
        .hook("ok", Hook::ok())
        .hook("fail", Hook::fail());
    let mut ports = Vec::new();
    for i in 1..=nodes {
        let port = free_port()?;
        options = options.node_agent_toml_extra(i, &primes::primes_service(APP, APP, port));
        ports.push(port);
    }
    Ok((options, ports))
}

/// `<cluster>/artifacts/<version>/<name>` with `text` in it.
fn artifact_file(
    cluster: &Cluster,
    version: &str,
    name: &str,
    text: &str,
) -> anyhow::Result<PathBuf> {
    let dir = cluster.dir().join("artifacts").join(version);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n"))?;
    Ok(path)
}

/// An upgrade script of `primes` from `from` to `to` shipping `artifacts` (name, source);
/// `rollout` is the body of `[rollout]`, `up` the instructions.
fn script(
    from: &str,
    to: &str,
    artifacts: &[(&str, PathBuf)],
    rollout: &str,
    up: &[&str],
) -> String {
    let mut text = format!("app = \"{APP}\"\nfrom = \"{from}\"\nto = \"{to}\"\n\n");
    for (name, source) in artifacts {
        let mode = if name.starts_with("bin/") {
            "mode = \"0755\"\n"
        } else {
            ""
        };
        text.push_str(&format!(
            "[[artifacts]]\nname = \"{name}\"\nsource = \"{}\"\n{mode}\n",
            source.display()
        ));
    }
    text.push_str(&format!("[rollout]\n{rollout}\n\n[script]\nup = [\n"));
    for step in up {
        text.push_str(&format!("  {step},\n"));
    }
    text.push_str("]\n");
    text
}

const POLICY: &str = "on_failure = \"rollback_node\"\nmax_failures = 1\nstep_timeout = \"30s\"\nbarrier_timeout = \"30s\"";

/// Install `primes` 1.0.0 on every node and wait until each serves it.
fn install(cluster: &Cluster, ports: &[u16]) -> anyhow::Result<()> {
    let text = script(
        "none",
        "1.0.0",
        &[
            ("bin/primes", primes_binary()?),
            (
                "VERSION",
                artifact_file(cluster, "1.0.0", "VERSION", "1.0.0")?,
            ),
        ],
        POLICY,
        &[
            r#"{ load_object_code = ["bin/primes", "VERSION"] }"#,
            r#""point_of_no_return""#,
            r#"{ load = "primes" }"#,
            r#"{ health = { service = "primes", timeout = "20s" } }"#,
        ],
    );
    let path = cluster.write_script("install.toml", &text)?;
    let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
    ensure!(
        status::rollout_state(&run.status)? == "succeeded",
        "installing 1.0.0 did not succeed: {:#}\n{}",
        run.status,
        run.output.stderr
    );
    for port in ports {
        primes::wait_stats(*port, "primes 1.0.0 to serve", SERVE_TIMEOUT, |s| {
            s["code"] == 1
        })?;
    }
    Ok(())
}

/// The hot upgrade: stage, barrier, point of no return, suspend / load / code_change (the
/// handover) / resume, health, a last barrier.
fn hot_upgrade_steps(code_change_timeout: &str) -> Vec<String> {
    vec![
        r#"{ load_object_code = ["VERSION"] }"#.to_string(),
        r#"{ sync_nodes = "staged" }"#.to_string(),
        r#""point_of_no_return""#.to_string(),
        r#"{ suspend = ["primes"] }"#.to_string(),
        r#"{ load = "primes" }"#.to_string(),
        format!(
            r#"{{ code_change = {{ service = "primes", extra = "from-test", timeout = "{code_change_timeout}" }} }}"#
        ),
        r#"{ resume = ["primes"] }"#.to_string(),
        r#"{ health = { service = "primes", timeout = "15s" } }"#.to_string(),
        r#"{ sync_nodes = { id = "upgraded", timeout = "20s" } }"#.to_string(),
    ]
}

fn as_strs(steps: &[String]) -> Vec<&str> {
    steps.iter().map(String::as_str).collect()
}

/// The rollout's status once every node reports a settled state.
fn settled(cluster: &Cluster, id: &str) -> anyhow::Result<Value> {
    cluster.wait_status(
        id,
        "every node to settle",
        Duration::from_secs(30),
        |status| {
            status::node_states(status).iter().all(|(_, state)| {
                ["aborted", "rolled_back", "committed", "failed"].contains(&state.as_str())
            })
        },
    )
}

/// Per node: the suspend window, from `suspend`'s start to `resume`'s end, as the sum of the
/// agent-measured durations of suspend, load, code_change and resume (ms).
fn suspend_windows(cluster: &Cluster, id: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let output = cluster
        .hotroll(&["rollout", "events", id, "--output", "json"])?
        .ok()?;
    let mut windows = std::collections::BTreeMap::<String, u64>::new();
    for line in output.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).with_context(|| format!("event {line}"))?;
        let instruction = event["instruction"].as_str().unwrap_or_default();
        if event["kind"] == "step"
            && event["phase"] == "succeeded"
            && ["suspend", "load", "code_change", "resume"].contains(&instruction)
            && let Some(node) = event["node"].as_str()
        {
            *windows.entry(node.to_string()).or_default() +=
                event["duration_ms"].as_u64().unwrap_or(0);
        }
    }
    Ok(windows.into_iter().collect())
}

fn ensure_clean(node: &str, report: &LoadReport) -> anyhow::Result<()> {
    ensure!(
        report.failed() == 0 && report.refused() == 0,
        "{node}: {} failed and {} refused requests out of {}: {:?}",
        report.failed(),
        report.refused(),
        report.count(),
        report.errors
    );
    Ok(())
}

/// 1. Three nodes (a canary, then a wave of two) move from 1.0.0 to 2.0.0 by handover while
///    two clients per node keep asking for the stats: at least 2,000 requests per node span
///    the upgrade; none fails, none is refused; every node serves v2 (the new strategy, the
///    new field, state format 2) with every prime it had mined before.
#[test]
fn hot_upgrade_under_load_loses_no_request_and_no_prime() -> anyhow::Result<()> {
    const NODES: usize = 3;
    let (options, ports) = fleet(NODES)?;
    Cluster::start(NODES, options)?.run(|cluster| {
        install(cluster, &ports)?;
        for port in &ports {
            primes::wait_stats(*port, "some primes mined", SERVE_TIMEOUT, |s| {
                s["count"].as_u64().unwrap_or(0) >= 1_000
            })?;
        }
        let loads: Vec<LoadLoop> = ports
            .iter()
            .map(|port| LoadLoop::start(*port, 2, Duration::from_secs(120), 50_000))
            .collect();
        // Steady state first.
        hotroll_tests::poll(
            "steady-state requests",
            SERVE_TIMEOUT,
            Duration::from_millis(20),
            || Ok(loads.iter().all(|l| l.snapshot().count() >= 400).then_some(())),
        )?;
        let before: Vec<Vec<u64>> = ports
            .iter()
            .map(|p| all_primes(*p))
            .collect::<anyhow::Result<_>>()?;
        let upgrade_started = loads.iter().map(LoadLoop::elapsed).collect::<Vec<_>>();

        let text = script(
            "1.0.0",
            "2.0.0",
            &[("VERSION", artifact_file(cluster, "2.0.0", "VERSION", "2.0.0")?)],
            "canary = 1\nmax_in_flight = 2\nmax_failures = 0\non_failure = \"rollback_all\"\nstep_timeout = \"30s\"\nbarrier_timeout = \"30s\"",
            &as_strs(&hot_upgrade_steps("15s")),
        );
        let path = cluster.write_script("upgrade.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "the upgrade did not succeed: {:#}\n{}",
            run.status,
            run.output.stderr
        );
        let upgrade_ended = loads.iter().map(LoadLoop::elapsed).collect::<Vec<_>>();

        // Until every node's clients sent their share, with plenty of answers from v2.
        hotroll_tests::poll(
            "every node's clients to span the upgrade",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || {
                Ok(loads
                    .iter()
                    .all(|l| {
                        let r = l.snapshot();
                        r.count() >= REQUESTS_PER_NODE && r.by_code(2) >= 200
                    })
                    .then_some(()))
            },
        )?;
        let reports: Vec<LoadReport> = loads
            .into_iter()
            .map(LoadLoop::finish)
            .collect::<anyhow::Result<_>>()?;

        let windows = suspend_windows(cluster, &run.id)?;
        for (i, (port, report)) in ports.iter().zip(&reports).enumerate() {
            let node = node_name(i + 1);
            ensure_clean(&node, report)?;
            ensure!(
                report.by_code(1) > 0 && report.by_code(2) > 0,
                "{node}: the clients did not span the upgrade ({} answers from v1, {} from v2)",
                report.by_code(1),
                report.by_code(2)
            );
            let stats = primes::stats(*port)?;
            ensure!(
                stats["code"] == 2
                    && stats["version"] == "2.0.0"
                    && stats["strategy"] == "segmented sieve"
                    && stats["state_format"] == 2
                    && stats["twin_primes"].as_u64().is_some()
                    && stats["handed_over_from"]["version"] == "1.0.0"
                    && stats["handed_over_from"]["state_format"] == 1
                    && stats["handed_over_from"]["extra"] == "from-test",
                "{node}: not v2 with a handed-over state: {stats}"
            );
            let after = all_primes(*port)?;
            ensure_kept(&before[i], &after).with_context(|| node.to_string())?;
            ensure!(current_release(cluster, i + 1, APP).as_deref() == Some("2.0.0"));
            ensure!(permanent_release(cluster, i + 1, APP).as_deref() == Some("2.0.0"));

            let steady = report.percentiles(Duration::ZERO, upgrade_started[i]);
            let during = report.percentiles(upgrade_started[i], upgrade_ended[i]);
            let window = windows
                .iter()
                .find(|(n, _)| n == &node)
                .map_or(0, |(_, ms)| *ms);
            eprintln!(
                "{node}: {} requests ({} v1, {} v2), 0 failed, 0 refused; primes {} before -> {} \
                 after; suspend window {window} ms\n  steady: {}\n  during the upgrade: {}",
                report.count(),
                report.by_code(1),
                report.by_code(2),
                before[i].len(),
                after.len(),
                steady.map_or("-".to_string(), |p| p.to_string()),
                during.map_or("-".to_string(), |p| p.to_string()),
            );
        }
        Ok(())
    })
}

/// Fails unless node 1's rollout ended rolled back with the old instance (same pid, same
/// code) still serving every prime it had.
fn ensure_rolled_back_with_state(
    cluster: &Cluster,
    id: &str,
    port: u16,
    old: &Value,
    before: &[u64],
    error_contains: &str,
) -> anyhow::Result<()> {
    let status = settled(cluster, id)?;
    let node = node_name(1);
    ensure!(
        status::node_state(&status, &node)? == "rolled_back",
        "{node} was not rolled back: {status:#}"
    );
    let error = status::node_error(&status, &node)?.unwrap_or_default();
    ensure!(
        error.contains(error_contains) && error.contains("carries on with its state"),
        "{node}'s error does not say why: {error}"
    );
    let stats = primes::stats(port)?;
    ensure!(
        stats["pid"] == old["pid"] && stats["code"] == old["code"],
        "the old instance does not serve any more: before {old}, now {stats}"
    );
    let after = all_primes(port)?;
    ensure_kept(before, &after)?;
    // It mines again after the aborted export.
    primes::wait_stats(port, "the old instance to mine again", SERVE_TIMEOUT, |s| {
        s["count"].as_u64().unwrap_or(0) > after.len() as u64
    })?;
    ensure!(current_release(cluster, 1, APP).as_deref() == Some("1.0.0"));
    ensure!(permanent_release(cluster, 1, APP).as_deref() == Some("1.0.0"));
    Ok(())
}

/// 2. 1.0.0 -> 3.0.0, whose code_change fails (it refuses every state format): the new
///    instance exits, the old one (same pid) carries on with every prime; the node is rolled
///    back to 1.0.0 and no client saw an error.
#[test]
fn failing_code_change_keeps_the_old_instance_and_its_state() -> anyhow::Result<()> {
    let (options, ports) = fleet(1)?;
    let port = ports[0];
    Cluster::start(1, options)?.run(|cluster| {
        install(cluster, &ports)?;
        let load = LoadLoop::start(port, 2, Duration::from_secs(90), 20_000);
        let old = primes::stats(port)?;
        let before = all_primes(port)?;
        let text = script(
            "1.0.0",
            "3.0.0",
            &[(
                "VERSION",
                artifact_file(cluster, "3.0.0", "VERSION", "3.0.0")?,
            )],
            POLICY,
            &as_strs(&hot_upgrade_steps("15s")),
        );
        let path = cluster.write_script("upgrade-3.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "rolled_back",
            "expected rolled_back: {:#}",
            run.status
        );
        ensure_rolled_back_with_state(
            cluster,
            &run.id,
            port,
            &old,
            &before,
            "v3 code_change: state format 1 cannot be converted",
        )?;
        let report = load.finish()?;
        ensure_clean("node-1", &report)?;
        ensure!(report.by_code(3) == 0, "v3 answered requests");
        eprintln!(
            "failing code_change: {} requests, 0 failed, 0 refused; pid {} kept {} primes",
            report.count(),
            old["pid"],
            before.len()
        );
        Ok(())
    })
}

/// 3. 1.0.0 -> a 2.0.0 whose instance never becomes ready (`FAULT` = never-ready): the
///    code_change times out, the new instance is stopped, the old one carries on with its
///    state; the node is rolled back, and clients (queued meanwhile) saw no error.
#[test]
fn never_ready_new_instance_times_out_and_the_old_one_serves_on() -> anyhow::Result<()> {
    let (options, ports) = fleet(1)?;
    let port = ports[0];
    Cluster::start(1, options)?.run(|cluster| {
        install(cluster, &ports)?;
        let load = LoadLoop::start(port, 2, Duration::from_secs(90), 20_000);
        let old = primes::stats(port)?;
        let before = all_primes(port)?;
        let steps: Vec<String> = hot_upgrade_steps("3s")
            .into_iter()
            .map(|s| s.replace(r#"["VERSION"]"#, r#"["VERSION", "FAULT"]"#))
            .collect();
        let text = script(
            "1.0.0",
            "2.0.0",
            &[
                ("VERSION", artifact_file(cluster, "2.0.0", "VERSION", "2.0.0")?),
                ("FAULT", artifact_file(cluster, "2.0.0", "FAULT", "never-ready")?),
            ],
            POLICY,
            &as_strs(&steps),
        );
        let path = cluster.write_script("upgrade-never-ready.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "rolled_back",
            "expected rolled_back: {:#}",
            run.status
        );
        ensure_rolled_back_with_state(cluster, &run.id, port, &old, &before, "was not ready")?;
        let report = load.finish()?;
        ensure_clean("node-1", &report)?;
        let slowest = report
            .percentiles(Duration::ZERO, Duration::MAX)
            .map(|p| p.max)
            .unwrap_or_default();
        eprintln!(
            "never-ready: {} requests, 0 failed, 0 refused; the slowest waited {slowest:?} in the listen queue",
            report.count()
        );
        Ok(())
    })
}

/// 4. 1.0.0 -> 2.0.0 succeeds on the node, then a later step fails: the default rollback hands
///    the state back down to 1.0.0 (v1's code_change reads v2's format), so the primes mined
///    under both versions survive the rollback too.
#[test]
fn rollback_after_a_handover_hands_the_state_back_down() -> anyhow::Result<()> {
    let (options, ports) = fleet(1)?;
    let port = ports[0];
    Cluster::start(1, options)?.run(|cluster| {
        install(cluster, &ports)?;
        let load = LoadLoop::start(port, 1, Duration::from_secs(90), 20_000);
        let before = all_primes(port)?;
        let mut steps = hot_upgrade_steps("15s");
        // After the handover and health: a failing step.
        steps.insert(8, r#"{ apply = "fail" }"#.to_string());
        let text = script(
            "1.0.0",
            "2.0.0",
            &[(
                "VERSION",
                artifact_file(cluster, "2.0.0", "VERSION", "2.0.0")?,
            )],
            POLICY,
            &as_strs(&steps),
        );
        let path = cluster.write_script("upgrade-then-fail.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "rolled_back",
            "expected rolled_back: {:#}",
            run.status
        );
        let status = settled(cluster, &run.id)?;
        ensure!(status::node_state(&status, "node-1")? == "rolled_back");
        let stats =
            primes::wait_stats(port, "v1 to serve again", SERVE_TIMEOUT, |s| s["code"] == 1)?;
        ensure!(
            stats["handed_over_from"]["version"] == "2.0.0"
                && stats["handed_over_from"]["mode"] == "down"
                && stats["handed_over_from"]["state_format"] == 2,
            "1.0.0 did not get its state back from 2.0.0: {stats}"
        );
        ensure_kept(&before, &all_primes(port)?)?;
        let report = load.finish()?;
        ensure_clean("node-1", &report)?;
        ensure!(
            report.by_code(2) > 0,
            "v2 never answered: {} requests",
            report.count()
        );
        ensure!(current_release(cluster, 1, APP).as_deref() == Some("1.0.0"));
        Ok(())
    })
}

/// 5. `hotroll demo` (the README's first command) runs its whole story — a fleet of primes
///    v1, the v1 -> v2 hot upgrade under load, the failing v2 -> v3 — and exits 0.
#[test]
fn hotroll_demo_exits_0() -> anyhow::Result<()> {
    let bins = hotroll_tests::binaries()?;
    // The demo finds primes next to its own executable.
    primes_binary()?;
    let mut command = std::process::Command::new(&bins.hotroll);
    command.args(["demo", "--nodes", "3"]);
    let output = run_command(command, Duration::from_secs(240))?;
    eprintln!("{}", output.stdout);
    ensure!(
        output.code == Some(0),
        "hotroll demo exited {:?}\nstdout:\n{}\nstderr:\n{}",
        output.code,
        output.stdout,
        output.stderr
    );
    for expected in [
        "PRIMES before -> after",
        "0 failed",
        "rolled back",
        "everything behaved as described",
    ] {
        ensure!(
            output.stdout.contains(expected),
            "the demo's output lacks {expected:?}:\n{}",
            output.stdout
        );
    }
    Ok(())
}
