//! `console-bench`: how long the web console takes to show a 10,000-node rollout in headless
//! Chromium, and how much memory the page takes for it. Prints figures; asserts none.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin console-bench -- [--agents 10000] [--workers 4]
//! ```
//!
//! 1. The scale bench's fleet (`hotroll_tests::scale::run`: one real `hotroll serve`, N real
//!    agents in worker processes) runs one rollout of its script (three barriers, the point of
//!    no return) to its end, and stops.
//! 2. A `hotroll serve --ui-listen` on the same data dir serves the console; a viewer token is
//!    made with `hotroll token create`.
//! 3. Chromium logs in through the form, opens the fleet page (N table rows), then the
//!    rollout's page, which receives the status (N node rows) and the whole stored history
//!    over server-sent events.
//!
//! Printed: the time to log in and draw the fleet page (N table rows); the rollout page's time
//! to its virtualised node list (every row accounted for) and to the whole history applied;
//! how long a jump in the node list takes to its next painted frame (median, worst of 20); the
//! tab's JS heap (`performance.memory`) and the resident (RSS) and proportional (PSS) memory of
//! Chromium's `--type=renderer` processes (`/proc/PID/status`, `smaps_rollup`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use hotroll_tests::browser::Browser;
use hotroll_tests::scale::procfs;
use hotroll_tests::scale::raise_fd_limit;
use hotroll_tests::scale::run::{RunOptions, run};
use hotroll_tests::scale::worker::{self, WorkerArgs};
use hotroll_tests::{Process, free_port};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(
    name = "console-bench",
    about = "The web console showing an N-node rollout in headless Chromium: time and memory"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Nodes in the rollout.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Worker processes the agents are spread over.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Session heartbeat interval of the scale fleet.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// How long the page may take to show everything.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    page_timeout: Duration,
    /// Keep the temp dirs (coordinator store, logs).
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// (internal) Run agents in this process for the scale fleet.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    hotroll_script::parse_duration(text).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Sub::Worker(worker_args)) = args.command {
        return worker::run(worker_args.into());
    }
    hotroll_tests::browser::require()?;
    let fd_limit = raise_fd_limit()?;
    ensure!(
        fd_limit >= args.agents as u64 + 256,
        "the open-file limit is {fd_limit}: raise it (ulimit -Hn) first"
    );
    let bins = hotroll_tests::binaries()?;
    let dir = tempfile::Builder::new()
        .prefix("hotroll-console-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let shm = PathBuf::from("/dev/shm");
    let agent_parent = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    let agent_dir = tempfile::Builder::new()
        .prefix("hotroll-console-bench-agents-")
        .tempdir_in(&agent_parent)?;
    eprintln!(
        "console-bench: a {}-node rollout with the scale fleet, logs in {}",
        args.agents,
        dir.path().display()
    );
    let options = RunOptions {
        agents: args.agents,
        workers: args.workers,
        worker_threads: 1,
        blocking_threads: 8,
        heartbeat: args.heartbeat_interval,
        rounds: 1,
        settle: Duration::from_secs(3),
        idle: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(600),
        rollout_timeout: Duration::from_secs(900),
        agent_data_root: agent_dir.path().to_path_buf(),
        coordinator_args: Vec::new(),
        etcd_endpoints: None,
        perf: None,
        perf_dir: PathBuf::from("."),
    };
    let result = run(&bins.hotroll, dir.path(), options);
    let outcome = result.and_then(|result| {
        let round = result.rounds.first().context("no rollout ran")?;
        eprintln!(
            "console-bench: rollout {} {} in {} ms",
            round.rollout_id, round.state, round.rollout_ms
        );
        measure(&bins.hotroll, dir.path(), &round.rollout_id, &args)
    });
    if args.keep || outcome.is_err() {
        let kept = dir.keep();
        let _ = agent_dir.keep();
        eprintln!("console-bench: kept {}", kept.display());
    }
    let figures = outcome?;
    print(&figures, args.agents);
    Ok(())
}

#[derive(Debug)]
struct Figures {
    login_ms: u64,
    fleet_rows_ms: f64,
    rows_ready_ms: f64,
    history_ready_ms: f64,
    history_events: u64,
    median_scroll_redraw_ms: f64,
    worst_scroll_redraw_ms: f64,
    js_heap_used_bytes: u64,
    js_heap_total_bytes: u64,
    /// (pid, RSS, PSS) of each renderer process, KiB.
    renderer_rss_kib: Vec<(u32, u64, u64)>,
    console_rss_kib: u64,
}

fn print(f: &Figures, nodes: usize) {
    let line = |what: &str, value: String| println!("  {what:<46} {value}");
    println!("console-bench: a {nodes}-node rollout in headless Chromium");
    line(
        "open the page, log in, fleet drawn",
        format!("{} ms", f.login_ms),
    );
    line(
        &format!("fleet page, {nodes} table rows"),
        format!("{:.0} ms", f.fleet_rows_ms),
    );
    line(
        "rollout page, node list ready",
        format!("{:.0} ms (every row accounted for)", f.rows_ready_ms),
    );
    line(
        "rollout page, whole history applied",
        format!(
            "{:.0} ms ({} events over SSE)",
            f.history_ready_ms, f.history_events
        ),
    );
    line(
        "a jump in the node list to its next frame",
        format!(
            "median {:.1} ms, worst {:.1} ms (20 jumps)",
            f.median_scroll_redraw_ms, f.worst_scroll_redraw_ms
        ),
    );
    line(
        "tab JS heap (performance.memory)",
        format!(
            "{:.1} MiB used of {:.1} MiB",
            f.js_heap_used_bytes as f64 / 1048576.0,
            f.js_heap_total_bytes as f64 / 1048576.0
        ),
    );
    for (pid, rss, pss) in &f.renderer_rss_kib {
        line(
            &format!("renderer process {pid}"),
            format!(
                "RSS {:.1} MiB, PSS {:.1} MiB",
                *rss as f64 / 1024.0,
                *pss as f64 / 1024.0
            ),
        );
    }
    line(
        "coordinator serving the console, RSS",
        format!("{:.1} MiB", f.console_rss_kib as f64 / 1024.0),
    );
}

fn measure(
    hotroll: &std::path::Path,
    dir: &std::path::Path,
    rollout: &str,
    args: &Args,
) -> anyhow::Result<Figures> {
    let data_dir = dir.join("coordinator");
    let port = free_port()?;
    let ui_port = free_port()?;
    let mut console = Process::new(
        "console",
        hotroll,
        [
            "serve".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--ui-listen".into(),
            format!("127.0.0.1:{ui_port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--insecure".into(),
        ],
        dir,
        dir.join("console.log"),
    );
    console.start()?;
    let mut create = std::process::Command::new(hotroll);
    create
        .args(["token", "create", "--role", "viewer", "--data-dir"])
        .arg(&data_dir);
    let token = hotroll_tests::run_command(create, Duration::from_secs(60))?;
    ensure!(
        token.code == Some(0),
        "hotroll token create: {}",
        token.stderr
    );
    let token = token.stdout.trim().to_string();
    let base = format!("http://127.0.0.1:{ui_port}");
    hotroll_tests::poll(
        "the console listening",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || Ok(std::net::TcpStream::connect(("127.0.0.1", ui_port)).ok()),
    )?;
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut figures = tokio.block_on(in_browser(&base, &token, rollout, args))?;
    figures.console_rss_kib = procfs::rss_kib(console.pid().context("the console stopped")?)?;
    let _ = console.terminate(Duration::from_secs(30));
    Ok(figures)
}

async fn in_browser(
    base: &str,
    token: &str,
    rollout: &str,
    args: &Args,
) -> anyhow::Result<Figures> {
    let browser = Browser::start().await?;
    let nodes = args.agents;
    let within = args.page_timeout;
    let started = Instant::now();
    browser.goto(&format!("{base}/")).await?;
    browser
        .wait_until(
            "the login form",
            within,
            "!document.getElementById('login').hidden",
        )
        .await?;
    browser.type_into("#token", token).await?;
    // Timed in the page: from the click to the fleet table's N rows.
    browser
        .eval(&watch_for(&format!(
            "document.querySelectorAll('#fleet-table tr.node-row').length === {nodes}"
        )))
        .await?;
    browser.click("#login-button").await?;
    let fleet_rows_ms = ready_after(&browser, "the fleet page's rows", within).await?;
    let login_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    // The rollout page: rows first (from the first status), then the whole history.
    browser
        .eval(&format!(
            "window.__bench = {{ start: performance.now(), rows: null, history: null }};
             const timer = setInterval(() => {{
               const list = document.getElementById('nodes');
               const live = document.getElementById('live');
               const now = performance.now() - window.__bench.start;
               if (window.__bench.rows === null && list && list.dataset.nodes === '{nodes}' &&
                   list.querySelectorAll('.node-row').length > 0) window.__bench.rows = now;
               if (live && live.dataset.state === 'ended') {{ window.__bench.history = now; clearInterval(timer); }}
             }}, 5);
             location.hash = '#/rollout/{rollout}';
             return true;"
        ))
        .await?;
    let done = browser
        .wait_until(
            "the rollout page with its whole history",
            within,
            "window.__bench.history !== null && window.__bench",
        )
        .await?;
    let rows_ready_ms = done["rows"].as_f64().unwrap_or(f64::NAN);
    let history_ready_ms = done["history"].as_f64().unwrap_or(f64::NAN);
    let stream = browser
        .eval("return window.hotrollConsole.stream();")
        .await?;
    let history_events = stream["received"].as_u64().unwrap_or(0);
    let rows = browser
        .eval("return document.getElementById('nodes').dataset.nodes;")
        .await?;
    if rows != Value::String(nodes.to_string()) {
        bail!("the page lists {rows} nodes, not {nodes}");
    }

    // Jumps through the list: each redraw is one animation frame after the scroll.
    let redraws = browser
        .eval(
            "const list = document.getElementById('nodes');
             const frame = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
             return (async () => {
               const took = [];
               for (let i = 1; i <= 20; i++) {
                 const t = performance.now();
                 list.scrollTop = (list.scrollHeight * i) / 21;
                 await frame();
                 took.push(performance.now() - t);
               }
               took.sort((a, b) => a - b);
               return { median: took[10], worst: took[19] };
             })();",
        )
        .await?;
    let memory = browser
        .eval(
            "return { used: performance.memory.usedJSHeapSize, total: performance.memory.totalJSHeapSize };",
        )
        .await?;
    let renderer_rss_kib = browser
        .renderer_pids()
        .into_iter()
        .filter_map(|pid| Some((pid, procfs::rss_kib(pid).ok()?, pss_kib(pid)?)))
        .collect();
    let _ = browser.screenshot("rollout-10000.png").await;
    browser.close().await?;
    Ok(Figures {
        login_ms,
        fleet_rows_ms,
        rows_ready_ms,
        history_ready_ms,
        history_events,
        median_scroll_redraw_ms: redraws["median"].as_f64().unwrap_or(f64::NAN),
        worst_scroll_redraw_ms: redraws["worst"].as_f64().unwrap_or(f64::NAN),
        js_heap_used_bytes: memory["used"].as_u64().unwrap_or(0),
        js_heap_total_bytes: memory["total"].as_u64().unwrap_or(0),
        renderer_rss_kib,
        console_rss_kib: 0,
    })
}

/// A page script that records in `window.__ready` the ms from now until `condition` holds.
fn watch_for(condition: &str) -> String {
    format!(
        "window.__ready = null; const t0 = performance.now();
         const timer = setInterval(() => {{
           if ({condition}) {{ window.__ready = performance.now() - t0; clearInterval(timer); }}
         }}, 5);
         return true;"
    )
}

async fn ready_after(browser: &Browser, what: &str, within: Duration) -> anyhow::Result<f64> {
    let value = browser
        .wait_until(what, within, "window.__ready !== null && window.__ready")
        .await?;
    value.as_f64().context("not a number")
}

/// Proportional set size (`Pss` of /proc/PID/smaps_rollup), KiB: a renderer's RSS counts every
/// page it shares with Chromium's other processes in full.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}
