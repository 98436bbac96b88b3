//! System tools the tests need (Erlang, systemd-analyze, and later etcd, Prometheus, Chromium).
//! The README's test command (`tests/run`) installs them; a test whose tool is missing fails
//! with the command that installs it — it never returns early as a pass.

use std::process::{Command, Stdio};

/// Whether `tool` is on the PATH.
pub fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `Ok` when every one of `tools` is installed; else an error naming the missing ones and the
/// Debian package that brings them.
pub fn require(tools: &[&str], package: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !installed(t)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} not installed: run `tests/run` (the README's test command installs what the suite \
         needs) or `apt-get install -y --no-install-recommends {package}`",
        missing.join(", ")
    );
    Ok(())
}
