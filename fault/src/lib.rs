//! Fault injection for the crash-safety tests: a process started with `HOTROLL_FAULT_FILE=PATH`
//! SIGKILLs itself at the named *fault point*, so a test can crash it at an exact step instead of
//! racing a `kill` against it.
//!
//! A fault point is a line of text such as `journal committing committing 5` (the agent, just
//! after its journal durably recorded step 5 after the point of no return) or
//! `command make_permanent node-1` (the coordinator, just after it durably decided to send it).
//! When a process reaches a point whose text equals the first line of the file at `PATH`
//! (trimmed), it removes the file — so the restarted process does not crash again — and sends
//! itself SIGKILL. A relative `PATH` is relative to the process's working directory, which lets
//! one variable serve a whole test cluster (each process has a directory of its own).
//!
//! Without the variable nothing is read and every point costs one load of a cached flag.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable naming the fault file.
pub const ENV: &str = "HOTROLL_FAULT_FILE";

fn fault_file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os(ENV).map(PathBuf::from))
        .as_ref()
}

/// Whether fault points are armed at all (the variable is set): callers that must format a
/// point's name check this first.
pub fn armed() -> bool {
    fault_file().is_some()
}

/// A fault point: SIGKILL this process if the fault file names `name`.
pub fn point(name: &str) {
    let Some(path) = fault_file() else {
        return;
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    if text.lines().next().map(str::trim) != Some(name) {
        return;
    }
    // Fire once: a process that cannot disarm the point does not crash (a restart would loop).
    if let Err(e) = std::fs::remove_file(path) {
        tracing::error!(path = %path.display(), error = %e, "fault point reached but its file cannot be removed; not crashing");
        return;
    }
    tracing::warn!(point = name, "fault injection: SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}
