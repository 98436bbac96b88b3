//! Supervising one service: one task owns its process, its held sockets and its notify socket,
//! and takes requests (start, stop, restart, SIGSTOP/SIGCONT, shutdown) over a channel, so a
//! request whose caller went away (a cancelled step) still completes and never leaves a
//! half-stopped process.
//!
//! * **Start** runs `command` from the app's current release (resolved at start, so `load`
//!   never changes a running instance), as the leader of its own process group, cwd the release
//!   directory, output appended to `<data_dir>/logs/<service>.log`, with the held sockets at
//!   fds 3… (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`) and `NOTIFY_SOCKET` for `notify`.
//! * **LISTEN_PID** must be the service's own pid, which is unknown before the fork, and the
//!   workspace forbids `unsafe` (so no `pre_exec` of our own). The process therefore starts as
//!   `/bin/sh -c 'export LISTEN_PID=$$; exec "$0" "$@"' PROGRAM ARGS…`: `$$` is the shell's pid,
//!   and `exec` keeps it, so the service sees `LISTEN_PID == getpid()` as `sd_listen_fds`
//!   requires. The fds themselves are placed by the `command-fds` crate (its `pre_exec` is
//!   reviewed code outside this workspace). Services without sockets are exec'd directly.
//! * **Crash**: the rest of the group is killed and the service started again after a backoff
//!   (200 ms doubling to 10 s, reset after 10 s of uptime).
//! * **Stop**: `stop_signal` (and SIGCONT, in case it is suspended) to the process group; after
//!   `stop_timeout` SIGKILL to the group. Whatever the leader leaves in its group is killed.
//! * A pid file `<data_dir>/run/<service>.pid` (pid and start time) lets an agent that restarts
//!   after a crash stop the instance its previous run left behind before it binds the sockets
//!   again.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::listen::{self, HeldInfo, HeldSocket};
use super::release::Apps;
use crate::config::{Ready, ServiceConfig};

/// The state handover of `code_change` (a child module: it drives this task directly).
#[path = "handover.rs"]
pub mod handover;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// An instance that ran this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The socket-activation shim (see the module docs).
const LISTEN_PID_SHIM: &str = r#"export LISTEN_PID=$$; exec "$0" "$@""#;
const SHELL: &str = "/bin/sh";

/// Where a service's files live.
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    pub apps: Apps,
    /// `<data_dir>/logs`
    pub logs: PathBuf,
    /// `<data_dir>/run`: pid files and notify sockets.
    pub run: PathBuf,
}

/// What a service is doing, as its supervisor last published it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub pid: Option<u32>,
    /// Release the running instance was started from.
    pub release: Option<String>,
    pub release_dir: Option<PathBuf>,
    /// Counts the instances started (0 = never).
    pub instance: u64,
    pub suspended: bool,
    /// `READY=1` arrived on the notify socket from the running instance.
    pub notified_ready: bool,
    /// The supervisor keeps the service running (restarts it when it exits).
    pub wanted: bool,
    /// Unexpected exits since the agent started.
    pub crashes: u64,
    pub last_exit: Option<String>,
    /// Why the last start failed, if it did.
    pub last_error: Option<String>,
    /// Held TCP sockets (for probes).
    pub held: Vec<HeldInfo>,
}

impl Status {
    pub fn running(&self) -> bool {
        self.pid.is_some()
    }
}

type Reply<T> = oneshot::Sender<T>;

enum Request {
    Start(Reply<Result<Status, String>>),
    Restart(Reply<Result<Status, String>>),
    Stop(Reply<Status>),
    Signal(Signal, Reply<Result<Status, String>>),
    Handover(handover::Request, Reply<Result<handover::Report, String>>),
    Shutdown(Reply<()>),
}

/// Handle to a service's supervisor task.
#[derive(Debug, Clone)]
pub struct Supervisor {
    pub spec: Arc<ServiceConfig>,
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<Status>,
}

fn gone() -> String {
    "the service's supervisor is not running (the agent is shutting down)".to_string()
}

impl Supervisor {
    /// Start supervising `spec`: stop whatever a previous agent left running, bind the
    /// sockets, and start the service when `start` and its app has a current release.
    pub async fn launch(spec: Arc<ServiceConfig>, env: ServiceEnv, start: bool) -> Self {
        for dir in [&env.logs, &env.run] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot create directory");
            }
        }
        stop_leftover(&spec, &env).await;
        if spec.handover {
            handover::stop_leftover(&spec, &env).await;
        }
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (tx, rx) = mpsc::channel(16);
        let mut task = Task {
            spec: Arc::clone(&spec),
            env,
            held: None,
            notify: None,
            child: None,
            wanted: false,
            restart_at: None,
            backoff: FIRST_BACKOFF,
            status: status_tx,
        };
        if let Err(e) = task.ensure_bound() {
            tracing::error!(service = %spec.name, error = %e, "cannot bind the service's sockets; will retry at its next start");
        }
        if start {
            if task.env.apps.current_release(&spec.app).is_some() {
                task.wanted = true;
                if let Err(e) = task.spawn() {
                    tracing::error!(service = %spec.name, error = %e, "cannot start service");
                    task.schedule_restart();
                }
            } else {
                tracing::info!(service = %spec.name, app = %spec.app, "app has no release on this node yet; the service starts when a rollout installs one");
            }
        }
        tokio::spawn(task.run(rx));
        Self {
            spec,
            requests: tx,
            status: status_rx,
        }
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Keep the service running; start it now unless it runs.
    pub async fn start(&self) -> Result<Status, String> {
        self.ask(Request::Start).await?
    }

    /// Stop the running instance (if any) and start a new one from the current release; the
    /// held sockets stay open throughout.
    pub async fn restart(&self) -> Result<Status, String> {
        self.ask(Request::Restart).await?
    }

    /// Stop it and keep it stopped.
    pub async fn stop(&self) -> Result<Status, String> {
        self.ask(Request::Stop).await
    }

    /// SIGSTOP or SIGCONT the process group.
    pub async fn signal(&self, signal: Signal) -> Result<Status, String> {
        self.ask(|reply| Request::Signal(signal, reply)).await?
    }

    /// Move the running instance to the current release with its state (the handover
    /// protocol, see [`handover`]); on failure the old instance carries on.
    pub async fn handover(&self, request: handover::Request) -> Result<handover::Report, String> {
        self.ask(|reply| Request::Handover(request, reply)).await?
    }

    /// Stop the service and end the supervisor.
    pub async fn shutdown(&self) {
        let _ = self.ask(Request::Shutdown).await;
    }
}

struct Instance {
    child: tokio::process::Child,
    pid: u32,
    started: Instant,
    /// Its handover control socket (services with `handover = true`).
    control: Option<PathBuf>,
}

impl Instance {
    fn pgid(&self) -> Option<Pid> {
        i32::try_from(self.pid).ok().map(Pid::from_raw)
    }
}

enum Event {
    Request(Option<Request>),
    Exited(std::io::Result<ExitStatus>),
    RestartDue,
    Notify(std::io::Result<Vec<u8>>),
}

struct Task {
    spec: Arc<ServiceConfig>,
    env: ServiceEnv,
    held: Option<Vec<HeldSocket>>,
    notify: Option<(UnixDatagram, PathBuf)>,
    child: Option<Instance>,
    wanted: bool,
    restart_at: Option<Instant>,
    backoff: Duration,
    status: watch::Sender<Status>,
}

fn signal_group(pgid: Option<Pid>, signal: Signal) -> Result<(), Errno> {
    let Some(pgid) = pgid else {
        return Ok(());
    };
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |s| s.as_str().to_string());
                format!("was killed by {name}")
            }
            (None, None) => "ended".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

impl Task {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut buf = vec![0u8; 4096];
        loop {
            let event = {
                let child = &mut self.child;
                let notify = &self.notify;
                let restart_at = self.restart_at;
                let buf = &mut buf;
                tokio::select! {
                    request = requests.recv() => Event::Request(request),
                    status = async {
                        match child {
                            Some(instance) => instance.child.wait().await,
                            None => std::future::pending().await,
                        }
                    } => Event::Exited(status),
                    () = async {
                        match restart_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => Event::RestartDue,
                    message = async {
                        match notify {
                            Some((socket, _)) => socket.recv(buf).await.map(|n| buf[..n].to_vec()),
                            None => std::future::pending().await,
                        }
                    } => Event::Notify(message),
                }
            };
            match event {
                Event::Request(None) => {
                    self.shutdown().await;
                    return;
                }
                Event::Request(Some(Request::Shutdown(reply))) => {
                    self.shutdown().await;
                    let _ = reply.send(());
                    return;
                }
                Event::Request(Some(request)) => self.handle(request).await,
                Event::Exited(status) => self.exited(status),
                Event::RestartDue => {
                    self.restart_at = None;
                    if self.wanted
                        && self.child.is_none()
                        && let Err(e) = self.spawn()
                    {
                        tracing::warn!(service = %self.spec.name, error = %e, "cannot restart service");
                        self.schedule_restart();
                    }
                }
                Event::Notify(Ok(message)) => self.notified(&message),
                Event::Notify(Err(e)) => {
                    tracing::warn!(service = %self.spec.name, error = %e, "notify socket failed; closing it");
                    self.notify = None;
                }
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Start(reply) => {
                self.wanted = true;
                let result = if self.child.is_some() {
                    Ok(self.status())
                } else {
                    self.restart_at = None;
                    self.backoff = FIRST_BACKOFF;
                    self.spawn_or_schedule()
                };
                let _ = reply.send(result);
            }
            Request::Restart(reply) => {
                self.wanted = true;
                self.stop_instance().await;
                self.restart_at = None;
                self.backoff = FIRST_BACKOFF;
                let _ = reply.send(self.spawn_or_schedule());
            }
            Request::Stop(reply) => {
                self.wanted = false;
                self.restart_at = None;
                self.stop_instance().await;
                self.publish(|s| s.wanted = false);
                let _ = reply.send(self.status());
            }
            Request::Signal(signal, reply) => {
                let result = match &self.child {
                    None => Err(format!("service `{}` is not running", self.spec.name)),
                    Some(instance) => match signal_group(instance.pgid(), signal) {
                        Ok(()) => {
                            let suspended = signal == Signal::SIGSTOP;
                            self.publish(|s| s.suspended = suspended);
                            Ok(self.status())
                        }
                        Err(e) => Err(format!(
                            "cannot send {signal} to service `{}`: {e}",
                            self.spec.name
                        )),
                    },
                };
                let _ = reply.send(result);
            }
            Request::Handover(request, reply) => {
                let result = self.handover(request).await;
                let _ = reply.send(result);
            }
            Request::Shutdown(reply) => {
                self.shutdown().await;
                let _ = reply.send(());
            }
        }
    }

    fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    fn publish(&self, change: impl FnOnce(&mut Status)) {
        self.status.send_modify(change);
    }

    fn spawn_or_schedule(&mut self) -> Result<Status, String> {
        match self.spawn() {
            Ok(()) => Ok(self.status()),
            Err(e) => {
                // Keep trying in the background (a release may show up, a port may free up);
                // the instruction that asked fails now.
                if self.env.apps.current_release(&self.spec.app).is_some() {
                    self.schedule_restart();
                }
                Err(e)
            }
        }
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn ensure_bound(&mut self) -> Result<&[HeldSocket], String> {
        if self.held.is_none() {
            let mut held = Vec::with_capacity(self.spec.listen.len());
            for spec in &self.spec.listen {
                held.push(listen::bind(spec)?);
            }
            let infos: Vec<HeldInfo> = held.iter().filter_map(HeldSocket::info).collect();
            for socket in &held {
                tracing::info!(service = %self.spec.name, address = %socket.spec.address, "holding listening socket");
            }
            self.publish(|s| s.held = infos);
            self.held = Some(held);
        }
        Ok(self.held.as_deref().unwrap_or_default())
    }

    fn notify_path(&self) -> PathBuf {
        self.env.run.join(format!("{}.notify", self.spec.name))
    }

    /// The notify socket, bound on first use; stale datagrams (from an earlier instance) are
    /// dropped so that a READY=1 is always the current instance's.
    fn ensure_notify(&mut self) -> Result<PathBuf, String> {
        if self.notify.is_none() {
            let path = self.notify_path();
            let _ = std::fs::remove_file(&path);
            let socket = UnixDatagram::bind(&path)
                .map_err(|e| format!("cannot create notify socket {}: {e}", path.display()))?;
            self.notify = Some((socket, path));
        }
        let Some((socket, path)) = &self.notify else {
            return Err("notify socket missing".to_string());
        };
        let mut buf = [0u8; 512];
        while socket.try_recv(&mut buf).is_ok() {}
        Ok(path.clone())
    }

    fn log_path(&self) -> PathBuf {
        self.env.logs.join(format!("{}.log", self.spec.name))
    }

    fn pid_path(&self) -> PathBuf {
        self.env.run.join(format!("{}.pid", self.spec.name))
    }

    /// A line in the service's log from the agent itself.
    fn note(&self, text: &str) {
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            let _ = writeln!(log, "===== hotroll-agent: {} {text}", self.spec.name);
        }
    }

    /// Start an instance from the current release.
    fn spawn(&mut self) -> Result<(), String> {
        let notify = match self.spec.ready {
            Ready::Notify => Some(self.ensure_notify()?),
            _ => None,
        };
        let number = self.status().instance + 1;
        let (instance, version, dir) = self.start_instance(number, notify.as_deref(), &[])?;
        let pid = instance.pid;
        write_pid_file(&self.pid_path(), pid);
        tracing::info!(service = %self.spec.name, pid, release = %version, "service started");
        self.child = Some(instance);
        self.publish(|s| {
            s.pid = Some(pid);
            s.release = Some(version);
            s.release_dir = Some(dir);
            s.instance = number;
            s.suspended = false;
            s.notified_ready = false;
            s.wanted = true;
            s.last_error = None;
        });
        Ok(())
    }

    /// Start instance `number` from the current release with the held sockets, `notify` as
    /// its `NOTIFY_SOCKET` and `extra_env`; nothing is recorded (the caller decides what the
    /// instance becomes). Returns it with its release and release directory.
    fn start_instance(
        &mut self,
        number: u64,
        notify: Option<&Path>,
        extra_env: &[(String, String)],
    ) -> Result<(Instance, String, PathBuf), String> {
        let name = self.spec.name.clone();
        let (version, dir) = self
            .env
            .apps
            .current_release(&self.spec.app)
            .ok_or_else(|| {
                format!(
                    "service `{name}`: app `{}` has no current release on this node",
                    self.spec.app
                )
            })?;
        let program = resolve(&dir, &self.spec.command[0]);
        check_executable(&program).map_err(|e| format!("service `{name}`: {e}"))?;
        let (handover_env, control) = if self.spec.handover {
            let (vars, path) = handover::instance_env(&self.env, &self.spec, number)?;
            (vars, Some(path))
        } else {
            (Vec::new(), None)
        };
        let held = self.ensure_bound()?;
        let mut mappings = Vec::with_capacity(held.len());
        let mut names = Vec::with_capacity(held.len());
        for (i, socket) in held.iter().enumerate() {
            let parent_fd = socket
                .fd
                .try_clone()
                .map_err(|e| format!("service `{name}`: cannot pass its socket: {e}"))?;
            let child_fd = 3 + i32::try_from(i).unwrap_or(i32::MAX - 3);
            mappings.push(FdMapping {
                parent_fd,
                child_fd,
            });
            names.push(socket.spec.name.clone());
        }

        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("service `{name}`: cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("service `{name}`: cannot open {}: {e}", log_path.display()))?;

        let mut command = if mappings.is_empty() {
            tokio::process::Command::new(&program)
        } else {
            let mut shim = tokio::process::Command::new(SHELL);
            shim.arg("-c").arg(LISTEN_PID_SHIM).arg(&program);
            shim
        };
        command
            .args(&self.spec.command[1..])
            .current_dir(&dir)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("NOTIFY_SOCKET");
        for variable in handover::ENV_ALL {
            command.env_remove(variable);
        }
        command
            .envs(&self.spec.env)
            .envs(handover_env)
            .envs(extra_env.iter().cloned())
            .env("HOTROLL_SERVICE", &name)
            .env("HOTROLL_APP", &self.spec.app)
            .env("HOTROLL_RELEASE", &version)
            .env("HOTROLL_RELEASE_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(false);
        if !mappings.is_empty() {
            command
                .env("LISTEN_FDS", mappings.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            command
                .fd_mappings(mappings)
                .map_err(|e| format!("service `{name}`: {e}"))?;
        }
        if let Some(path) = notify {
            command.env("NOTIFY_SOCKET", path);
        }
        self.note(&format!(
            "starting release {version}: {}",
            program.display()
        ));
        let spawned = command.spawn();
        // The command holds copies of the fds it passes; they close here.
        drop(command);
        let child = spawned.map_err(|e| {
            let message = format!("service `{name}`: cannot start {}: {e}", program.display());
            self.publish(|s| s.last_error = Some(message.clone()));
            message
        })?;
        let pid = child.id().unwrap_or_default();
        let instance = Instance {
            child,
            pid,
            started: Instant::now(),
            control,
        };
        Ok((instance, version, dir))
    }

    /// The leader exited on its own.
    fn exited(&mut self, status: std::io::Result<ExitStatus>) {
        let Some(instance) = self.child.take() else {
            return;
        };
        let _ = signal_group(instance.pgid(), Signal::SIGKILL);
        let _ = std::fs::remove_file(self.pid_path());
        handover::forget(&instance);
        let how = describe_exit(&status);
        let ran = instance.started.elapsed();
        self.note(&format!("(pid {}) {how} after {ran:?}", instance.pid));
        if ran >= STABLE_AFTER {
            self.backoff = FIRST_BACKOFF;
        }
        self.publish(|s| {
            s.pid = None;
            s.suspended = false;
            s.notified_ready = false;
            s.crashes += 1;
            s.last_exit = Some(how.clone());
        });
        if self.wanted {
            tracing::warn!(service = %self.spec.name, pid = instance.pid, exit = %how, restart_in = ?self.backoff, "service exited unexpectedly; restarting it");
            self.schedule_restart();
        } else {
            tracing::info!(service = %self.spec.name, pid = instance.pid, exit = %how, "service exited");
        }
    }

    /// Stop the running instance: stop signal (and SIGCONT) to the group, SIGKILL after
    /// `stop_timeout`, reap, kill what is left of the group.
    async fn stop_instance(&mut self) {
        let Some(instance) = self.child.take() else {
            return;
        };
        let how = self.terminate(instance, self.spec.stop_timeout).await;
        let _ = std::fs::remove_file(self.pid_path());
        self.publish(|s| {
            s.pid = None;
            s.suspended = false;
            s.notified_ready = false;
            s.last_exit = Some(how.clone());
        });
    }

    /// Stop `instance`: stop signal (and SIGCONT) to its group, SIGKILL after `timeout`, reap,
    /// kill what is left of the group. Returns how it ended.
    async fn terminate(&self, mut instance: Instance, timeout: Duration) -> String {
        let name = self.spec.name.clone();
        let pgid = instance.pgid();
        let signal = self.spec.stop_signal;
        if let Err(e) = signal_group(pgid, signal) {
            tracing::warn!(service = %name, error = %e, "cannot signal service");
        }
        // A suspended service must run to handle its stop signal.
        let _ = signal_group(pgid, Signal::SIGCONT);
        let status = match tokio::time::timeout(timeout, instance.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(service = %name, pid = instance.pid, ?timeout, "service did not stop in time; killing its process group");
                self.note(&format!(
                    "(pid {}) did not stop within {timeout:?} of {signal}; SIGKILL",
                    instance.pid
                ));
                let _ = signal_group(pgid, Signal::SIGKILL);
                let _ = instance.child.start_kill();
                instance.child.wait().await
            }
        };
        let _ = signal_group(pgid, Signal::SIGKILL);
        handover::forget(&instance);
        let how = describe_exit(&status);
        self.note(&format!("(pid {}) stopped: {how}", instance.pid));
        tracing::info!(service = %name, pid = instance.pid, exit = %how, "service stopped");
        how
    }

    fn notified(&mut self, message: &[u8]) {
        let text = String::from_utf8_lossy(message);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) if self.child.is_some() => {
                    tracing::info!(service = %self.spec.name, "service notified READY=1");
                    self.publish(|s| s.notified_ready = true);
                }
                Some(("STATUS", status)) => {
                    tracing::debug!(service = %self.spec.name, status, "service status");
                }
                _ => {}
            }
        }
    }

    async fn shutdown(&mut self) {
        self.wanted = false;
        self.restart_at = None;
        self.stop_instance().await;
        if let Some((_, path)) = self.notify.take() {
            let _ = std::fs::remove_file(path);
        }
        self.held = None;
        self.publish(|s| {
            s.wanted = false;
            s.held.clear();
        });
    }
}

/// `program` relative to `release` unless absolute.
pub fn resolve(release: &Path, program: &str) -> PathBuf {
    let path = Path::new(program);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        release.join(path)
    }
}

fn check_executable(program: &Path) -> Result<(), String> {
    match std::fs::metadata(program) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("{} is not an executable file", program.display())),
        Err(e) => Err(format!("{}: {e}", program.display())),
    }
}

/// `pid starttime`: the start time tells a live process from a reused pid.
fn write_pid_file(path: &Path, pid: u32) {
    let start = start_time(pid).unwrap_or_default();
    if let Err(e) = std::fs::write(path, format!("{pid} {start}\n")) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write pid file");
    }
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Stop the instance a previous run of the agent left (it crashed or was killed): the pid file
/// names it, and the start time proves the pid was not reused.
async fn stop_leftover(spec: &ServiceConfig, env: &ServiceEnv) {
    let path = env.run.join(format!("{}.pid", spec.name));
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let _ = std::fs::remove_file(&path);
    let mut fields = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        fields.next().and_then(|p| p.parse::<u32>().ok()),
        fields.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return;
    };
    if start == 0 || start_time(pid) != Some(start) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let pgid = Some(Pid::from_raw(raw));
    tracing::warn!(service = %spec.name, pid, "stopping the instance a previous agent run left running");
    let _ = signal_group(pgid, spec.stop_signal);
    let _ = signal_group(pgid, Signal::SIGCONT);
    let deadline = Instant::now() + spec.stop_timeout;
    while start_time(pid) == Some(start) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = signal_group(pgid, Signal::SIGKILL);
    // Give the kernel a moment to release the ports it held.
    let deadline = Instant::now() + Duration::from_secs(2);
    while start_time(pid) == Some(start) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
    }

    #[test]
    fn programs_resolve_in_the_release() {
        assert_eq!(
            resolve(Path::new("/r/1.0"), "bin/x"),
            PathBuf::from("/r/1.0/bin/x")
        );
        assert_eq!(
            resolve(Path::new("/r/1.0"), "/usr/bin/x"),
            PathBuf::from("/usr/bin/x")
        );
    }
}
