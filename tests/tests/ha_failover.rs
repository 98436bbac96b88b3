//! Issue 16 end to end: three coordinators in a group on a real 3-member etcd cluster, three
//! agents, rollouts with barriers before and after the point of no return; the leader is
//! SIGKILLed or SIGSTOPped in the middle, a standby takes over and the rollout ends where it
//! would have ended, every node on the whole release, the history without a gap.

use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::{Cluster, ClusterOptions, Hook, node_name, poll, status};
use serde_json::Value;

const NODES: usize = 3;
const COORDINATORS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(90);

fn mark(label: &str) -> String {
    format!(r#"{{ apply = {{ hook = "mark", args = ["{label}"] }} }}"#)
}

/// 1.0.0 -> 2.0.0: node-3's `gate` step waits until the cluster's `gate` file exists, before
/// the first barrier (`gate_before_ponr`) or after the point of no return.
fn script(gate_before_ponr: bool) -> String {
    let gate = r#"{ apply = "gate" }"#.to_string();
    let mut up = vec![r#"{ check = "ok" }"#.to_string(), mark("prepare")];
    if gate_before_ponr {
        up.push(gate.clone());
    }
    up.push(r#"{ sync_nodes = "staged" }"#.into());
    up.push(r#""point_of_no_return""#.into());
    up.push(mark("committed"));
    if !gate_before_ponr {
        up.push(gate);
    }
    up.push(r#"{ sync_nodes = "upgraded" }"#.into());
    up.push(mark("done"));
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("  {i},\n"))
            .collect::<String>()
    };
    format!(
        "app = \"demo\"\nfrom = \"1.0.0\"\nto = \"2.0.0\"\n\n\
         [rollout]\non_failure = \"rollback_all\"\nmax_failures = 0\n\
         barrier_timeout = \"60s\"\nstep_timeout = \"60s\"\n\n\
         [script]\nup = [\n{}]\ndown = [\n{}]\n",
        list(&up),
        list(&[mark("down")])
    )
}

fn options() -> ClusterOptions {
    ClusterOptions::default()
        .group(COORDINATORS)
        .session_grace("15s")
        .hook("mark", Hook::mark().timeout("5s"))
        .hook("ok", Hook::ok())
        .hook("gate", Hook::ok())
        .node_hook(
            NODES,
            "gate",
            Hook::sh("while [ ! -f {cluster_dir}/gate ]; do sleep 0.05; done").timeout("90s"),
        )
}

fn labels(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<String>> {
    Ok(cluster.marks(i)?.into_iter().map(|m| m.label).collect())
}

/// Wait until every node but the gated one has `label`, and the gated one has `gated_at`.
fn wait_marks(cluster: &Cluster, label: &str, gated_at: &str) -> anyhow::Result<()> {
    poll(
        &format!("nodes to reach `{label}` (node-{NODES} `{gated_at}`)"),
        TIMEOUT,
        Duration::from_millis(50),
        || {
            for i in 1..NODES {
                if !labels(cluster, i)?.iter().any(|l| l == label) {
                    return Ok(None);
                }
            }
            Ok(labels(cluster, NODES)?
                .iter()
                .any(|l| l == gated_at)
                .then_some(()))
        },
    )
}

fn history(cluster: &Cluster, id: &str) -> anyhow::Result<Vec<Value>> {
    let out = cluster
        .hotroll(&["rollout", "events", id, "--output", "json"])?
        .ok()?;
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON event: {l}")))
        .collect()
}

/// Every node committed and done once, none went down; the history's positions are 1..=n.
fn assert_whole_release(cluster: &Cluster, id: &str, run: &Value) -> anyhow::Result<()> {
    ensure!(
        status::rollout_state(run)? == "succeeded",
        "rollout is not succeeded: {run:#}"
    );
    for i in 1..=NODES {
        let labels = labels(cluster, i)?;
        for label in ["committed", "done"] {
            let count = labels.iter().filter(|l| *l == label).count();
            ensure!(
                count == 1,
                "{} ran `{label}` {count} times: {labels:?}",
                node_name(i)
            );
        }
        ensure!(
            !labels.iter().any(|l| l == "down"),
            "{} rolled back: {labels:?}",
            node_name(i)
        );
        let state = status::node_state(run, &node_name(i))?;
        ensure!(
            state == "committed" || state == "permanent" || state == "succeeded",
            "{} is {state}",
            node_name(i)
        );
    }
    let events = history(cluster, id)?;
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(!seqs.is_empty(), "no history: {events:?}");
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    ensure!(
        seqs == expected,
        "the history has a gap or a repeat: {seqs:?}"
    );
    Ok(())
}

fn killed_leader_case(gate_before_ponr: bool, label: &str, gated_at: &str) -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let leader = cluster.wait_group_leader(None, TIMEOUT)?;
        let script = cluster.write_script("up.toml", &script(gate_before_ponr))?;
        let id = cluster.start_rollout(&script, &[])?;
        wait_marks(cluster, label, gated_at)?;
        cluster.group_member(leader).kill()?;
        let next = cluster.wait_group_leader(Some(leader), TIMEOUT)?;
        ensure!(next != leader);
        std::fs::write(cluster.dir().join("gate"), "open")?;
        let run = cluster.wait_final(&id, TIMEOUT)?;
        assert_whole_release(cluster, &id, &run)
    })
}

/// 1a. The leader is SIGKILLed while two nodes wait at the barrier before the point of no
///     return (the third is still staging): a standby takes over and the rollout succeeds.
#[test]
fn leader_killed_while_nodes_wait_at_the_barrier_before_the_point_of_no_return()
-> anyhow::Result<()> {
    killed_leader_case(true, "prepare", "prepare")
}

/// 1b. The leader is SIGKILLed after the commit decision, in the middle of the wave (two nodes
///     past their post-commit step, the third still in it): the rollout succeeds.
#[test]
fn leader_killed_after_the_commit_decision_in_the_middle_of_a_wave() -> anyhow::Result<()> {
    killed_leader_case(false, "committed", "committed")
}

/// 2. The leader is SIGSTOPped past its lease; another takes over and moves the rollout on;
///    SIGCONT: the old leader steps down (its writes are refused by etcd), and nothing it did
///    after losing the lease shows: the history has no gap or repeat, every node ran each step
///    once.
#[test]
fn a_leader_paused_past_its_lease_steps_down_and_changes_nothing() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let leader = cluster.wait_group_leader(None, TIMEOUT)?;
        let script = cluster.write_script("up.toml", &script(true))?;
        let id = cluster.start_rollout(&script, &[])?;
        wait_marks(cluster, "prepare", "prepare")?;
        cluster.group_member(leader).stop()?;
        let next = cluster.wait_group_leader(Some(leader), TIMEOUT)?;
        std::fs::write(cluster.dir().join("gate"), "open")?;
        let run = cluster.wait_final(&id, TIMEOUT)?;
        cluster.group_member(leader).cont()?;
        // The old leader wakes up deposed and says so.
        poll(
            "the paused leader to step down",
            TIMEOUT,
            Duration::from_millis(100),
            || {
                let log = std::fs::read_to_string(cluster.group_member(leader).log_path())?;
                Ok(log.contains("leadership lost").then_some(()))
            },
        )?;
        ensure!(
            cluster.group_leader()? == Some(next),
            "the leader changed again after the old one woke"
        );
        // Give the old one time to do anything it still would, then check nothing changed.
        std::thread::sleep(Duration::from_secs(2));
        let after = cluster.status(&id)?;
        ensure!(
            status::rollout_state(&after)? == "succeeded",
            "the rollout changed after the old leader woke: {after:#}"
        );
        assert_whole_release(cluster, &id, &run)
    })
}

/// 3a. One etcd member SIGKILLed mid-rollout: nothing changes for the user.
#[test]
fn one_etcd_member_killed_mid_rollout_changes_nothing() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let script = cluster.write_script("up.toml", &script(true))?;
        let id = cluster.start_rollout(&script, &[])?;
        wait_marks(cluster, "prepare", "prepare")?;
        let leader = cluster.group_leader()?;
        cluster.etcd().context("no etcd")?.member(0).kill()?;
        std::fs::write(cluster.dir().join("gate"), "open")?;
        let run = cluster.wait_final(&id, TIMEOUT)?;
        ensure!(
            cluster.group_leader()? == leader,
            "the leader changed over one dead etcd member"
        );
        assert_whole_release(cluster, &id, &run)
    })
}

/// 3b. etcd loses its quorum while nodes wait at the barrier before the point of no return:
///     no decision is taken (nobody passes the barrier, no command goes out) while it is lost;
///     once it is back the rollout continues and succeeds.
#[test]
fn with_etcd_quorum_lost_the_rollout_holds_and_continues_once_it_is_back() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let script = cluster.write_script("up.toml", &script(true))?;
        let id = cluster.start_rollout(&script, &[])?;
        wait_marks(cluster, "prepare", "prepare")?;
        {
            let etcd = cluster.etcd().context("no etcd")?;
            etcd.member(0).stop()?;
            etcd.member(1).stop()?;
        }
        // The last node reaches the barrier while etcd cannot store that it did.
        std::fs::write(cluster.dir().join("gate"), "open")?;
        std::thread::sleep(Duration::from_secs(6));
        for i in 1..=NODES {
            let labels = labels(cluster, i)?;
            ensure!(
                !labels.iter().any(|l| l == "committed"),
                "{} went past the point of no return without a quorum: {labels:?}",
                node_name(i)
            );
        }
        {
            let etcd = cluster.etcd().context("no etcd")?;
            etcd.member(0).cont()?;
            etcd.member(1).cont()?;
        }
        let run = cluster.wait_final(&id, TIMEOUT)?;
        assert_whole_release(cluster, &id, &run)
    })
}

/// 4. `hotroll rollout watch` and the CLI pointed at the group (the first URL is the leader that
///    gets killed) follow the new leader: the watch sees every event of the history exactly once,
///    in order, across the failover.
#[test]
fn a_watch_survives_a_failover_without_missing_or_repeating_an_event() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let leader = cluster.wait_group_leader(None, TIMEOUT)?;
        let script = cluster.write_script("up.toml", &script(true))?;
        let id = cluster.start_rollout(&script, &[])?;
        let watch = hotroll_tests::background::Background::hotroll(
            cluster,
            &["rollout", "watch", &id, "--output", "json"],
        )?;
        wait_marks(cluster, "prepare", "prepare")?;
        cluster.group_member(leader).kill()?;
        cluster.wait_group_leader(Some(leader), TIMEOUT)?;
        std::fs::write(cluster.dir().join("gate"), "open")?;
        let run = cluster.wait_final(&id, TIMEOUT)?;
        let watched = watch.wait(TIMEOUT)?;
        ensure!(
            watched.code == Some(0),
            "the watch exited {:?}: {}",
            watched.code,
            watched.stderr
        );
        let seen: Vec<u64> = watched
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Value>(l).map(|e| e["seq"].as_u64().unwrap_or(0)))
            .collect::<Result<_, _>>()?;
        let stored: Vec<u64> = history(cluster, &id)?
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        ensure!(
            seen == stored,
            "the watch saw {seen:?}, the history is {stored:?}"
        );
        assert_whole_release(cluster, &id, &run)
    })
}
