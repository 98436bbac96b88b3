//! Tests of the harness itself: process control, command timeouts, marker hooks, and a
//! coordinator-only cluster.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::{Cluster, ClusterOptions, Hook, Process, poll, read_marks, run_command};

/// The state letter of `/proc/<pid>/stat` (`S` sleeping, `T` stopped, ...); `None` when the
/// process is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    after_name.trim_start().chars().next()
}

fn sleeper(dir: &Path) -> Process {
    Process::new("sleeper", "sleep", ["30"], dir, dir.join("sleeper.log"))
}

#[test]
fn process_stop_cont_kill_restart_terminate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut p = sleeper(dir.path());
    p.start()?;
    let pid = p.pid().context("no pid")?;
    ensure!(p.is_running());

    p.stop()?;
    poll(
        "SIGSTOP to take",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || Ok((proc_state(pid) == Some('T')).then_some(())),
    )?;
    p.cont()?;
    poll(
        "SIGCONT to take",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || Ok((proc_state(pid) != Some('T')).then_some(())),
    )?;

    p.restart()?;
    let pid2 = p.pid().context("no pid after restart")?;
    ensure!(pid2 != pid, "restart kept the old process");
    ensure!(proc_state(pid).is_none(), "the old process was not reaped");
    ensure!(p.starts() == 2);

    let status = p.terminate(Duration::from_secs(5))?;
    ensure!(!status.success(), "sleep ended by SIGTERM reported success");
    ensure!(!p.is_running());
    ensure!(
        proc_state(pid2).is_none(),
        "terminated process was not reaped"
    );

    p.start()?;
    p.kill()?;
    ensure!(!p.is_running());
    let log = std::fs::read_to_string(p.log_path())?;
    ensure!(
        log.contains("start #3") && log.contains("SIGKILL"),
        "log: {log}"
    );
    Ok(())
}

#[test]
fn dropping_a_stopped_process_kills_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut p = sleeper(dir.path());
    p.start()?;
    let pid = p.pid().context("no pid")?;
    p.stop()?;
    drop(p);
    ensure!(
        proc_state(pid).is_none(),
        "process {pid} outlived its handle"
    );
    Ok(())
}

#[test]
fn commands_time_out() -> anyhow::Result<()> {
    let mut command = Command::new("sh");
    command.args(["-c", "echo out; echo err >&2; exit 7"]);
    let out = run_command(command, Duration::from_secs(10))?;
    ensure!(
        out.code == Some(7) && out.stdout == "out\n" && out.stderr == "err\n",
        "{out:?}"
    );

    let mut command = Command::new("sleep");
    command.arg("30");
    let err = run_command(command, Duration::from_millis(200))
        .err()
        .context("sleep 30 did not time out")?;
    ensure!(err.to_string().contains("timed out"), "{err}");
    Ok(())
}

#[test]
fn mark_hook_appends_label_and_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let marks = dir.path().join("marks");
    let vars = [("{marks}", marks.display().to_string())];
    for (hook, args) in [
        (Hook::mark(), vec!["one"]),
        (Hook::mark(), vec!["two", "words"]),
        (Hook::mark_fail(), vec!["three"]),
    ] {
        let mut cmd = hook.resolve(&vars);
        cmd.extend(args.iter().map(|a| a.to_string()));
        let mut command = Command::new(&cmd[0]);
        command.args(&cmd[1..]);
        let out = run_command(command, Duration::from_secs(10))?;
        ensure!(
            out.code == Some(if args[0] == "three" { 1 } else { 0 }),
            "{out:?}"
        );
    }
    let read = read_marks(&marks)?;
    let labels: Vec<&str> = read.iter().map(|m| m.label.as_str()).collect();
    ensure!(labels == ["one", "two words", "three"], "{read:?}");
    ensure!(
        read.windows(2).all(|w| w[0].ns <= w[1].ns),
        "marks out of order: {read:?}"
    );
    ensure!(read_marks(&dir.path().join("missing"))?.is_empty());
    Ok(())
}

/// A cluster without agents: the coordinator starts on a free port, answers `nodes`, and can
/// be SIGKILLed and restarted on the same port and data dir.
#[test]
fn coordinator_only_cluster_starts_and_restarts() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(0, ClusterOptions::default())?;
    let nodes = cluster.nodes()?;
    ensure!(
        nodes.as_array().is_some_and(Vec::is_empty),
        "nodes: {nodes}"
    );
    let pid = cluster.coordinator().pid().context("no pid")?;
    cluster.restart_coordinator()?;
    ensure!(cluster.coordinator().pid() != Some(pid));
    let nodes = cluster.nodes()?;
    ensure!(
        nodes.as_array().is_some_and(Vec::is_empty),
        "nodes: {nodes}"
    );
    let pid = cluster.coordinator().pid().context("no pid")?;
    drop(cluster);
    ensure!(
        proc_state(pid).is_none(),
        "coordinator outlived the cluster"
    );
    Ok(())
}

/// An agent that exits at start (here: a config it refuses) fails `Cluster::start` at once, with
/// its log in the error.
#[test]
fn agent_that_cannot_start_fails_the_cluster_fast() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let err = Cluster::start(
        1,
        ClusterOptions::default()
            .agent_toml_extra("[not_a_section]\nx = 1")
            .ready_timeout(Duration::from_secs(20)),
    )
    .err()
    .context("an agent with a bad config started")?;
    let text = format!("{err:#}");
    ensure!(text.contains("agent node-1 exited"), "{text}");
    ensure!(
        text.contains("not_a_section"),
        "the agent's log is not in the error: {text}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Agents can be SIGKILLed and restarted, and reconnect; SIGTERM ends an agent cleanly.
#[test]
fn agents_restart_and_reconnect() -> anyhow::Result<()> {
    Cluster::start(2, ClusterOptions::default())?.run(|cluster| {
        cluster.agent(1).kill()?;
        cluster.agent(1).restart()?;
        cluster.wait_all_connected(Duration::from_secs(20))?;
        let status = cluster.agent(2).terminate(Duration::from_secs(10))?;
        ensure!(status.success(), "SIGTERM: agent exited with {status}");
        poll(
            "node-2 to show as disconnected",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                let nodes = cluster.nodes()?;
                let gone = nodes.as_array().is_some_and(|all| {
                    all.iter()
                        .any(|n| n["name"] == "node-2" && n["connected"] == false)
                });
                Ok(gone.then_some(()))
            },
        )?;
        cluster.agent(2).start()?;
        cluster.wait_all_connected(Duration::from_secs(20))
    })
}
