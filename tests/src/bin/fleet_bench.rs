//! `fleet-bench`: a fleet upgrade of N real services by hotroll against the floor, the same N
//! services started in parallel without hotroll (issue 17's third measure), on real processes
//! on 127.0.0.1.
//!
//! ```text
//! cargo run --release -p hotroll-tests --bin fleet-bench -- --nodes 30 --service python
//! cargo run --release -p hotroll-tests --bin fleet-bench -- --nodes 100 --service native
//! ```
//!
//! * The service: `python`, a small Python HTTP server (`server.py`, written by the bench:
//!   `http.server` on the socket the agent holds, answering `<version> <pid>`), or `native`,
//!   this crate's `version-server` (Rust). Both read their version from the release's `VERSION`.
//! * The floor: N instances started at once, each binding its own port, until every one has
//!   answered a request (the time to the last answer).
//! * hotroll: a coordinator and N agents, each supervising one instance of the service on a
//!   socket it holds; release 1.0 installed (not timed), then the timed rollout 1.0 -> 2.0:
//!   stage two files (`load_object_code`: the program and `VERSION`), the point of no return,
//!   swap (`load`), `restart`, `health`, make permanent, all nodes in one wave. Timed from
//!   `hotroll rollout start --wait` to its exit, and, from the history, from the rollout's
//!   first event to its last.
//! * Where the time goes: per instruction, the span from its first start to its last end
//!   across the fleet and the agents' own durations (p50, max), from the history.
//! * CPU seconds of the coordinator and of all agents during the rollout (services excluded).
//! * `--perf FILE`: `perf record -a` over the first timed rollout.
//! * `--events DIR`: each timed rollout's history, one JSON event a line.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use hotroll_tests::scale::perf::Perf;
use hotroll_tests::scale::{Stats, procfs};
use hotroll_tests::{Cluster, ClusterOptions, free_port, status};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-bench",
    about = "hotroll fleet upgrade of N restarted services vs the same N services started in parallel without hotroll"
)]
struct Args {
    /// Number of nodes (agents), each supervising one instance of the service.
    #[arg(long, default_value_t = 30)]
    nodes: usize,
    /// `python` (a small Python HTTP server) or `native` (the Rust `version-server`).
    #[arg(long, default_value = "python", value_parser = ["python", "native"])]
    service: String,
    /// Timed rollouts (each to the next version); the floor is measured before each.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// `text` or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    /// `perf record -a` (every CPU: coordinator, agents, services, kernel) during the first
    /// timed rollout, into this file.
    #[arg(long, value_name = "FILE")]
    perf: Option<PathBuf>,
    /// Write each timed rollout's history (`hotroll rollout events --output json`, one event a
    /// line) to `DIR/round-<k>.jsonl`, for a closer look than the step table.
    #[arg(long, value_name = "DIR")]
    events: Option<PathBuf>,
}

const TIMEOUT: Duration = Duration::from_secs(300);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The Python service: the socket passed by socket activation (fd 3 when `LISTEN_PID` is ours),
/// else `LISTEN_ADDR`; every request gets `<version> <pid>`.
const SERVER_PY: &str = r#"# fleet-bench's Python service (release @VERSION@).
import os, socket, sys
from http.server import HTTPServer, BaseHTTPRequestHandler

try:
    with open("VERSION") as f:
        VERSION = f.read().strip()
except OSError:
    VERSION = "unknown"
BODY = f"{VERSION} {os.getpid()}\n".encode()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
if os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") == str(os.getpid()):
    server.socket = socket.socket(fileno=3)
else:
    host, port = os.environ["LISTEN_ADDR"].rsplit(":", 1)
    server.socket = socket.create_server((host, int(port)))
server.serve_forever()
"#;

/// The service under test: how to run it, and the files a release carries.
struct Service {
    kind: String,
    dir: PathBuf,
    /// The Python interpreter, absolute (a relative command is looked up in the release).
    python: PathBuf,
}

impl Service {
    fn new(kind: &str, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // The system's interpreter first: a version manager's shim (pyenv's is a shell
        // script) would add its own start-up to every instance.
        let system = PathBuf::from("/usr/bin/python3");
        let python = if system.is_file() {
            system
        } else {
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join("python3"))
                .find(|p| p.is_file())
                .unwrap_or(system)
        };
        if kind == "python" {
            let works = Command::new(&python).arg("--version").output();
            ensure!(
                works.is_ok_and(|o| o.status.success()),
                "python3 is needed for --service python (apt-get install -y python3)"
            );
        }
        Ok(Self {
            kind: kind.to_string(),
            dir: dir.to_path_buf(),
            python,
        })
    }

    /// The program's file name inside a release.
    fn program(&self) -> &'static str {
        if self.kind == "python" {
            "server.py"
        } else {
            "bin/version-server"
        }
    }

    /// The command line, run in the release directory.
    fn command(&self) -> Vec<String> {
        if self.kind == "python" {
            vec![self.python.display().to_string(), "server.py".into()]
        } else {
            vec!["bin/version-server".into()]
        }
    }

    /// `<dir>/<version>/{program, VERSION}`: the release's two files.
    fn release(&self, version: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(version);
        std::fs::create_dir_all(dir.join("bin"))?;
        std::fs::write(dir.join("VERSION"), format!("{version}\n"))?;
        let program = dir.join(self.program());
        if self.kind == "python" {
            std::fs::write(&program, SERVER_PY.replace("@VERSION@", version))?;
        } else {
            let exe = std::env::current_exe()?;
            let built = exe
                .parent()
                .context("the bench's directory")?
                .join("version-server");
            std::fs::copy(&built, &program).with_context(|| {
                format!(
                    "no {} (build it: cargo build --release -p hotroll-tests --bin version-server)",
                    built.display()
                )
            })?;
        }
        Ok(dir)
    }

    /// The agent's `[[services]]` entry for this service on `port`.
    fn agent_toml(&self, port: u16) -> String {
        let command: Vec<String> = self.command().iter().map(|c| format!("\"{c}\"")).collect();
        format!(
            "[[services]]\nname = \"svc\"\napp = \"svc\"\ncommand = [{}]\n\
             listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ tcp = \"127.0.0.1:{port}\" }}\n\
             stop_signal = \"SIGTERM\"\nstop_timeout = \"5s\"\n",
            command.join(", ")
        )
    }
}

/// One request; the answer's body when it came.
fn ask(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // version-server answers on connect and ignores this; the Python server needs it.
    let _ = stream.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

/// Wait until the service on `port` answers with `version`.
fn wait_answer(port: u16, version: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        if ask(port).is_some_and(|a| a.contains(&format!("{version} "))) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the service on port {port} never answered {version}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The floor: `n` instances of release `dir` started at once, each on its own port; the time
/// until the last has answered.
fn floor(service: &Service, release: &Path, n: usize, version: &str) -> anyhow::Result<Duration> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let spawned = (|| -> anyhow::Result<()> {
        for port in &ports {
            let command = service.command();
            let child = Command::new(&command[0])
                .args(&command[1..])
                .current_dir(release)
                .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {command:?}"))?;
            children.push(child);
        }
        // Every instance is waited for at once: one thread each, as the services start in
        // parallel.
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        std::thread::scope(|scope| {
            let waits: Vec<_> = ports
                .iter()
                .map(|port| scope.spawn(move || wait_answer(*port, version, deadline)))
                .collect();
            for wait in waits {
                wait.join()
                    .map_err(|_| anyhow::anyhow!("a waiting thread panicked"))??;
            }
            Ok(())
        })
    })();
    let took = started.elapsed();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    spawned?;
    Ok(took)
}

/// A rollout script of app `svc` from `from` to `to` with the two files of release `dir`.
fn script(service: &Service, dir: &Path, from: &str, to: &str, up: &[&str]) -> String {
    let program = service.program();
    let mode = if service.kind == "python" {
        ""
    } else {
        "mode = \"0755\"\n"
    };
    let steps: Vec<String> = up.iter().map(|s| format!("  {s},\n")).collect();
    format!(
        "app = \"svc\"\nfrom = \"{from}\"\nto = \"{to}\"\n\n\
         [[artifacts]]\nname = \"{program}\"\nsource = \"{}\"\n{mode}\n\
         [[artifacts]]\nname = \"VERSION\"\nsource = \"{}\"\n\n\
         [rollout]\nmax_failures = 0\non_failure = \"rollback_all\"\n\
         step_timeout = \"60s\"\nbarrier_timeout = \"60s\"\n\n[script]\nup = [\n{}]\n",
        dir.join(program).display(),
        dir.join("VERSION").display(),
        steps.concat()
    )
}

fn upgrade_steps(program: &str) -> Vec<String> {
    vec![
        format!("{{ load_object_code = [\"{program}\", \"VERSION\"] }}"),
        "\"point_of_no_return\"".into(),
        "{ load = \"svc\" }".into(),
        "{ restart = \"svc\" }".into(),
        "{ health = { service = \"svc\", timeout = \"30s\" } }".into(),
    ]
}

/// Per instruction: (first start, last end) relative to `t0`, and the agents' durations.
#[derive(Debug, Default, Clone)]
struct StepSpan {
    first_start_ms: Option<u64>,
    last_end_ms: Option<u64>,
    durations_ms: Vec<u64>,
}

/// The rollout's history: its span (first event to last) and each instruction's.
/// With `save`, the history is also written to that file.
fn history(
    cluster: &Cluster,
    id: &str,
    save: Option<&Path>,
) -> anyhow::Result<(u64, Vec<(String, StepSpan)>)> {
    let out = cluster
        .hotroll(&["rollout", "events", id, "--output", "json"])?
        .ok()?;
    if let Some(file) = save {
        std::fs::write(file, &out.stdout).with_context(|| format!("write {}", file.display()))?;
    }
    let events: Vec<Value> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let at = |e: &Value| e["at_unix_ms"].as_u64().unwrap_or(0);
    let t0 = events.iter().map(at).min().unwrap_or(0);
    let t1 = events.iter().map(at).max().unwrap_or(0);
    let mut order: Vec<String> = Vec::new();
    let mut spans: BTreeMap<String, StepSpan> = BTreeMap::new();
    for e in events.iter().filter(|e| e["kind"] == "step") {
        let key = format!(
            "{} {}",
            e["step"].as_i64().unwrap_or(-1) + 1,
            e["instruction"].as_str().unwrap_or("?")
        );
        if !order.contains(&key) {
            order.push(key.clone());
        }
        let span = spans.entry(key).or_default();
        let t = at(e) - t0;
        if e["phase"] == "started" {
            span.first_start_ms = Some(span.first_start_ms.map_or(t, |s| s.min(t)));
        } else {
            span.last_end_ms = Some(span.last_end_ms.map_or(t, |s| s.max(t)));
            span.durations_ms
                .push(e["duration_ms"].as_u64().unwrap_or_default());
        }
    }
    order.sort_by_key(|k| {
        k.split(' ')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    let spans = order
        .into_iter()
        .map(|k| {
            let span = spans.remove(&k).unwrap_or_default();
            (k, span)
        })
        .collect();
    Ok((t1 - t0, spans))
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| procfs::cpu_seconds(*pid).ok())
        .sum()
}

/// The median of a step's per-node durations, in whole milliseconds.
fn median_ms(durations_ms: &[u64]) -> u64 {
    Stats::of(durations_ms.iter().map(|&d| d as f64).collect()).p50 as u64
}

struct Round {
    floor: Duration,
    wall: Duration,
    history_ms: u64,
    coordinator_cpu_s: f64,
    agents_cpu_s: f64,
    steps: Vec<(String, StepSpan)>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.nodes > 0, "--nodes must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let dir = tempfile::Builder::new()
        .prefix("hotroll-fleet-bench-")
        .tempdir()?;
    if let Some(events) = &args.events {
        std::fs::create_dir_all(events).with_context(|| format!("create {}", events.display()))?;
    }
    let service = Service::new(&args.service, &dir.path().join("releases"))?;
    let mut options = ClusterOptions::default();
    for i in 1..=args.nodes {
        options = options.node_agent_toml_extra(i, &service.agent_toml(free_port()?));
    }
    let v1 = service.release("1.0")?;
    let rounds = Cluster::start(args.nodes, options)?.run(|cluster| {
        // Release 1.0 everywhere (not timed).
        let install = script(
            &service,
            &v1,
            "none",
            "1.0",
            &[
                &format!(
                    "{{ load_object_code = [\"{}\", \"VERSION\"] }}",
                    service.program()
                ),
                "\"point_of_no_return\"",
                "{ load = \"svc\" }",
                "{ health = { service = \"svc\", timeout = \"60s\" } }",
            ],
        );
        let path = cluster.write_script("install.toml", &install)?;
        let run = cluster.run_rollout(&path, &[], TIMEOUT)?;
        ensure!(
            status::rollout_state(&run.status)? == "succeeded",
            "installing 1.0: {}",
            run.status
        );
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            let from = format!("{}.0", round + 1);
            let to = format!("{}.0", round + 2);
            let release = service.release(&to)?;
            let floor = floor(&service, &release, args.nodes, &to)?;
            let steps = upgrade_steps(service.program());
            let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
            let text = script(&service, &release, &from, &to, &steps);
            let path = cluster.write_script(&format!("upgrade-{to}.toml"), &text)?;
            let mut pids: Vec<u32> = (1..=args.nodes)
                .filter_map(|i| cluster.agent(i).pid())
                .collect();
            let coordinator = cluster.coordinator().pid();
            let (c0, a0) = (
                cpu_of(&coordinator.into_iter().collect::<Vec<_>>()),
                cpu_of(&pids),
            );
            let perf = match &args.perf {
                Some(file) if round == 0 => Some(Perf::system_wide(file)?),
                _ => None,
            };
            let started = Instant::now();
            let run = cluster.run_rollout(&path, &[], TIMEOUT)?;
            let wall = started.elapsed();
            drop(perf);
            let (c1, a1) = (
                cpu_of(&coordinator.into_iter().collect::<Vec<_>>()),
                cpu_of(&pids),
            );
            pids.clear();
            ensure!(
                status::rollout_state(&run.status)? == "succeeded",
                "rollout {from} -> {to}: {}",
                run.status
            );
            let save = args
                .events
                .as_ref()
                .map(|dir| dir.join(format!("round-{}.jsonl", round + 1)));
            let (history_ms, steps) = history(cluster, &run.id, save.as_deref())?;
            rounds.push(Round {
                floor,
                wall,
                history_ms,
                coordinator_cpu_s: c1 - c0,
                agents_cpu_s: a1 - a0,
                steps,
            });
        }
        Ok(rounds)
    })?;
    report(&args, &rounds);
    Ok(())
}

fn report(args: &Args, rounds: &[Round]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if args.output == "json" {
        let rounds: Vec<Value> = rounds
            .iter()
            .map(|r| {
                json!({
                    "floor_ms": ms(r.floor),
                    "rollout_wall_ms": ms(r.wall),
                    "rollout_history_ms": r.history_ms,
                    "ratio_wall": ms(r.wall) / ms(r.floor),
                    "ratio_history": r.history_ms as f64 / ms(r.floor),
                    "coordinator_cpu_s": r.coordinator_cpu_s,
                    "agents_cpu_s": r.agents_cpu_s,
                    "steps": r.steps.iter().map(|(name, s)| json!({
                        "step": name,
                        "first_start_ms": s.first_start_ms,
                        "last_end_ms": s.last_end_ms,
                        "p50_ms": median_ms(&s.durations_ms),
                        "max_ms": s.durations_ms.iter().max(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            json!({"nodes": args.nodes, "service": args.service, "rounds": rounds})
        );
        return;
    }
    println!(
        "== fleet-bench: {} nodes, {} service ==",
        args.nodes, args.service
    );
    for (i, r) in rounds.iter().enumerate() {
        println!("round {}:", i + 1);
        println!(
            "  floor: {} services started in parallel, all answering: {:.0} ms",
            args.nodes,
            ms(r.floor)
        );
        println!(
            "  hotroll rollout (rollout start --wait, upload included): {:.0} ms = {:.2}x the floor",
            ms(r.wall),
            ms(r.wall) / ms(r.floor)
        );
        println!(
            "  hotroll rollout (history: first event -> last):          {} ms = {:.2}x the floor",
            r.history_ms,
            r.history_ms as f64 / ms(r.floor)
        );
        println!(
            "  CPU during the rollout: coordinator {:.2} s, agents {:.2} s",
            r.coordinator_cpu_s, r.agents_cpu_s
        );
        println!("  step                       first start   last end   agent p50   agent max");
        for (name, s) in &r.steps {
            println!(
                "  {name:<26} {:>8} ms {:>8} ms {:>8} ms {:>8} ms",
                s.first_start_ms.map_or("-".into(), |v| v.to_string()),
                s.last_end_ms.map_or("-".into(), |v| v.to_string()),
                median_ms(&s.durations_ms),
                s.durations_ms.iter().max().copied().unwrap_or(0)
            );
        }
    }
}
