//! Helpers for the process runtime's tests: `[[services]]` entries for the `version-server` test
//! service, clients that read the version it serves, and the releases an agent keeps on disk.
//!
//! ```no_run
//! use std::time::Duration;
//! use hotroll_tests::{Cluster, ClusterOptions, free_port, services};
//!
//! # fn main() -> anyhow::Result<()> {
//! let port = free_port()?;
//! let options = ClusterOptions::default()
//!     .node_agent_toml_extra(1, &services::version_service("version", "version", port, &[]));
//! Cluster::start(1, options)?.run(|cluster| {
//!     // ... install a release with a rollout, then:
//!     let (version, _pid) = services::wait_serving(port, "1.0", Duration::from_secs(10))?;
//!     Ok(())
//! })
//! # }
//! ```

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::cluster::Cluster;
use crate::poll::poll;

/// A `[[services]]` entry running `bin/version-server` of app `app`, with the agent holding
/// `127.0.0.1:<port>` and a tcp readiness probe on it; `env` goes to the service.
pub fn version_service(name: &str, app: &str, port: u16, env: &[(&str, &str)]) -> String {
    version_service_with(
        name,
        app,
        port,
        env,
        &format!("{{ tcp = \"127.0.0.1:{port}\" }}"),
    )
}

/// [`version_service`] with an explicit `ready` value (TOML), e.g. `"\"notify\""`.
pub fn version_service_with(
    name: &str,
    app: &str,
    port: u16,
    env: &[(&str, &str)],
    ready: &str,
) -> String {
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k} = \"{v}\"")).collect();
    format!(
        "[[services]]\n\
         name = \"{name}\"\n\
         app = \"{app}\"\n\
         command = [\"bin/version-server\"]\n\
         env = {{ {} }}\n\
         listen = [\"tcp://127.0.0.1:{port}\"]\n\
         ready = {ready}\n\
         stop_signal = \"SIGTERM\"\n\
         stop_timeout = \"5s\"\n",
        env.join(", ")
    )
}

/// One connection to the service: the `(version, pid)` line it serves.
pub fn read_version(port: u16) -> anyhow::Result<(String, u32)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    parse_line(&text)
}

fn parse_line(text: &str) -> anyhow::Result<(String, u32)> {
    let (version, pid) = text
        .trim()
        .split_once(' ')
        .with_context(|| format!("unexpected answer {text:?}"))?;
    Ok((version.to_string(), pid.parse().context("bad pid")?))
}

/// Wait until the service on `port` serves `version`; returns its pid.
pub fn wait_serving(port: u16, version: &str, timeout: Duration) -> anyhow::Result<(String, u32)> {
    poll(
        &format!("127.0.0.1:{port} to serve version {version}"),
        timeout,
        Duration::from_millis(100),
        || {
            let (served, pid) = read_version(port)?;
            Ok((served == version).then_some((served, pid)))
        },
    )
}

/// What a [`ClientLoop`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoopStats {
    /// Connections that got a version.
    pub ok: u64,
    /// Connections refused (nobody listening).
    pub refused: u64,
    /// Any other failure (reset, timeout, empty answer).
    pub failed: u64,
    /// Answers per version.
    pub versions: BTreeMap<String, u64>,
    /// The first few failures.
    pub errors: Vec<String>,
}

impl LoopStats {
    /// Add another loop's counts.
    pub fn merge(&mut self, other: LoopStats) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.failed += other.failed;
        for (version, n) in other.versions {
            *self.versions.entry(version).or_default() += n;
        }
        self.errors.extend(other.errors);
    }
}

/// A client that connects to a port over and over in a thread until stopped (bounded by a
/// maximum duration), counting what happens.
#[derive(Debug)]
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoopStats>>,
    handle: Option<JoinHandle<()>>,
}

impl ClientLoop {
    /// Start connecting to `127.0.0.1:<port>`; stops by itself after `max_duration`.
    pub fn start(port: u16, max_duration: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoopStats::default()));
        let (flag, shared) = (Arc::clone(&stop), Arc::clone(&stats));
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) && started.elapsed() < max_duration {
                let result = read_version(port);
                let Ok(mut stats) = shared.lock() else { return };
                match result {
                    Ok((version, _)) => {
                        stats.ok += 1;
                        *stats.versions.entry(version).or_default() += 1;
                    }
                    Err(e) => {
                        let refused = e
                            .downcast_ref::<std::io::Error>()
                            .is_some_and(|io| io.kind() == ErrorKind::ConnectionRefused);
                        if refused {
                            stats.refused += 1;
                        } else {
                            stats.failed += 1;
                        }
                        if stats.errors.len() < 10 {
                            stats.errors.push(format!("{e:#}"));
                        }
                    }
                }
                drop(stats);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            stop,
            stats,
            handle: Some(handle),
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> LoopStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stop and return the counts.
    pub fn finish(mut self) -> anyhow::Result<LoopStats> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().context("already finished")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("the client loop panicked"))?;
        Ok(self.snapshot())
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Where node `i` keeps app `app`.
pub fn app_dir(cluster: &Cluster, i: usize, app: &str) -> PathBuf {
    cluster.agent_info(i).data_dir.join("apps").join(app)
}

/// The release `current` names on node `i` (from its data dir).
pub fn current_release(cluster: &Cluster, i: usize, app: &str) -> Option<String> {
    let target = std::fs::read_link(app_dir(cluster, i, app).join("current")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The release in `permanent` on node `i`.
pub fn permanent_release(cluster: &Cluster, i: usize, app: &str) -> Option<String> {
    std::fs::read_to_string(app_dir(cluster, i, app).join("permanent"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Every entry of `releases/` on node `i` (staging directories included), sorted.
pub fn release_entries(cluster: &Cluster, i: usize, app: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(app_dir(cluster, i, app).join("releases"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `(current, permanent)` of `app` per node, as `hotroll nodes` shows them.
pub fn nodes_apps(
    cluster: &Cluster,
    app: &str,
) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let nodes = cluster.nodes()?;
    let mut out = BTreeMap::new();
    for node in nodes.as_array().context("nodes is not an array")? {
        let name = node["name"].as_str().unwrap_or_default().to_string();
        let entry = &node["apps"][app];
        out.insert(
            name,
            (
                entry["current"].as_str().unwrap_or_default().to_string(),
                entry["permanent"].as_str().unwrap_or_default().to_string(),
            ),
        );
    }
    Ok(out)
}

/// `sha256:<hex>` of a file.
pub fn digest_of(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))))
}

/// Lines of `log` that contain every one of `needles`.
pub fn log_lines(log: &Path, needles: &[&str]) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .map(str::to_string)
        .collect()
}

/// A deterministic pseudo-random file of `size` bytes (incompressible enough for transfers).
pub fn write_blob(path: &Path, size: usize, seed: u64) -> anyhow::Result<()> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    bytes.truncate(size);
    std::fs::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Fail unless `stats` saw answers and no refused or failed connection.
pub fn ensure_no_refusals(stats: &LoopStats) -> anyhow::Result<()> {
    if stats.ok == 0 {
        bail!("the client loop got no answer at all: {stats:?}");
    }
    if stats.refused > 0 || stats.failed > 0 {
        bail!(
            "{} refused and {} failed connections out of {}: {:?}",
            stats.refused,
            stats.failed,
            stats.ok + stats.refused + stats.failed,
            stats.errors
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() -> anyhow::Result<()> {
        assert_eq!(parse_line("2.0 1234\n")?, ("2.0".to_string(), 1234));
        assert!(parse_line("").is_err());
        Ok(())
    }
}
