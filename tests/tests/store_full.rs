//! The coordinator's disk fills up during a rollout (a real `hotroll serve` whose data dir is a
//! 4 MiB tmpfs, three real agents): the rollout holds — no node runs its step after the point
//! of no return while the store cannot record the decision, and status says why — then, once
//! space is freed, it succeeds, every node ran that step exactly once, and the coordinator's
//! history agrees with each node's journal, also after the coordinator restarts.
//!
//! Needs root (the tmpfs is mounted in a private mount namespace, see
//! `hotroll_tests::small_disk`); without it the test fails and says so.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_agent::journal::Journal;
use hotroll_agent::report::{NodeState as AgentState, Phase};
use hotroll_tests::scripts::{gate, gate_hook, mark, open_gate, script};
use hotroll_tests::small_disk::SmallDisk;
use hotroll_tests::{Cluster, ClusterOptions, Hook, node_name, status};
use serde_json::Value;

const NODES: usize = 3;
/// Instructions each node runs before the barrier: node-3 runs them with the disk full, so the
/// coordinator's store must grow (new pages) to record them.
const PRE_STEPS: usize = 150;

fn events(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON event: {l}")))
        .collect()
}

fn history(cluster: &Cluster, id: &str) -> anyhow::Result<Vec<Value>> {
    events(
        &cluster
            .hotroll(&["rollout", "events", id, "--output", "json"])?
            .ok()?
            .stdout,
    )
}

/// How many times `node` recorded step `step` with `phase` in the history.
fn step_count(history: &[Value], node: &str, step: u64, phase: &str) -> usize {
    history
        .iter()
        .filter(|e| {
            e["kind"] == "step" && e["node"] == node && e["step"] == step && e["phase"] == phase
        })
        .count()
}

fn post_marks(cluster: &Cluster, i: usize) -> anyhow::Result<usize> {
    Ok(cluster
        .marks(i)?
        .iter()
        .filter(|m| m.label == "post")
        .count())
}

#[test]
fn a_full_disk_holds_the_rollout_until_space_is_freed() -> anyhow::Result<()> {
    let disk = SmallDisk::mount("4m")?;
    let options = ClusterOptions::default()
        .insecure()
        .coordinator_data_dir(disk.dir())
        .coordinator_wrapper(disk.wrapper())
        .hook("gate", gate_hook())
        .hook("mark", Hook::mark());
    Cluster::start(NODES, options)?.run(|cluster| {
        let mut up = vec![gate("fill")];
        up.extend((0..PRE_STEPS).map(|i| mark(&format!("pre-{i}"))));
        up.push(r#"{ sync_nodes = "b" }"#.to_string());
        up.push(r#""point_of_no_return""#.to_string());
        up.push(mark("post"));
        let up: Vec<&str> = up.iter().map(String::as_str).collect();
        let post_step = u64::try_from(PRE_STEPS + 3)?;
        let text = script(
            "demo",
            "barrier_timeout = \"300s\"\nstep_timeout = \"90s\"",
            &up,
            &[],
        );
        let path = cluster.write_script("full.toml", &text)?;
        let id = cluster.start_rollout(&path, &[])?;

        // node-1 and node-2 go through to the barrier and wait there for node-3.
        open_gate(cluster, 1, "fill")?;
        open_gate(cluster, 2, "fill")?;
        let barrier_step = u64::try_from(PRE_STEPS + 1)?;
        cluster.wait_status(
            &id,
            "two nodes at the barrier",
            Duration::from_secs(60),
            |s| {
                [1, 2].iter().all(|&i| {
                    status::node(s, &node_name(i)).is_ok_and(|n| n["step"] == barrier_step)
                })
            },
        )?;
        // Their arrival reaches the coordinator right after the step starts.
        std::thread::sleep(Duration::from_millis(500));
        let status = cluster.status(&id)?;
        ensure!(
            status.get("held_on_store").is_none(),
            "held before the disk is full: {status}"
        );

        // The disk fills while they wait; then node-3 runs its steps and joins the barrier.
        let filled = disk.fill()?;
        eprintln!("filled the coordinator's disk with {filled} bytes");
        open_gate(cluster, 3, "fill")?;
        let held = cluster.wait_status(
            &id,
            "the rollout holds on its store",
            Duration::from_secs(60),
            |s| s.get("held_on_store").is_some(),
        )?;
        let why = held["held_on_store"]["error"].as_str().unwrap_or_default();
        ensure!(
            why.contains("cannot store the rollout's step") && why.contains("No space left"),
            "held, but for another reason: {held}"
        );
        // The hold can lift for one step now and then with the disk still full: a retry after
        // the store reopened may find a page redb freed (CI saw `attempts=2` then a new hold
        // 6 ms later). So wait for the CLI to show it rather than read it once.
        let mut text = String::new();
        let shown = hotroll_tests::poll(
            "`rollout status` to say held",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                text = cluster.hotroll(&["rollout", "status", &id])?.ok()?.stdout;
                Ok(text
                    .contains("held: cannot store the rollout's step")
                    .then_some(()))
            },
        );
        ensure!(shown.is_ok(), "`rollout status` does not say held:\n{text}");

        // While the disk is full nothing after the point of no return runs.
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(100));
            for i in 1..=NODES {
                ensure!(
                    post_marks(cluster, i)? == 0,
                    "{} ran its post-PONR step while the store could not record the decision",
                    node_name(i)
                );
            }
        }
        let status = cluster.wait_status(
            &id,
            "the rollout still held with the disk full",
            Duration::from_secs(30),
            |s| s.get("held_on_store").is_some(),
        )?;
        ensure!(
            status::rollout_state(&status)? == "preparing",
            "the rollout left preparing with the disk still full: {status}"
        );

        disk.free()?;
        let done = cluster.wait_final(&id, Duration::from_secs(120))?;
        ensure!(
            status::rollout_state(&done)? == "succeeded",
            "after space was freed the rollout ended {done}"
        );
        ensure!(done.get("held_on_store").is_none(), "still held: {done}");
        let log = std::fs::read_to_string(cluster.coordinator().log_path())?;
        ensure!(
            log.contains("cannot store the rollout's step")
                && log.contains("the store took the held step"),
            "the coordinator's log does not tell the hold and its end"
        );

        let before_restart = history(cluster, &id)?;
        for i in 1..=NODES {
            let node = node_name(i);
            ensure!(
                post_marks(cluster, i)? == 1,
                "{node} ran its post-PONR step {} times",
                post_marks(cluster, i)?
            );
            ensure!(
                step_count(&before_restart, &node, post_step, "succeeded") == 1,
                "the history does not record {node}'s post-PONR step once"
            );
            ensure!(
                status::node_state(&done, &node)? == "committed",
                "{node}: {done}"
            );
        }

        // The store outlives the process: a restarted coordinator shows the same rollout.
        cluster.restart_coordinator()?;
        cluster.wait_all_connected(Duration::from_secs(30))?;
        let after = cluster.status(&id)?;
        ensure!(
            status::rollout_state(&after)? == "succeeded",
            "after a restart the coordinator shows {after}"
        );
        let after_restart = history(cluster, &id)?;
        ensure!(
            after_restart == before_restart,
            "the stored history changed across the restart"
        );

        // Every node's journal agrees with the coordinator: made permanent, nothing in progress.
        let mut journals = BTreeMap::new();
        for i in 1..=NODES {
            cluster.agent(i).kill()?;
            let journal = Journal::open(&cluster.agent_info(i).data_dir)?;
            let record = journal
                .get(&id)?
                .with_context(|| format!("{} has no journal record of {id}", node_name(i)))?;
            journals.insert(node_name(i), record);
        }
        for (node, record) in &journals {
            ensure!(
                record.phase == Phase::Done,
                "{node}: journal in progress: {record:?}"
            );
            ensure!(
                record.node_state == AgentState::Permanent,
                "{node}: the coordinator says committed, the journal {record:?}"
            );
            ensure!(
                status::node_state(&after, node)? == "committed",
                "{node}: the restarted coordinator says {after}"
            );
        }
        Ok(())
    })
}
