//! End-to-end tests of issue 3 ("Rollout core"): a real coordinator and three real agents per
//! test, hooks that write marker files, outcomes read from `hotroll rollout status`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hotroll_tests::{Cluster, ClusterOptions, Hook, node_name, poll, status};

const NODES: usize = 3;
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// An upgrade script of app `demo` 1.0.0 -> 2.0.0: `rollout` is the body of `[rollout]`, `up`
/// and `down` are instructions written inline (TOML).
fn script(rollout: &str, up: &[&str], down: &[&str]) -> String {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("  {i},\n"))
            .collect::<String>()
    };
    let (up, down) = (list(up), list(down));
    format!(
        "app = \"demo\"\nfrom = \"1.0.0\"\nto = \"2.0.0\"\n\n\
         [rollout]\n{rollout}\n\n\
         [script]\nup = [\n{up}]\ndown = [\n{down}]\n"
    )
}

/// The body of `[rollout]`: failure policy, budget, barrier timeout, a 10 s step timeout.
fn policy(on_failure: &str, max_failures: u32, barrier_timeout: &str) -> String {
    format!(
        "on_failure = \"{on_failure}\"\nmax_failures = {max_failures}\n\
         barrier_timeout = \"{barrier_timeout}\"\nstep_timeout = \"10s\""
    )
}

fn mark(label: &str) -> String {
    format!(r#"{{ apply = {{ hook = "mark", args = ["{label}"] }} }}"#)
}

/// Hooks every test uses: `mark`, a passing check `ok`, and `maybe_fail` (passes unless a test
/// overrides it on one node).
fn options() -> ClusterOptions {
    ClusterOptions::default()
        .hook("mark", Hook::mark().timeout("5s"))
        .hook("ok", Hook::ok())
        .hook("maybe_fail", Hook::ok())
}

fn all_nodes() -> Vec<String> {
    (1..=NODES).map(node_name).collect()
}

/// Node `i`'s mark labelled `label`, which must exist.
fn mark_ns(cluster: &Cluster, i: usize, label: &str) -> anyhow::Result<u128> {
    cluster.mark_time(i, label)?.with_context(|| {
        format!(
            "{} has no `{label}` mark: {:?}",
            node_name(i),
            cluster.marks(i)
        )
    })
}

fn labels(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<String>> {
    Ok(cluster.marks(i)?.into_iter().map(|m| m.label).collect())
}

fn assert_node_states(status: &serde_json::Value, expected: &[(&str, &str)]) -> anyhow::Result<()> {
    for (name, state) in expected {
        let actual = status::node_state(status, name)?;
        ensure!(
            actual == *state,
            "node {name} is `{actual}`, expected `{state}`; status: {status:#}"
        );
    }
    Ok(())
}

fn assert_every_node(status: &serde_json::Value, state: &str) -> anyhow::Result<()> {
    let names = all_nodes();
    let expected: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), state)).collect();
    assert_node_states(status, &expected)
}

fn assert_rollout(
    run: &hotroll_tests::WaitedRollout,
    state: &str,
    code: i32,
) -> anyhow::Result<()> {
    let actual = status::rollout_state(&run.status)?;
    ensure!(
        actual == state,
        "rollout is `{actual}`, expected `{state}`; status: {:#}\nstderr: {}",
        run.status,
        run.output.stderr
    );
    ensure!(
        run.code == Some(code),
        "`rollout start --wait` exited {:?}, expected {code}; stderr: {}",
        run.code,
        run.output.stderr
    );
    Ok(())
}

/// 1. Two barriers and the point of no return on three nodes: succeeds, and no node passed a
///    barrier before every node had arrived at it. Arrivals are staggered (a per-node delay hook
///    right before the "before" mark), so a barrier that let early nodes through would show.
#[test]
fn barriers_hold_every_node_until_all_arrive() -> anyhow::Result<()> {
    Cluster::start(
        NODES,
        options()
            .hook("delay_b1", Hook::ok())
            .hook("delay_b2", Hook::ok())
            .node_hook(2, "delay_b1", Hook::sh("sleep 0.3"))
            .node_hook(3, "delay_b1", Hook::sh("sleep 0.6"))
            .node_hook(1, "delay_b2", Hook::sh("sleep 0.6")),
    )?
    .run(|cluster| {
        let text = script(
            &policy("rollback_node", 0, "10s"),
            &[
                r#"{ check = "ok" }"#,
                r#"{ apply = "delay_b1" }"#,
                &mark("before-b1"),
                r#"{ sync_nodes = "b1" }"#,
                &mark("after-b1"),
                r#""point_of_no_return""#,
                r#"{ apply = "delay_b2" }"#,
                &mark("before-b2"),
                r#"{ sync_nodes = "b2" }"#,
                &mark("after-b2"),
                r#"{ apply = { hook = "maybe_fail" } }"#,
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("barriers.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "succeeded", 0)?;
        assert_every_node(&run.status, "committed")?;

        for i in 1..=NODES {
            ensure!(
                labels(cluster, i)? == ["before-b1", "after-b1", "before-b2", "after-b2"],
                "{} ran {:?}",
                node_name(i),
                labels(cluster, i)?
            );
        }
        for barrier in ["b1", "b2"] {
            let mut last_arrival = 0;
            let mut first_release = u128::MAX;
            for i in 1..=NODES {
                last_arrival = last_arrival.max(mark_ns(cluster, i, &format!("before-{barrier}"))?);
                first_release =
                    first_release.min(mark_ns(cluster, i, &format!("after-{barrier}"))?);
            }
            ensure!(
                first_release > last_arrival,
                "a node passed barrier {barrier} {} ms before the last node arrived",
                (last_arrival - first_release) as f64 / 1e6
            );
        }
        Ok(())
    })
}

/// 2. A check fails on one node before the point of no return: every node aborts and nothing
///    after the point of no return runs anywhere.
#[test]
fn failed_check_aborts_every_node() -> anyhow::Result<()> {
    Cluster::start(NODES, options().node_hook(2, "ok", Hook::fail()))?.run(|cluster| {
        let text = script(
            &policy("rollback_node", 1, "10s"),
            &[
                &mark("prepare"),
                r#"{ check = "ok" }"#,
                r#"{ sync_nodes = "b1" }"#,
                r#""point_of_no_return""#,
                &mark("committed"),
                r#"{ sync_nodes = "b2" }"#,
                &mark("done"),
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("check-fails.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "aborted", 3)?;
        assert_every_node(&run.status, "aborted")?;
        ensure!(
            status::node_error(&run.status, "node-2")?.is_some(),
            "node-2's failed check left no error: {:#}",
            run.status
        );
        for i in 1..=NODES {
            let ran = labels(cluster, i)?;
            ensure!(
                ran.iter().all(|l| l == "prepare"),
                "{} ran hooks after the point of no return (or its rollback): {ran:?}",
                node_name(i)
            );
        }
        Ok(())
    })
}

/// Script of tests 3 and 4: `maybe_fail` fails after the point of no return on node-2 only.
fn failing_after_ponr_script(on_failure: &str) -> String {
    script(
        &policy(on_failure, 1, "10s"),
        &[
            r#"{ check = "ok" }"#,
            &mark("prepare"),
            r#"{ sync_nodes = "b1" }"#,
            r#""point_of_no_return""#,
            &mark("committed"),
            r#"{ sync_nodes = "b2" }"#,
            r#"{ apply = { hook = "maybe_fail" } }"#,
            &mark("done"),
        ],
        &[&mark("down")],
    )
}

/// 3. `apply` fails after the point of no return on one node under `rollback_node`: that node
///    runs its `down` list and ends `rolled_back`, the others stay `committed`.
#[test]
fn failure_after_ponr_rolls_back_that_node() -> anyhow::Result<()> {
    Cluster::start(NODES, options().node_hook(2, "maybe_fail", Hook::fail()))?.run(|cluster| {
        let path = cluster.write_script(
            "rollback-node.toml",
            &failing_after_ponr_script("rollback_node"),
        )?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "partially_rolled_back", 3)?;
        ensure!(
            run.status["failures"] == 1,
            "the failure was not counted against the budget: {:#}",
            run.status
        );
        assert_node_states(
            &run.status,
            &[
                ("node-1", "committed"),
                ("node-2", "rolled_back"),
                ("node-3", "committed"),
            ],
        )?;
        ensure!(
            labels(cluster, 2)? == ["prepare", "committed", "down"],
            "node-2 ran {:?}, expected its down list after the failure",
            labels(cluster, 2)?
        );
        for i in [1, 3] {
            ensure!(
                labels(cluster, i)? == ["prepare", "committed", "done"],
                "{} ran {:?}",
                node_name(i),
                labels(cluster, i)?
            );
        }
        Ok(())
    })
}

/// 4. The same failure under `rollback_all`: every node rolls back (runs its `down` list).
#[test]
fn failure_after_ponr_rolls_back_every_node() -> anyhow::Result<()> {
    Cluster::start(NODES, options().node_hook(2, "maybe_fail", Hook::fail()))?.run(|cluster| {
        let path = cluster.write_script(
            "rollback-all.toml",
            &failing_after_ponr_script("rollback_all"),
        )?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "rolled_back", 3)?;
        assert_every_node(&run.status, "rolled_back")?;
        for i in 1..=NODES {
            let ran = labels(cluster, i)?;
            ensure!(
                ran.first().map(String::as_str) == Some("prepare")
                    && ran.get(1).map(String::as_str) == Some("committed")
                    && ran.last().map(String::as_str) == Some("down")
                    && ran.iter().filter(|l| *l == "down").count() == 1,
                "{} ran {ran:?}, expected prepare, committed, [done,] down",
                node_name(i)
            );
        }
        Ok(())
    })
}

/// Shell code that waits (up to 30 s) for the file `go` in the node's directory.
const GO_WAIT: &str =
    r#"i=0; while [ ! -e "{node_dir}/go" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"#;

/// 5. One agent is SIGSTOPped while the others wait at a barrier before the point of no return:
///    the barrier fails at its deadline, the rollout aborts, the waiting agents report `aborted`,
///    and after SIGCONT the frozen agent reports `aborted` too. The session grace is longer than
///    the barrier timeout, so only the barrier deadline can end the prepare phase.
#[test]
fn frozen_agent_fails_the_barrier_at_its_deadline() -> anyhow::Result<()> {
    Cluster::start(
        NODES,
        options()
            .session_grace("60s")
            .hook("pre", Hook::mark())
            // node-3 marks, then stays in the hook until the test has frozen its agent and
            // says go, so it cannot arrive at the barrier (at most 30 s).
            .node_hook(3, "pre", Hook::mark_then(GO_WAIT)),
    )?
    .run(|cluster| {
        let text = script(
            &policy("rollback_node", 1, "3s"),
            &[
                r#"{ check = "ok" }"#,
                r#"{ apply = { hook = "pre", args = ["pre"] } }"#,
                r#"{ sync_nodes = "b1" }"#,
                r#""point_of_no_return""#,
                &mark("committed"),
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("frozen.toml", &text)?;
        let started = Instant::now();
        let id = cluster.start_rollout(&path, &[])?;
        poll(
            "node-3 to enter its `pre` hook",
            Duration::from_secs(15),
            Duration::from_millis(5),
            || cluster.mark_time(3, "pre"),
        )?;
        cluster.agent(3).stop()?;
        std::fs::write(cluster.agent_info(3).dir.join("go"), "")?;

        let status = cluster.wait_status(
            &id,
            "nodes 1 and 2 to abort",
            Duration::from_secs(30),
            |s| {
                ["node-1", "node-2"]
                    .iter()
                    .all(|n| status::node_state(s, n).is_ok_and(|st| st == "aborted"))
                    && status::rollout_state(s).is_ok_and(status::is_final)
            },
        )?;
        let waited = started.elapsed();
        ensure!(
            status::rollout_state(&status)? == "aborted",
            "rollout is not aborted: {status:#}"
        );
        ensure!(
            waited >= Duration::from_secs(2),
            "ended after {waited:?}, before the 3 s barrier deadline: {status:#}"
        );
        for i in [1, 2] {
            ensure!(
                labels(cluster, i)? == ["pre"],
                "{} ran {:?}",
                node_name(i),
                labels(cluster, i)?
            );
        }

        cluster.agent(3).cont()?;
        cluster.wait_status(
            &id,
            "node-3 to report aborted after SIGCONT",
            Duration::from_secs(30),
            |s| status::node_state(s, "node-3").is_ok_and(|st| st == "aborted"),
        )?;
        ensure!(
            labels(cluster, 3)? == ["pre"],
            "node-3 ran {:?}",
            labels(cluster, 3)?
        );
        let status = cluster.status(&id)?;
        ensure!(
            status::rollout_state(&status)? == "aborted",
            "rollout changed after node-3 came back: {status:#}"
        );

        // No agent hangs: all three are connected and run a fresh rollout to the end.
        cluster.wait_all_connected(Duration::from_secs(20))?;
        let text = script(
            "barrier_timeout = \"10s\"\nstep_timeout = \"10s\"",
            &[
                r#"{ check = "ok" }"#,
                r#"{ sync_nodes = "again" }"#,
                &mark("again"),
            ],
            &[],
        )
        .replace("app = \"demo\"", "app = \"demo-again\"");
        let path = cluster.write_script("again.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "succeeded", 0)?;
        for i in 1..=NODES {
            ensure!(
                cluster.mark_time(i, "again")?.is_some(),
                "{} did not run the second rollout",
                node_name(i)
            );
        }
        Ok(())
    })
}

/// 6. A script naming a hook no agent declares is refused by the agents before anything runs;
///    the error (naming the hook) shows in `rollout status`.
#[test]
fn undeclared_hook_is_refused_before_anything_runs() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let text = script(
            "barrier_timeout = \"10s\"\nstep_timeout = \"10s\"",
            &[
                r#"{ check = "ok" }"#,
                &mark("prepare"),
                r#"{ sync_nodes = "b1" }"#,
                r#""point_of_no_return""#,
                r#"{ apply = { hook = "no_such_hook_xyz", args = ["x"] } }"#,
                &mark("committed"),
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("undeclared.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "aborted", 3)?;
        // Every agent validates the script on its own and refuses it: `failed` (protocol.md,
        // "Running a script"), with the reason naming the hook.
        for name in all_nodes() {
            let state = status::node_state(&run.status, &name)?;
            ensure!(
                state == "failed",
                "{name} is `{state}` after refusing the script: {:#}",
                run.status
            );
            let error = status::node_error(&run.status, &name)?.unwrap_or_default();
            ensure!(
                error.contains("no_such_hook_xyz"),
                "{name}'s error does not name the undeclared hook: {:#}",
                run.status
            );
        }
        for i in 1..=NODES {
            ensure!(
                cluster.marks(i)?.is_empty(),
                "{} ran hooks of a refused script: {:?}",
                node_name(i),
                labels(cluster, i)?
            );
        }
        Ok(())
    })
}

/// 7. Canary 1 and `max_in_flight` 1 over three nodes: three waves cross the point of no return
///    one after the other, each after the previous one finished.
#[test]
fn canary_then_waves_commit_in_order() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let text = script(
            "canary = 1\nmax_in_flight = 1\nbarrier_timeout = \"10s\"\nstep_timeout = \"10s\"",
            &[
                r#"{ check = "ok" }"#,
                &mark("prepare"),
                r#"{ sync_nodes = "b1" }"#,
                r#""point_of_no_return""#,
                &mark("committed"),
                r#"{ sync_nodes = "b2" }"#,
                &mark("done"),
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("waves.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        assert_rollout(&run, "succeeded", 0)?;
        assert_every_node(&run.status, "committed")?;

        let mut by_wave = Vec::new();
        for i in 1..=NODES {
            by_wave.push((status::node_wave(&run.status, &node_name(i))?, i));
        }
        by_wave.sort();
        let waves: BTreeSet<u64> = by_wave.iter().map(|(w, _)| *w).collect();
        ensure!(
            waves == BTreeSet::from([1, 2, 3]),
            "expected waves 1, 2, 3, got {by_wave:?}: {:#}",
            run.status
        );
        let last_prepare = (1..=NODES)
            .map(|i| mark_ns(cluster, i, "prepare"))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or_default();
        for pair in by_wave.windows(2) {
            let ((w1, a), (w2, b)) = (pair[0], pair[1]);
            ensure!(
                mark_ns(cluster, a, "committed")? < mark_ns(cluster, b, "committed")?,
                "wave {w2} ({}) crossed the point of no return before wave {w1} ({})",
                node_name(b),
                node_name(a)
            );
            ensure!(
                mark_ns(cluster, a, "done")? < mark_ns(cluster, b, "committed")?,
                "wave {w2} ({}) started before wave {w1} ({}) finished",
                node_name(b),
                node_name(a)
            );
        }
        let (_, first) = by_wave[0];
        ensure!(
            last_prepare < mark_ns(cluster, first, "committed")?,
            "the canary committed before every node had prepared"
        );
        Ok(())
    })
}

/// Issue 16's report, with real processes: the coordinator restarts while one of four agents is
/// down (as one in its reconnect back-off is), and a rollout starts at once. The missing node
/// is a target: the rollout waits for it and succeeds on all four nodes. With
/// `--skip-unreachable` it is left out and named in the answer and the status.
#[test]
fn a_node_still_reconnecting_after_a_coordinator_restart_is_not_skipped() -> anyhow::Result<()> {
    const FLEET: usize = 4;
    Cluster::start(FLEET, options().session_grace("30s"))?.run(|cluster| {
        let text = script(
            &policy("rollback_node", 0, "30s"),
            &[
                &mark("pre"),
                r#"{ sync_nodes = "b" }"#,
                r#""point_of_no_return""#,
                &mark("post"),
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("reconnecting.toml", &text)?;
        let everyone: Vec<String> = (1..=FLEET).map(node_name).collect();

        cluster.agent(FLEET).kill()?;
        cluster.restart_coordinator()?;
        cluster.wait_connected(&everyone[..FLEET - 1], Duration::from_secs(30))?;
        let id = cluster.start_rollout(&path, &[])?;
        std::thread::sleep(Duration::from_millis(500));
        cluster.agent(FLEET).start()?;
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&status)? == "succeeded",
            "status: {status:#}"
        );
        for i in 1..=FLEET {
            ensure!(
                labels(cluster, i)? == ["pre", "post"],
                "{} ran {:?}",
                node_name(i),
                labels(cluster, i)?
            );
        }

        // The same with --skip-unreachable: the node is left out, and says so.
        cluster.agent(FLEET).kill()?;
        cluster.wait_connected(&everyone[..FLEET - 1], Duration::from_secs(30))?;
        let started = cluster
            .hotroll(&[
                "rollout",
                "start",
                &path.display().to_string(),
                "--skip-unreachable",
                "--output",
                "json",
            ])?
            .ok()?
            .json()?;
        let left_out = &started["left_out"];
        ensure!(
            left_out[0]["node"] == node_name(FLEET).as_str()
                && left_out.as_array().map(Vec::len) == Some(1),
            "answer: {started:#}"
        );
        let id = started["id"].as_str().context("no id")?.to_string();
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&status)? == "succeeded",
            "status: {status:#}"
        );
        ensure!(
            status["left_out"][0]["node"] == node_name(FLEET).as_str(),
            "status: {status:#}"
        );
        ensure!(
            status::node(&status, &node_name(FLEET)).is_err(),
            "the left-out node is in the status: {status:#}"
        );
        Ok(())
    })
}
