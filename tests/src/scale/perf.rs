//! `perf record` around one phase of a bench, for finding where its time goes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A running `perf record`; stopped (SIGINT, so it writes its file) on drop.
pub struct Perf {
    child: Child,
}

impl Perf {
    /// Samples one process (and its threads), with DWARF call graphs.
    pub fn attach(pid: u32, output: &Path) -> anyhow::Result<Self> {
        Self::start(&["-p", &pid.to_string()], output)
    }

    /// Samples several processes (and their threads) into one file.
    pub fn attach_all(pids: &[u32], output: &Path) -> anyhow::Result<Self> {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        Self::start(&["-p", &pids.join(",")], output)
    }

    /// Samples every CPU: all the processes of a fleet and the kernel's work for them.
    pub fn system_wide(output: &Path) -> anyhow::Result<Self> {
        Self::start(&["-a"], output)
    }

    fn start(target: &[&str], output: &Path) -> anyhow::Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "999", "-g"])
            .args(["--call-graph", "dwarf,32768"])
            .args(target)
            .arg("-o")
            .arg(output)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start perf (apt-get install -y linux-perf)")?;
        // Let it attach before the phase starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { child })
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let _ = self.child.wait();
    }
}
