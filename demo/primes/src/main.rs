//! `primes`: hotroll's demo service, after the prime miner that inspired the project. It mines
//! primes in the background, keeps every one it found in memory — volatile, valuable state —
//! and serves them over HTTP. It speaks the handover protocol (`docs/handover.md`) through the
//! `hotroll-handover` crate, so a hot upgrade moves its primes to the new version and no client
//! sees an error.
//!
//! ```text
//! GET /            the stats (same as /stats)
//! GET /stats       {"version","code","pid","count","largest","next","strategy",
//!                   "primes_per_second","state_format","handed_over_from", v2+: "twin_primes"}
//! GET /primes      {"from","total","primes":[…]}   ?from=INDEX&limit=N (default: all)
//! GET /health      ok
//! ```
//!
//! One binary carries three code versions; the release it runs from picks one (the major
//! version of the `VERSION` file in the release directory, else `--version`, else
//! `$HOTROLL_RELEASE`):
//!
//! * **v1**: trial division, exports its state as JSON (format 1).
//! * **v2**: a segmented sieve over ten times the ground per tick, a new field (`twin_primes`),
//!   and a binary state format (2); its code_change converts format 1 to 2 (and v1's converts
//!   2 back to 1 on a downgrade).
//! * **v3**: its code_change fails (it wants a state format nobody writes), so a hot upgrade
//!   to it is rolled back with the old instance still serving its primes.
//!
//! A release with a `FAULT` file saying `never-ready` loads its state and then never serves
//! nor says READY=1 (for the "never ready" test).
//!
//! Sockets: `LISTEN_FDS` (the agent's held sockets), else `--listen ADDR` (default
//! `127.0.0.1:8080`). SIGTERM: stop accepting, finish the requests in flight, exit 0.

mod miner;
mod state;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hotroll_handover::{Control, ExportRequest, Listener, Outcome};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use miner::Shared;
use state::{Code, Primes};

/// How long a stopping instance waits for the requests it has.
const DRAIN: Duration = Duration::from_secs(5);

/// Where this instance's state came from.
#[derive(Debug, Clone)]
struct Origin {
    from: String,
    format: u32,
    mode: &'static str,
    extra: Option<String>,
}

#[derive(Debug)]
struct Info {
    version: String,
    code: Code,
    pid: u32,
    origin: Option<Origin>,
    started: Instant,
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    info: Arc<Info>,
}

fn log(info: &str) {
    println!("primes (pid {}): {info}", std::process::id());
}

fn main() -> ExitCode {
    // Sockets first, before any thread exists (they come from the environment).
    let listeners = match hotroll_handover::listeners() {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("primes: {e}");
            return ExitCode::from(2);
        }
    };
    match run(listeners) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("primes: {e:#}");
            let _ = hotroll_handover::notify_status(&format!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

struct Args {
    listen: String,
    version: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: "127.0.0.1:8080".to_string(),
        version: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => args.listen = it.next().context("--listen needs an address")?,
            "--version" => args.version = Some(it.next().context("--version needs a version")?),
            "-h" | "--help" => {
                println!("usage: primes [--listen ADDR] [--version VERSION]");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// The release directory: `$HOTROLL_RELEASE_DIR` (set by the agent), else the working dir.
fn release_dir() -> PathBuf {
    std::env::var_os("HOTROLL_RELEASE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn run(listeners: Vec<hotroll_handover::NamedListener>) -> anyhow::Result<ExitCode> {
    let args = parse_args()?;
    let dir = release_dir();
    let version = args
        .version
        .or_else(|| read_trimmed(&dir.join("VERSION")))
        .or_else(|| std::env::var("HOTROLL_RELEASE").ok())
        .unwrap_or_else(|| "1.0.0".to_string());
    let code = Code::from_version(&version).map_err(anyhow::Error::msg)?;
    let fault = read_trimmed(&dir.join("FAULT"));

    // code_change: the state of the instance before this one, converted by this code.
    let incoming = hotroll_handover::incoming()?;
    let (state, origin) = match incoming {
        None => (Primes::new(code), None),
        Some(incoming) => {
            let mode = match incoming.mode {
                hotroll_handover::Mode::Up => "up",
                hotroll_handover::Mode::Down => "down",
            };
            match Primes::code_change(code, &incoming.state) {
                Ok((state, format)) => {
                    log(&format!(
                        "{version} (v{}): code_change ({mode}) from {}: {} primes in state \
                         format {format} -> format {}{}",
                        code.number(),
                        incoming.from,
                        state.primes.len(),
                        code.format(),
                        incoming
                            .extra
                            .as_deref()
                            .map(|e| format!(", extra {e:?}"))
                            .unwrap_or_default()
                    ));
                    let origin = Origin {
                        from: incoming.from,
                        format,
                        mode,
                        extra: incoming.extra,
                    };
                    (state, Some(origin))
                }
                Err(e) => {
                    let why = format!("code_change from {} failed: {e}", incoming.from);
                    eprintln!("primes {version} (v{}): {why}", code.number());
                    let _ = hotroll_handover::notify_status(&why);
                    return Ok(ExitCode::from(3));
                }
            }
        }
    };

    let mut bound = Vec::new();
    if listeners.is_empty() {
        let listener = std::net::TcpListener::bind(&args.listen)
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        log(&format!(
            "{version}: listening on {} (no LISTEN_FDS)",
            args.listen
        ));
        bound.push(Listener::Tcp(listener));
    } else {
        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        log(&format!(
            "{version}: {} socket(s) from the agent ({})",
            listeners.len(),
            names.join(", ")
        ));
        bound.extend(listeners.into_iter().map(|l| l.listener));
    }

    let info = Info {
        version,
        code,
        pid: std::process::id(),
        origin,
        started: Instant::now(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(
        info,
        state,
        bound,
        fault.as_deref() == Some("never-ready"),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// The HTTP servers on the listening sockets. Accepting stops (and starts again) around an
/// export; connections already accepted are always served to the end. Only the final stop
/// closes connections, and never one whose first request has not been read yet (a client that
/// connected just before the freeze gets its answer, not a reset).
struct Http {
    listeners: Vec<Listener>,
    router: Router,
    accepting: Option<watch::Sender<bool>>,
    closing: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// How long a connection that has not sent its first request yet may take to send it once
/// the instance is stopping.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(2);

impl Http {
    fn new(listeners: Vec<Listener>, router: Router) -> Self {
        Self {
            listeners,
            router,
            accepting: None,
            closing: watch::channel(false).0,
            tasks: JoinSet::new(),
        }
    }

    /// Accept on every listening socket (a fresh duplicate of each).
    fn start(&mut self) -> anyhow::Result<()> {
        let (tx, rx) = watch::channel(false);
        for listener in &self.listeners {
            let acceptor = match listener {
                Listener::Tcp(l) => {
                    let l = l.try_clone().context("cannot duplicate the listener")?;
                    l.set_nonblocking(true)?;
                    Acceptor::Tcp(tokio::net::TcpListener::from_std(l)?)
                }
                Listener::Unix(l) => {
                    let l = l.try_clone().context("cannot duplicate the listener")?;
                    l.set_nonblocking(true)?;
                    Acceptor::Unix(tokio::net::UnixListener::from_std(l)?)
                }
            };
            self.tasks.spawn(accept_loop(
                acceptor,
                self.router.clone(),
                rx.clone(),
                self.closing.subscribe(),
            ));
        }
        self.accepting = Some(tx);
        Ok(())
    }

    /// Stop accepting: new connections wait in the listen queue (for the next instance).
    fn stop_accepting(&mut self) {
        if let Some(stop) = self.accepting.take() {
            let _ = stop.send(true);
        }
    }

    /// Stop: no more accepts, finish the requests in flight (bounded), close the connections.
    async fn finish(&mut self, within: Duration) {
        self.stop_accepting();
        let _ = self.closing.send(true);
        let _ = tokio::time::timeout(within, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Accept until told to stop, then wait for the connections this loop accepted.
async fn accept_loop(
    acceptor: Acceptor,
    router: Router,
    mut stop: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        // `accept` is cancel-safe: when the stop wins, no connection was taken off the queue.
        tokio::select! {
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = async {
                match &acceptor {
                    Acceptor::Tcp(l) => l.accept().await.map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Box::new(s) as Box<dyn Stream>
                    }),
                    Acceptor::Unix(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Stream>),
                }
            } => match accepted {
                Ok(stream) => {
                    connections.spawn(serve_connection(stream, router.clone(), closing.clone()));
                }
                Err(e) => {
                    log(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(acceptor);
    while connections.join_next().await.is_some() {}
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn serve_connection(
    stream: Box<dyn Stream>,
    router: Router,
    mut closing: watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let service = hyper::service::service_fn(move |request| {
        flag.store(true, Ordering::Relaxed);
        router.clone().oneshot(request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = async { let _ = closing.wait_for(|c| *c).await; } => {}
    }
    let deadline = Instant::now() + FIRST_REQUEST_WAIT;
    while !started.load(Ordering::Relaxed) && Instant::now() < deadline {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

async fn next_export(control: &mut Option<Control>) -> anyhow::Result<ExportRequest> {
    match control {
        Some(control) => Ok(control.next_export().await?),
        None => std::future::pending().await,
    }
}

async fn serve(
    info: Info,
    state: Primes,
    listeners: Vec<Listener>,
    never_ready: bool,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let code = info.code;
    if never_ready {
        log(&format!(
            "{}: FAULT says never-ready: holding {} primes, serving nothing",
            info.version,
            state.primes.len()
        ));
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        return Ok(());
    }

    let shared = Arc::new(Shared::new(state));
    let stop_miner = Arc::new(AtomicBool::new(false));
    let miner = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop_miner));
        std::thread::Builder::new()
            .name("miner".into())
            .spawn(move || miner::run(shared, code, stop))
            .context("cannot start the miner")?
    };
    let app = App {
        shared: Arc::clone(&shared),
        info: Arc::new(info),
    };
    let version = app.info.version.clone();
    let router = Router::new()
        .route("/", get(stats))
        .route("/stats", get(stats))
        .route("/primes", get(list))
        .route("/health", get(|| async { "ok\n" }))
        .with_state(app);
    let mut http = Http::new(listeners, router);
    http.start()?;
    let mut control = Control::from_env()?;
    hotroll_handover::notify_ready()?;
    log(&format!(
        "{version} (v{}, {}): serving{}",
        code.number(),
        code.strategy(),
        if control.is_some() {
            "; handover socket ready"
        } else {
            ""
        }
    ));

    loop {
        tokio::select! {
            request = next_export(&mut control) => {
                let request = request?;
                // Freeze: no new connection, no new prime, then the state.
                http.stop_accepting();
                shared.paused.store(true, Ordering::SeqCst);
                let (bytes, count) = {
                    let state = shared.read();
                    (state.export(code), state.primes.len())
                };
                log(&format!("export: {count} primes, {} bytes (format {})", bytes.len(), code.format()));
                let outcome = match request.send_state(&bytes).await {
                    Ok(exported) => tokio::select! {
                        outcome = exported.outcome() => outcome,
                        _ = term.recv() => break,
                    },
                    Err(e) => {
                        log(&format!("export failed: {e}; carrying on"));
                        Outcome::Aborted
                    }
                };
                match outcome {
                    Outcome::Committed => {
                        log("handover committed: the next instance serves; waiting for the stop signal");
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = interrupt.recv() => {}
                        }
                        break;
                    }
                    Outcome::Aborted => {
                        log("handover aborted: serving and mining again");
                        shared.paused.store(false, Ordering::SeqCst);
                        http.start()?;
                    }
                }
            }
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    log("stopping: finishing the requests in flight");
    stop_miner.store(true, Ordering::Relaxed);
    http.finish(DRAIN).await;
    let _ = miner.join();
    log("stopped");
    Ok(())
}

fn json(value: &serde_json::Value) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn stats(State(app): State<App>) -> Response {
    let info = &app.info;
    let state = app.shared.read();
    let mut doc = serde_json::json!({
        "version": info.version,
        "code": info.code.number(),
        "pid": info.pid,
        "count": state.primes.len(),
        "largest": state.largest(),
        "next": state.next,
        "strategy": info.code.strategy(),
        "primes_per_second": app.shared.rate().round(),
        "state_format": info.code.format(),
        "uptime_ms": info.started.elapsed().as_millis() as u64,
        "handed_over_from": info.origin.as_ref().map(|o| serde_json::json!({
            "version": o.from,
            "state_format": o.format,
            "mode": o.mode,
            "extra": o.extra,
        })),
    });
    if info.code >= Code::V2
        && let Some(map) = doc.as_object_mut()
    {
        map.insert("twin_primes".into(), serde_json::json!(state.twins));
    }
    drop(state);
    json(&doc)
}

async fn list(State(app): State<App>, RawQuery(query): RawQuery) -> Response {
    let mut from = 0usize;
    let mut limit = usize::MAX;
    for pair in query.as_deref().unwrap_or_default().split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let parsed = value.parse::<usize>();
        match (key, parsed) {
            ("from", Ok(n)) => from = n,
            ("limit", Ok(n)) => limit = n,
            ("from" | "limit", Err(_)) => {
                return (StatusCode::BAD_REQUEST, format!("bad {key}: {value:?}\n"))
                    .into_response();
            }
            _ => {}
        }
    }
    let state = app.shared.read();
    let total = state.primes.len();
    let start = from.min(total);
    let end = start.saturating_add(limit).min(total);
    let doc = serde_json::json!({
        "from": start,
        "total": total,
        "primes": &state.primes[start..end],
    });
    drop(state);
    json(&doc)
}
