//! A real Prometheus on 127.0.0.1 for the metric-gate tests (Debian's `prometheus`), scraping
//! every second a config the test writes, and [`ErrorCounter`], the scraped service: an HTTP
//! server whose `errors_total` counter climbs while a flag file exists (a hook of the "bad
//! release" creates it). Dropping either stops it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::poll::poll;
use crate::ports::free_port;
use crate::process::Process;
use crate::tools;

/// A Prometheus server with its own temp dir (config, TSDB, log).
#[derive(Debug)]
pub struct Prometheus {
    dir: tempfile::TempDir,
    port: u16,
    process: Process,
}

impl Prometheus {
    /// Start Prometheus scraping `targets` (`host:port`, path `/metrics`, job `svc`) every
    /// second, and wait until it is ready (`/-/ready`).
    pub fn start(targets: &[String]) -> anyhow::Result<Self> {
        let unlabelled: Vec<(String, Option<String>)> =
            targets.iter().map(|t| (t.clone(), None)).collect();
        Self::start_labelled(&unlabelled)
    }

    /// Like [`Prometheus::start`], each target with its `node` label when given (what a node
    /// gate's `$node` selects).
    pub fn start_labelled(targets: &[(String, Option<String>)]) -> anyhow::Result<Self> {
        tools::require(&["prometheus"], "prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("hotroll-prometheus-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let static_configs: String = targets
            .iter()
            .map(|(target, node)| match node {
                Some(node) => {
                    format!(
                        "      - targets: [\"{target}\"]\n        labels: {{ node: \"{node}\" }}\n"
                    )
                }
                None => format!("      - targets: [\"{target}\"]\n"),
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: svc\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    \
             static_configs:\n{static_configs}"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).context("cannot write prometheus.yml")?;
        let port = free_port()?;
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_string(),
        ];
        let mut process = Process::new(
            "prometheus",
            "prometheus",
            args,
            dir.path(),
            dir.path().join("prometheus.log"),
        );
        process.start()?;
        let prometheus = Self { dir, port, process };
        poll(
            "Prometheus to be ready",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || Ok(http_get(prometheus.addr(), "/-/ready")?.map(|_| ())),
        )
        .with_context(|| prometheus.process.log_tail(20))?;
        Ok(prometheus)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The values of an instant query, `None` while it has no series (or Prometheus errs).
    pub fn query(&self, promql: &str) -> anyhow::Result<Option<Vec<f64>>> {
        let mut encoded = String::new();
        for byte in promql.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                encoded.push(char::from(byte));
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        let Some(body) = http_get(self.addr(), &format!("/api/v1/query?query={encoded}"))? else {
            return Ok(None);
        };
        let json: serde_json::Value =
            serde_json::from_str(&body).context("Prometheus answered no JSON")?;
        let values: Vec<f64> = json["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok((!values.is_empty()).then_some(values))
    }

    /// Wait until `promql` has a value (the scrapes it needs have happened).
    pub fn wait_for_data(&self, promql: &str, timeout: Duration) -> anyhow::Result<Vec<f64>> {
        poll(
            &format!("Prometheus to have data for `{promql}`"),
            timeout,
            Duration::from_millis(200),
            || self.query(promql),
        )
    }

    /// Stop it (SIGKILL); its port then refuses connections.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `GET path` over HTTP/1.0: the body of a 200 answer, `None` for any other status or when
/// nobody answers.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<Option<String>> {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    if stream.read_to_string(&mut answer).is_err() {
        return Ok(None);
    }
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        return Ok(None);
    };
    let ok = head
        .lines()
        .next()
        .is_some_and(|status| status.split_whitespace().nth(1) == Some("200"));
    Ok(ok.then(|| body.to_string()))
}

/// The scraped service: `GET /metrics` answers `errors_total N`. While `flag` exists every
/// scrape adds [`ErrorCounter::ERRORS_PER_SCRAPE`] to N (a rate of about that many per second
/// at a 1 s scrape interval); otherwise N stays.
#[derive(Debug)]
pub struct ErrorCounter {
    addr: SocketAddr,
    flag: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ErrorCounter {
    pub const ERRORS_PER_SCRAPE: u64 = 5;

    pub fn start(flag: PathBuf) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot bind the error counter's port")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, flag) = (stop.clone(), flag.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut request = [0u8; 2048];
                    let _ = stream.read(&mut request);
                    let n = if flag.exists() {
                        errors.fetch_add(Self::ERRORS_PER_SCRAPE, Ordering::SeqCst)
                            + Self::ERRORS_PER_SCRAPE
                    } else {
                        errors.load(Ordering::SeqCst)
                    };
                    let body = format!(
                        "# HELP errors_total Errors served.\n# TYPE errors_total counter\nerrors_total {n}\n"
                    );
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            })
        };
        Ok(Self {
            addr,
            flag,
            stop,
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`, the scrape target.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The file whose existence makes errors climb.
    pub fn flag(&self) -> &Path {
        &self.flag
    }
}

impl Drop for ErrorCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
