//! A `hotroll` client command running in the background (a watcher, say) while the test does
//! other things; killed when dropped.

use std::io::Read;
use std::process::{Child, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{Cluster, CmdOutput};

#[derive(Debug)]
pub struct Background {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    /// The child was waited for.
    reaped: bool,
    what: String,
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

impl Background {
    /// Start `hotroll ARGS` against `cluster` (with `--coordinator` for `rollout` and `nodes`
    /// commands, like [`Cluster::hotroll`]), stdout and stderr captured.
    pub fn hotroll(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = cluster.hotroll_command();
        command.args(args);
        if matches!(args.first(), Some(&"nodes") | Some(&"rollout")) {
            command.args(["--coordinator", cluster.url()]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("hotroll {}", args.join(" "));
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Ok(Self {
            child,
            stdout,
            stderr,
            reaped: false,
            what,
        })
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        if self.reaped {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(_)) => {
                self.reaped = true;
                false
            }
            _ => true,
        }
    }

    /// Wait for it to exit (killed after `timeout`); its output.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<CmdOutput> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.reaped = true;
        let stdout = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        );
        let Some(status) = status else {
            bail!(
                "{} still running after {timeout:?}\nstdout: {stdout}\nstderr: {stderr}",
                self.what
            );
        };
        Ok(CmdOutput {
            code: status.code(),
            stdout,
            stderr,
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
