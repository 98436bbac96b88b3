//! One child process under test control: start, SIGKILL, SIGSTOP/SIGCONT, SIGTERM, restart.
//! Its stdout and stderr go to a log file; dropping it kills and reaps it.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A restartable child process.
#[derive(Debug)]
pub struct Process {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
    starts: u32,
}

impl Process {
    /// Describe a process; nothing runs until [`Process::start`].
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        cwd: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: cwd.into(),
            log: log.into(),
            child: None,
            stopped: false,
            starts: 0,
        }
    }

    /// Set an environment variable for every later start.
    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file that receives stdout and stderr of every start.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Pid of the running (or exited but not yet reaped) process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process was SIGSTOPped and not SIGCONTed since.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Start the process. Fails if it is already running.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("{} is already running (pid {:?})", self.name, self.pid());
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "===== harness: start #{} of {}: {} {}",
            self.starts,
            self.name,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        let err = log.try_clone()?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    /// Whether the process is alive (a stopped process is alive). Reaps it if it exited.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none() && self.child.is_some()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs or when it
    /// never started.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.stopped = false;
                Some(status)
            }
            _ => None,
        }
    }

    fn signal(&mut self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("cannot send {signal} to {} (pid {pid})", self.name))
    }

    /// SIGKILL the process and reap it. A process that is not running is left alone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            // SIGKILL also ends a stopped process.
            let _ = child.kill();
        }
        child
            .wait()
            .with_context(|| format!("cannot reap {}", self.name))?;
        self.stopped = false;
        self.note("killed (SIGKILL)");
        Ok(())
    }

    /// SIGSTOP: the process freezes (its sockets stay open, it answers nothing).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)?;
        self.stopped = true;
        self.note("stopped (SIGSTOP)");
        Ok(())
    }

    /// SIGCONT a stopped process.
    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)?;
        self.stopped = false;
        self.note("continued (SIGCONT)");
        Ok(())
    }

    /// SIGTERM and wait up to `timeout` for the process to exit; SIGKILL it after that (and
    /// return an error saying so).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if self.stopped {
            self.cont()?;
        }
        self.signal(Signal::SIGTERM)?;
        self.note("terminated (SIGTERM)");
        match self.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(e) => {
                self.kill()?;
                Err(e.context(format!("{} ignored SIGTERM; killed it", self.name)))
            }
        }
    }

    /// Wait up to `timeout` for the process to exit on its own, and reap it.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self
                .child
                .as_mut()
                .with_context(|| format!("{} is not running", self.name))?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                self.stopped = false;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still runs after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the process if it runs, then start it again with the same command line.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.start()
    }

    /// The last `lines` lines of the log file.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    fn note(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "===== harness: {} {what}", self.name);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.stopped {
            let _ = self.signal(Signal::SIGCONT);
        }
        let _ = self.kill();
    }
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// SIGKILL the process group of every service an agent with data dir `data_dir` left running
/// (the agent's pid files, `run/<service>.pid`: pid and start time). The cluster calls it after
/// it killed the agents, so no service outlives a test.
pub fn kill_leftover_services(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("run")) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut fields = text.split_whitespace();
        let (Some(pid), Some(start)) = (
            fields.next().and_then(|p| p.parse::<i32>().ok()),
            fields.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        // Only the process the agent started (a pid may have been reused since).
        if start == 0 || start_time(pid) != Some(start) {
            continue;
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Field 22 of `/proc/<pid>/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
