//! `otp-release-bench`: a fleet upgrade of OTP release nodes by hotroll against relx's own
//! `bin/<rel> upgrade` run on the same number of nodes one after another (issue 15's closing
//! measurement), on real processes on 127.0.0.1: the `pm` release of the otp_release tests
//! (tests/src/otp_release.rs, built with rebar3 offline), nodes started with relx's `bin/pm
//! daemon`, a private epmd, a real coordinator and real agents.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin otp-release-bench -- --nodes 3 [--output json]
//! ```
//!
//! * hotroll: `hotroll rollout start --wait` of 0.1.0 -> 0.2.0 (unpack_release, a barrier, the
//!   point of no return, install_release, a barrier; make_permanent), all nodes in one wave.
//! * relx: fresh nodes on 0.1.0; for each in turn the tarball copied to
//!   `releases/pm-0.2.0.tar.gz` and `bin/pm upgrade 0.2.0` (unpack, install, make permanent).
//! * The suspend -> resume window of the miner on each node, both ways: the node traces the
//!   `pm` process's `{system, _, suspend}` and `{system, _, resume}` messages (monotonic
//!   timestamps, a tracer process started in the node before the upgrade).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use hotroll_tests::cluster::run_command;
use hotroll_tests::erlang::{self, Epmd};
use hotroll_tests::otp_release::{self, ReleaseNode};
use hotroll_tests::{Cluster, ClusterOptions, node_name, status};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "otp-release-bench",
    about = "hotroll fleet upgrade of OTP release nodes vs relx's bin/<rel> upgrade one node after another"
)]
struct Args {
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// `text` or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// Starts a tracer in the node that records when `pm` receives suspend and resume.
const TRACE: &str = "P = whereis(pm), T = spawn(fun() -> L = fun Loop(Acc) -> receive \
{trace_ts, _, 'receive', {system, _, suspend}, Ts} -> Loop([{suspend, Ts} | Acc]); \
{trace_ts, _, 'receive', {system, _, resume}, Ts} -> Loop([{resume, Ts} | Acc]); \
{get, From} -> From ! {windows, Acc}, Loop(Acc); _ -> Loop(Acc) end end, L([]) end), \
register(hotroll_bench_tracer, T), \
erlang:trace(P, true, ['receive', monotonic_timestamp, {tracer, T}]), ok.";

/// The last suspend -> resume window in microseconds.
const WINDOW: &str = "hotroll_bench_tracer ! {get, self()}, receive {windows, W} -> \
case W of [{resume, R}, {suspend, S} | _] -> (R - S) div 1000; _ -> none end \
after 5000 -> none end.";

fn start_nodes(
    dir: &Path,
    n: usize,
    tarball: &Path,
    cookie: &str,
    epmd: u16,
) -> anyhow::Result<Vec<ReleaseNode>> {
    (1..=n)
        .map(|i| {
            let name = node_name(i);
            ReleaseNode::start(
                &dir.join(&name),
                &format!("pm-{name}"),
                tarball,
                cookie,
                epmd,
            )
        })
        .collect()
}

fn trace(nodes: &[ReleaseNode]) -> anyhow::Result<()> {
    for node in nodes {
        let ok = node.eval(TRACE)?;
        ensure!(ok == "ok", "{}: tracer: {ok}", node.name());
    }
    Ok(())
}

fn windows(nodes: &[ReleaseNode]) -> anyhow::Result<Vec<Option<u64>>> {
    nodes
        .iter()
        .map(|node| Ok(node.eval(WINDOW)?.parse().ok()))
        .collect()
}

fn on_v2(nodes: &[ReleaseNode]) -> anyhow::Result<()> {
    for node in nodes {
        let miner = node.miner()?;
        ensure!(
            miner.format == "map",
            "{}: not on v2: {miner:?}",
            node.name()
        );
        let releases = node.which_releases()?;
        ensure!(
            releases.contains(&("0.2.0".to_string(), "permanent".to_string())),
            "{}: {releases:?}",
            node.name()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    otp_release::require()?;
    let dir = tempfile::Builder::new()
        .prefix("hotroll-otp-bench-")
        .tempdir()?;
    let root = dir.path();
    let built = Instant::now();
    let tarballs = otp_release::build(&root.join("build"))?;
    eprintln!("tarballs built in {:?}", built.elapsed());
    let epmd = Epmd::start(&root.join("epmd.log"))?;
    let cookie = erlang::random_cookie();

    // hotroll.
    let fleet = root.join("hotroll");
    let nodes = start_nodes(&fleet, args.nodes, &tarballs.v1, &cookie, epmd.port)?;
    trace(&nodes)?;
    let extra = format!(
        r#"[[release]]
app = "pm"
root_dir = "{f}/{{node}}/rel"
node = "pm-{{node}}@127.0.0.1"
cookie_file = "{f}/{{node}}/cookie"
env = {{ NODE_NAME = "pm-{{node}}@127.0.0.1", HOME = "{f}/{{node}}" }}
cookie_env = "COOKIE"
"#,
        f = fleet.display()
    );
    let options = ClusterOptions::default()
        .agent_toml_extra(&extra)
        .env("ERL_EPMD_PORT", &epmd.port.to_string());
    let script = format!(
        r#"app = "pm"
runtime = "otp_release"
from = "0.1.0"
to = "0.2.0"

[[artifacts]]
name = "pm-0.2.0.tar.gz"
source = "{}"

[rollout]
max_failures = 0
on_failure = "rollback_all"
barrier_timeout = "60s"
step_timeout = "60s"

[script]
up = [
  {{ unpack_release = "pm-0.2.0.tar.gz" }},
  {{ sync_nodes = "unpacked" }},
  "point_of_no_return",
  "install_release",
  {{ sync_nodes = "installed" }},
]
"#,
        tarballs.v2.display()
    );
    let (hotroll_wall, hotroll_windows) = Cluster::start(args.nodes, options)?.run(|cluster| {
        let path = cluster.write_script("v2.toml", &script)?;
        let started = Instant::now();
        let run = cluster.run_rollout(&path, &[], TIMEOUT)?;
        let wall = started.elapsed();
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "rollout: {}",
            run.status
        );
        on_v2(&nodes)?;
        Ok((wall, windows(&nodes)?))
    })?;
    drop(nodes);

    // relx, one node after another.
    let fleet = root.join("relx");
    let nodes = start_nodes(&fleet, args.nodes, &tarballs.v1, &cookie, epmd.port)?;
    trace(&nodes)?;
    let mut each = Vec::new();
    let started = Instant::now();
    for node in &nodes {
        let one = Instant::now();
        std::fs::copy(&tarballs.v2, node.root.join("releases/pm-0.2.0.tar.gz"))?;
        let mut upgrade = Command::new(node.root.join("bin/pm"));
        let home = node.root.parent().context("node dir")?;
        upgrade
            .args(["upgrade", "0.2.0"])
            .env("NODE_NAME", node.name())
            .env("COOKIE", &cookie)
            .env("ERL_EPMD_PORT", epmd.port.to_string())
            .env("HOME", home);
        let out = run_command(upgrade, TIMEOUT)?;
        ensure!(
            out.code == Some(0),
            "{}: bin/pm upgrade 0.2.0: {}{}",
            node.name(),
            out.stdout,
            out.stderr
        );
        each.push(one.elapsed());
    }
    let relx_wall = started.elapsed();
    on_v2(&nodes)?;
    let relx_windows = windows(&nodes)?;
    drop(nodes);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if args.output == "json" {
        println!(
            "{}",
            json!({
                "nodes": args.nodes,
                "hotroll_wall_ms": ms(hotroll_wall),
                "hotroll_window_us": hotroll_windows,
                "relx_wall_ms": ms(relx_wall),
                "relx_each_ms": each.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "relx_window_us": relx_windows,
            })
        );
    } else {
        println!(
            "== otp-release-bench: {} nodes, pm 0.1.0 -> 0.2.0 ==",
            args.nodes
        );
        println!(
            "hotroll fleet upgrade (rollout start --wait, one wave): {:.0} ms",
            ms(hotroll_wall)
        );
        println!(
            "relx bin/pm upgrade, one node after another:           {:.0} ms (each: {})",
            ms(relx_wall),
            each.iter()
                .map(|d| format!("{:.0} ms", ms(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let show = |w: &[Option<u64>]| {
            w.iter()
                .map(|w| w.map_or("?".to_string(), |us| format!("{us} us")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "suspend->resume window per node, hotroll: {}",
            show(&hotroll_windows)
        );
        println!(
            "suspend->resume window per node, relx:    {}",
            show(&relx_windows)
        );
    }
    Ok(())
}
