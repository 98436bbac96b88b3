//! Issue 16 end to end: three coordinators in a group on a real 3-member etcd cluster, three
//! agents, rollouts with barriers before and after the point of no return; the leader is
//! SIGKILLed or SIGSTOPped in the middle, a standby takes over and the rollout ends where it
//! would have ended, every node on the whole release, the history without a gap.

use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::{Cluster, ClusterOptions, Hook, crash, node_name, poll, services, status};
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

/// 1c. The leader SIGKILLs itself during make-permanent: at the fault point just after it
///     durably decided to tell `node-2` to make the release permanent (`node-1` may have been
///     told and confirmed already; `node-3` not yet). A standby takes over and the rollout
///     succeeds, every node made permanent once.
#[test]
fn leader_killed_during_make_permanent() -> anyhow::Result<()> {
    let options = crash::with_fault_points(options());
    Cluster::start(NODES, options)?.run(|cluster| {
        let leader = cluster.wait_group_leader(None, TIMEOUT)?;
        std::fs::write(cluster.dir().join("gate"), "open")?;
        crash::arm_coordinator(cluster, &format!("command make_permanent {}", node_name(2)))?;
        let script = cluster.write_script("up.toml", &script(false))?;
        let id = cluster.start_rollout(&script, &[])?;
        let crashed = poll(
            "the leader to crash at make-permanent",
            TIMEOUT,
            Duration::from_millis(20),
            || Ok(cluster.exited_group_member()),
        )?;
        ensure!(
            crashed == leader,
            "coordinator {crashed} crashed, but {leader} was the leader"
        );
        let next = cluster.wait_group_leader(Some(leader), TIMEOUT)?;
        ensure!(next != leader);
        let run = cluster.wait_final(&id, TIMEOUT)?;
        assert_whole_release(cluster, &id, &run)?;
        // Every node was told by one leader or the other, and confirmed.
        for i in 1..=NODES {
            let log = cluster.agent(i).log_path().to_path_buf();
            ensure!(
                !services::log_lines(&log, &["release made permanent", &id]).is_empty(),
                "{} did not make the release permanent",
                node_name(i)
            );
        }
        Ok(())
    })
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

fn count(cluster: &Cluster, i: usize, label: &str) -> anyhow::Result<usize> {
    Ok(labels(cluster, i)?.iter().filter(|l| *l == label).count())
}

/// 5. After a failover, a known node whose agent is still away when the rollout starts is a
///    target: the rollout waits for it and succeeds on every node. With `--skip-unreachable`
///    it is left out and named as such; a node that never comes back makes the rollout abort
///    before the point of no return.
#[test]
fn after_a_failover_a_node_still_away_is_waited_for_never_skipped() -> anyhow::Result<()> {
    let everyone: Vec<String> = (1..=NODES).map(node_name).collect();
    Cluster::start(NODES, options())?.run(|cluster| {
        std::fs::write(cluster.dir().join("gate"), "open")?;
        let script = cluster.write_script("up.toml", &script(true))?;
        let leader = cluster.wait_group_leader(None, TIMEOUT)?;
        cluster.agent(NODES).kill()?;
        cluster.group_member(leader).kill()?;
        cluster.wait_group_leader(Some(leader), TIMEOUT)?;
        cluster.wait_connected(&everyone[..NODES - 1], TIMEOUT)?;

        // Away when the rollout starts, back a moment later: waited for.
        let id = cluster.start_rollout(&script, &[])?;
        std::thread::sleep(Duration::from_millis(500));
        cluster.agent(NODES).start()?;
        let run = cluster.wait_final(&id, TIMEOUT)?;
        assert_whole_release(cluster, &id, &run)?;

        // Away, and skipped on request: named in the answer and the status.
        cluster.agent(NODES).kill()?;
        cluster.wait_connected(&everyone[..NODES - 1], TIMEOUT)?;
        let path = script.display().to_string();
        let started = cluster
            .hotroll(&[
                "rollout",
                "start",
                &path,
                "--skip-unreachable",
                "--output",
                "json",
            ])?
            .ok()?
            .json()?;
        ensure!(
            started["left_out"][0]["node"] == node_name(NODES).as_str()
                && started["left_out"].as_array().map(Vec::len) == Some(1),
            "answer: {started:#}"
        );
        let id = started["id"].as_str().context("no id")?.to_string();
        let run = cluster.wait_final(&id, TIMEOUT)?;
        ensure!(
            status::rollout_state(&run)? == "succeeded"
                && run["left_out"][0]["node"] == node_name(NODES).as_str(),
            "status: {run:#}"
        );

        // Away for good: the rollout aborts before the point of no return, nobody commits.
        let committed: Vec<usize> = (1..NODES)
            .map(|i| count(cluster, i, "committed"))
            .collect::<anyhow::Result<_>>()?;
        let id = cluster.start_rollout(&script, &[])?;
        let run = cluster.wait_final(&id, TIMEOUT)?;
        ensure!(
            status::rollout_state(&run)? == "aborted",
            "a node that never came back did not abort the rollout: {run:#}"
        );
        for i in 1..NODES {
            ensure!(
                count(cluster, i, "committed")? == committed[i - 1],
                "{} committed in an aborted rollout",
                node_name(i)
            );
        }
        Ok(())
    })
}

/// [`script`] with one artifact, `payload`, from `source`.
fn script_with_artifact(source: &std::path::Path) -> String {
    script(true).replacen(
        "[rollout]",
        &format!(
            "[[artifacts]]\nname = \"payload\"\nsource = \"{}\"\n\n[rollout]",
            source.display()
        ),
        1,
    )
}

/// Where coordinator `i` (0-based) keeps the artifact of `content`.
fn stored_artifact(cluster: &Cluster, i: usize, content: &[u8]) -> std::path::PathBuf {
    use sha2::Digest;
    cluster
        .dir()
        .join(format!("coordinator-{}", i + 1))
        .join("cas/sha256")
        .join(hex::encode(sha2::Sha256::digest(content)))
}

/// Artifacts are held by two coordinators before a rollout starts: the leader copies them to
/// every standby that answers, so a new leader has them. With no standby running the start is
/// refused, saying why, and nothing starts.
#[test]
fn a_rollout_starts_only_once_two_coordinators_hold_its_artifacts() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        std::fs::write(cluster.dir().join("gate"), "open")?;
        let leader = cluster.wait_group_leader(None, TIMEOUT)?;
        let first = b"payload of 2.0.0".to_vec();
        let source = cluster.dir().join("payload-1");
        std::fs::write(&source, &first)?;
        let path = cluster.write_script("first.toml", &script_with_artifact(&source))?;
        let id = cluster.start_rollout(&path, &[])?;
        let holders: Vec<usize> = (0..COORDINATORS)
            .filter(|&i| stored_artifact(cluster, i, &first).is_file())
            .collect();
        ensure!(
            holders.len() == COORDINATORS,
            "the artifact is on coordinators {holders:?} only, when the rollout started"
        );
        let run = cluster.wait_final(&id, TIMEOUT)?;
        assert_whole_release(cluster, &id, &run)?;

        for i in (0..COORDINATORS).filter(|&i| i != leader) {
            cluster.group_member(i).kill()?;
        }
        let second = b"payload of 2.0.1".to_vec();
        let source = cluster.dir().join("payload-2");
        std::fs::write(&source, &second)?;
        let path = cluster.write_script("second.toml", &script_with_artifact(&source))?;
        let out = cluster.hotroll(&["rollout", "start", &path.display().to_string()])?;
        ensure!(
            out.code != Some(0)
                && out.stderr.contains("held by 1 coordinator")
                && out
                    .stderr
                    .contains("no other coordinator of the group is running"),
            "a start with the artifact on the leader alone: exit {:?}\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        ensure!(
            stored_artifact(cluster, leader, &second).is_file(),
            "the upload itself did not reach the leader"
        );
        let listed = cluster
            .hotroll(&["rollout", "list", "--output", "json"])?
            .ok()?
            .json()?;
        ensure!(
            listed.as_array().map(Vec::len) == Some(1),
            "a refused start left a rollout: {listed:#}"
        );
        Ok(())
    })
}
