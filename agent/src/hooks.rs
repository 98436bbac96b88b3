//! Running a declared hook: the only way `apply` and `check` execute anything on a node.
//!
//! A hook is looked up by name in the agent's own config and run with the script's arguments
//! appended; the network never supplies a command line. It runs as the leader of its own
//! process group, so that a timeout or an abort can kill everything it started (a shell and its
//! children) with one `killpg`, and the agent reaps the leader before it reports.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

use crate::cancel::CancelToken;
use crate::config::HookConfig;

/// How much of a hook's combined stdout and stderr is kept (the tail).
pub const OUTPUT_TAIL_BYTES: usize = 8 * 1024;

/// How long to wait for the output pipe to close once the process group is gone. Only a process
/// that left the group (setsid) can hold it open longer; the hook does not wait for it.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How much output the failure message itself quotes (the full tail is in the report's output).
const ERROR_QUOTE_BYTES: usize = 512;

/// One run of a hook.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub name: &'a str,
    pub hook: &'a HookConfig,
    /// Appended to the hook's declared command.
    pub args: &'a [String],
    pub cwd: &'a Path,
    /// Added to the inherited environment (`HOTROLL_*`).
    pub env: &'a [(String, String)],
    /// Effective bound: the shorter of the hook's own timeout and the step's deadline.
    pub timeout: Duration,
}

/// How a hook run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// The timeout passed; the whole group was killed.
    TimedOut,
    /// Cancelled by the caller (abort, rollback, shutdown); the whole group was killed.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct HookRun {
    pub name: String,
    pub ending: Ending,
    /// Tail of stdout and stderr, interleaved as written.
    pub output: String,
    pub duration: Duration,
    pub timeout: Duration,
}

impl HookRun {
    pub fn succeeded(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// The failure as one line for a step report; `None` when the hook succeeded.
    pub fn error(&self) -> Option<String> {
        let name = &self.name;
        let head = match self.ending {
            Ending::Exited(0) => return None,
            Ending::Exited(code) => format!("hook `{name}` exited with status {code}"),
            Ending::Signaled(signal) => {
                let signal = Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |s| s.as_str().to_string());
                format!("hook `{name}` was killed by {signal}")
            }
            Ending::TimedOut => format!(
                "hook `{name}` timed out after {:?}; its process group was killed",
                self.timeout
            ),
            Ending::Cancelled => format!("hook `{name}` was stopped; its process group was killed"),
        };
        let quoted = tail_str(self.output.trim_end(), ERROR_QUOTE_BYTES);
        Some(if quoted.is_empty() {
            head
        } else {
            format!("{head}: {quoted}")
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook `{name}` is not declared in this agent's config")]
    Undeclared { name: String },
    #[error("hook `{name}` could not be started ({program}): {error}")]
    Spawn {
        name: String,
        program: String,
        error: std::io::Error,
    },
    #[error("hook `{name}`: cannot capture its output: {error}")]
    Pipe { name: String, error: std::io::Error },
}

/// Run `inv` to its end, its timeout, or `cancel`, whichever comes first. On timeout or cancel
/// the whole process group is SIGKILLed and the leader reaped before this returns.
///
/// When the hook's main process exits, whatever it left running in its group is killed too: a
/// hook is a bounded command, not a daemon (services are supervised through `[[services]]`), and
/// a straggler would otherwise hold the output pipe open.
pub async fn run(inv: &Invocation<'_>, cancel: &CancelToken) -> Result<HookRun, HookError> {
    let name = inv.name.to_string();
    let pipe_err = |error| HookError::Pipe {
        name: name.clone(),
        error,
    };
    let Some((program, fixed_args)) = inv.hook.command.split_first() else {
        return Err(HookError::Spawn {
            name: name.clone(),
            program: String::new(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    };

    // One pipe for both streams keeps stdout and stderr in the order the hook wrote them.
    let (reader, writer) = std::io::pipe().map_err(pipe_err)?;
    let writer_for_stderr = writer.try_clone().map_err(pipe_err)?;

    let mut command = tokio::process::Command::new(program);
    command
        .args(fixed_args)
        .args(inv.args)
        .current_dir(inv.cwd)
        .envs(inv.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_for_stderr)
        .process_group(0);
    let started = Instant::now();
    let spawned = command.spawn();
    // The command holds our copies of the pipe's write end; they must close or the pipe never
    // reaches end-of-file.
    drop(command);
    let mut child = spawned.map_err(|error| HookError::Spawn {
        name: name.clone(),
        program: program.clone(),
        error,
    })?;
    let group = GroupGuard {
        pgid: child.id().and_then(|id| i32::try_from(id).ok()),
    };

    let tail = Arc::new(Mutex::new(Tail::new(OUTPUT_TAIL_BYTES)));
    let receiver =
        tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(pipe_err)?;
    let collector = tokio::spawn(collect(receiver, Arc::clone(&tail)));

    let ending = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => Ending::Exited(code),
                (None, Some(signal)) => Ending::Signaled(signal),
                (None, None) => Ending::Exited(-1),
            },
            // wait() only fails if the child was already reaped elsewhere; report it as a
            // failure rather than pretend success.
            Err(e) => {
                tracing::warn!(hook = %name, error = %e, "cannot wait for hook");
                Ending::Exited(-1)
            }
        },
        () = tokio::time::sleep(inv.timeout) => Ending::TimedOut,
        () = cancel.cancelled() => Ending::Cancelled,
    };
    group.kill();
    if matches!(ending, Ending::TimedOut | Ending::Cancelled) {
        // The group kill covers the leader; this also does when its pid was unknown.
        let _ = child.start_kill();
        // Reap the leader so no zombie is left behind; SIGKILL makes this prompt.
        if let Err(e) = child.wait().await {
            tracing::warn!(hook = %name, error = %e, "cannot reap hook after killing it");
        }
    }
    let duration = started.elapsed();

    let mut collector = collector;
    if tokio::time::timeout(OUTPUT_DRAIN_GRACE, &mut collector)
        .await
        .is_err()
    {
        tracing::warn!(hook = %name, "a process that left the hook's group still holds its output open");
        collector.abort();
    }
    let output = tail.lock().map(|t| t.render()).unwrap_or_default();
    Ok(HookRun {
        name,
        ending,
        output,
        duration,
        timeout: inv.timeout,
    })
}

/// Kills the hook's process group when the run ends or when the run's future is dropped
/// (the executor task aborted): no hook process outlives its step.
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn kill(&self) {
        let Some(pgid) = self.pgid else { return };
        match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
            // ESRCH: the group is already empty.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid, error = %e, "cannot kill hook process group"),
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn collect(mut receiver: tokio::net::unix::pipe::Receiver, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        match receiver.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Ok(mut tail) = tail.lock() {
                    tail.push(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading hook output failed");
                return;
            }
        }
    }
}

/// The last `capacity` bytes written, and how many came before them.
#[derive(Debug)]
struct Tail {
    bytes: VecDeque<u8>,
    dropped: u64,
    capacity: usize,
}

impl Tail {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity),
            dropped: 0,
            capacity,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.capacity {
            self.dropped += (data.len() - self.capacity) as u64;
            &data[data.len() - self.capacity..]
        } else {
            data
        };
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.dropped += overflow as u64;
        self.bytes.extend(data);
    }

    fn render(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        let text = String::from_utf8_lossy(&bytes);
        if self.dropped > 0 {
            format!("[{} earlier bytes not kept]\n{text}", self.dropped)
        } else {
            text.into_owned()
        }
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        let mut tail = Tail::new(4);
        tail.push(b"ab");
        tail.push(b"cdef");
        assert_eq!(tail.render(), "[2 earlier bytes not kept]\ncdef");
        tail.push(b"0123456789");
        assert_eq!(tail.render(), "[12 earlier bytes not kept]\n6789");
    }

    #[test]
    fn tail_str_respects_char_boundaries() {
        assert_eq!(tail_str("héllo", 4), "llo");
        assert_eq!(tail_str("abc", 10), "abc");
    }
}
