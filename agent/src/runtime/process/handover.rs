//! The state handover (docs/design.md §8, `docs/handover.md`): `code_change` of a service declared with
//! `handover = true` moves the running instance's in-memory state to an instance of the new
//! release without closing its listening sockets.
//!
//! 1. The old instance is continued (SIGCONT) if `suspend` stopped it, and asked over its
//!    control socket (`HOTROLL_HANDOVER_SOCKET`, a unix stream socket it listens on) to
//!    `EXPORT`. It freezes (stops accepting, stops changing its state) and answers
//!    `STATE <n>\n` + n bytes, which the agent writes to a file (mode 0600).
//! 2. The new instance starts from the current release with the same held sockets
//!    (`LISTEN_FDS`), the state (`HOTROLL_HANDOVER_STATE`), the old release
//!    (`HOTROLL_HANDOVER_FROM`), `up`/`down` (`HOTROLL_HANDOVER_MODE`) and the script's `extra`
//!    (`HOTROLL_HANDOVER_EXTRA`), and a notify socket of its own.
//! 3. The agent waits for it to be ready (`READY=1`, or the service's probe) within the step's
//!    budget. Then `COMMIT` to the old instance and its stop signal: it finishes the requests it
//!    has and exits (SIGKILL after `stop_timeout`, bounded by what is left of the budget). The new
//!    instance becomes the supervised one.
//! 4. Any failure (export refused or broken, the new instance exits or is not ready in time, the
//!    step is cancelled): the new instance is stopped (its stop signal, SIGKILL after a short
//!    grace), then `ABORT` to the old one, which carries on with its state. The old instance is
//!    left running and not suspended; the step fails and the executor rolls the node back.
//!
//! This module is a child of `supervisor` so that it drives the supervisor's task directly: the
//! whole handover is one request of that task, so nothing else (a crash restart, a stop) can
//! interleave with it, and it completes even if the step that asked goes away.
//!
//! Files: `<run>/handover/<service>/<n>.sock` (instance n's control socket, bound by the
//! service), `<run>/handover/<service>/<n>.state` (the state handed to instance n, removed when
//! the handover ends), `<run>/<service>.<n>.notify` (instance n's notify socket when it was
//! started by a handover), `<run>/<service>.handover.pid` (the incoming instance while a
//! handover runs, so that an agent restarted after a crash stops it).

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixDatagram, UnixStream};
use tokio::time::Instant;

use super::super::probe;
use super::{
    Instance, ServiceEnv, Status, Task, describe_exit, signal_group, start_time, write_pid_file,
};
use crate::cancel::CancelToken;
use crate::config::{Ready, ServiceConfig};

/// The protocol version the agent speaks (`HOTROLL_HANDOVER_PROTOCOL`).
pub const PROTOCOL_VERSION: &str = "1";
pub const ENV_PROTOCOL: &str = "HOTROLL_HANDOVER_PROTOCOL";
pub const ENV_SOCKET: &str = "HOTROLL_HANDOVER_SOCKET";
pub const ENV_STATE: &str = "HOTROLL_HANDOVER_STATE";
pub const ENV_FROM: &str = "HOTROLL_HANDOVER_FROM";
pub const ENV_MODE: &str = "HOTROLL_HANDOVER_MODE";
pub const ENV_EXTRA: &str = "HOTROLL_HANDOVER_EXTRA";
/// Every variable of the protocol (the agent clears them from what a service inherits).
pub const ENV_ALL: [&str; 6] = [
    ENV_PROTOCOL,
    ENV_SOCKET,
    ENV_STATE,
    ENV_FROM,
    ENV_MODE,
    ENV_EXTRA,
];

/// Longest protocol line (bytes, newline included).
const MAX_LINE: u64 = 4096;
/// How long a new instance that failed gets to stop on its stop signal before SIGKILL.
const DISMISS_GRACE: Duration = Duration::from_secs(1);
/// Interval between readiness probes of the new instance (services without `notify`).
const PROBE_INTERVAL: Duration = Duration::from_millis(25);
/// The least time the old instance gets to finish its requests after `COMMIT`, even when the
/// step's budget is nearly spent.
const MIN_DRAIN: Duration = Duration::from_millis(500);
/// `sockaddr_un.sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// Which way the release changes (`code_change`'s mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    Down,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Up => "up",
            Mode::Down => "down",
        }
    }
}

/// A handover to run.
#[derive(Debug, Clone)]
pub struct Request {
    pub mode: Mode,
    /// The script's `extra`.
    pub extra: Option<String>,
    /// Everything (export, start, readiness, the old instance's exit) fits in this.
    pub budget: Duration,
    pub cancel: CancelToken,
}

/// What a handover did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub old_pid: u32,
    pub old_release: String,
    pub new_pid: u32,
    pub new_release: String,
    /// Bytes of state handed over.
    pub state_bytes: u64,
    /// From the export request to the state on disk.
    pub export: Duration,
    /// From the new instance's start to its readiness.
    pub ready: Duration,
    /// From the export request to `COMMIT`: how long the service accepted no connection.
    pub frozen: Duration,
    /// How the old instance ended, and how long it took after `COMMIT`.
    pub old_exit: String,
    pub old_stop: Duration,
}

impl Report {
    /// One line for the step's output.
    pub fn describe(&self, service: &str) -> String {
        format!(
            "{service}: handover {} (pid {}) -> {} (pid {}): {} of state exported in {}, \
             new instance ready in {}, connections waited {} in the listen queue; \
             the old instance {} {} after COMMIT",
            self.old_release,
            self.old_pid,
            self.new_release,
            self.new_pid,
            bytes(self.state_bytes),
            ms(self.export),
            ms(self.ready),
            ms(self.frozen),
            self.old_exit,
            ms(self.old_stop),
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

/// `<run>/handover/<service>`.
pub fn dir(env: &ServiceEnv, spec: &ServiceConfig) -> PathBuf {
    absolute(&env.run.join("handover").join(&spec.name))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn leftover_pid_path(env: &ServiceEnv, spec: &ServiceConfig) -> PathBuf {
    env.run.join(format!("{}.handover.pid", spec.name))
}

/// The control socket of instance `number`, checked to fit a unix socket address.
pub fn control_path(
    env: &ServiceEnv,
    spec: &ServiceConfig,
    number: u64,
) -> Result<PathBuf, String> {
    let path = dir(env, spec).join(format!("{number}.sock"));
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "service `{}`: its handover socket path {} is longer than {MAX_SOCKET_PATH} bytes \
             (a unix socket limit): use a shorter data_dir",
            spec.name,
            path.display()
        ));
    }
    Ok(path)
}

/// The environment every instance of a handover service gets, and its control socket.
pub fn instance_env(
    env: &ServiceEnv,
    spec: &ServiceConfig,
    number: u64,
) -> Result<(Vec<(String, String)>, PathBuf), String> {
    let path = control_path(env, spec, number)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            format!(
                "service `{}`: cannot create {}: {e}",
                spec.name,
                parent.display()
            )
        })?;
    }
    let _ = std::fs::remove_file(&path);
    let vars = vec![
        (ENV_PROTOCOL.to_string(), PROTOCOL_VERSION.to_string()),
        (ENV_SOCKET.to_string(), path.display().to_string()),
    ];
    Ok((vars, path))
}

/// At launch: stop an incoming instance that a crashed agent left in the middle of a handover
/// (its pid file names it; the start time proves the pid was not reused), and remove the
/// handover files of earlier runs.
pub async fn stop_leftover(spec: &ServiceConfig, env: &ServiceEnv) {
    let path = leftover_pid_path(env, spec);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let _ = std::fs::remove_file(&path);
        let mut fields = text.split_whitespace();
        if let (Some(pid), Some(start)) = (
            fields.next().and_then(|p| p.parse::<u32>().ok()),
            fields.next().and_then(|s| s.parse::<u64>().ok()),
        ) && start != 0
            && start_time(pid) == Some(start)
            && let Ok(raw) = i32::try_from(pid)
        {
            tracing::warn!(service = %spec.name, pid, "stopping the incoming instance of a handover a previous agent run left");
            let pgid = Some(Pid::from_raw(raw));
            let _ = signal_group(pgid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while start_time(pid) == Some(start) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir(env, spec));
}

/// Remove the handover files of an instance that ended.
pub(super) fn forget(instance: &Instance) {
    if let Some(path) = &instance.control {
        let _ = std::fs::remove_file(path);
    }
}

/// Read one protocol line (without `\n` / `\r\n`); `None` at EOF.
async fn read_line(stream: &mut BufReader<UnixStream>) -> io::Result<Option<String>> {
    let mut bytes = Vec::new();
    let n = (&mut *stream)
        .take(MAX_LINE)
        .read_until(b'\n', &mut bytes)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if bytes.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_LINE} bytes, or cut short"),
        ));
    }
    bytes.pop();
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// `EXPORT` to the old instance; its state lands in `state_path`. Returns the connection (for
/// the verdict) and the size of the state.
async fn export(control: &Path, state_path: &Path) -> Result<(BufReader<UnixStream>, u64), String> {
    let stream = UnixStream::connect(control).await.map_err(|e| {
        format!(
            "the running instance does not answer on its handover socket {}: {e} (does it \
             speak the handover protocol?)",
            control.display()
        )
    })?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"EXPORT\n")
        .await
        .map_err(|e| format!("cannot send EXPORT: {e}"))?;
    let line = read_line(&mut stream)
        .await
        .map_err(|e| format!("no answer to EXPORT: {e}"))?
        .ok_or("the running instance closed its handover connection instead of answering EXPORT")?;
    if let Some(reason) = line.strip_prefix("ERROR") {
        return Err(format!(
            "the running instance refused to export its state: {}",
            reason.trim()
        ));
    }
    let len: u64 = line
        .strip_prefix("STATE ")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "the running instance answered EXPORT with {:?}, not `STATE <length>`",
                line.chars().take(80).collect::<String>()
            )
        })?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(state_path)
        .await
        .map_err(|e| format!("cannot create {}: {e}", state_path.display()))?;
    let copied = tokio::io::copy(&mut (&mut stream).take(len), &mut file)
        .await
        .map_err(|e| format!("receiving the state failed: {e}"))?;
    if copied != len {
        return Err(format!(
            "the running instance closed its handover connection after {copied} of {len} bytes of state"
        ));
    }
    file.flush()
        .await
        .map_err(|e| format!("cannot write {}: {e}", state_path.display()))?;
    Ok((stream, len))
}

/// Send the verdict; a broken connection is no error (the old instance treats EOF as ABORT,
/// and after COMMIT its stop signal follows anyway).
async fn verdict(connection: Option<BufReader<UnixStream>>, word: &str) {
    if let Some(mut stream) = connection {
        let line = format!("{word}\n");
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.get_mut().write_all(line.as_bytes()).await;
            let _ = stream.get_mut().shutdown().await;
        })
        .await;
    }
}

/// Why the new instance is not (yet) serving.
enum NotReady {
    Exited(String),
    Timeout(String),
    Cancelled,
}

impl Task {
    /// Run one handover (see the module docs).
    pub(super) async fn handover(&mut self, request: Request) -> Result<Report, String> {
        let name = self.spec.name.clone();
        let started = Instant::now();
        let deadline = started + request.budget;
        let status = self.status();
        let (old_pid, old_pgid, old_control) = match &self.child {
            Some(old) => (old.pid, old.pgid(), old.control.clone()),
            None => {
                return Err(format!(
                    "service `{name}` is not running: no state to hand over"
                ));
            }
        };
        let Some(old_control) = old_control else {
            return Err(format!(
                "service `{name}` (pid {old_pid}) was started without a handover socket"
            ));
        };
        let old_release = status.release.clone().unwrap_or_default();
        let number = status.instance + 1;
        let dir = dir(&self.env, &self.spec);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let state_path = dir.join(format!("{number}.state"));

        // 1. Export. A suspended instance must run to answer.
        if status.suspended {
            let _ = signal_group(old_pgid, Signal::SIGCONT);
            self.publish(|s| s.suspended = false);
        }
        self.note(&format!(
            "handover: asking pid {old_pid} ({old_release}) to export its state"
        ));
        let export_started = Instant::now();
        let exported = tokio::select! {
            result = export(&old_control, &state_path) => result,
            () = tokio::time::sleep_until(deadline) => Err(format!(
                "the running instance did not export its state within {:?}", request.budget
            )),
            () = request.cancel.cancelled() => Err("the step was cancelled".to_string()),
        };
        let (connection, state_bytes) = match exported {
            Ok(ok) => ok,
            Err(e) => {
                let _ = std::fs::remove_file(&state_path);
                self.note(&format!("handover: export failed: {e}"));
                return Err(format!("service `{name}`: handover failed: {e}"));
            }
        };
        let export = export_started.elapsed();

        // 2. The new instance.
        let mut notify = None;
        if self.spec.ready == Ready::Notify {
            let path = absolute(&self.env.run.join(format!("{name}.{number}.notify")));
            let _ = std::fs::remove_file(&path);
            match UnixDatagram::bind(&path) {
                Ok(socket) => notify = Some((socket, path)),
                Err(e) => {
                    verdict(Some(connection), "ABORT").await;
                    let _ = std::fs::remove_file(&state_path);
                    return Err(format!(
                        "service `{name}`: cannot create notify socket {}: {e}",
                        path.display()
                    ));
                }
            }
        }
        let mut env = vec![
            (ENV_STATE.to_string(), state_path.display().to_string()),
            (ENV_FROM.to_string(), old_release.clone()),
            (ENV_MODE.to_string(), request.mode.as_str().to_string()),
        ];
        if let Some(extra) = &request.extra {
            env.push((ENV_EXTRA.to_string(), extra.clone()));
        }
        let notify_path = notify
            .as_ref()
            .map(|(_, p): &(UnixDatagram, PathBuf)| p.clone());
        let spawned = self.start_instance(number, notify_path.as_deref(), &env);
        let (mut new, new_release, new_dir) = match spawned {
            Ok(started) => started,
            Err(e) => {
                verdict(Some(connection), "ABORT").await;
                cleanup(&state_path, notify_path.as_deref());
                self.note(&format!("handover: cannot start the new instance: {e}"));
                return Err(format!("service `{name}`: handover failed: {e}"));
            }
        };
        write_pid_file(&leftover_pid_path(&self.env, &self.spec), new.pid);
        self.note(&format!(
            "handover: pid {} ({new_release}) started with {state_bytes} bytes of state from {old_release}",
            new.pid
        ));

        // 3. Readiness.
        let ready_started = Instant::now();
        let waited = self
            .await_ready(
                &mut new,
                &new_release,
                &new_dir,
                notify.as_ref().map(|(s, _)| s),
                deadline,
                &request.cancel,
            )
            .await;
        if let Err(why) = waited {
            let (exited, why) = match why {
                NotReady::Exited(why) => (true, why),
                NotReady::Timeout(why) => (false, why),
                NotReady::Cancelled => (false, "the step was cancelled".to_string()),
            };
            // 4. Failure: the new instance goes first (nobody accepts meanwhile), then the old
            // one carries on.
            let new_pid = new.pid;
            let how = if exited {
                let _ = signal_group(new.pgid(), Signal::SIGKILL);
                forget(&new);
                "had exited".to_string()
            } else {
                self.terminate(new, self.spec.stop_timeout.min(DISMISS_GRACE))
                    .await
            };
            let _ = std::fs::remove_file(leftover_pid_path(&self.env, &self.spec));
            verdict(Some(connection), "ABORT").await;
            cleanup(&state_path, notify_path.as_deref());
            self.note(&format!(
                "handover: failed ({why}); new instance pid {new_pid} {how}; pid {old_pid} \
                 carries on with its state"
            ));
            tracing::warn!(service = %name, old_pid, new_pid, reason = %why, "handover failed; the old instance carries on");
            return Err(format!(
                "service `{name}`: handover {old_release} -> {new_release} failed: {why}; the \
                 new instance (pid {new_pid}) was stopped and the old one (pid {old_pid}) \
                 carries on with its state"
            ));
        }
        let ready = ready_started.elapsed();

        // Commit: the new instance is the service now.
        let frozen = export_started.elapsed();
        verdict(Some(connection), "COMMIT").await;
        let new_pid = new.pid;
        let Some(old) = self.child.replace(new) else {
            return Err(format!("service `{name}`: the old instance vanished"));
        };
        write_pid_file(&self.pid_path(), new_pid);
        let _ = std::fs::remove_file(leftover_pid_path(&self.env, &self.spec));
        if let Some(notify) = notify
            && let Some((_, old_path)) = self.notify.replace(notify)
        {
            let _ = std::fs::remove_file(old_path);
        }
        let _ = std::fs::remove_file(&state_path);
        self.publish(|s| {
            s.pid = Some(new_pid);
            s.release = Some(new_release.clone());
            s.release_dir = Some(new_dir.clone());
            s.instance = number;
            s.suspended = false;
            s.notified_ready = self.spec.ready == Ready::Notify;
            s.wanted = true;
            s.last_error = None;
        });
        tracing::info!(service = %name, old_pid, new_pid, release = %new_release, state_bytes, ?frozen, "handover committed");

        // The old instance finishes its requests and exits.
        let stop_started = Instant::now();
        let drain = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_DRAIN)
            .min(self.spec.stop_timeout);
        let old_exit = self.terminate(old, drain).await;
        let old_stop = stop_started.elapsed();
        self.note(&format!(
            "handover: committed to pid {new_pid} ({new_release}); pid {old_pid} {old_exit}"
        ));
        Ok(Report {
            old_pid,
            old_release,
            new_pid,
            new_release,
            state_bytes,
            export,
            ready,
            frozen,
            old_exit,
            old_stop,
        })
    }

    /// Wait until the new instance is ready: `READY=1` on its own notify socket, or the
    /// service's probe; fail when it exits, the deadline passes or the step is cancelled.
    async fn await_ready(
        &self,
        new: &mut Instance,
        release: &str,
        release_dir: &Path,
        notify: Option<&UnixDatagram>,
        deadline: Instant,
        cancel: &CancelToken,
    ) -> Result<(), NotReady> {
        let ready = &self.spec.ready;
        let probing = !matches!(ready, Ready::Notify);
        let mut last_status: Option<String> = None;
        let mut last_probe = String::from("no probe has run yet");
        let mut buf = vec![0u8; 4096];
        let mut next_probe = Instant::now();
        let probe_status = Status {
            pid: Some(new.pid),
            release: Some(release.to_string()),
            release_dir: Some(release_dir.to_path_buf()),
            wanted: true,
            held: self.status().held,
            ..Status::default()
        };
        enum Event {
            Exited(io::Result<ExitStatus>),
            Datagram(io::Result<usize>),
            Probe,
            Deadline,
            Cancelled,
        }
        loop {
            let event = tokio::select! {
                status = new.child.wait() => Event::Exited(status),
                received = async {
                    match notify {
                        Some(socket) => socket.recv(&mut buf).await,
                        None => std::future::pending().await,
                    }
                } => Event::Datagram(received),
                () = tokio::time::sleep_until(next_probe), if probing => Event::Probe,
                () = tokio::time::sleep_until(deadline) => Event::Deadline,
                () = cancel.cancelled() => Event::Cancelled,
            };
            match event {
                Event::Exited(status) => {
                    // What it said before it exited may still be queued.
                    if let Some(socket) = notify {
                        while let Ok(n) = socket.try_recv(&mut buf) {
                            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                            for line in text.lines() {
                                if let Some(status) = line.strip_prefix("STATUS=") {
                                    last_status = Some(status.to_string());
                                }
                            }
                        }
                    }
                    let mut why = format!(
                        "the new instance (pid {}) {} before it was ready",
                        new.pid,
                        describe_exit(&status)
                    );
                    if let Some(text) = last_status {
                        why.push_str(&format!(": {text}"));
                    }
                    return Err(NotReady::Exited(why));
                }
                Event::Datagram(Ok(n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    for line in text.lines() {
                        match line.split_once('=') {
                            Some(("READY", "1")) => return Ok(()),
                            Some(("STATUS", status)) => last_status = Some(status.to_string()),
                            _ => {}
                        }
                    }
                }
                Event::Datagram(Err(e)) => {
                    return Err(NotReady::Timeout(format!(
                        "the new instance's notify socket failed: {e}"
                    )));
                }
                Event::Probe => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match probe::probe(&self.spec.name, ready, &probe_status, remaining, cancel)
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(why) => last_probe = why,
                    }
                    let interval = match ready {
                        Ready::Exec(_) => PROBE_INTERVAL * 4,
                        _ => PROBE_INTERVAL,
                    };
                    next_probe = Instant::now() + interval;
                }
                Event::Deadline => {
                    let mut why = format!(
                        "the new instance (pid {}) was not ready ({}) in time",
                        new.pid,
                        ready.describe()
                    );
                    if probing {
                        why.push_str(&format!(": {last_probe}"));
                    } else if let Some(text) = last_status {
                        why.push_str(&format!(" (its last STATUS: {text})"));
                    }
                    return Err(NotReady::Timeout(why));
                }
                Event::Cancelled => return Err(NotReady::Cancelled),
            }
        }
    }
}

fn cleanup(state: &Path, notify: Option<&Path>) {
    let _ = std::fs::remove_file(state);
    if let Some(path) = notify {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/examples/primes/agent.toml` is a valid config with a handover service.
    #[test]
    fn the_primes_example_config_is_valid() -> Result<(), String> {
        let text = include_str!("../../../../deploy/examples/primes/agent.toml");
        let config =
            crate::config::Config::from_toml(Path::new("deploy/examples/primes/agent.toml"), text)
                .map_err(|e| e.to_string())?;
        let spec = config.services.first().ok_or("no [[services]] entry")?;
        assert!(spec.handover);
        assert_eq!(spec.ready, Ready::Notify);
        Ok(())
    }

    #[test]
    fn report_line_names_what_happened() {
        let report = Report {
            old_pid: 10,
            old_release: "1.0.0".into(),
            new_pid: 11,
            new_release: "2.0.0".into(),
            state_bytes: 2048,
            export: Duration::from_micros(1500),
            ready: Duration::from_millis(12),
            frozen: Duration::from_millis(14),
            old_exit: "exited with status 0".into(),
            old_stop: Duration::from_millis(3),
        };
        let line = report.describe("primes");
        assert!(
            line.contains("handover 1.0.0 (pid 10) -> 2.0.0 (pid 11)"),
            "{line}"
        );
        assert!(
            line.contains("2.0 KiB of state exported in 1.5 ms"),
            "{line}"
        );
        assert!(line.contains("exited with status 0"), "{line}");
    }

    #[tokio::test]
    async fn export_reads_the_state_and_refusals() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let control = dir.path().join("1.sock");
        let listener = tokio::net::UnixListener::bind(&control).map_err(|e| e.to_string())?;
        let server = tokio::spawn(async move {
            for answer in [&b"STATE 5\nhello"[..], b"ERROR busy\n", b"STATE 9\nshort"] {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                let _ = stream.read_line(&mut line).await;
                assert_eq!(line, "EXPORT\n");
                let _ = stream.get_mut().write_all(answer).await;
                // Keep the first connection for the verdict.
                if answer.starts_with(b"STATE 5") {
                    let mut verdict = String::new();
                    let _ = stream.read_line(&mut verdict).await;
                    assert_eq!(verdict, "COMMIT\n");
                }
            }
        });
        let state = dir.path().join("2.state");
        let (connection, len) = export(&control, &state).await?;
        assert_eq!(len, 5);
        assert_eq!(std::fs::read(&state).map_err(|e| e.to_string())?, b"hello");
        verdict(Some(connection), "COMMIT").await;
        let refused = export(&control, &state).await.err().unwrap_or_default();
        assert!(
            refused.contains("refused to export its state: busy"),
            "{refused}"
        );
        let short = export(&control, &state).await.err().unwrap_or_default();
        assert!(short.contains("after 5 of 9 bytes"), "{short}");
        server.await.map_err(|e| e.to_string())?;
        let missing = export(&dir.path().join("none.sock"), &state)
            .await
            .err()
            .unwrap_or_default();
        assert!(missing.contains("does not answer"), "{missing}");
        Ok(())
    }
}
