//! The otp_release runtime end to end: a rebar3 project built by the test into real release
//! tarballs, three nodes started from v1 with relx's `bin/pm daemon` (long names on 127.0.0.1,
//! a private epmd, `vm.args.src` with the node's own name and cookie), a real coordinator and
//! real agents doing the fleet version of `bin/pm upgrade` (tests/src/otp_release.rs).
//!
//! They need rebar3 (Debian's brings Erlang; the README's test command installs it) and fail,
//! saying how to install it, when it is missing.
//!
//! Measurements (printed with `--nocapture`): the rollout's wall time over 3 nodes and each
//! node's install_release time, in `upgrades_three_release_nodes_to_v2_keeping_primes_and_pid`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hotroll_tests::erlang::{self, Epmd};
use hotroll_tests::otp_release::{self, ReleaseNode, Tarballs};
use hotroll_tests::{Cluster, ClusterOptions, node_name, status};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// Any failure rolls every node back.
const ROLLBACK_ALL: &str = "max_failures = 0\non_failure = \"rollback_all\"";

/// Release nodes for a cluster of `n` agents: node-i drives `pm-node-i@127.0.0.1`.
struct Fleet {
    nodes: Vec<ReleaseNode>,
    tarballs: Tarballs,
    // Dropped last: the nodes first, then epmd, then the dir.
    epmd: Epmd,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Build the tarballs; start node i (1-based) from `tarball(i)`.
    fn start(n: usize, tarball: impl Fn(&Tarballs, usize) -> PathBuf) -> anyhow::Result<Self> {
        otp_release::require()?;
        let dir = tempfile::Builder::new().prefix("hotroll-otp-").tempdir()?;
        let tarballs = otp_release::build(&dir.path().join("build"))?;
        let epmd = Epmd::start(&dir.path().join("epmd.log"))?;
        let cookie = erlang::random_cookie();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = node_name(i);
            nodes.push(ReleaseNode::start(
                &dir.path().join(&name),
                &format!("pm-{name}"),
                &tarball(&tarballs, i),
                &cookie,
                epmd.port,
            )?);
        }
        Ok(Self {
            nodes,
            tarballs,
            epmd,
            dir,
        })
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Cluster options whose agents drive these nodes, each with its own variables.
    fn options(&self) -> ClusterOptions {
        let root = self.root().display().to_string();
        let extra = format!(
            r#"[[release]]
app = "pm"
root_dir = "{root}/{{node}}/rel"
node = "pm-{{node}}@127.0.0.1"
cookie_file = "{root}/{{node}}/cookie"
env = {{ NODE_NAME = "pm-{{node}}@127.0.0.1", HOME = "{root}/{{node}}" }}
cookie_env = "COOKIE"
"#
        );
        ClusterOptions::default()
            .agent_toml_extra(&extra)
            .env("ERL_EPMD_PORT", &self.epmd.port.to_string())
    }

    fn node(&self, i: usize) -> &ReleaseNode {
        &self.nodes[i - 1]
    }

    /// The script moving the fleet 0.1.0 -> 0.2.0 with `tarball`.
    fn script(&self, tarball: &Path) -> String {
        self.script_with(tarball, "0.1.0", "0.2.0", ROLLBACK_ALL)
    }

    /// The script moving the fleet `from` -> `to` with `tarball` and the `[rollout]` `policy`.
    fn script_with(&self, tarball: &Path, from: &str, to: &str, policy: &str) -> String {
        format!(
            r#"app = "pm"
runtime = "otp_release"
from = "{from}"
to = "{to}"

[[artifacts]]
name = "pm-{to}.tar.gz"
source = "{tarball}"

[rollout]
{policy}
barrier_timeout = "60s"
step_timeout = "60s"

[script]
up = [
  {{ unpack_release = "pm-{to}.tar.gz" }},
  {{ sync_nodes = "unpacked" }},
  "point_of_no_return",
  "install_release",
  {{ sync_nodes = "installed" }},
]
"#,
            tarball = tarball.display()
        )
    }
}

fn releases_of(node: &ReleaseNode) -> anyhow::Result<Vec<(String, String)>> {
    let mut releases = node.which_releases()?;
    releases.sort();
    Ok(releases)
}

/// Test 1: three release nodes on 0.1.0; rollout to 0.2.0 (relup `{update, pm, {advanced,
/// []}}`, a new state format) with the script `hotroll plan release` writes from the tarball
/// (it also prints the relup's instructions): every node runs 0.2.0, permanent, the same miner
/// process, no prime lost, mining goes on; `which_releases` agrees with `hotroll nodes`.
#[test]
fn upgrades_three_release_nodes_to_v2_keeping_primes_and_pid() -> anyhow::Result<()> {
    let fleet = Fleet::start(3, |t, _| t.v1.clone())?;
    Cluster::start(3, fleet.options())?.run(|cluster| {
        // The script is the one `hotroll plan release` writes from the tarball.
        let script = fleet.root().join("planned.toml");
        let plan = cluster.hotroll(&[
            "plan",
            "release",
            "--tar",
            &fleet.tarballs.v2.display().to_string(),
            "-o",
            &script.display().to_string(),
        ])?;
        let said = format!("{}{}", plan.stdout, plan.stderr);
        ensure!(plan.code == Some(0), "plan exit {:?}: {said}", plan.code);
        for part in [
            "relup 0.2.0 UpFrom 0.1.0",
            "relup 0.2.0 DownTo 0.1.0",
            "point_of_no_return",
            "{suspend,[pm]}",
            "{code_change,up,[{pm,[]}]}",
            "{resume,[pm]}",
        ] {
            ensure!(said.contains(part), "plan does not say {part}: {said}");
        }
        let check = cluster.hotroll(&["check", &script.display().to_string()])?;
        ensure!(
            check.code == Some(0),
            "check of the planned script: {}{}",
            check.stdout,
            check.stderr
        );
        let mut before = Vec::new();
        for i in 1..=3 {
            let miner = fleet.node(i).miner()?;
            ensure!(miner.format == "tuple", "node {i} is not on v1: {miner:?}");
            before.push(miner);
        }
        let started = Instant::now();
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        let took = started.elapsed();
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "rollout: {}",
            run.status
        );
        let nodes = cluster.nodes()?;
        for i in 1..=3 {
            let node = fleet.node(i);
            let after = node.miner()?;
            ensure!(
                after.format == "map",
                "node {i}: state not converted: {after:?}"
            );
            ensure!(
                after.pid == before[i - 1].pid,
                "node {i}: not the same process"
            );
            let old = &before[i - 1].primes;
            ensure!(
                after.primes.len() >= old.len() && after.primes[..old.len()] == old[..],
                "node {i} lost primes: {} before, {} after",
                old.len(),
                after.primes.len()
            );
            std::thread::sleep(Duration::from_millis(300));
            let later = node.miner()?;
            ensure!(
                later.primes.len() > after.primes.len(),
                "node {i} stopped mining"
            );
            let releases = releases_of(node)?;
            ensure!(
                releases
                    == vec![
                        ("0.1.0".into(), "old".into()),
                        ("0.2.0".into(), "permanent".into())
                    ],
                "node {i}: {releases:?}"
            );
            // relx's step after make_permanent: bin/pm boots 0.2.0 from now on.
            let script = std::fs::read_to_string(node.root.join("bin/pm"))?;
            ensure!(
                script.contains("REL_VSN=\"0.2.0\""),
                "node {i}: bin/pm not replaced"
            );
            let listed = nodes
                .as_array()
                .and_then(|all| all.iter().find(|n| n["name"] == node_name(i).as_str()))
                .map(|n| n["apps"].to_string())
                .unwrap_or_default();
            ensure!(
                listed.contains("\"current\":\"0.2.0\"")
                    && listed.contains("\"permanent\":\"0.2.0\""),
                "hotroll nodes for node {i}: {listed}"
            );
            // The releases hotroll nodes shows are the node's own which_releases.
            let mut shown: Vec<(String, String)> = nodes
                .as_array()
                .and_then(|all| all.iter().find(|n| n["name"] == node_name(i).as_str()))
                .and_then(|n| n["apps"]["pm"]["releases"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    (
                        r["version"].as_str().unwrap_or_default().to_string(),
                        r["status"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            shown.sort();
            ensure!(
                shown == releases,
                "node {i}: hotroll nodes {shown:?}, which_releases {releases:?}"
            );
        }
        println!("== otp_release runtime measurements (3 nodes, pm 0.1.0 -> 0.2.0) ==");
        println!("rollout wall time over 3 nodes (hotroll rollout start --wait): {took:?}");
        Ok(())
    })
}

/// Test 6: `tally`, a registered gen_server in no supervision tree (the release handler looks
/// only at supervisors), with a changed module and a state-converting code_change in the relup:
/// upgraded with its state and the same pid. `pm_idle`, whose code_change no process runs, is
/// recorded in the history as a warning, and the rollout still succeeds.
#[test]
fn an_unsupervised_gen_server_in_a_release_is_upgraded_with_its_state_and_pid() -> anyhow::Result<()>
{
    let fleet = Fleet::start(1, |t, _| t.v1.clone())?;
    Cluster::start(1, fleet.options())?.run(|cluster| {
        let node = fleet.node(1);
        let supervised = node.eval("[P || {_, _, P, _} <- release_handler_1:get_supervised_procs(), P =:= whereis(tally)].")?;
        ensure!(supervised == "[]", "tally is supervised: {supervised}");
        let count = node.bump_tally(5)?;
        let before = node.tally()?;
        ensure!(
            before.format == "integer" && before.count == count,
            "tally on v1: {before:?}"
        );
        let script = fleet.root().join("v2.toml");
        std::fs::write(&script, fleet.script(&fleet.tarballs.v2))?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "rollout: {}",
            run.status
        );
        let after = node.tally()?;
        ensure!(after.pid == before.pid, "tally is not the same process: {before:?} -> {after:?}");
        ensure!(
            after.format == "map" && after.count == before.count,
            "tally's state was not converted: {before:?} -> {after:?}"
        );
        ensure!(node.bump_tally(1)? == before.count + 1, "tally does not count on v2");
        let history = cluster
            .hotroll(&["rollout", "events", &run.id, "--output", "json"])?
            .ok()?;
        let warnings: Vec<serde_json::Value> = history
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["warning"].is_string())
            .collect();
        ensure!(
            warnings.len() == 1
                && warnings[0]["instruction"] == "install_release"
                && warnings[0]["phase"] == "succeeded",
            "expected one warning on install_release: {warnings:?}\n{}",
            history.stdout
        );
        let text = warnings[0]["warning"].as_str().unwrap_or_default();
        ensure!(
            text.contains("pm_idle") && !text.contains("tally") && !text.contains("pm "),
            "the warning names what no process ran: {text}"
        );
        let plain = cluster.hotroll(&["rollout", "events", &run.id])?.ok()?;
        ensure!(
            plain.stdout.contains("WARNING: code_change of pm_idle reached no process"),
            "the table shows the warning: {}",
            plain.stdout
        );
        Ok(())
    })
}

/// A node's `(version, status)` releases and its miner's pid.
type NodeSnapshot = (Vec<(String, String)>, String);

/// Every node's releases and miner, to compare before and after a refused rollout.
fn snapshot(fleet: &Fleet, n: usize) -> anyhow::Result<Vec<NodeSnapshot>> {
    (1..=n)
        .map(|i| Ok((releases_of(fleet.node(i))?, fleet.node(i).miner()?.pid)))
        .collect()
}

/// Test 3: node-2 runs 0.1.1, which the relup does not upgrade from: the coordinator refuses
/// the rollout at start, naming that node (it knows what each node runs from its Hello);
/// nothing changed on any node, no rollout recorded. And a relup with OTP's own `sync_nodes`
/// is refused by `hotroll check` (exit 2) and at start, with its place in the relup and the
/// hotroll barrier to use instead.
#[test]
fn a_node_the_relup_does_not_upgrade_from_is_refused_at_start_naming_it() -> anyhow::Result<()> {
    let fleet = Fleet::start(3, |t, i| {
        if i == 2 {
            t.other.clone()
        } else {
            t.v1.clone()
        }
    })?;
    let sync_nodes = otp_release::sync_nodes_tarball(&fleet.tarballs.v2, fleet.root())?;
    Cluster::start(3, fleet.options())?.run(|cluster| {
        let script = cluster.write_script("v2.toml", &fleet.script(&fleet.tarballs.v2))?;
        // The tarball itself is fine.
        let check = cluster.hotroll(&["check", &script.display().to_string()])?;
        ensure!(
            check.code == Some(0),
            "check: {}{}",
            check.stdout,
            check.stderr
        );
        let before = snapshot(&fleet, 3)?;
        let start = |script: &Path| {
            cluster.hotroll(&[
                "rollout",
                "start",
                &script.display().to_string(),
                "--wait",
                "--output",
                "json",
            ])
        };
        let refused = start(&script)?;
        let said = format!("{}{}", refused.stdout, refused.stderr);
        ensure!(
            refused.code == Some(1),
            "start exit {:?}: {said}",
            refused.code
        );
        ensure!(
            said.contains("no UpFrom entry") && said.contains("node-2 (runs 0.1.1)"),
            "start: {said}"
        );
        ensure!(
            !said.contains("node-1") && !said.contains("node-3"),
            "start names other nodes: {said}"
        );

        let script = cluster.write_script("sync.toml", &fleet.script(&sync_nodes))?;
        let check = cluster.hotroll(&["check", &script.display().to_string()])?;
        let checked = format!("{}{}", check.stdout, check.stderr);
        ensure!(
            check.code == Some(2),
            "check exit {:?}: {checked}",
            check.code
        );
        ensure!(
            checked.contains("UpFrom \"0.1.0\" instruction 3 is OTP's")
                && checked.contains("sync_nodes, which waits without a deadline")
                && checked.contains("hotroll barrier"),
            "check: {checked}"
        );
        let refused = start(&script)?;
        let said = format!("{}{}", refused.stdout, refused.stderr);
        ensure!(
            refused.code == Some(1),
            "start exit {:?}: {said}",
            refused.code
        );
        ensure!(
            said.contains("UpFrom \"0.1.0\" instruction 3 is OTP's sync_nodes")
                && said.contains("hotroll barrier"),
            "start: {said}"
        );

        let list = cluster.hotroll(&["rollout", "list", "--output", "json"])?;
        ensure!(
            !list.stdout.contains("\"id\""),
            "a rollout was recorded: {}",
            list.stdout
        );
        ensure!(
            snapshot(&fleet, 3)? == before,
            "a node changed: {before:?} -> {:?}",
            snapshot(&fleet, 3)?
        );
        for i in 1..=3 {
            ensure!(
                !fleet.node(i).root.join("releases/0.2.0").exists(),
                "node {i} holds the new release"
            );
        }
        Ok(())
    })
}

/// Test 4: a tarball with no relup and a sys.config that does not parse: `hotroll check` exits
/// 2 saying both; a rollout of it aborts before the point of no return, every node unchanged.
/// Then one whose `vm.args.src` names a fixed node: the nodes' identity check aborts it too.
#[test]
fn a_broken_tarball_fails_check_and_aborts_before_the_point_of_no_return() -> anyhow::Result<()> {
    let fleet = Fleet::start(2, |t, _| t.v1.clone())?;
    let broken = otp_release::broken_tarball(&fleet.tarballs.v2, fleet.root())?;
    let fixed = otp_release::fixed_name_tarball(&fleet.tarballs.v2, fleet.root())?;
    Cluster::start(2, fleet.options())?.run(|cluster| {
        let script = cluster.write_script("broken.toml", &fleet.script(&broken))?;
        let check = cluster.hotroll(&["check", &script.display().to_string()])?;
        let said = format!("{}{}", check.stdout, check.stderr);
        ensure!(check.code == Some(2), "check exit {:?}: {said}", check.code);
        ensure!(said.contains("no releases/0.2.0/relup"), "check: {said}");
        ensure!(
            said.contains("sys.config.src does not parse"),
            "check: {said}"
        );
        let before = snapshot(&fleet, 2)?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "aborted",
            "rollout: {}",
            run.status
        );
        ensure!(snapshot(&fleet, 2)? == before, "a node changed");
        for i in 1..=2 {
            ensure!(
                !fleet.node(i).root.join("releases/0.2.0").exists(),
                "node {i} kept the unpacked release"
            );
        }
        // A package whose vm.args.src names one node for the whole fleet: each node's vote
        // refuses it (its own name would not survive), before the point of no return.
        let script = cluster.write_script("fixed.toml", &fleet.script(&fixed))?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "aborted",
            "rollout: {}",
            run.status
        );
        // Whichever node voted first is named (the other is aborted by the coordinator).
        let said = format!(
            "{} {}",
            status::node_error(&run.status, "node-1")?.unwrap_or_default(),
            status::node_error(&run.status, "node-2")?.unwrap_or_default()
        );
        ensure!(
            said.contains("makes the node `pm-fixed@127.0.0.1`, not `pm-node-"),
            "errors: {said}"
        );
        ensure!(snapshot(&fleet, 2)? == before, "a node changed");
        for i in 1..=2 {
            ensure!(
                !fleet.node(i).root.join("releases/0.2.0").exists(),
                "node {i} kept the unpacked release"
            );
        }
        Ok(())
    })
}

/// Test 5: the canary (canary 1, paused after its wave) has installed 0.2.0 when its Erlang
/// node is SIGKILLed, before make-permanent. Promoted, the rest of the fleet upgrades; at
/// make-permanent the canary's agent finds its node gone, starts it again from its permanent
/// release (bin/pm still boots 0.1.0) and reports the node rolled back, saying the in-memory
/// state was lost; the rollout ends `partially_rolled_back`.
#[test]
fn a_node_killed_between_install_and_make_permanent_comes_back_on_its_permanent_release()
-> anyhow::Result<()> {
    let fleet = Fleet::start(3, |t, _| t.v1.clone())?;
    Cluster::start(3, fleet.options())?.run(|cluster| {
        let policy = "canary = 1\npause_after_canary = true\nmax_failures = 1\non_failure = \"rollback_node\"";
        let text = fleet.script_with(&fleet.tarballs.v2, "0.1.0", "0.2.0", policy);
        let script = cluster.write_script("v2-canary.toml", &text)?;
        let id = cluster.start_rollout(&script, &[])?;
        let paused = cluster.wait_status(&id, "the canary wave to finish", ROLLOUT_TIMEOUT, |s| {
            status::rollout_state(s).is_ok_and(|st| st == "paused")
        })?;
        let canary = status::node_states(&paused)
            .into_iter()
            .find(|(_, state)| state == "committed")
            .map(|(name, _)| name)
            .with_context(|| format!("no committed canary: {paused}"))?;
        let i = (1..=3)
            .find(|&i| node_name(i) == canary)
            .with_context(|| format!("unknown canary {canary}"))?;
        let node = fleet.node(i);
        ensure!(
            releases_of(node)?
                == vec![
                    ("0.1.0".into(), "permanent".into()),
                    ("0.2.0".into(), "current".into())
                ],
            "canary {canary} not installed: {:?}",
            releases_of(node)?
        );
        let killed_pid = node.miner()?.pid;
        node.erl.stop()?;
        let promoted = cluster.hotroll(&["rollout", "promote", &id])?;
        ensure!(promoted.code == Some(0), "promote: {promoted:?}");
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&status)? == "partially_rolled_back",
            "rollout: {status:#}"
        );
        // The rollout is final once the canary reports it is rolling back; its restart takes
        // longer.
        let status = cluster.wait_status(&id, "the canary to roll back", ROLLOUT_TIMEOUT, |s| {
            status::node_state(s, &canary).is_ok_and(|st| st == "rolled_back")
        })?;
        // The history says how: restarted from the permanent release, state lost.
        let said = status::node_error(&status, &canary)?.unwrap_or_default();
        ensure!(
            said.contains("restarted from the permanent release 0.1.0")
                && said.contains("in-memory state lost"),
            "canary: {said}"
        );
        node.wait_running(Duration::from_secs(30))?;
        let back = node.miner()?;
        ensure!(back.format == "tuple", "canary not on v1 code: {back:?}");
        ensure!(back.pid != killed_pid || back.primes.len() < 5, "not a new node: {back:?}");
        let releases = releases_of(node)?;
        ensure!(
            releases.first() == Some(&("0.1.0".into(), "permanent".into()))
                && !releases.iter().any(|(_, st)| st == "current"),
            "canary releases: {releases:?}"
        );
        for j in (1..=3).filter(|&j| j != i) {
            let other = fleet.node(j);
            ensure!(
                releases_of(other)?
                    == vec![
                        ("0.1.0".into(), "old".into()),
                        ("0.2.0".into(), "permanent".into())
                    ],
                "node {j}: {:?}",
                releases_of(other)?
            );
            ensure!(other.miner()?.format == "map", "node {j} not on v2");
        }
        Ok(())
    })
}

/// Test 2: the fleet on 0.2.0; a 0.3.0 whose `code_change` crashes, canary 1, no failure
/// allowed: the canary's install_release fails after the point of no return and it is rolled
/// back to 0.2.0 (the relup's downgrade with its state, or a restart without it: what its
/// outcome says is what the node shows); the other nodes never changed (never committed, the
/// unpacked 0.3.0 removed); the rollout ends `rolled_back`.
#[test]
fn a_v3_whose_code_change_crashes_rolls_the_canary_back_and_leaves_the_rest_unchanged()
-> anyhow::Result<()> {
    let fleet = Fleet::start(3, |t, _| t.v2.clone())?;
    let v3 = otp_release::build_v3(&fleet.root().join("build"))?;
    Cluster::start(3, fleet.options())?.run(|cluster| {
        let policy = "canary = 1\nmax_failures = 0\non_failure = \"rollback_node\"";
        let text = fleet.script_with(&v3, "0.2.0", "0.3.0", policy);
        let script = cluster.write_script("v3.toml", &text)?;
        let before = snapshot(&fleet, 3)?;
        for (i, (releases, _)) in before.iter().enumerate() {
            ensure!(
                releases == &vec![("0.2.0".to_string(), "permanent".to_string())],
                "node {} not on 0.2.0: {releases:?}",
                i + 1
            );
        }
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        let id = run.id.clone();
        let state = status::rollout_state(&run.status)?.to_string();
        ensure!(
            state == "rolled_back" || state == "partially_rolled_back",
            "rollout: {:#}",
            run.status
        );
        let canary = status::node_states(&run.status)
            .into_iter()
            .find(|(_, st)| st != "aborted")
            .map(|(name, _)| name)
            .with_context(|| format!("no canary: {:#}", run.status))?;
        let status = cluster.wait_status(&id, "the canary to roll back", ROLLOUT_TIMEOUT, |s| {
            status::node_state(s, &canary).is_ok_and(|st| st == "rolled_back")
        })?;
        ensure!(
            status::rollout_state(&status)? == "rolled_back",
            "rollout: {status:#}"
        );
        let said = status::node_error(&status, &canary)?
            .unwrap_or_default()
            .to_string();
        ensure!(said.contains("install_release"), "canary: {said}");
        let kept = said.contains("in-memory state kept");
        ensure!(
            kept || said.contains("in-memory state lost"),
            "the canary's outcome does not say what happened to its state: {said}"
        );
        let i = (1..=3)
            .find(|&i| node_name(i) == canary)
            .with_context(|| format!("unknown canary {canary}"))?;
        let node = fleet.node(i);
        node.wait_running(Duration::from_secs(30))?;
        let back = node.miner()?;
        ensure!(back.format == "map", "canary not on v2 code: {back:?}");
        let (releases, pid) = &before[i - 1];
        ensure!(
            kept == (back.pid == *pid),
            "the canary says {said:?} but its miner is {} (was {pid})",
            back.pid
        );
        ensure!(
            releases_of(node)? == *releases,
            "canary releases: {:?}",
            releases_of(node)?
        );
        for j in (1..=3).filter(|&j| j != i) {
            ensure!(
                status::node_state(&status, &node_name(j))? == "aborted",
                "node {j}: {status:#}"
            );
            ensure!(
                (releases_of(fleet.node(j))?, fleet.node(j).miner()?.pid) == before[j - 1],
                "node {j} changed"
            );
            ensure!(
                !fleet.node(j).root.join("releases/0.3.0").exists(),
                "node {j} kept the unpacked release"
            );
        }
        println!("canary {canary}: {said}");
        Ok(())
    })
}
