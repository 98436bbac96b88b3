//! The BEAM runtime end to end: real Erlang nodes (long names on 127.0.0.1, a private epmd per
//! test, a random cookie), a real coordinator and real agents driving them.
//!
//! Fixtures: `tests/erlang/` (the `counter` app; `counter_server` v1 `{state, N}`, v2
//! `{state, N, Note}`, v3 whose code_change crashes where `-counter fail_code_change true`).
//! They need Erlang (the README's test command installs it) and fail, saying how to install
//! it, when it is missing.
//!
//! Measurements (printed with `--nocapture`): the suspend→resume window each agent reports and
//! the rollout time over 3 nodes, in `upgrades_three_nodes_to_v2_keeping_state_and_pid`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hotroll_tests::erlang::{self, Epmd, ErlNode};
use hotroll_tests::{Cluster, ClusterOptions, node_name, poll, status};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

/// Erlang nodes for a cluster of `n` agents: node-i drives `counter-node-i@127.0.0.1`.
struct Fleet {
    nodes: Vec<ErlNode>,
    ebin: PathBuf,
    // Dropped last: the nodes first, then epmd, then the dir.
    _epmd: Epmd,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// `n` nodes on v1; `args(i)` gives node i (1-based) extra `erl` arguments.
    fn start(n: usize, args: impl Fn(usize) -> String) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("hotroll-beam-").tempdir()?;
        let ebin = dir.path().join("ebin");
        for v in ["v1", "v2", "v3"] {
            erlang::compile_fixture(v, &ebin.join(v))?;
        }
        let epmd = Epmd::start(&dir.path().join("epmd.log"))?;
        let cookie = erlang::random_cookie();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let name = node_name(i);
            let node_dir = dir.path().join(&name);
            let code_dir = node_dir.join("ebin");
            std::fs::create_dir_all(&code_dir)?;
            for entry in std::fs::read_dir(ebin.join("v1"))? {
                let entry = entry?;
                std::fs::copy(entry.path(), code_dir.join(entry.file_name()))?;
            }
            let node = ErlNode::prepare(
                &node_dir,
                &format!("counter-{name}"),
                &code_dir,
                &cookie,
                epmd.port,
                &args(i),
            )?;
            node.start()?;
            nodes.push(node);
        }
        Ok(Self {
            nodes,
            ebin,
            _epmd: epmd,
            _dir: dir,
        })
    }

    fn root(&self) -> &Path {
        self._dir.path()
    }

    /// Cluster options whose agents drive these nodes.
    fn options(&self) -> ClusterOptions {
        let root = self.root().display().to_string();
        let extra = format!(
            r#"[[beam]]
app = "counter"
node = "counter-{{node}}@127.0.0.1"
cookie_file = "{root}/{{node}}/.erlang.cookie"
code_dir = "{root}/{{node}}/ebin"
start = ["sh", "{root}/{{node}}/start.sh"]
mfa_allow = ["counter_server:get/0"]
"#
        );
        ClusterOptions::default()
            .agent_toml_extra(&extra)
            .env("ERL_EPMD_PORT", &self._epmd.port.to_string())
    }

    fn node(&self, i: usize) -> &ErlNode {
        &self.nodes[i - 1]
    }

    fn beam(&self, version: &str, module: &str) -> String {
        self.ebin
            .join(version)
            .join(format!("{module}.beam"))
            .display()
            .to_string()
    }
}

/// What a test reads from a node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counter {
    version: String,
    state: String,
    pid: String,
    sys: String,
}

fn counter(node: &ErlNode) -> anyhow::Result<Counter> {
    let squash = |s: String| s.replace(' ', "");
    Ok(Counter {
        version: node.eval("gen_server:call(counter_server, version).")?,
        state: squash(node.eval("sys:get_state(counter_server).")?),
        pid: node.eval("pid_to_list(whereis(counter_server)).")?,
        sys: node.eval(
            "{status, _, _, [_, SysState | _]} = sys:get_status(counter_server, 5000), SysState.",
        )?,
    })
}

fn incr(node: &ErlNode, times: usize) -> anyhow::Result<()> {
    for _ in 0..times {
        node.eval("counter_server:incr().")?;
    }
    Ok(())
}

/// The suspend→resume windows (µs) an agent's log reports.
fn windows(cluster: &Cluster, i: usize) -> Vec<u64> {
    let log = cluster.dir().join(format!("logs/{}.log", node_name(i)));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("in-node upgrade group finished"))
        .filter_map(|l| {
            let at = l.find("window_us=")?;
            l[at + 10..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn v2_script(fleet: &Fleet, extra: &str, policy: &str) -> String {
    format!(
        r#"app = "counter"
runtime = "beam"
from = "1"
to = "2"

[[artifacts]]
name = "counter_fmt.beam"
source = "{fmt}"

[[artifacts]]
name = "counter_server.beam"
source = "{server}"

[rollout]
{policy}
barrier_timeout = "30s"
step_timeout = "30s"

[script]
up = [
  {{ load_object_code = ["counter_fmt.beam", "counter_server.beam"] }},
  {{ check = {{ modules = ["counter_server"] }} }},
  {{ sync_nodes = "staged" }},
  "point_of_no_return",
  {{ load = ["counter_fmt"] }},
  {{ suspend = ["counter_server"] }},
  {{ load = ["counter_server"] }},
  {{ code_change = {{ modules = ["counter_server"], extra = "{extra}" }} }},
  {{ resume = ["counter_server"] }},
  {{ apply = {{ mfa = "counter_server:get/0" }} }},
  {{ sync_nodes = "upgraded" }},
]
"#,
        fmt = fleet.beam("v2", "counter_fmt"),
        server = fleet.beam("v2", "counter_server"),
    )
}

/// Test 1: three nodes, v1 with state; rollout to v2 with barriers: every node runs v2, its
/// state migrated by code_change, in the same process.
#[test]
fn upgrades_three_nodes_to_v2_keeping_state_and_pid() -> anyhow::Result<()> {
    erlang::require()?;
    let fleet = Fleet::start(3, |_| String::new())?;
    let mut before = Vec::new();
    for i in 1..=3 {
        incr(fleet.node(i), i + 1)?;
        before.push(counter(fleet.node(i))?);
    }
    Cluster::start(3, fleet.options())?.run(|cluster| {
        let script = cluster.write_script(
            "v2.toml",
            &v2_script(
                &fleet,
                "upgraded",
                "max_failures = 0\non_failure = \"rollback_all\"",
            ),
        )?;
        let started = Instant::now();
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        let took = started.elapsed();
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "rollout: {}",
            run.status
        );
        for i in 1..=3 {
            let after = counter(fleet.node(i))?;
            let n = i + 1;
            ensure!(after.version == "2", "node {i}: {after:?}");
            ensure!(
                after.state == format!("{{state,{n},upgraded}}"),
                "node {i}: state not migrated: {after:?} (before {:?})",
                before[i - 1]
            );
            ensure!(
                after.pid == before[i - 1].pid,
                "node {i}: not the same process"
            );
            ensure!(after.sys == "running", "node {i}: {after:?}");
            // Permanent: the node boots v2 from now on.
            let installed = std::fs::read(fleet.node(i).code_dir.join("counter_server.beam"))?;
            ensure!(installed == std::fs::read(fleet.beam("v2", "counter_server"))?);
        }
        let nodes = cluster.nodes()?;
        ensure!(
            nodes.to_string().contains("\"2\""),
            "hotroll nodes does not show version 2: {nodes}"
        );
        println!("== BEAM runtime measurements (3 nodes, counter_server v1 -> v2) ==");
        println!("rollout time over 3 nodes (hotroll rollout start --wait): {took:?}");
        for i in 1..=3 {
            println!(
                "{}: suspend->resume window inside the node: {:?} us",
                node_name(i),
                windows(cluster, i)
            );
        }
        Ok(())
    })
}

/// Test 2: v3's code_change crashes on node-2: node-2 is back on v1 with its state in the same
/// running process; the others run v3 (policy rollback_node, one failure tolerated).
#[test]
fn failed_code_change_restores_v1_with_its_state() -> anyhow::Result<()> {
    erlang::require()?;
    let fleet = Fleet::start(3, |i| {
        if i == 2 {
            "-counter fail_code_change true".into()
        } else {
            String::new()
        }
    })?;
    let mut before = Vec::new();
    for i in 1..=3 {
        incr(fleet.node(i), 5)?;
        before.push(counter(fleet.node(i))?);
    }
    Cluster::start(3, fleet.options())?.run(|cluster| {
        let script = format!(
            r#"app = "counter"
runtime = "beam"
from = "1"
to = "3"

[[artifacts]]
name = "counter_server.beam"
source = "{server}"

[rollout]
max_failures = 1
on_failure = "rollback_node"
barrier_timeout = "30s"
step_timeout = "30s"

[script]
up = [
  {{ load_object_code = ["counter_server.beam"] }},
  {{ sync_nodes = "staged" }},
  "point_of_no_return",
  {{ suspend = ["counter_server"] }},
  {{ load = ["counter_server"] }},
  {{ code_change = {{ modules = ["counter_server"] }} }},
  {{ resume = ["counter_server"] }},
]
"#,
            server = fleet.beam("v3", "counter_server")
        );
        let script = cluster.write_script("v3.toml", &script)?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "partially_rolled_back",
            "rollout: {}",
            run.status
        );
        ensure!(status::node_state(&run.status, "node-2")? == "rolled_back");
        let error = status::node_error(&run.status, "node-2")?.unwrap_or_default();
        ensure!(error.contains("code_change"), "node-2 error: {error}");
        let back = counter(fleet.node(2))?;
        ensure!(back.version == "1", "node-2: {back:?}");
        ensure!(back.state == "{state,5}", "node-2 lost its state: {back:?}");
        ensure!(back.pid == before[1].pid, "node-2: not the same process");
        ensure!(back.sys == "running", "node-2: {back:?}");
        for i in [1, 3] {
            let after = counter(fleet.node(i))?;
            ensure!(after.version == "3", "node {i}: {after:?}");
            ensure!(after.state == "{state,5,v3}", "node {i}: {after:?}");
            ensure!(after.pid == before[i - 1].pid);
        }
        Ok(())
    })
}

/// Issue 15, test 6: `counter_server` is not in any supervision tree — its supervised child
/// is removed and it is started again by hand as a registered gen_server (`gen_server:start`,
/// no parent) — so the release handler's way of finding processes (the supervisors) does not
/// see it. The rollout to v2 still finds it (a proc_lib process whose initial call is the
/// module's), suspends it, and its code_change converts the state: the same pid, the state
/// migrated, running, `succeeded`.
#[test]
fn an_unsupervised_registered_gen_server_is_upgraded_with_its_state_and_pid() -> anyhow::Result<()>
{
    erlang::require()?;
    let fleet = Fleet::start(2, |_| String::new())?;
    let mut before = Vec::new();
    for i in 1..=2 {
        let node = fleet.node(i);
        node.eval(
            "ok = supervisor:terminate_child(counter_sup, counter_server), \
             ok = supervisor:delete_child(counter_sup, counter_server), \
             {ok, _} = gen_server:start({local, counter_server}, counter_server, [], []), ok.",
        )?;
        let children = node.eval("supervisor:which_children(counter_sup).")?;
        ensure!(children == "[]", "node {i}: still supervised: {children}");
        incr(node, i + 2)?;
        before.push(counter(node)?);
    }
    Cluster::start(2, fleet.options())?.run(|cluster| {
        let script = cluster.write_script(
            "v2.toml",
            &v2_script(
                &fleet,
                "upgraded",
                "max_failures = 0\non_failure = \"rollback_all\"",
            ),
        )?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "rollout: {}",
            run.status
        );
        for i in 1..=2 {
            let after = counter(fleet.node(i))?;
            let n = i + 2;
            ensure!(after.version == "2", "node {i}: {after:?}");
            ensure!(
                after.state == format!("{{state,{n},upgraded}}"),
                "node {i}: state not migrated: {after:?} (before {:?})",
                before[i - 1]
            );
            ensure!(
                after.pid == before[i - 1].pid,
                "node {i}: not the same process"
            );
            ensure!(after.sys == "running", "node {i}: {after:?}");
            incr(fleet.node(i), 1)?;
        }
        Ok(())
    })
}

/// Test 3: the agent is SIGKILLed while the node runs the upgrade group (a slow code_change):
/// the group completes inside the node and resumes the process, nothing stays suspended; the
/// restarted agent rolls the unfinished upgrade back: the node ends on a whole release (v1).
#[test]
fn agent_killed_mid_upgrade_leaves_nothing_suspended() -> anyhow::Result<()> {
    erlang::require()?;
    let fleet = Fleet::start(1, |_| String::new())?;
    incr(fleet.node(1), 3)?;
    let before = counter(fleet.node(1))?;
    Cluster::start(1, fleet.options())?.run(|cluster| {
        let script = cluster.write_script(
            "slow.toml",
            &v2_script(&fleet, "{delay, 3000}", "max_failures = 0"),
        )?;
        let id = cluster.start_rollout(&script, &[])?;
        // Kill the agent while counter_server sits in its slow code_change (suspended, inside
        // the in-node group). Ask the VM, not the process: a process busy in code_change cannot
        // answer sys:get_status, and an earlier load-only group takes the helper's lock too.
        poll(
            "counter_server to be inside its slow code_change",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                Ok((fleet.node(1).eval(
                    "erlang:process_info(whereis(counter_server), current_function) \
                     =:= {current_function, {timer, sleep, 1}}.",
                )? == "true")
                    .then_some(()))
            },
        )?;
        cluster.agent(1).kill()?;
        // With no agent at all, the node finishes the group and resumes the process.
        let resumed = poll(
            "counter_server to run again",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let c = counter(fleet.node(1))?;
                Ok((c.sys == "running").then_some(c))
            },
        )?;
        ensure!(resumed.pid == before.pid);
        ensure!(
            resumed.version == "2" && resumed.state == "{state,3,migrated}",
            "the group should have completed: {resumed:?}"
        );
        // The restarted agent rolls the unfinished upgrade back.
        cluster.agent(1).start()?;
        let back = poll(
            "the restarted agent to roll back to v1",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let c = counter(fleet.node(1))?;
                Ok((c.version == "1").then_some(c))
            },
        )?;
        ensure!(
            back.state == "{state,3}" && back.sys == "running",
            "{back:?}"
        );
        ensure!(back.pid == before.pid);
        let old_code = fleet
            .node(1)
            .eval("{code:which(counter_server), erlang:check_old_code(counter_fmt)}.")?;
        ensure!(
            old_code.contains("releases/1/counter_server.beam"),
            "{old_code}"
        );
        let final_status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&final_status)? != "succeeded",
            "{final_status}"
        );
        Ok(())
    })
}

/// Test 4: `hotroll plan beam` on the v1/v2 ebins writes a script that `hotroll check` accepts
/// and that upgrades the nodes (counter_fmt, added, loads before counter_server, which calls it).
#[test]
fn planned_script_upgrades_the_nodes() -> anyhow::Result<()> {
    erlang::require()?;
    let fleet = Fleet::start(2, |_| String::new())?;
    incr(fleet.node(1), 2)?;
    let before = counter(fleet.node(1))?;
    Cluster::start(2, fleet.options())?.run(|cluster| {
        let plan = cluster.dir().join("scripts/plan.toml");
        let from = fleet.ebin.join("v1").display().to_string();
        let to = fleet.ebin.join("v2").display().to_string();
        let plan_arg = plan.display().to_string();
        cluster
            .hotroll(&[
                "plan",
                "beam",
                "--from",
                &from,
                "--to",
                &to,
                "--app",
                "counter",
                "--from-version",
                "1",
                "--to-version",
                "2",
                "-o",
                &plan_arg,
            ])?
            .ok()?;
        let text = std::fs::read_to_string(&plan)?;
        let fmt = text
            .find("\"counter_fmt\"")
            .context("counter_fmt not in the plan")?;
        let server = text[fmt..]
            .find("\"counter_server\"")
            .context("counter_server not loaded after counter_fmt")?;
        ensure!(server > 0, "{text}");
        ensure!(text.contains("code_change"), "{text}");
        cluster.hotroll(&["check", &plan_arg])?.ok()?;
        let run = cluster.run_rollout(&plan, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "{}",
            run.status
        );
        for i in 1..=2 {
            let after = counter(fleet.node(i))?;
            ensure!(after.version == "2" && after.sys == "running", "{after:?}");
        }
        let after = counter(fleet.node(1))?;
        ensure!(
            after.state == "{state,2,migrated}" && after.pid == before.pid,
            "{after:?}"
        );
        let described = fleet.node(1).eval("counter_server:describe().")?;
        ensure!(described.contains("2 (migrated)"), "{described}");
        Ok(())
    })
}

/// `hotroll plan beam --node NAME --to NEW_EBIN`: the running node says what it has loaded
/// (and the app's version); the plan holds what really differs (counter_fmt added,
/// counter_server changed, callee first) and nothing the node already runs (counter_sup,
/// counter_app); the planned script upgrades the fleet.
#[test]
fn a_script_planned_from_the_running_node_upgrades_the_nodes() -> anyhow::Result<()> {
    erlang::require()?;
    let fleet = Fleet::start(2, |_| String::new())?;
    Cluster::start(2, fleet.options())?.run(|cluster| {
        let plan = cluster.dir().join("scripts/from-node.toml");
        let to = fleet.ebin.join("v2").display().to_string();
        let plan_arg = plan.display().to_string();
        let node = fleet.node(1);
        let mut command = cluster.hotroll_command();
        command
            .args(["plan", "beam", "--node", &node.name, "--cookie-file"])
            .arg(&node.cookie_file)
            .args([
                "--to",
                &to,
                "--app",
                "counter",
                "--to-version",
                "2",
                "-o",
                &plan_arg,
            ])
            .env("ERL_EPMD_PORT", node.epmd_port.to_string());
        let out = hotroll_tests::cluster::run_command(command, Duration::from_secs(60))?;
        ensure!(out.code == Some(0), "plan: {}{}", out.stdout, out.stderr);
        ensure!(
            out.stderr.contains("1 changed, 1 added"),
            "plan: {}",
            out.stderr
        );
        let text = std::fs::read_to_string(&plan)?;
        ensure!(
            text.contains("from = \"1\""),
            "from the node's app vsn: {text}"
        );
        let fmt = text
            .find("\"counter_fmt\"")
            .context("counter_fmt not in the plan")?;
        ensure!(
            text[fmt..].contains("\"counter_server\""),
            "counter_server not loaded after counter_fmt: {text}"
        );
        ensure!(
            !text.contains("counter_sup") && !text.contains("counter_app"),
            "unchanged modules planned: {text}"
        );
        cluster.hotroll(&["check", &plan_arg])?.ok()?;
        let run = cluster.run_rollout(&plan, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "{}",
            run.status
        );
        for i in 1..=2 {
            let after = counter(fleet.node(i))?;
            ensure!(after.version == "2" && after.sys == "running", "{after:?}");
        }
        Ok(())
    })
}

/// Test 5: a node that is down when the rollout starts: aborted before the point of no return,
/// no node changed.
#[test]
fn node_down_at_start_aborts_and_changes_nothing() -> anyhow::Result<()> {
    erlang::require()?;
    let fleet = Fleet::start(3, |_| String::new())?;
    let mut before = Vec::new();
    for i in 1..=3 {
        incr(fleet.node(i), i)?;
        before.push(counter(fleet.node(i))?);
    }
    fleet.node(3).stop()?;
    Cluster::start(3, fleet.options())?.run(|cluster| {
        let script = cluster.write_script(
            "v2.toml",
            &v2_script(&fleet, "upgraded", "max_failures = 0"),
        )?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "aborted",
            "{}",
            run.status
        );
        let error = status::node_error(&run.status, "node-3")?.unwrap_or_default();
        ensure!(error.contains("counter-node-3"), "node-3 error: {error}");
        for i in 1..=2 {
            let after = counter(fleet.node(i))?;
            ensure!(after == before[i - 1], "node {i} changed: {after:?}");
            let loaded = fleet.node(i).eval("code:is_loaded(counter_fmt).")?;
            ensure!(loaded == "false", "node {i} loaded counter_fmt: {loaded}");
            let installed = std::fs::read(fleet.node(i).code_dir.join("counter_server.beam"))?;
            ensure!(installed == std::fs::read(fleet.beam("v1", "counter_server"))?);
        }
        Ok(())
    })
}
