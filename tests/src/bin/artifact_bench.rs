//! `artifact-bench`: artifact distribution on a local cluster of real processes (coordinator and
//! agents on 127.0.0.1), against `cp` of the same file measured in the same run.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin artifact-bench -- --agents 3 --size-mib 100 --rounds 3
//! ```
//!
//! Each round makes a new pseudo-random file (so nothing is deduplicated), copies it with `cp`
//! (timed), then runs a rollout whose only instruction is `load_object_code` of that file:
//!
//! * **upload**: `hotroll rollout start` (no wait): the CLI hashes the file, uploads it to the
//!   coordinator in 256 KiB chunks, which verifies and stores it, and the rollout starts;
//! * **fetch**: per agent, from its `load_object_code` step starting to its "artifact fetched and
//!   verified" log line (chunked download over gRPC, hashing, fsync, rename into the content
//!   store); all agents fetch at once;
//! * **stage**: the rest of the step (copying the artifact into the new release directory);
//! * **end to end**: from invoking the CLI until the rollout is final (every agent has the
//!   verified artifact staged), by polling its status.
//!
//! Throughputs are the file's size over the time (aggregate: times the number of agents).
//! Ratios are times divided by the `cp` time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use hotroll_tests::services::{log_lines, write_blob};
use hotroll_tests::{Cluster, ClusterOptions, node_name, poll, run_command, status};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "artifact-bench",
    about = "Artifact distribution to local agents, against cp of the same file"
)]
struct Args {
    /// Number of agents.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Artifact size in MiB.
    #[arg(long, default_value_t = 100)]
    size_mib: usize,
    /// Rounds (a new artifact each); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `text` or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Round {
    cp: f64,
    upload: f64,
    /// Slowest agent.
    fetch: f64,
    /// Slowest agent's whole `load_object_code` step minus its fetch.
    stage: f64,
    total: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.agents >= 1 && args.rounds >= 1 && args.size_mib >= 1);
    let size = args.size_mib << 20;
    let cluster = Cluster::start(args.agents, ClusterOptions::default())?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let r = measure(&cluster, &args, size, round).with_context(|| format!("round {round}"))?;
        eprintln!(
            "round {round}: cp {:.3}s, upload {:.3}s, fetch {:.3}s, stage {:.3}s, end to end {:.3}s",
            r.cp, r.upload, r.fetch, r.stage, r.total
        );
        rounds.push(r);
    }
    let median = |f: fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let m = Round {
        cp: median(|r| r.cp),
        upload: median(|r| r.upload),
        fetch: median(|r| r.fetch),
        stage: median(|r| r.stage),
        total: median(|r| r.total),
    };
    let mib = args.size_mib as f64;
    let n = args.agents as f64;
    if args.output == "json" {
        println!(
            "{}",
            json!({
                "agents": args.agents, "size_mib": args.size_mib, "rounds": args.rounds,
                "median_seconds": {"cp": m.cp, "upload": m.upload, "fetch": m.fetch, "stage": m.stage, "end_to_end": m.total},
                "throughput_mib_s": {"cp": mib / m.cp, "upload": mib / m.upload, "fetch_per_agent": mib / m.fetch, "fetch_aggregate": n * mib / m.fetch, "end_to_end_aggregate": n * mib / m.total},
                "ratio_to_cp": {"upload": m.upload / m.cp, "fetch": m.fetch / m.cp, "end_to_end": m.total / m.cp},
            })
        );
        return Ok(());
    }
    println!(
        "{} MiB artifact to {} agents on 127.0.0.1, median of {} round(s):",
        args.size_mib, args.agents, args.rounds
    );
    println!(
        "{:<44} {:>9} {:>12} {:>9}",
        "phase", "seconds", "MiB/s", "x cp"
    );
    let row = |name: &str, t: f64, rate: f64| {
        println!("{name:<44} {t:>9.3} {rate:>12.1} {:>9.2}", t / m.cp);
    };
    row("cp of the same file", m.cp, mib / m.cp);
    row(
        "upload (CLI hash + send, coordinator verify)",
        m.upload,
        mib / m.upload,
    );
    row(
        "fetch, slowest agent (per agent MiB/s)",
        m.fetch,
        mib / m.fetch,
    );
    println!(
        "{:<44} {:>9} {:>12.1}",
        "  aggregate over all agents",
        "",
        n * mib / m.fetch
    );
    row(
        "stage into the release (slowest agent)",
        m.stage,
        mib / m.stage,
    );
    row(
        "end to end (CLI start -> all staged)",
        m.total,
        n * mib / m.total,
    );
    Ok(())
}

fn measure(cluster: &Cluster, args: &Args, size: usize, round: usize) -> anyhow::Result<Round> {
    let dir = cluster.dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let blob = dir.join(format!("blob-{round}.bin"));
    write_blob(&blob, size, round as u64 * 7919)?;

    let copy = dir.join(format!("copy-{round}.bin"));
    let started = Instant::now();
    let status = Command::new("cp").arg(&blob).arg(&copy).status()?;
    let cp = started.elapsed().as_secs_f64();
    ensure!(status.success(), "cp failed: {status}");
    std::fs::remove_file(&copy)?;

    let script = format!(
        "app = \"bench\"\nfrom = \"0\"\nto = \"r{round}\"\n\n\
         [[artifacts]]\nname = \"data/blob.bin\"\nsource = \"{}\"\n\n\
         [rollout]\nstep_timeout = \"10m\"\n\n\
         [script]\nup = [{{ load_object_code = [\"data/blob.bin\"] }}]\n",
        blob.display()
    );
    let path = cluster.write_script(&format!("bench-{round}.toml"), &script)?;

    let started = Instant::now();
    let mut command = cluster.hotroll_command();
    command.args(["rollout", "start"]).arg(&path).args([
        "--output",
        "json",
        "--coordinator",
        cluster.url(),
    ]);
    let output = run_command(command, Duration::from_secs(600))?.ok()?;
    let upload = started.elapsed().as_secs_f64();
    let id = output.json()?["id"]
        .as_str()
        .context("no rollout id")?
        .to_string();
    let final_status = poll(
        "the bench rollout to end",
        Duration::from_secs(600),
        Duration::from_millis(10),
        || {
            let status = cluster.status(&id)?;
            Ok(status::is_final(status::rollout_state(&status)?).then_some(status))
        },
    )?;
    let total = started.elapsed().as_secs_f64();
    let state = status::rollout_state(&final_status)?;
    if state != "succeeded" {
        bail!("bench rollout ended {state}: {final_status:#}");
    }

    let digest = hotroll_tests::services::digest_of(&blob)?;
    let (mut fetch, mut stage) = (0f64, 0f64);
    for i in 1..=args.agents {
        let log = cluster.agent_info(i).process.log_path().to_path_buf();
        let (f, s) = agent_times(&log, &id, &digest)
            .with_context(|| format!("timing of {}", node_name(i)))?;
        fetch = fetch.max(f);
        stage = stage.max(s);
    }
    // The staged release and the content stores keep their copies; the next round's artifact
    // is a new one, so nothing is deduplicated.
    let _ = std::fs::remove_file(&blob);
    Ok(Round {
        cp,
        upload,
        fetch,
        stage,
        total,
    })
}

/// Seconds of the day of a log line's timestamp (`2026-01-02T03:04:05.123456Z ...`).
fn timestamp(line: &str) -> Option<f64> {
    let time = line.get(11..26)?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// (fetch, stage) seconds of one agent: step start -> artifact verified -> step end.
fn agent_times(log: &Path, rollout: &str, digest: &str) -> anyhow::Result<(f64, f64)> {
    let line_time = |needles: &[&str]| -> anyhow::Result<f64> {
        let lines = log_lines(log, needles);
        let line = lines
            .last()
            .with_context(|| format!("no log line with {needles:?}"))?;
        timestamp(line).with_context(|| format!("no timestamp in {line}"))
    };
    let started = line_time(&["step started", rollout, "load_object_code"])?;
    let fetched = line_time(&["artifact fetched and verified", digest])?;
    let ended = line_time(&["step succeeded", rollout, "load_object_code"])?;
    let wrap = |d: f64| if d < 0.0 { d + 86_400.0 } else { d };
    Ok((wrap(fetched - started), wrap(ended - fetched)))
}
