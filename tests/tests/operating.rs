//! End-to-end tests of issue 5 ("Operating a rollout"): the watch output in a pipe and on a
//! terminal, the full history for late and reconnecting watchers, pause/resume/promote/abort,
//! the metrics endpoint, and fifty watchers at once. A real coordinator and three real agents
//! per test; hooks write marker files and gates hold nodes inside an instruction.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hotroll_tests::background::Background;
use hotroll_tests::metrics::scrape;
use hotroll_tests::scripts::{gate, gate_hook, mark, open_gate, open_gate_everywhere, script};
use hotroll_tests::terminal::Terminal;
use hotroll_tests::timed::timed_rollout;
use hotroll_tests::{Cluster, ClusterOptions, CmdOutput, Hook, free_port, golden, poll, status};
use serde_json::Value;

const NODES: usize = 3;
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

/// Hooks every test uses: `mark`, a passing check `ok`, `maybe_fail` (passes unless a test
/// overrides it on one node) and `gate`.
fn options() -> ClusterOptions {
    ClusterOptions::default()
        .hook("mark", Hook::mark().timeout("5s"))
        .hook("ok", Hook::ok())
        .hook("maybe_fail", Hook::ok())
        .hook("gate", gate_hook())
}

/// `[rollout]` body: waves (`canary`, `max_in_flight`), failure policy, generous timeouts so
/// that gates can hold nodes.
fn policy(extra: &str) -> String {
    format!(
        "on_failure = \"rollback_node\"\nmax_failures = 1\nbarrier_timeout = \"60s\"\n\
         step_timeout = \"60s\"\n{extra}"
    )
}

fn labels(cluster: &Cluster, i: usize) -> anyhow::Result<Vec<String>> {
    Ok(cluster.marks(i)?.into_iter().map(|m| m.label).collect())
}

fn node_states(status: &Value) -> Vec<(String, String)> {
    status::node_states(status)
}

fn expect_states(status: &Value, expected: &[(&str, &str)]) -> anyhow::Result<()> {
    for (name, state) in expected {
        let actual = status::node_state(status, name)?;
        ensure!(
            actual == *state,
            "node {name} is `{actual}`, expected `{state}`; status: {status:#}"
        );
    }
    Ok(())
}

/// Parse NDJSON events.
fn events(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON event: {l}")))
        .collect()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

/// Every seq from 1 to the last, once, in order; the last event is the final state.
fn assert_whole_history(events: &[Value], what: &str) -> anyhow::Result<()> {
    let seqs = seqs(events);
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    ensure!(
        seqs == expected,
        "{what}: seqs are not 1..={}: {seqs:?}",
        seqs.len()
    );
    let last = events.last().context("no events")?;
    ensure!(
        last["kind"] == "rollout_state"
            && last["rollout_state"].as_str().is_some_and(status::is_final),
        "{what}: the last event is not a final state: {last}"
    );
    Ok(())
}

fn expect_code(output: &CmdOutput, code: i32, what: &str) -> anyhow::Result<()> {
    ensure!(
        output.code == Some(code),
        "{what} exited {:?}, expected {code}\nstdout: {}\nstderr: {}",
        output.code,
        output.stdout,
        output.stderr
    );
    Ok(())
}

fn golden_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// A cluster whose coordinator serves metrics on a free port; returns the address.
fn with_metrics(options: ClusterOptions) -> anyhow::Result<(ClusterOptions, SocketAddr)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    Ok((
        options
            .coordinator_arg("--metrics-listen")
            .coordinator_arg(&addr.to_string()),
        addr,
    ))
}

// ---------------------------------------------------------------------------------------------
// 1. The watch output in a pipe, against a golden file.

/// The golden rollout: canary node-1, then node-2 and node-3 together; `maybe_fail` fails on
/// node-3 after the point of no return, which rolls back (`rollback_node`).
fn golden_script() -> String {
    script(
        "demo",
        &policy("canary = 1"),
        &[
            r#"{ check = "ok" }"#,
            &mark("prepare"),
            r#"{ sync_nodes = "staged" }"#,
            r#""point_of_no_return""#,
            &mark("committed"),
            r#"{ apply = { hook = "maybe_fail" } }"#,
        ],
        &[&mark("down")],
    )
}

/// 1. `hotroll rollout start FILE --watch` with stdout in a pipe prints one plain line per
///    event, no escape codes; masked (times, durations, arrival order), every line is the
///    golden file's and each lane (the rollout's lines, each node's) is in the golden order.
///    `HOTROLL_BLESS=1` rewrites the golden file from this run.
#[test]
fn watch_lines_in_a_pipe_match_the_golden_file() -> anyhow::Result<()> {
    Cluster::start(NODES, options().node_hook(3, "maybe_fail", Hook::fail()))?.run(|cluster| {
        let path = cluster.write_script("golden.toml", &golden_script())?;
        let path = path.display().to_string();
        let output = cluster.hotroll_timeout(
            &[
                "rollout",
                "start",
                &path,
                "--watch",
                "--wait-timeout",
                "80s",
            ],
            ROLLOUT_TIMEOUT,
        )?;
        expect_code(
            &output,
            3,
            "start --watch of a partially rolled back rollout",
        )?;
        ensure!(
            !output.stdout.contains('\u{1b}'),
            "escape codes in piped output:\n{}",
            output.stdout
        );
        ensure!(
            output.stderr.contains("started on 3 node(s)"),
            "stderr: {}",
            output.stderr
        );
        let actual = golden::mask(&output.stdout);
        let file = golden_path("watch_three_nodes.txt");
        if std::env::var_os("HOTROLL_BLESS").is_some() {
            std::fs::create_dir_all(file.parent().context("no parent")?)?;
            std::fs::write(&file, actual.join("\n") + "\n")?;
        }
        let expected = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        golden::compare(&actual, &golden::mask(&expected)).map_err(anyhow::Error::msg)?;

        // The arrivals at `staged`, masked above, count 1/3, 2/3, 3/3 in order.
        let arrivals: Vec<&str> = output
            .stdout
            .lines()
            .filter(|l| l.contains("arrived at barrier `staged`"))
            .filter_map(|l| l.rsplit_once('(').map(|(_, c)| c))
            .collect();
        ensure!(
            arrivals == ["1/3 arrived)", "2/3 arrived)", "3/3 arrived)"],
            "arrivals: {arrivals:?}"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Late watchers and reconnecting watchers see the whole history.

/// 2a. A watcher started after the rollout finished receives its whole history: the same
///     events `rollout events` lists, seq 1 to the final state; `--from-seq` resumes a saved
///     log; the text history has every event with time, node, instruction, outcome, duration.
#[test]
fn a_late_watcher_gets_the_whole_history() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let text = script(
            "demo",
            &policy("canary = 1\nmax_in_flight = 1"),
            &[
                r#"{ check = "ok" }"#,
                r#"{ sync_nodes = "staged" }"#,
                r#""point_of_no_return""#,
                &mark("committed"),
            ],
            &[],
        );
        let path = cluster.write_script("late.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        ensure!(run.code == Some(0), "rollout failed: {:#}", run.status);

        let watched = cluster.hotroll(&["rollout", "watch", &run.id, "--output", "json"])?;
        expect_code(&watched, 0, "watch of a succeeded rollout")?;
        let watched_events = events(&watched.stdout)?;
        assert_whole_history(&watched_events, "late watcher")?;
        ensure!(
            watched_events
                .iter()
                .all(|e| e["rollout"] == run.id.as_str()),
            "events of another rollout"
        );

        let history = cluster
            .hotroll(&["rollout", "events", &run.id, "--output", "json"])?
            .ok()?;
        ensure!(
            history.stdout == watched.stdout,
            "`events` and a late `watch` differ:\n{}\n---\n{}",
            history.stdout,
            watched.stdout
        );
        // Every step that finished carries its duration.
        for e in &watched_events {
            if e["kind"] == "step" && e["phase"] != "started" {
                ensure!(e["duration_ms"].is_u64(), "no duration: {e}");
            }
        }
        let steps_ok = watched_events
            .iter()
            .filter(|e| e["kind"] == "step" && e["phase"] == "succeeded")
            .count();
        ensure!(steps_ok == 4 * NODES, "{steps_ok} steps succeeded");

        // Resuming from a seq gives exactly the rest.
        let n = watched_events.len() as u64;
        let from = n / 2;
        let rest = cluster.hotroll(&[
            "rollout",
            "watch",
            &run.id,
            "--output",
            "json",
            "--from-seq",
            &from.to_string(),
        ])?;
        expect_code(&rest, 0, "watch --from-seq")?;
        ensure!(
            seqs(&events(&rest.stdout)?) == (from..=n).collect::<Vec<_>>(),
            "--from-seq {from}: {}",
            rest.stdout
        );

        // The same history as a table and as plain lines.
        let table = cluster.hotroll(&["rollout", "events", &run.id])?.ok()?;
        ensure!(
            table.stdout.lines().count() == watched_events.len() + 1,
            "table rows: {}",
            table.stdout
        );
        let header = table.stdout.lines().next().unwrap_or_default();
        for column in ["TIME", "NODE", "WHAT", "OUTCOME", "DURATION"] {
            ensure!(header.contains(column), "no {column} column: {header}");
        }
        ensure!(table.stdout.contains("#4 apply"), "{}", table.stdout);
        let lines = cluster.hotroll(&["rollout", "watch", &run.id])?;
        expect_code(&lines, 0, "plain watch")?;
        ensure!(
            lines.stdout.lines().count() == watched_events.len(),
            "one line per event expected:\n{}",
            lines.stdout
        );

        // `rollout list` shows it with state, app, versions, node count and duration.
        let list = cluster
            .hotroll(&["rollout", "list", "--output", "json"])?
            .ok()?
            .json()?;
        let row = list
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == run.id.as_str()))
            .with_context(|| format!("not listed: {list}"))?;
        ensure!(
            row["state"] == "succeeded"
                && row["app"] == "demo"
                && row["from"] == "1.0.0"
                && row["to"] == "2.0.0"
                && row["nodes"] == NODES as u64
                && row["duration_ms"].is_u64(),
            "list row: {row}"
        );
        let list_text = cluster.hotroll(&["rollout", "list"])?.ok()?;
        ensure!(
            list_text.stdout.contains(&run.id) && list_text.stdout.contains("succeeded"),
            "{}",
            list_text.stdout
        );
        Ok(())
    })
}

/// 2b. A watcher that falls behind while the rollout runs (here: a coordinator keeping one
///     event for live watchers, so every burst of events overflows it) is told so, reconnects
///     from its last event, and misses nothing: its output is the whole history, once.
#[test]
fn a_reconnecting_watcher_misses_nothing() -> anyhow::Result<()> {
    let (options, metrics) = with_metrics(options().coordinator_arg("--watch-buffer=1"))?;
    Cluster::start(NODES, options)?.run(|cluster| {
        let text = script(
            "demo",
            &policy("canary = 1"),
            &[
                &gate("start"),
                r#"{ check = "ok" }"#,
                r#"{ sync_nodes = "staged" }"#,
                r#""point_of_no_return""#,
                &mark("committed"),
                r#"{ sync_nodes = "done" }"#,
                &mark("done"),
            ],
            &[],
        );
        let path = cluster.write_script("reconnect.toml", &text)?;
        let id = cluster.start_rollout(&path, &[])?;
        let watcher = Background::hotroll(cluster, &["rollout", "watch", &id, "--output", "json"])?;
        poll(
            "the watcher to attach",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                Ok(
                    (scrape(metrics)?.value_or_zero("hotroll_watch_streams", &[]) >= 1.0)
                        .then_some(()),
                )
            },
        )?;
        open_gate_everywhere(cluster, "start")?;
        let output = watcher.wait(ROLLOUT_TIMEOUT)?;
        expect_code(&output, 0, "the watcher")?;
        ensure!(
            output.stderr.contains("fell behind"),
            "the watcher never had to reconnect (stderr: {})",
            output.stderr
        );
        let watched = events(&output.stdout)?;
        assert_whole_history(&watched, "reconnecting watcher")?;
        let history = cluster
            .hotroll(&["rollout", "events", &id, "--output", "json"])?
            .ok()?;
        ensure!(
            history.stdout == output.stdout,
            "the reconnecting watcher's events differ from the history"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Steering a rollout.

/// Three waves of one node; node `i`'s `wave` gate holds it after the point of no return.
fn three_waves_script(extra: &str) -> String {
    script(
        "demo",
        &policy(&format!("canary = 1\nmax_in_flight = 1\n{extra}")),
        &[
            r#"{ check = "ok" }"#,
            &mark("prepare"),
            r#"{ sync_nodes = "staged" }"#,
            r#""point_of_no_return""#,
            &mark("committed"),
            &gate("wave"),
            &mark("done"),
        ],
        &[&mark("down")],
    )
}

fn control(cluster: &Cluster, action: &str, id: &str) -> anyhow::Result<CmdOutput> {
    cluster.hotroll(&["rollout", action, id])
}

/// The state a control command printed (`rollout ID: STATE` on its first line).
fn answered_state(output: &CmdOutput) -> anyhow::Result<String> {
    let first = output.stdout.lines().next().unwrap_or_default();
    first
        .rsplit_once(": ")
        .map(|(_, s)| s.trim().to_string())
        .with_context(|| {
            format!(
                "no state in `{}` (stderr: {})",
                output.stdout, output.stderr
            )
        })
}

/// A command that does not apply: exit 1 and an error on stderr containing `why`.
fn refused(output: &CmdOutput, why: &str) -> anyhow::Result<()> {
    ensure!(
        output.code == Some(1) && output.stderr.contains(why) && output.stdout.is_empty(),
        "expected a refusal mentioning `{why}`, got exit {:?}\nstdout: {}\nstderr: {}",
        output.code,
        output.stdout,
        output.stderr
    );
    Ok(())
}

/// 3a. pause → the wave in flight finishes and no new wave starts; resume → it continues.
#[test]
fn pause_holds_the_next_wave_and_resume_continues() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let path = cluster.write_script("pause.toml", &three_waves_script(""))?;
        let id = cluster.start_rollout(&path, &[])?;
        poll(
            "node-1 to reach its gate",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || cluster.mark_time(1, "wave"),
        )?;

        let paused = control(cluster, "pause", &id)?.ok()?;
        ensure!(
            answered_state(&paused)? == "committing",
            "pause answered: {}",
            paused.stdout
        );
        ensure!(
            paused.stdout.contains("pause requested"),
            "{}",
            paused.stdout
        );
        refused(
            &control(cluster, "pause", &id)?,
            "cannot pause rollout in state committing: a pause is already pending",
        )?;

        // The wave in flight finishes; then the rollout holds.
        open_gate(cluster, 1, "wave")?;
        // Had a wave started, its node would pass its gate at once.
        open_gate(cluster, 2, "wave")?;
        open_gate(cluster, 3, "wave")?;
        let status =
            cluster.wait_status(&id, "the rollout to pause", Duration::from_secs(30), |s| {
                status::rollout_state(s).is_ok_and(|st| st == "paused")
            })?;
        expect_states(
            &status,
            &[
                ("node-1", "committed"),
                ("node-2", "prepared"),
                ("node-3", "prepared"),
            ],
        )?;
        // Give a wrongly started wave time to show, then check that none did.
        std::thread::sleep(Duration::from_millis(1500));
        let status = cluster.status(&id)?;
        ensure!(
            status::rollout_state(&status)? == "paused",
            "no longer paused: {status:#}"
        );
        expect_states(&status, &[("node-2", "prepared"), ("node-3", "prepared")])?;
        for i in [2, 3] {
            ensure!(
                labels(cluster, i)? == ["prepare"],
                "node-{i} went past the point of no return while paused: {:?}",
                labels(cluster, i)?
            );
        }
        refused(
            &control(cluster, "promote", &id)?,
            "only a rollout paused after its canary wave can be promoted",
        )?;
        refused(
            &control(cluster, "pause", &id)?,
            "cannot pause rollout in state paused: the rollout is already paused",
        )?;

        let resumed = control(cluster, "resume", &id)?.ok()?;
        ensure!(
            answered_state(&resumed)? == "committing",
            "resume answered: {}",
            resumed.stdout
        );
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(status::rollout_state(&status)? == "succeeded", "{status:#}");
        for i in 1..=NODES {
            ensure!(
                labels(cluster, i)? == ["prepare", "committed", "wave", "done"],
                "node-{i} ran {:?}",
                labels(cluster, i)?
            );
        }
        refused(
            &control(cluster, "resume", &id)?,
            "cannot resume rollout in state succeeded: the rollout is not paused",
        )?;
        refused(
            &control(cluster, "abort", &id)?,
            "cannot abort rollout in state succeeded: the rollout has already finished",
        )?;
        refused(
            &control(cluster, "pause", "no-such-rollout")?,
            "no rollout with id `no-such-rollout`",
        )?;
        Ok(())
    })
}

/// 3b. `pause_after_canary = true`: the rollout holds after the canary wave until `promote`
///     (`resume` is refused with the reason), then the other waves run.
#[test]
fn pause_after_canary_holds_until_promote() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let path = cluster.write_script(
            "canary.toml",
            &three_waves_script("pause_after_canary = true"),
        )?;
        open_gate_everywhere(cluster, "wave")?;
        let id = cluster.start_rollout(&path, &[])?;
        let status = cluster.wait_status(
            &id,
            "the rollout to pause after its canary",
            Duration::from_secs(30),
            |s| status::rollout_state(s).is_ok_and(|st| st == "paused"),
        )?;
        expect_states(
            &status,
            &[
                ("node-1", "committed"),
                ("node-2", "prepared"),
                ("node-3", "prepared"),
            ],
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        for i in [2, 3] {
            ensure!(
                labels(cluster, i)? == ["prepare"],
                "node-{i} did not wait for promote: {:?}",
                labels(cluster, i)?
            );
        }
        refused(
            &control(cluster, "resume", &id)?,
            "paused after the canary wave: promote to continue",
        )?;
        let promoted = control(cluster, "promote", &id)?.ok()?;
        ensure!(
            answered_state(&promoted)? == "committing",
            "promote answered: {}",
            promoted.stdout
        );
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(status::rollout_state(&status)? == "succeeded", "{status:#}");
        for i in 1..=NODES {
            ensure!(
                labels(cluster, i)? == ["prepare", "committed", "wave", "done"],
                "node-{i} ran {:?}",
                labels(cluster, i)?
            );
        }
        refused(
            &control(cluster, "promote", &id)?,
            "cannot promote rollout in state succeeded",
        )?;
        Ok(())
    })
}

/// 3c. abort before the point of no return: the answer is `aborted`, every node aborts, and
///     nothing after the point of no return runs anywhere.
#[test]
fn abort_before_the_point_of_no_return_aborts_every_node() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let text = script(
            "demo",
            &policy(""),
            &[
                &mark("prepare"),
                &gate("hold"),
                r#"{ sync_nodes = "staged" }"#,
                r#""point_of_no_return""#,
                &mark("committed"),
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("abort-early.toml", &text)?;
        let id = cluster.start_rollout(&path, &[])?;
        // node-1 and node-3 go on to the barrier, node-2 stays in its gate.
        open_gate(cluster, 1, "hold")?;
        open_gate(cluster, 3, "hold")?;
        poll(
            "node-2 to reach its gate",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || cluster.mark_time(2, "hold"),
        )?;

        let aborted = control(cluster, "abort", &id)?.ok()?;
        ensure!(
            answered_state(&aborted)? == "aborted",
            "abort answered: {}",
            aborted.stdout
        );
        let status =
            cluster.wait_status(&id, "every node to abort", Duration::from_secs(30), |s| {
                node_states(s).iter().all(|(_, st)| st == "aborted")
            })?;
        ensure!(status::rollout_state(&status)? == "aborted", "{status:#}");
        for i in 1..=NODES {
            ensure!(
                labels(cluster, i)? == ["prepare", "hold"],
                "node-{i} ran past the point of no return or rolled back: {:?}",
                labels(cluster, i)?
            );
        }
        refused(
            &control(cluster, "abort", &id)?,
            "the rollout has already finished",
        )?;
        Ok(())
    })
}

/// 3d. abort after the point of no return: every node that committed rolls back (runs its
///     `down` list) and ends `rolled_back`; the node that never committed aborts.
#[test]
fn abort_after_the_point_of_no_return_rolls_back_the_committed_nodes() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let path = cluster.write_script("abort-late.toml", &three_waves_script(""))?;
        open_gate(cluster, 1, "wave")?;
        let id = cluster.start_rollout(&path, &[])?;
        // Wave 1 (node-1) done, wave 2 (node-2) held in its gate, node-3 prepared.
        poll(
            "node-2 to reach its gate",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || cluster.mark_time(2, "wave"),
        )?;
        // The command answers once the nodes have confirmed: with the final state.
        let aborted = control(cluster, "abort", &id)?.ok()?;
        ensure!(
            answered_state(&aborted)? == "rolled_back",
            "abort answered: {}",
            aborted.stdout
        );
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&status)? == "rolled_back",
            "{status:#}"
        );
        expect_states(
            &status,
            &[
                ("node-1", "rolled_back"),
                ("node-2", "rolled_back"),
                ("node-3", "aborted"),
            ],
        )?;
        ensure!(
            labels(cluster, 1)? == ["prepare", "committed", "wave", "done", "down"],
            "node-1 ran {:?}",
            labels(cluster, 1)?
        );
        let node2 = labels(cluster, 2)?;
        ensure!(
            node2.first().map(String::as_str) == Some("prepare")
                && node2.last().map(String::as_str) == Some("down")
                && !node2.contains(&"done".to_string()),
            "node-2 ran {node2:?}"
        );
        ensure!(
            labels(cluster, 3)? == ["prepare"],
            "node-3 ran {:?}",
            labels(cluster, 3)?
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// 4. The live view on a terminal.

/// 4. `hotroll rollout watch ID` on a pseudo-terminal: the screen (read through a terminal
///    emulator) shows the header and one row per node while the rollout runs, redraws in place
///    (one header on the screen, never a scrolled pile of frames), and ends with every node's
///    final row and the final state; exit 0.
#[test]
fn the_terminal_view_shows_every_node_and_the_final_state() -> anyhow::Result<()> {
    Cluster::start(NODES, options())?.run(|cluster| {
        let text = script(
            "demo",
            &policy("canary = 1"),
            &[
                r#"{ check = "ok" }"#,
                r#"{ sync_nodes = "staged" }"#,
                r#""point_of_no_return""#,
                &gate("wave"),
                &mark("done"),
            ],
            &[],
        );
        let path = cluster.write_script("tty.toml", &text)?;
        let id = cluster.start_rollout(&path, &[])?;
        let hotroll = cluster.binaries().hotroll.clone();
        let env = cluster.cli_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut term = Terminal::spawn(
            &hotroll,
            &["rollout", "watch", &id, "--coordinator", cluster.url()],
            &env,
            30,
            120,
        )?;
        let live = term.wait_for_screen(
            "the canary held in its gate",
            Duration::from_secs(30),
            |s| {
                s.contains(&format!("rollout {id}"))
                    && s.lines()
                        .any(|l| l.starts_with("node-1") && l.contains("4/5 apply"))
                    && s.contains("wave 1/2")
            },
        )?;
        for i in 1..=NODES {
            ensure!(
                live.lines().any(|l| l.starts_with(&format!("node-{i} "))),
                "no row for node-{i}:\n{live}"
            );
        }
        ensure!(live.contains("NODE") && live.contains("STATE"), "{live}");
        open_gate_everywhere(cluster, "wave")?;
        let code = term.wait(ROLLOUT_TIMEOUT)?;
        let screen = term.screen();
        ensure!(code == Some(0), "watch exited {code:?}; screen:\n{screen}");
        ensure!(
            screen.matches("NODE").count() == 1
                && screen.matches(&format!("rollout {id}")).count() == 1,
            "frames piled up instead of being redrawn in place:\n{screen}"
        );
        for i in 1..=NODES {
            let row = screen
                .lines()
                .find(|l| l.starts_with(&format!("node-{i} ")))
                .with_context(|| format!("no row for node-{i}:\n{screen}"))?;
            ensure!(
                row.contains("committed") && row.contains("5/5 apply"),
                "node-{i}'s row is not final: `{row}`\n{screen}"
            );
        }
        ensure!(
            screen.contains("rollout succeeded after") && screen.contains("100%"),
            "no final state on the screen:\n{screen}"
        );
        // It was a terminal: the output did use escape codes (redraws, colours).
        ensure!(term.raw().contains(&0x1b), "no escape codes on a terminal");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Metrics.

/// 5. `/metrics` scraped before, during and after a rollout parses as Prometheus text, and the
///    numbers move as they should: connected agents, rollouts by state, instruction durations
///    by instruction, barrier waits, rollbacks, watch streams.
#[test]
fn metrics_move_during_a_rollout() -> anyhow::Result<()> {
    let (options, addr) = with_metrics(options().node_hook(3, "maybe_fail", Hook::fail()))?;
    Cluster::start(NODES, options)?.run(|cluster| {
        let before = scrape(addr)?;
        ensure!(
            before.value("hotroll_connected_agents", &[]) == Some(NODES as f64),
            "connected agents: {:?}",
            before.value("hotroll_connected_agents", &[])
        );
        for state in [
            "pending",
            "preparing",
            "committing",
            "paused",
            "succeeded",
            "aborted",
        ] {
            ensure!(
                before.value("hotroll_rollouts", &[("state", state)]) == Some(0.0),
                "rollouts {state} before any rollout: {:?}",
                before.value("hotroll_rollouts", &[("state", state)])
            );
        }
        ensure!(before.value("hotroll_rollbacks_total", &[]) == Some(0.0));
        ensure!(before.value("hotroll_artifact_bytes_sent_total", &[]) == Some(0.0));

        let text = script(
            "demo",
            &policy("canary = 1"),
            &[
                r#"{ check = "ok" }"#,
                r#"{ sync_nodes = "staged" }"#,
                r#""point_of_no_return""#,
                &gate("wave"),
                r#"{ apply = { hook = "maybe_fail" } }"#,
            ],
            &[&mark("down")],
        );
        let path = cluster.write_script("metrics.toml", &text)?;
        let id = cluster.start_rollout(&path, &[])?;
        poll(
            "node-1 to reach its gate",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || cluster.mark_time(1, "wave"),
        )?;
        let watcher = Background::hotroll(cluster, &["rollout", "watch", &id, "--output", "json"])?;
        let during = poll(
            "the watcher to show in the metrics",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                let s = scrape(addr)?;
                Ok((s.value_or_zero("hotroll_watch_streams", &[]) >= 1.0).then_some(s))
            },
        )?;
        ensure!(
            during.value("hotroll_rollouts", &[("state", "committing")]) == Some(1.0),
            "rollouts committing during the rollout: {:?}",
            during.value("hotroll_rollouts", &[("state", "committing")])
        );
        ensure!(during.value("hotroll_rollouts_started_total", &[]) == Some(1.0));
        let checks = during.value(
            "hotroll_instruction_duration_seconds_count",
            &[("instruction", "check"), ("outcome", "succeeded")],
        );
        ensure!(
            checks == Some(NODES as f64),
            "check durations observed: {checks:?}"
        );
        let barrier = during.value(
            "hotroll_barrier_wait_seconds_count",
            &[("outcome", "released")],
        );
        ensure!(barrier == Some(1.0), "barrier waits observed: {barrier:?}");

        open_gate_everywhere(cluster, "wave")?;
        let status = cluster.wait_final(&id, ROLLOUT_TIMEOUT)?;
        ensure!(
            status::rollout_state(&status)? == "partially_rolled_back",
            "{status:#}"
        );
        watcher.wait(Duration::from_secs(30))?;
        let after = poll(
            "the watch stream to close",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let s = scrape(addr)?;
                Ok((s.value_or_zero("hotroll_watch_streams", &[]) == 0.0).then_some(s))
            },
        )?;
        for (state, n) in [
            ("committing", 0.0),
            ("partially_rolled_back", 1.0),
            ("succeeded", 0.0),
        ] {
            ensure!(
                after.value("hotroll_rollouts", &[("state", state)]) == Some(n),
                "rollouts {state}: {:?}",
                after.value("hotroll_rollouts", &[("state", state)])
            );
        }
        ensure!(
            after.value("hotroll_rollbacks_total", &[]) == Some(1.0),
            "rollbacks: {:?}",
            after.value("hotroll_rollbacks_total", &[])
        );
        let applies = |outcome| {
            after.value_or_zero(
                "hotroll_instruction_duration_seconds_count",
                &[("instruction", "apply"), ("outcome", outcome)],
            )
        };
        // Per node: the gate and maybe_fail (both `apply`); node-3's maybe_fail failed.
        ensure!(
            applies("succeeded") == (2 * NODES - 1) as f64 && applies("failed") == 1.0,
            "apply durations: {} succeeded, {} failed",
            applies("succeeded"),
            applies("failed")
        );
        // The buckets of a histogram are cumulative and end at the count.
        let mut buckets: Vec<(f64, f64)> = after
            .samples
            .iter()
            .filter(|s| {
                s.name == "hotroll_instruction_duration_seconds_bucket"
                    && s.labels.get("instruction").is_some_and(|i| i == "apply")
                    && s.labels.get("outcome").is_some_and(|o| o == "succeeded")
            })
            .map(|s| {
                let le = s.labels.get("le").map_or(f64::NAN, |le| match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::NAN),
                });
                (le, s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        ensure!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1)
                && buckets.last().map(|b| b.1) == Some(applies("succeeded")),
            "buckets are not cumulative up to the count: {buckets:?}"
        );
        let sum = after.value_or_zero(
            "hotroll_instruction_duration_seconds_sum",
            &[("instruction", "apply"), ("outcome", "succeeded")],
        );
        ensure!(sum > 0.0, "apply durations sum to {sum}");
        ensure!(
            after.value("hotroll_connected_agents", &[]) == Some(NODES as f64),
            "agents disconnected"
        );
        ensure!(
            after.value("hotroll_artifact_bytes_sent_total", &[]) == Some(0.0),
            "artifact bytes counted without any artifact"
        );
        // The histogram is consistent: +Inf bucket == count.
        let inf = after.value(
            "hotroll_instruction_duration_seconds_bucket",
            &[
                ("instruction", "check"),
                ("outcome", "succeeded"),
                ("le", "+Inf"),
            ],
        );
        ensure!(inf == Some(NODES as f64), "+Inf bucket: {inf:?}");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// 6. Fifty watchers.

/// 6. Fifty watchers at once: each receives the whole history and exits 0, and the rollout
///    is not held up by them. The durations with and without watchers are printed (run with
///    `--nocapture`); they are not asserted, wall-clock numbers on a shared machine being what
///    they are. `cargo run --release -p hotroll-tests --bin watch-bench` measures this properly.
#[test]
fn fifty_watchers_each_get_everything() -> anyhow::Result<()> {
    let (options, metrics) = with_metrics(options())?;
    Cluster::start(NODES, options)?.run(|cluster| {
        let started = Instant::now();
        let (alone, ()) = timed_rollout(cluster, metrics, "alone", 0, |_| Ok(()))?;
        let (watched, running) = timed_rollout(cluster, metrics, "watched", 50, |id| {
            (0..50)
                .map(|_| {
                    Background::hotroll(cluster, &["rollout", "watch", id, "--output", "json"])
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let outputs = running
            .into_iter()
            .map(|w| w.wait(Duration::from_secs(60)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut lengths = BTreeSet::new();
        for (n, output) in outputs.iter().enumerate() {
            expect_code(output, 0, &format!("watcher {n}"))?;
            let events = events(&output.stdout)?;
            assert_whole_history(&events, &format!("watcher {n}"))?;
            lengths.insert(events.len());
        }
        ensure!(
            lengths.len() == 1,
            "the watchers saw histories of different lengths: {lengths:?}"
        );
        eprintln!(
            "rollout from gate to final: {alone} ms without watchers, {watched} ms with 50 \
             watchers ({} events each); test took {:?}",
            lengths.first().copied().unwrap_or_default(),
            started.elapsed()
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Logs.

/// Every line of `log` (but the harness's own `=====` lines) is a JSON object with a timestamp
/// and a level.
fn assert_json_log(log: &Path) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut lines = 0;
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("===== "))
    {
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not a JSON log line: {line}", log.display()))?;
        ensure!(
            value["timestamp"].is_string() && value["level"].is_string(),
            "{}: no timestamp or level: {line}",
            log.display()
        );
        lines += 1;
    }
    Ok(lines)
}

/// `--log-format json`: the coordinator and an agent log one JSON object per line.
#[test]
fn both_daemons_log_json_on_request() -> anyhow::Result<()> {
    Cluster::start(1, options().coordinator_arg("--log-format=json"))?.run(|cluster| {
        // One more agent, started by hand with --log-format json, on node-1's config renamed.
        let config = std::fs::read_to_string(&cluster.agent_info(1).config)?
            .replace("\"node-1\"", "\"json-node\"")
            .replace("node-1/data", "json-node-data");
        // A join token of its own (node-1's is used up).
        let token = cluster.create_token(&["--role", "agent", "--node", "json-node"])?;
        let config = config
            .lines()
            .map(|line| match line.starts_with("join_token") {
                true => format!("join_token = \"{token}\""),
                false => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let dir = cluster.dir().join("json-node");
        std::fs::create_dir_all(dir.join("json-node-data"))?;
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config)?;
        let log = cluster.dir().join("logs/json-node.log");
        let mut agent = hotroll_tests::Process::new(
            "json-node",
            &cluster.binaries().agent,
            [
                "--config".to_string(),
                config_path.display().to_string(),
                "--log-format".into(),
                "json".into(),
            ],
            &dir,
            &log,
        );
        agent.env("RUST_LOG", "info");
        agent.start()?;
        let connected = cluster.wait_connected(&["json-node".to_string()], Duration::from_secs(20));
        let agent_lines = assert_json_log(&log);
        agent.kill()?;
        connected?;
        ensure!(agent_lines? > 0, "the agent logged nothing");
        let coordinator_log = cluster.coordinator().log_path().to_path_buf();
        let text = std::fs::read_to_string(&coordinator_log)?;
        ensure!(
            text.contains("\"message\":\"agent connected\""),
            "no structured `agent connected`: {text}"
        );
        ensure!(
            assert_json_log(&coordinator_log)? > 0,
            "the coordinator logged nothing"
        );
        Ok(())
    })
}
