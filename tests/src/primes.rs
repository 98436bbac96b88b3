//! Helpers for the hot-upgrade tests: the `primes` demo service (package `hotroll-primes`), its
//! `[[services]]` entry, a small HTTP client, and a load loop that records every request's
//! outcome and latency.
//!
//! ```no_run
//! use std::time::Duration;
//! use hotroll_tests::primes::{self, LoadLoop};
//!
//! # fn main() -> anyhow::Result<()> {
//! let binary = primes::primes_binary()?; // built like the daemons (see `bins`)
//! let load = LoadLoop::start(8080, 2, Duration::from_secs(60), 20_000);
//! // ... upgrade ...
//! let report = load.finish()?;
//! anyhow::ensure!(report.failed() == 0);
//! # Ok(()) }
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The binary's name.
pub const PRIMES_BIN: &str = "primes";

static PRIMES: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `primes` executable, next to the daemons the harness uses: built (once per test process)
/// with `cargo build -p hotroll-primes --bin primes` in the same profile and target dir, unless
/// `HOTROLL_BIN_DIR` or `HOTROLL_NO_BUILD` say to use what is there.
pub fn primes_binary() -> anyhow::Result<PathBuf> {
    PRIMES
        .get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn locate() -> anyhow::Result<PathBuf> {
    let bins = crate::binaries()?;
    let dir = bins
        .hotroll
        .parent()
        .context("the hotroll binary has no directory")?
        .to_path_buf();
    let path = dir.join(PRIMES_BIN);
    let prebuilt = std::env::var_os("HOTROLL_BIN_DIR").is_some()
        || std::env::var_os("HOTROLL_NO_BUILD").is_some();
    if !prebuilt {
        build_into(&dir)?;
    }
    if !path.is_file() {
        bail!(
            "{} does not exist (build it with `cargo build -p hotroll-primes --bin primes`)",
            path.display()
        );
    }
    Ok(path)
}

/// `cargo build -p hotroll-primes --bin primes` for the profile directory `dir`
/// (`<target>/[<triple>/]<profile>`).
fn build_into(dir: &Path) -> anyhow::Result<()> {
    let profile_name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("cannot tell the cargo profile of {}", dir.display()))?;
    let profile = if profile_name == "debug" {
        "dev"
    } else {
        profile_name
    };
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent", dir.display()))?;
    let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() {
        (parent.to_path_buf(), None)
    } else if let Some(root) = parent.parent().filter(|r| r.join("CACHEDIR.TAG").exists()) {
        (
            root.to_path_buf(),
            parent
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string),
        )
    } else {
        (parent.to_path_buf(), None)
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Cargo.toml");
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args([
            "-p",
            "hotroll-primes",
            "--bin",
            PRIMES_BIN,
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    if let Some(triple) = triple {
        command.arg("--target").arg(triple);
    }
    let output = command
        .output()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        bail!(
            "building primes failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A `[[services]]` entry running `bin/primes` of app `app` with the handover protocol, the
/// agent holding `127.0.0.1:<port>`, readiness by `READY=1`.
pub fn primes_service(name: &str, app: &str, port: u16) -> String {
    format!(
        "[[services]]\n\
         name = \"{name}\"\n\
         app = \"{app}\"\n\
         command = [\"bin/primes\"]\n\
         listen = [\"tcp://127.0.0.1:{port}\"]\n\
         ready = \"notify\"\n\
         handover = true\n\
         stop_signal = \"SIGTERM\"\n\
         stop_timeout = \"5s\"\n"
    )
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Nobody listening (the kernel refused the connection).
    Refused,
    /// Anything else: reset, timeout, a non-200 status, a body that is not the stats.
    Failed,
}

/// `GET path` on `127.0.0.1:<port>` (one connection, `Connection: close`): status and body.
pub fn get(port: u16, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(ErrorKind::InvalidData, format!("no HTTP head in {text:?}"))
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "no status"))?;
    Ok((status, body.to_string()))
}

/// `GET /stats` as JSON.
pub fn stats(port: u16) -> anyhow::Result<Value> {
    let (status, body) = get(port, "/stats", Duration::from_secs(10))?;
    if status != 200 {
        bail!("/stats answered {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("/stats is not JSON: {body}"))
}

/// Every prime the service on `port` holds.
pub fn all_primes(port: u16) -> anyhow::Result<Vec<u64>> {
    let (status, body) = get(port, "/primes", Duration::from_secs(20))?;
    if status != 200 {
        bail!("/primes answered {status}");
    }
    let doc: Value = serde_json::from_str(&body).context("/primes is not JSON")?;
    doc["primes"]
        .as_array()
        .context("no `primes` array")?
        .iter()
        .map(|v| v.as_u64().context("not a number"))
        .collect()
}

/// Fail unless `before` is a prefix of `after` (the miner only appends, so every prime known
/// before must still be there, in place).
pub fn ensure_kept(before: &[u64], after: &[u64]) -> anyhow::Result<()> {
    if after.len() < before.len() {
        bail!(
            "primes lost: {} before, {} after",
            before.len(),
            after.len()
        );
    }
    if let Some(i) = before.iter().zip(after).position(|(a, b)| a != b) {
        bail!(
            "prime #{i} changed: {} before, {} after",
            before[i],
            after[i]
        );
    }
    Ok(())
}

/// Wait until the service on `port` answers `/stats` with `field == value` (e.g. "code" 2).
pub fn wait_stats(
    port: u16,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> anyhow::Result<Value> {
    crate::poll(what, timeout, Duration::from_millis(50), || {
        Ok(stats(port).ok().filter(|s| done(s)))
    })
}

/// One request: when it started (since the loop's start), how long it took, how it ended, and
/// the `code` (1, 2, 3) that answered.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    pub latency: Duration,
    pub outcome: Outcome,
    pub code: u8,
}

/// Everything a [`LoadLoop`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub samples: Vec<Sample>,
    /// The first few failures.
    pub errors: Vec<String>,
}

impl LoadReport {
    pub fn count(&self) -> usize {
        self.samples.len()
    }

    pub fn failed(&self) -> usize {
        self.samples
            .iter()
            .filter(|s| s.outcome == Outcome::Failed)
            .count()
    }

    pub fn refused(&self) -> usize {
        self.samples
            .iter()
            .filter(|s| s.outcome == Outcome::Refused)
            .count()
    }

    /// Answers by code version.
    pub fn by_code(&self, code: u8) -> usize {
        self.samples
            .iter()
            .filter(|s| s.outcome == Outcome::Ok && s.code == code)
            .count()
    }

    /// Latency percentiles (p50, p99, max) of the requests that started in `[from, to)`.
    pub fn percentiles(&self, from: Duration, to: Duration) -> Option<Percentiles> {
        let mut latencies: Vec<Duration> = self
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at < to && s.outcome == Outcome::Ok)
            .map(|s| s.latency)
            .collect();
        Percentiles::of(&mut latencies)
    }
}

/// Latency percentiles of a set of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Percentiles {
    pub fn of(latencies: &mut [Duration]) -> Option<Self> {
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies[i.min(latencies.len() - 1)]
        };
        Some(Self {
            count: latencies.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: latencies[latencies.len() - 1],
        })
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} requests",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

/// Clients (threads) sending `GET /stats` to one port, one connection per request, until
/// stopped, `max_duration` passed, or `max_requests` were sent in all.
#[derive(Debug)]
pub struct LoadLoop {
    started: Instant,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    handles: Vec<JoinHandle<()>>,
}

/// A client waits this long for an answer: longer than any handover in these tests keeps
/// connections in the listen queue.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

impl LoadLoop {
    pub fn start(port: u16, clients: usize, max_duration: Duration, max_requests: usize) -> Self {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let handles = (0..clients.max(1))
            .map(|_| {
                let (stop, report) = (Arc::clone(&stop), Arc::clone(&report));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < max_duration {
                        let at = started.elapsed();
                        let t = Instant::now();
                        let result = get(port, "/stats", CLIENT_TIMEOUT);
                        let latency = t.elapsed();
                        let (outcome, code, error) = classify(result);
                        let Ok(mut report) = report.lock() else {
                            return;
                        };
                        report.samples.push(Sample {
                            at,
                            latency,
                            outcome,
                            code,
                        });
                        if let Some(error) = error
                            && report.errors.len() < 10
                        {
                            report.errors.push(error);
                        }
                        if report.samples.len() >= max_requests {
                            return;
                        }
                    }
                })
            })
            .collect();
        Self {
            started,
            stop,
            report,
            handles,
        }
    }

    /// Time since the loop started (to mark phases).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The report so far.
    pub fn snapshot(&self) -> LoadReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stop and return the report.
    pub fn finish(mut self) -> anyhow::Result<LoadReport> {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a load client panicked"))?;
        }
        Ok(self.snapshot())
    }
}

impl Drop for LoadLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

fn classify(result: std::io::Result<(u16, String)>) -> (Outcome, u8, Option<String>) {
    match result {
        Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
            Ok(doc) => {
                let code = doc["code"].as_u64().unwrap_or(0) as u8;
                (Outcome::Ok, code, None)
            }
            Err(e) => (Outcome::Failed, 0, Some(format!("bad body: {e}"))),
        },
        Ok((status, body)) => (
            Outcome::Failed,
            0,
            Some(format!("status {status}: {}", body.trim())),
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            (Outcome::Refused, 0, Some(e.to_string()))
        }
        Err(e) => (Outcome::Failed, 0, Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_prefixes() -> anyhow::Result<()> {
        let mut l: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut l).context("empty")?;
        assert_eq!(p.p50, Duration::from_millis(51));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        ensure_kept(&[2, 3, 5], &[2, 3, 5, 7])?;
        assert!(ensure_kept(&[2, 3, 5], &[2, 3]).is_err());
        assert!(ensure_kept(&[2, 3, 5], &[2, 4, 5, 7]).is_err());
        Ok(())
    }
}
