//! The fault-injection suite of issue 6 ("Crash safety"): real coordinator and agent processes,
//! the process runtime and its `version-server` service, and a representative hot upgrade:
//!
//! | index | instruction |
//! |---|---|
//! | 0 | `load_object_code` (the new `VERSION`) |
//! | 1 | `sync_nodes "staged"` (before the point of no return) |
//! | 2 | `point_of_no_return` |
//! | 3 | `suspend` (SIGSTOP) |
//! | 4 | `load` (swap `current`) |
//! | 5 | `code_change` (restart on the new release, sockets held) |
//! | 6 | `resume` |
//! | 7 | `sync_nodes "done"` (after it, wave-scoped) |
//! | 8 | `health` |
//!
//! For every instruction index (and the waits between them: prepared, committed, make-permanent)
//! one process is SIGKILLed there — (a) agent `node-1`, (b) the coordinator — and started again.
//! The kill point is exact: the process is armed with a fault point (`HOTROLL_FAULT_FILE`) and
//! kills itself when it reaches it (the agent right after its journal durably records the step,
//! before running it; the coordinator right after it durably records a step or decides a
//! command, before sending anything). After each run the invariants are checked
//! (`hotroll_tests::crash::check_invariants`): a final state within the deadlines, `current` a
//! whole release equal to `permanent` (both new after a success), the service running and not
//! stopped, nothing staged after an abort, the coordinator's node states agreeing with the
//! disks. Each test reuses one two-node cluster for its cases (a partially rolled back fleet is
//! brought back in line between cases) and prints its table of outcomes:
//! `cargo nextest run -p hotroll-tests --test crash_safety --no-capture`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hotroll_tests::crash::{self, Fleet, arm_agent, arm_coordinator, check_invariants};
use hotroll_tests::{Cluster, ClusterOptions, free_port, node_name, services, status};

const APP: &str = "version";
const SERVICE: &str = "version";
const NODES: usize = 2;
/// Bound on a rollout's end: every deadline of the script (step and barrier timeouts 10 s,
/// session grace 3 s, step slack 5 s) is far inside it.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fault point may take to be reached.
const DEATH_TIMEOUT: Duration = Duration::from_secs(30);
const POLICY: &str = "on_failure = \"rollback_node\"\nmax_failures = 1\nstep_timeout = \"10s\"\nbarrier_timeout = \"10s\"";

/// The representative script's `up` (see the module docs).
const UP: [&str; 9] = [
    r#"{ load_object_code = ["VERSION"] }"#,
    r#"{ sync_nodes = "staged" }"#,
    r#""point_of_no_return""#,
    r#"{ suspend = ["version"] }"#,
    r#"{ load = "version" }"#,
    r#"{ code_change = { service = "version", timeout = "10s" } }"#,
    r#"{ resume = ["version"] }"#,
    r#"{ sync_nodes = "done" }"#,
    r#"{ health = { service = "version", timeout = "10s" } }"#,
];

fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_version-server"))
}

/// `<cluster>/artifacts/<version>/VERSION`.
fn version_file(cluster: &Cluster, version: &str) -> anyhow::Result<PathBuf> {
    let dir = cluster.dir().join("artifacts").join(version);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("VERSION");
    std::fs::write(&path, format!("{version}\n"))?;
    Ok(path)
}

fn script(
    cluster: &Cluster,
    from: &str,
    to: &str,
    with_binary: bool,
    rollout: &str,
    up: &[&str],
) -> anyhow::Result<String> {
    let mut text = format!("app = \"{APP}\"\nfrom = \"{from}\"\nto = \"{to}\"\n\n");
    if with_binary {
        text.push_str(&format!(
            "[[artifacts]]\nname = \"bin/version-server\"\nsource = \"{}\"\nmode = \"0755\"\n\n",
            server_binary().display()
        ));
    }
    text.push_str(&format!(
        "[[artifacts]]\nname = \"VERSION\"\nsource = \"{}\"\n\n",
        version_file(cluster, to)?.display()
    ));
    text.push_str(&format!("[rollout]\n{rollout}\n\n[script]\nup = [\n"));
    for step in up {
        text.push_str(&format!("  {step},\n"));
    }
    text.push_str("]\n");
    Ok(text)
}

/// Which process a case kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Agent(usize),
    Coordinator,
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::Agent(i) => format!("agent {}", node_name(i)),
            Target::Coordinator => "coordinator".into(),
        }
    }
}

/// One crash: `target` SIGKILLs itself at `point`; when `then` is given, the restarted process
/// is armed with it before it starts (a second crash, e.g. during its recovery).
#[derive(Debug, Clone)]
struct Fault {
    target: Target,
    point: String,
    then: Option<String>,
}

impl Fault {
    fn describe(&self) -> String {
        match &self.then {
            Some(then) => format!("`{}`, then `{then}`", self.point),
            None => format!("`{}`", self.point),
        }
    }
}

struct Case {
    /// Every crash of the run (in whatever order the processes reach them).
    faults: Vec<Fault>,
    /// The rollout's expected final state.
    expect: &'static str,
}

impl Case {
    fn killed(&self) -> String {
        self.faults
            .iter()
            .map(|f| f.target.describe())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn points(&self) -> String {
        self.faults
            .iter()
            .map(Fault::describe)
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// Also crash `target` at `point` in the same run.
    fn and(mut self, target: Target, point: &str) -> Self {
        self.faults.push(Fault {
            target,
            point: point.to_string(),
            then: None,
        });
        self
    }

    /// The restarted process of the first crash crashes again at `point`.
    fn then(mut self, point: &str) -> Self {
        if let Some(first) = self.faults.first_mut() {
            first.then = Some(point.to_string());
        }
        self
    }
}

fn agent_case(point: &str, expect: &'static str) -> Case {
    Case {
        faults: vec![Fault {
            target: Target::Agent(1),
            point: point.to_string(),
            then: None,
        }],
        expect,
    }
}

fn coordinator_case(point: &str) -> Case {
    Case {
        faults: vec![Fault {
            target: Target::Coordinator,
            point: point.to_string(),
            then: None,
        }],
        // Nobody fails: the coordinator picks up where it was and every node upgrades.
        expect: "succeeded",
    }
}

fn arm(cluster: &Cluster, target: Target, point: &str) -> anyhow::Result<()> {
    match target {
        Target::Agent(i) => arm_agent(cluster, i, point),
        Target::Coordinator => arm_coordinator(cluster, point),
    }
}

/// A process that killed itself at its fault point.
#[derive(Debug, Clone, Copy)]
enum Crashed {
    Agent(usize),
    Coordinator,
    /// Coordinator `i` (0-based) of a group.
    GroupMember(usize),
}

/// The process `target` names, if it has exited. In a group the coordinator is whichever
/// member crashed: the fault fires in the leader, and the leader changes from case to case.
fn exited(cluster: &mut Cluster, target: Target) -> Option<Crashed> {
    match target {
        Target::Agent(i) => cluster.agent(i).exit_status().map(|_| Crashed::Agent(i)),
        Target::Coordinator if cluster.group_size() > 0 => {
            cluster.exited_group_member().map(Crashed::GroupMember)
        }
        Target::Coordinator => cluster
            .coordinator()
            .exit_status()
            .map(|_| Crashed::Coordinator),
    }
}

fn restart(cluster: &mut Cluster, crashed: Crashed) -> anyhow::Result<()> {
    match crashed {
        Crashed::Agent(i) => cluster.agent(i).start(),
        Crashed::Coordinator => cluster.restart_coordinator(),
        Crashed::GroupMember(i) => cluster.restart_group_member(i),
    }
}

/// The logs in which `target`'s recovery of a rollout shows: the agent's, or every
/// coordinator's (in a group another member than the crashed one takes the rollout over).
fn logs(cluster: &mut Cluster, target: Target) -> Vec<PathBuf> {
    match target {
        Target::Agent(i) => vec![cluster.agent(i).log_path().to_path_buf()],
        Target::Coordinator => (0..cluster.group_size().max(1))
            .map(|m| cluster.group_member(m).log_path().to_path_buf())
            .collect(),
    }
}

/// Wait for every crash of `faults` and start each crashed process again at once (a crash may
/// only be reachable once another process is back), arming the second crashes.
fn crash_and_restart(cluster: &mut Cluster, faults: &[Fault]) -> anyhow::Result<()> {
    // (fault, crashes still to come)
    let mut pending: Vec<(&Fault, usize)> = faults
        .iter()
        .map(|f| (f, 1 + usize::from(f.then.is_some())))
        .collect();
    let deadline = Instant::now() + DEATH_TIMEOUT;
    while !pending.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "fault points not reached within {DEATH_TIMEOUT:?}: {:?}",
            pending
                .iter()
                .map(|(f, _)| f.describe())
                .collect::<Vec<_>>()
        );
        let mut next = Vec::new();
        for (fault, left) in pending {
            let Some(crashed) = exited(cluster, fault.target) else {
                next.push((fault, left));
                continue;
            };
            if left == 2
                && let Some(then) = &fault.then
            {
                arm(cluster, fault.target, then)?;
            }
            restart(cluster, crashed)?;
            if left > 1 {
                next.push((fault, left - 1));
            }
        }
        pending = next;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

struct Row {
    killed: String,
    points: String,
    expect: &'static str,
    outcome: crash::Outcome,
    seconds: f64,
}

/// A two-node fleet running `version` 1.0, and the table of the cases run on it.
struct Suite {
    ports: Vec<u16>,
    /// The version every node runs between cases.
    version: String,
    next: u32,
    rows: Vec<Row>,
    /// Every case upgrades to this version, on this node only (`--select name=NODE`), and the
    /// fleet stays where the case leaves it (for cases that always end back on `version`).
    fixed: Option<(String, String)>,
}

impl Suite {
    fn start() -> anyhow::Result<(Cluster, Suite)> {
        Self::start_with(|_| Vec::new())
    }

    /// [`Suite::start`] with more environment for node `i`'s service.
    fn start_with(
        env: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> anyhow::Result<(Cluster, Suite)> {
        Self::start_on(ClusterOptions::default(), env)
    }

    /// [`Suite::start_with`] on a cluster set up by `options` (a group on etcd, say).
    fn start_on(
        options: ClusterOptions,
        env: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> anyhow::Result<(Cluster, Suite)> {
        let mut options = crash::with_fault_points(options);
        let mut ports = Vec::new();
        for i in 1..=NODES {
            let port = free_port()?;
            options = options
                .node_label(i, "name", &node_name(i))
                .node_agent_toml_extra(i, &services::version_service(SERVICE, APP, port, &env(i)));
            ports.push(port);
        }
        let cluster = Cluster::start(NODES, options)?;
        let mut suite = Suite {
            ports,
            version: "1.0".into(),
            next: 1,
            rows: Vec::new(),
            fixed: None,
        };
        suite.install(&cluster)?;
        Ok((cluster, suite))
    }

    fn fleet(&self) -> Fleet<'_> {
        Fleet {
            app: APP,
            service: SERVICE,
            ports: &self.ports,
        }
    }

    fn install(&mut self, cluster: &Cluster) -> anyhow::Result<()> {
        let text = script(
            cluster,
            "none",
            "1.0",
            true,
            POLICY,
            &[
                r#"{ load_object_code = ["bin/version-server", "VERSION"] }"#,
                r#""point_of_no_return""#,
                r#"{ load = "version" }"#,
                r#"{ health = { service = "version", timeout = "10s" } }"#,
            ],
        )?;
        let path = cluster.write_script("install.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "install: {:#}",
            run.status
        );
        let status = crash::wait_settled(cluster, &run.id, Duration::from_secs(30))?;
        check_invariants(cluster, &self.fleet(), &status, "none", "1.0")?;
        Ok(())
    }

    /// Run one case: arm the point, start the upgrade, restart the process that killed itself,
    /// wait for the end, check the invariants, and bring the fleet back to one version.
    fn run(&mut self, cluster: &mut Cluster, case: &Case) -> anyhow::Result<()> {
        self.run_script(cluster, case, &UP)
    }

    /// [`Suite::run`] with another `up` list.
    fn run_script(
        &mut self,
        cluster: &mut Cluster,
        case: &Case,
        up: &[&str],
    ) -> anyhow::Result<()> {
        let old = self.version.clone();
        let new = match &self.fixed {
            Some((to, _)) => to.clone(),
            None => {
                self.next += 1;
                format!("1.{}", self.next - 1)
            }
        };
        let text = script(cluster, &old, &new, false, POLICY, up)?;
        let path =
            cluster.write_script(&format!("upgrade-{new}-{}.toml", self.rows.len()), &text)?;
        for fault in &case.faults {
            arm(cluster, fault.target, &fault.point)?;
        }
        let started = Instant::now();
        let select = self.fixed.as_ref().map(|(_, node)| format!("name={node}"));
        let extra: Vec<&str> = match &select {
            Some(select) => vec!["--select", select.as_str()],
            None => Vec::new(),
        };
        let id = cluster.start_rollout(&path, &extra)?;
        crash_and_restart(cluster, &case.faults)?;
        cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        let status = crash::wait_settled(cluster, &id, Duration::from_secs(30))?;
        let seconds = started.elapsed().as_secs_f64();
        // Each restarted process did recover this rollout (not merely start afresh), or, when
        // it had finished it before it died, answered for it from its journal.
        for fault in &case.faults {
            let logs = logs(cluster, fault.target);
            let recovered = logs.iter().any(|log| {
                !services::log_lines(log, &["rollout recovered", &id]).is_empty()
                    || !services::log_lines(log, &["answering from the journal", &id]).is_empty()
            });
            ensure!(recovered, "{logs:?} show no recovery of {id}");
        }
        let what = format!("{} killed at {}", case.killed(), case.points());
        let outcome = check_invariants(cluster, &self.fleet(), &status, &old, &new)
            .with_context(|| what.clone())?;
        ensure!(
            outcome.rollout == case.expect,
            "{what}: rollout ended `{}`, expected `{}`: {status:#}",
            outcome.rollout,
            case.expect
        );
        eprintln!(
            "{what} -> {} {} ({seconds:.1} s)",
            outcome.rollout,
            outcome.describe_nodes()
        );
        let lagging: Vec<String> = outcome
            .versions
            .iter()
            .filter(|(_, v)| **v != new)
            .map(|(n, _)| n.clone())
            .collect();
        self.rows.push(Row {
            killed: case.killed(),
            points: case.points(),
            expect: case.expect,
            outcome,
            seconds,
        });
        if lagging.len() == NODES || self.fixed.is_some() {
            return Ok(());
        }
        // Partially rolled back: bring the nodes left behind to the new version too.
        for name in lagging {
            let text = script(cluster, &old, &new, false, POLICY, &UP)?;
            let path = cluster.write_script(&format!("catch-up-{new}-{name}.toml"), &text)?;
            let select = format!("name={name}");
            let run =
                cluster.run_rollout(&path, &["--select", select.as_str()], ROLLOUT_TIMEOUT)?;
            ensure!(
                status::rollout_state(&run.status)? == "succeeded",
                "catching {name} up to {new}: {:#}",
                run.status
            );
        }
        self.version = new;
        Ok(())
    }

    fn run_all(mut self, cluster: &mut Cluster, title: &str, cases: &[Case]) -> anyhow::Result<()> {
        let result = cases.iter().try_for_each(|case| self.run(cluster, case));
        self.print(title);
        result?;
        ensure!(
            !crash::coordinator_armed(cluster)
                && (1..=NODES).all(|i| !crash::agent_armed(cluster, i)),
            "a fault point was never reached"
        );
        Ok(())
    }

    fn print(&self, title: &str) {
        let mut out = format!(
            "\n{title}: {} fault points\n\n| # | killed | fault point | expected | rollout | nodes (state at the coordinator, version on disk) | s |\n|---|---|---|---|---|---|---|\n",
            self.rows.len()
        );
        for (k, row) in self.rows.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {:.1} |\n",
                k + 1,
                row.killed,
                row.points,
                row.expect,
                row.outcome.rollout,
                row.outcome.describe_nodes(),
                row.seconds
            ));
        }
        eprintln!("{out}");
    }
}

/// The agent's journal point before up[`step`] runs. The point of no return (2) has no record
/// of its own: `journal prepared prepared 2` is its record, and the Committing record written
/// when Commit arrives names step 3, so `before_step(3)` is also the point right after the
/// commit.
fn before_step(step: usize) -> String {
    assert_ne!(
        step, 2,
        "the point of no return's record is `journal prepared prepared 2`"
    );
    let phase = if step < 2 { "preparing" } else { "committing" };
    format!("journal {phase} {phase} {step}")
}

/// (a) SIGKILL agent `node-1` before each instruction of the prepare phase (and while it waits
/// prepared for Commit): the restarted agent discards what it staged and reports `aborted`, so
/// the whole rollout aborts and no node changed.
#[test]
fn agent_killed_before_the_point_of_no_return() -> anyhow::Result<()> {
    let (cluster, suite) = Suite::start()?;
    let mut cases: Vec<Case> = (0..2)
        .map(|step| agent_case(&before_step(step), "aborted"))
        .collect();
    // Before the point of no return, and while it waits prepared for Commit.
    cases.push(agent_case("journal prepared prepared 2", "aborted"));
    // Killed again while recovering (after the discard, before its result is journaled).
    cases.push(agent_case(&before_step(1), "aborted").then("recovery Discard"));
    cluster.run(|cluster| {
        suite.run_all(
            cluster,
            "agent killed before the point of no return",
            &cases,
        )
    })
}

/// (a) SIGKILL agent `node-1` after it committed: right after the commit, before each
/// instruction after the point of no return, after the whole `up` (committed, not yet
/// reported) and when MakePermanent arrived. The restarted agent rolls back to the permanent
/// release and says so; the other node completes: `partially_rolled_back`, and the coordinator
/// shows `node-1` rolled back (never `succeeded` with a node it lost track of).
#[test]
fn agent_killed_after_the_point_of_no_return() -> anyhow::Result<()> {
    let (cluster, suite) = Suite::start()?;
    // before_step(3) is also right after the commit (see `before_step`).
    let mut cases: Vec<Case> = (3..UP.len())
        .map(|step| agent_case(&before_step(step), "partially_rolled_back"))
        .collect();
    cases.push(agent_case(
        "journal committing committed 8",
        "partially_rolled_back",
    ));
    cases.push(agent_case("make_permanent", "partially_rolled_back"));
    // Killed again while recovering (after the rollback, before its result is journaled).
    cases.push(agent_case(&before_step(5), "partially_rolled_back").then("recovery RollBack"));
    cluster
        .run(|cluster| suite.run_all(cluster, "agent killed after the point of no return", &cases))
}

/// (b) SIGKILL the coordinator when it records `node-1` starting each instruction of the
/// prepare phase, and when it decided to commit (durable, not yet sent): the restarted
/// coordinator rebuilds the rollout (barrier `staged` included), the agents reconnect, and the
/// rollout succeeds.
#[test]
fn coordinator_killed_before_the_point_of_no_return() -> anyhow::Result<()> {
    let (cluster, suite) = Suite::start()?;
    let mut cases: Vec<Case> = (0..=2)
        .map(|step| coordinator_case(&format!("step node-1 {step} started")))
        .collect();
    cases.push(coordinator_case("command commit node-1"));
    // Both at once: node-1 dies before the barrier, and the coordinator as it tells node-2 to
    // abort (durable, not yet sent).
    cases.push(Case {
        expect: "aborted",
        ..agent_case(&before_step(1), "aborted").and(Target::Coordinator, "command abort node-2")
    });
    cluster.run(|cluster| {
        suite.run_all(
            cluster,
            "coordinator killed before the point of no return",
            &cases,
        )
    })
}

/// (b) SIGKILL the coordinator when it records `node-1` starting each instruction after the
/// point of no return, when it records `node-1` committed, and when it decided MakePermanent
/// (durable, not yet sent): the rollout continues from its stored inputs and succeeds.
#[test]
fn coordinator_killed_after_the_point_of_no_return() -> anyhow::Result<()> {
    let (cluster, suite) = Suite::start()?;
    let mut cases: Vec<Case> = (3..UP.len())
        .map(|step| coordinator_case(&format!("step node-1 {step} started")))
        .collect();
    cases.push(coordinator_case("node node-1 committed"));
    cases.push(coordinator_case("command make_permanent node-1"));
    // Both at once: the coordinator dies as node-1 starts code_change, node-1 itself just
    // before resume (the agent goes on without a coordinator; both restart).
    cases.push(Case {
        expect: "partially_rolled_back",
        ..coordinator_case("step node-1 5 started").and(Target::Agent(1), &before_step(6))
    });
    cluster.run(|cluster| {
        suite.run_all(
            cluster,
            "coordinator killed after the point of no return",
            &cases,
        )
    })
}

/// (b) on the etcd store: the coordinator fault points on both sides of the point of no return,
/// in a group of three coordinators on a real 3-member etcd cluster. The leader kills itself at
/// the point and is started again (as a standby); another member takes the rollout over from
/// the inputs stored in etcd, and the rollout succeeds.
#[test]
fn leader_killed_at_the_coordinator_fault_points_on_the_etcd_store() -> anyhow::Result<()> {
    let (cluster, suite) = Suite::start_on(ClusterOptions::default().group(3), |_| Vec::new())?;
    let cases: Vec<Case> = [
        "step node-1 1 started",
        "command commit node-1",
        "step node-1 4 started",
        "node node-1 committed",
        "command make_permanent node-1",
    ]
    .iter()
    .map(|point| coordinator_case(point))
    .collect();
    cluster.run(|cluster| suite.run_all(cluster, "group leader killed on the etcd store", &cases))
}

/// Fencing: a node that is declared failed after the point of no return (its agent frozen past
/// the grace period) and then comes back is told to roll back, never resumed. The canary pause
/// makes the window deterministic: node-1 (the canary) committed, the rollout waits for
/// promote.
#[test]
fn a_node_declared_failed_after_the_point_of_no_return_is_rolled_back_when_it_returns()
-> anyhow::Result<()> {
    let (cluster, mut suite) = Suite::start()?;
    cluster.run(|cluster| {
        let policy = format!("{POLICY}\ncanary = 1\npause_after_canary = true");
        let text = script(cluster, "1.0", "1.1", false, &policy, &UP)?;
        let path = cluster.write_script("canary.toml", &text)?;
        let id = cluster.start_rollout(&path, &[])?;
        cluster.wait_status(&id, "the canary wave to finish", ROLLOUT_TIMEOUT, |s| {
            status::rollout_state(s).is_ok_and(|st| st == "paused")
        })?;
        ensure!(services::current_release(cluster, 1, APP).as_deref() == Some("1.1"));
        cluster.agent(1).stop()?;
        // 3 heartbeats (1.5 s) to lose the session, then the 3 s grace: node-1 is failed.
        cluster.wait_status(&id, "node-1 to be declared failed", ROLLOUT_TIMEOUT, |s| {
            status::node_state(s, "node-1").is_ok_and(|st| st == "failed")
        })?;
        cluster.agent(1).cont()?;
        // Back, it hears Rollback (never a resume) and returns to 1.0.
        cluster.wait_status(&id, "node-1 to roll back", ROLLOUT_TIMEOUT, |s| {
            status::node_state(s, "node-1").is_ok_and(|st| st == "rolled_back")
        })?;
        let promoted = cluster.hotroll(&["rollout", "promote", &id])?;
        ensure!(promoted.code == Some(0), "promote: {promoted:?}");
        cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        let status = crash::wait_settled(cluster, &id, Duration::from_secs(30))?;
        let outcome = check_invariants(cluster, &suite.fleet(), &status, "1.0", "1.1")?;
        ensure!(
            outcome.rollout == "partially_rolled_back",
            "rollout ended {}: {status:#}",
            outcome.rollout
        );
        ensure!(outcome.versions.get("node-1").map(String::as_str) == Some("1.0"));
        ensure!(outcome.versions.get("node-2").map(String::as_str) == Some("1.1"));
        suite.version = "1.1".into();
        Ok(())
    })
}

/// An agent killed while it rolls back after a failed step (its new release crashes, `health`
/// fails after the point of no return), and killed after the rollback is journaled but before
/// it is reported: restarted, it rolls back again from its journal (or just reports what the
/// journal says) and the rollout ends `rolled_back`. Every case upgrades node-1 alone to 1.1,
/// which cannot run there (`FAIL_VERSION`), so each one ends back on 1.0.
#[test]
fn agent_killed_while_rolling_back() -> anyhow::Result<()> {
    let (cluster, mut suite) = Suite::start_with(|i| {
        if i == 1 {
            vec![("FAIL_VERSION", "1.1")]
        } else {
            Vec::new()
        }
    })?;
    suite.fixed = Some(("1.1".into(), node_name(1)));
    let mut up = UP.to_vec();
    up[8] = r#"{ health = { service = "version", timeout = "2s" } }"#;
    let cases = [
        agent_case("journal rolling_back rolling_back 8", "rolled_back"),
        agent_case("journal done rolled_back 8", "rolled_back"),
        agent_case("journal rolling_back rolling_back 8", "rolled_back").then("recovery RollBack"),
    ];
    cluster.run(|cluster| {
        let result = cases
            .iter()
            .try_for_each(|case| suite.run_script(cluster, case, &up));
        suite.print("agent killed while rolling back");
        result
    })
}
