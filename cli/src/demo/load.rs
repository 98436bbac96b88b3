//! The demo's load generator and HTTP client for `primes`: clients that send `GET /stats`
//! over a new connection each time and record every request (when, how long, how it ended,
//! which code version answered).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A client waits this long for an answer (connections may wait in the listen queue while a
/// service is suspended; that is latency, not an error).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Between two requests of one client.
const PAUSE: Duration = Duration::from_millis(1);
/// Bounds of a load run, whatever happens.
const MAX_DURATION: Duration = Duration::from_secs(600);
const MAX_REQUESTS_PER_CLIENT: usize = 500_000;

/// `GET path` on `127.0.0.1:port` with `Connection: close`: status and body.
pub async fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(bytes)
    };
    let bytes = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no answer from 127.0.0.1:{port} within {CLIENT_TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| {
        format!(
            "not an HTTP answer: {:?}",
            text.chars().take(80).collect::<String>()
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}

/// `GET /stats` as JSON.
pub async fn stats(port: u16) -> anyhow::Result<serde_json::Value> {
    let (status, body) = get(port, "/stats").await?;
    if status != 200 {
        bail!("/stats answered {status}");
    }
    serde_json::from_str(&body).context("/stats is not JSON")
}

/// Every prime the service holds.
pub async fn all_primes(port: u16) -> anyhow::Result<Vec<u64>> {
    let (status, body) = get(port, "/primes").await?;
    if status != 200 {
        bail!("/primes answered {status}");
    }
    let doc: serde_json::Value = serde_json::from_str(&body).context("/primes is not JSON")?;
    doc["primes"]
        .as_array()
        .context("no `primes` in /primes")?
        .iter()
        .map(|v| v.as_u64().context("a prime that is not a number"))
        .collect()
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it started, since the load began.
    pub at: Duration,
    pub latency: Duration,
    pub ok: bool,
    /// The code version (1, 2, 3) that answered; 0 when it failed.
    pub code: u8,
}

/// Clients on every node's port.
pub struct Load {
    started: Instant,
    stop: watch::Sender<bool>,
    /// Per node (in the order of the ports).
    samples: Arc<Vec<Mutex<Vec<Sample>>>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: JoinSet<()>,
}

impl Load {
    /// `clients` per port, until [`Load::stop`] (or the bounds above).
    pub fn start(ports: &[u16], clients: usize) -> Self {
        let started = Instant::now();
        let (stop, stopped) = watch::channel(false);
        let samples: Arc<Vec<Mutex<Vec<Sample>>>> =
            Arc::new(ports.iter().map(|_| Mutex::new(Vec::new())).collect());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        for (node, &port) in ports.iter().enumerate() {
            for _ in 0..clients {
                let samples = Arc::clone(&samples);
                let errors = Arc::clone(&errors);
                let stopped = stopped.clone();
                tasks.spawn(async move {
                    for _ in 0..MAX_REQUESTS_PER_CLIENT {
                        if *stopped.borrow() || started.elapsed() > MAX_DURATION {
                            return;
                        }
                        let at = started.elapsed();
                        let t = Instant::now();
                        let result = get(port, "/stats").await;
                        let latency = t.elapsed();
                        let (ok, code) = match &result {
                            Ok((200, body)) => {
                                match serde_json::from_str::<serde_json::Value>(body) {
                                    Ok(doc) => (true, doc["code"].as_u64().unwrap_or(0) as u8),
                                    Err(_) => (false, 0),
                                }
                            }
                            _ => (false, 0),
                        };
                        if !ok {
                            let mut errors = errors.lock().unwrap_or_else(PoisonError::into_inner);
                            if errors.len() < 10 {
                                errors.push(match result {
                                    Ok((status, _)) => format!("port {port}: status {status}"),
                                    Err(e) => format!("port {port}: {e:#}"),
                                });
                            }
                        }
                        if let Some(node) = samples.get(node) {
                            node.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(Sample {
                                    at,
                                    latency,
                                    ok,
                                    code,
                                });
                        }
                        tokio::time::sleep(PAUSE).await;
                    }
                });
            }
        }
        Self {
            started,
            stop,
            samples,
            errors,
            tasks,
        }
    }

    /// Time since the load began (to mark phases).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Node `i`'s requests that started in `[from, to)`.
    pub fn window(&self, i: usize, from: Duration, to: Duration) -> Vec<Sample> {
        self.samples
            .get(i)
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|s| s.at >= from && s.at < to)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stop every client and wait for them.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(CLIENT_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// What the requests of a window came to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub sent: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Answers by code version (index 1, 2, 3).
    pub by_code: [usize; 4],
}

impl Tally {
    pub fn of(samples: &[Sample]) -> Self {
        let mut latencies: Vec<f64> = samples
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.latency.as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies[i.min(latencies.len() - 1)]
        };
        let mut by_code = [0usize; 4];
        for s in samples.iter().filter(|s| s.ok) {
            if let Some(n) = by_code.get_mut(usize::from(s.code)) {
                *n += 1;
            }
        }
        Self {
            by_code,
            sent: samples.len(),
            failed: samples.iter().filter(|s| !s.ok).count(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: latencies.last().copied().unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies() {
        let samples: Vec<Sample> = (1..=100)
            .map(|i| Sample {
                at: Duration::ZERO,
                latency: Duration::from_millis(i),
                ok: i != 50,
                code: 1,
            })
            .collect();
        let t = Tally::of(&samples);
        assert_eq!((t.sent, t.failed), (100, 1));
        assert!((t.p50_ms - 51.0).abs() < 1e-9, "{t:?}");
        assert!((t.max_ms - 100.0).abs() < 1e-9, "{t:?}");
        assert_eq!(Tally::of(&[]), Tally::default());
    }
}
