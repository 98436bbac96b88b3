//! Hooks for the agents' `[hooks]` tables, and the marker files tests read back.
//!
//! Every element of a hook's command may use these placeholders, replaced per node when the
//! cluster writes that node's `agent.toml`:
//!
//! | placeholder | replaced by |
//! |---|---|
//! | `{marks}` | the node's marker file (see [`Hook::mark`]) |
//! | `{node}` | the node's name, e.g. `node-2` |
//! | `{node_dir}` | the node's directory in the cluster's temp dir |
//! | `{cluster_dir}` | the cluster's temp dir |
//!
//! The agent appends the script's `args` to the command, so with `sh -c SCRIPT NAME` they are
//! `$1`, `$2`, ... (and `$*`) inside `SCRIPT`.

use std::path::Path;

use anyhow::Context;

/// One `[hooks]` entry: `name = { command = [...], timeout = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub command: Vec<String>,
    pub timeout: Option<String>,
}

/// Shell code that appends `<label> <unix time in ns>` to the node's marker file, the label
/// being the hook's arguments.
const MARK: &str = r#"printf '%s %s\n' "$*" "$(date +%s%N)" >> "{marks}""#;

impl Hook {
    /// A hook running `command` (script args appended).
    pub fn new(command: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            command: command.into_iter().map(Into::into).collect(),
            timeout: None,
        }
    }

    /// `sh -c SCRIPT <name>`: the script's args are `$1`, `$2`, ... inside `SCRIPT`.
    pub fn sh(script: &str) -> Self {
        Self::new(["sh", "-c", script, "hook"])
    }

    /// Always succeeds (`true`).
    pub fn ok() -> Self {
        Self::new(["true"])
    }

    /// Always fails (`false`).
    pub fn fail() -> Self {
        Self::new(["false"])
    }

    /// Appends `<args> <unix ns>` as one line to the node's marker file and succeeds.
    pub fn mark() -> Self {
        Self::sh(MARK)
    }

    /// Like [`Hook::mark`], then runs `then` (shell code; its exit status is the hook's).
    pub fn mark_then(then: &str) -> Self {
        Self::sh(&format!("{MARK}; {then}"))
    }

    /// Like [`Hook::mark`], then fails.
    pub fn mark_fail() -> Self {
        Self::mark_then("exit 1")
    }

    /// Set the hook's own timeout, e.g. `"5s"`.
    pub fn timeout(mut self, timeout: &str) -> Self {
        self.timeout = Some(timeout.to_string());
        self
    }

    /// The command with the placeholders `vars` (`("{marks}", path)`, ...) replaced.
    pub fn resolve(&self, vars: &[(&str, String)]) -> Vec<String> {
        self.command
            .iter()
            .map(|part| {
                let mut part = part.clone();
                for (key, value) in vars {
                    part = part.replace(key, value);
                }
                part
            })
            .collect()
    }

    /// The hook with its placeholders replaced, as a TOML inline table.
    pub(crate) fn to_toml(&self, vars: &[(&str, String)]) -> toml::Value {
        let command = self
            .resolve(vars)
            .into_iter()
            .map(toml::Value::String)
            .collect();
        let mut table = toml::Table::new();
        table.insert("command".into(), toml::Value::Array(command));
        if let Some(t) = &self.timeout {
            table.insert("timeout".into(), toml::Value::String(t.clone()));
        }
        toml::Value::Table(table)
    }
}

/// One line of a marker file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub label: String,
    /// Unix time in nanoseconds.
    pub ns: u128,
}

/// Read a marker file; a missing file is no marks.
pub fn read_marks(path: &Path) -> anyhow::Result<Vec<Mark>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (label, ns) = line.rsplit_once(' ').unwrap_or(("", line));
            let ns = ns
                .trim()
                .parse()
                .with_context(|| format!("bad marker line `{line}` in {}", path.display()))?;
            Ok(Mark {
                label: label.to_string(),
                ns,
            })
        })
        .collect()
}
