//! Helpers for the crash-safety suite (`tests/crash_safety.rs`): arming a fault point in a
//! process (`HOTROLL_FAULT_FILE`, see `hotroll_agent::fault`), waiting for the process to crash
//! itself there, and the invariants every node must satisfy once the rollout ended.
//!
//! A cluster built with [`with_fault_points`] starts every process with
//! `HOTROLL_FAULT_FILE=fault`, a path relative to the process's working directory: the
//! coordinator reads `<cluster>/fault`, agent `i` reads `<cluster>/node-<i>/fault`. Writing the
//! point's name there ([`arm_agent`], [`arm_coordinator`]) makes that process SIGKILL itself
//! when it reaches the point; the file is removed as it fires.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::cluster::{Cluster, ClusterOptions};
use crate::poll::poll;
use crate::process::Process;
use crate::services::{self, current_release, permanent_release, release_entries};
use crate::{node_name, status};

/// The fault file's name, relative to each process's working directory.
pub const FAULT_FILE: &str = "fault";

/// Start every process of the cluster with fault points armable.
pub fn with_fault_points(options: ClusterOptions) -> ClusterOptions {
    options.env("HOTROLL_FAULT_FILE", FAULT_FILE)
}

fn agent_fault(cluster: &Cluster, i: usize) -> PathBuf {
    cluster.agent_info(i).dir.join(FAULT_FILE)
}

fn coordinator_fault(cluster: &Cluster) -> PathBuf {
    cluster.dir().join(FAULT_FILE)
}

/// Make agent `i` SIGKILL itself at fault point `point`.
pub fn arm_agent(cluster: &Cluster, i: usize, point: &str) -> anyhow::Result<()> {
    let path = agent_fault(cluster, i);
    std::fs::write(&path, format!("{point}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Make the coordinator SIGKILL itself at fault point `point`.
pub fn arm_coordinator(cluster: &Cluster, point: &str) -> anyhow::Result<()> {
    let path = coordinator_fault(cluster);
    std::fs::write(&path, format!("{point}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Whether an armed point is still waiting to fire.
pub fn armed(path: &Path) -> bool {
    path.exists()
}

/// Whether agent `i`'s fault point has not fired (yet).
pub fn agent_armed(cluster: &Cluster, i: usize) -> bool {
    armed(&agent_fault(cluster, i))
}

/// Whether the coordinator's fault point has not fired (yet).
pub fn coordinator_armed(cluster: &Cluster) -> bool {
    armed(&coordinator_fault(cluster))
}

/// Wait until `process` has exited (it crashed itself at its fault point); reaps it.
pub fn wait_dead(process: &mut Process, timeout: Duration) -> anyhow::Result<()> {
    let name = process.name().to_string();
    poll(
        &format!("{name} to reach its fault point and die"),
        timeout,
        Duration::from_millis(10),
        || Ok(process.exit_status().map(|_| ())),
    )
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `T` stopped, `Z` zombie, ...), `None` when
/// the process does not exist.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The pid the agent's pid file names for `service` on node `i`.
pub fn service_pid(cluster: &Cluster, i: usize, service: &str) -> Option<u32> {
    let path = cluster
        .agent_info(i)
        .data_dir
        .join("run")
        .join(format!("{service}.pid"));
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One node's app after a rollout, as its data dir says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRelease {
    pub current: String,
    pub permanent: String,
}

/// What one fault-injection run ended with (a row of the suite's table).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub rollout: String,
    /// Node name → the coordinator's final state of the node (targets only).
    pub nodes: BTreeMap<String, String>,
    /// Node name → the version the node runs (current = permanent), every node.
    pub versions: BTreeMap<String, String>,
}

impl Outcome {
    /// `node-1 rolled_back 1.0, node-2 committed 1.1`.
    pub fn describe_nodes(&self) -> String {
        self.versions
            .iter()
            .map(|(n, v)| match self.nodes.get(n) {
                Some(s) => format!("{n} {s} {v}"),
                None => format!("{n} (not targeted) {v}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The version-server release layout the suite checks: app `app` served by `service` on
/// `ports[i - 1]` of node `i`.
#[derive(Debug, Clone)]
pub struct Fleet<'a> {
    pub app: &'a str,
    pub service: &'a str,
    pub ports: &'a [u16],
}

/// Every node settled (what the coordinator shows no longer changes) and connected.
pub fn wait_settled(cluster: &Cluster, id: &str, timeout: Duration) -> anyhow::Result<Value> {
    cluster.wait_all_connected(timeout)?;
    cluster.wait_status(id, "every node to settle", timeout, |s| {
        status::rollout_state(s).is_ok_and(status::is_final)
            && status::node_states(s).iter().all(|(_, state)| {
                ["aborted", "rolled_back", "committed", "failed"].contains(&state.as_str())
            })
    })
}

/// Check the invariants of the issue on every node once rollout `status` (final) moved the
/// fleet from `old` to `new`:
///
/// * `current` names a complete release (its directory holds the binary and a `VERSION` of that
///   version) and equals `permanent`; when the rollout succeeded both are `new`;
/// * the node's state at the coordinator agrees with it: `committed` ⇔ on `new`, `aborted` or
///   `rolled_back` ⇔ on `old` (no node ends `failed` in these runs);
/// * after an abort, and on a node the rollout did not target, nothing is staged: no staging
///   directory, no `new` release;
/// * the service runs (its pid file names a live process that is not stopped, `T`) and serves
///   the current version; `hotroll nodes` shows the same releases.
pub fn check_invariants(
    cluster: &Cluster,
    fleet: &Fleet<'_>,
    status: &Value,
    old: &str,
    new: &str,
) -> anyhow::Result<Outcome> {
    let state = status::rollout_state(status)?.to_string();
    ensure!(status::is_final(&state), "rollout not final: {status}");
    let mut outcome = Outcome {
        rollout: state.clone(),
        nodes: BTreeMap::new(),
        versions: BTreeMap::new(),
    };
    for i in 1..=cluster.len() {
        let name = node_name(i);
        let release = NodeRelease {
            current: current_release(cluster, i, fleet.app)
                .with_context(|| format!("{name}: `current` names no release"))?,
            permanent: permanent_release(cluster, i, fleet.app)
                .with_context(|| format!("{name}: no `permanent` file"))?,
        };
        ensure!(
            release.current == release.permanent,
            "{name}: current {} but permanent {} after a final state",
            release.current,
            release.permanent
        );
        let version = release.current.clone();
        let dir = services::app_dir(cluster, i, fleet.app)
            .join("releases")
            .join(&version);
        let recorded = std::fs::read_to_string(dir.join("VERSION"))
            .with_context(|| format!("{name}: release {version} has no VERSION"))?;
        ensure!(
            recorded.trim() == version,
            "{name}: release {version} holds VERSION {recorded:?}: not a whole release"
        );
        ensure!(
            dir.join("bin/version-server").is_file(),
            "{name}: release {version} has no bin/version-server"
        );
        // A node the rollout did not target keeps its release; the rest of the checks apply.
        let targeted = status::node(status, &name).is_ok();
        if targeted {
            let node_state = status::node_state(status, &name)?.to_string();
            let expected = match node_state.as_str() {
                "committed" => new,
                "aborted" | "rolled_back" => old,
                other => bail!("{name} ended `{other}` at the coordinator: {status}"),
            };
            ensure!(
                version == expected,
                "{name} is `{node_state}` at the coordinator but runs {version} (expected {expected})"
            );
            if state == "succeeded" {
                ensure!(
                    version == new,
                    "{name}: rollout succeeded but it runs {version}"
                );
            }
            outcome.nodes.insert(name.clone(), node_state);
        }
        if state == "aborted" || !targeted {
            let entries = release_entries(cluster, i, fleet.app);
            ensure!(
                !entries
                    .iter()
                    .any(|e| e.starts_with(".staging-") || e == new),
                "{name}: something staged is left after the abort: {entries:?}"
            );
        }
        let pid = poll(
            &format!("{name}'s service to run"),
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                Ok(service_pid(cluster, i, fleet.service)
                    .filter(|pid| process_state(*pid).is_some_and(|s| s != 'Z')))
            },
        )?;
        match process_state(pid) {
            Some('T') | Some('t') => bail!("{name}: service pid {pid} is stopped (SIGSTOP)"),
            None => bail!("{name}: service pid {pid} is gone"),
            Some(_) => {}
        }
        let port = fleet
            .ports
            .get(i - 1)
            .copied()
            .with_context(|| format!("no port for {name}"))?;
        services::wait_serving(port, &version, Duration::from_secs(15))?;
        outcome.versions.insert(name, version);
    }
    // What the coordinator shows of every node agrees with the disks.
    poll(
        "hotroll nodes to show every node's releases",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let shown = services::nodes_apps(cluster, fleet.app)?;
            let agree = outcome.versions.iter().all(|(name, version)| {
                shown.get(name) == Some(&(version.clone(), version.clone()))
            });
            Ok(agree.then_some(()))
        },
    )?;
    Ok(outcome)
}
