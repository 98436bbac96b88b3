//! Real Erlang nodes for the BEAM runtime tests, on loopback only: a private `epmd` per test
//! (`epmd -address 127.0.0.1 -port P`, in the foreground, a child of the test), nodes with long
//! names `NAME@127.0.0.1` started with `-start_epmd false` and `ERL_EPMD_PORT=P`, the
//! distribution listener bound to 127.0.0.1, a random cookie in a file. Every node and the epmd
//! are killed when their guard drops, on failure too.
//!
//! The fixtures (`tests/erlang/`: a `counter` app, `counter_server` v1/v2/v3) are compiled with
//! `erlc` into temp dirs at test time.

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::cluster::{free_port, run_command};
use crate::poll::poll;

/// `Ok` when `erl`, `erlc`, `epmd` and `erl_call` are installed; else an error that says how to
/// install them (a test that needs Erlang fails without it, it never passes silently).
pub fn require() -> anyhow::Result<()> {
    crate::tools::require(&["erl", "erlc", "epmd", "erl_call"], "erlang-base")
}

/// `tests/erlang`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("erlang")
}

/// Compile the fixture `version` (`v1`, `v2`, `v3`: `common/*.erl` plus the version's own) into
/// `out` with the `.app` file: an ebin directory.
pub fn compile_fixture(version: &str, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let root = fixtures();
    let mut sources = Vec::new();
    for dir in [root.join("common"), root.join(version)] {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "erl") {
                sources.push(path);
            }
        }
    }
    let mut erlc = Command::new("erlc");
    erlc.arg("+deterministic").arg("-o").arg(out).args(&sources);
    let output = run_command(erlc, Duration::from_secs(60))?;
    if output.code != Some(0) {
        bail!("erlc failed: {}{}", output.stdout, output.stderr);
    }
    std::fs::copy(root.join("common/counter.app"), out.join("counter.app"))?;
    Ok(())
}

/// A private epmd on 127.0.0.1; killed on drop.
#[derive(Debug)]
pub struct Epmd {
    pub port: u16,
    child: Child,
}

impl Epmd {
    pub fn start(log: &Path) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let log_file = std::fs::File::create(log)?;
            let child = Command::new("epmd")
                .args(["-address", "127.0.0.1", "-port", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .context("cannot run epmd")?;
            let mut epmd = Epmd { port, child };
            let up = poll(
                "epmd to listen",
                Duration::from_secs(5),
                Duration::from_millis(20),
                || {
                    if let Some(status) = epmd.child.try_wait()? {
                        bail!("epmd exited: {status}");
                    }
                    Ok(TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                        .ok()
                        .map(|_| ()))
                },
            );
            match up {
                Ok(()) => return Ok(epmd),
                Err(e) => {
                    let _ = epmd.child.kill();
                    let _ = epmd.child.wait();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("epmd did not start")))
    }
}

impl Drop for Epmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cookie nobody guesses: time and pid mixed, letters only.
pub fn random_cookie() -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1)
        ^ (u128::from(std::process::id()) << 64);
    let mut x = seed | 1;
    (0..24)
        .map(|_| {
            // xorshift
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'A' + (x % 26) as u8)
        })
        .collect()
}

/// One Erlang node running the `counter` app from `code_dir`; killed on drop (whoever started
/// it last: the start script writes its pid).
#[derive(Debug)]
pub struct ErlNode {
    /// `name@127.0.0.1`.
    pub name: String,
    pub dir: PathBuf,
    pub code_dir: PathBuf,
    pub cookie_file: PathBuf,
    pub cookie: String,
    pub epmd_port: u16,
    /// `sh <dir>/start.sh`: what the agent's `start` runs too.
    pub start: Vec<String>,
}

impl ErlNode {
    /// Prepare `<dir>` (home with the cookie, start script) for node `short@127.0.0.1` running
    /// the ebin `code_dir`; `extra_args` go to `erl` (e.g. `-counter fail_code_change true`).
    pub fn prepare(
        dir: &Path,
        short: &str,
        code_dir: &Path,
        cookie: &str,
        epmd_port: u16,
        extra_args: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cookie_file = dir.join(".erlang.cookie");
        std::fs::write(&cookie_file, cookie)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mut perms = std::fs::metadata(&cookie_file)?.permissions();
            perms.set_mode(0o400);
            std::fs::set_permissions(&cookie_file, perms)?;
        }
        let name = format!("{short}@127.0.0.1");
        let script = dir.join("start.sh");
        let text = format!(
            "#!/bin/sh\n\
             # Started by the test or by the hotroll agent (restart): same node either way.\n\
             echo $$ > '{dir}/node.pid'\n\
             export HOME='{dir}' ERL_EPMD_PORT={epmd_port}\n\
             exec erl -name {name} -start_epmd false -noshell -noinput \\\n\
               -kernel inet_dist_use_interface '{{127,0,0,1}}' \\\n\
               -pa '{code}' {extra_args} \\\n\
               -eval 'ok = element(1, application:ensure_all_started(counter))' \\\n\
               >> '{dir}/node.log' 2>&1\n",
            dir = dir.display(),
            code = code_dir.display(),
        );
        std::fs::write(&script, text)?;
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            code_dir: code_dir.to_path_buf(),
            cookie_file,
            cookie: cookie.to_string(),
            epmd_port,
            start: vec!["sh".into(), script.display().to_string()],
        })
    }

    /// Start the node and wait until the counter app answers.
    pub fn start(&self) -> anyhow::Result<()> {
        let (program, args) = self.start.split_first().context("empty start command")?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the erlang node")?;
        // Reaped by a thread; the node is killed through its pid file.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.wait_running(Duration::from_secs(30))
    }

    pub fn wait_running(&self, timeout: Duration) -> anyhow::Result<()> {
        poll(
            &format!("node {} to run counter", self.name),
            timeout,
            Duration::from_millis(100),
            || self.eval("counter_server:get().").map(|_| Some(())),
        )
        .with_context(|| format!("node log:\n{}", self.log_tail()))
    }

    /// Evaluate `expr` in the node with `erl_call -e`; the printed `{ok, Result}` without the
    /// wrapper. (Test-only: the agent never evaluates code in a node.)
    pub fn eval(&self, expr: &str) -> anyhow::Result<String> {
        let mut command = Command::new("erl_call");
        command
            .args([
                "-name",
                &self.name,
                "-c",
                &self.cookie,
                "-timeout",
                "10",
                "-e",
            ])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("HOME", &self.dir);
        let output = run_with_stdin(command, expr, Duration::from_secs(15))?;
        let text = output.trim();
        let inner = text
            .strip_prefix("{ok, ")
            .or_else(|| text.strip_prefix("{ok,"))
            .and_then(|t| t.strip_suffix('}'))
            .with_context(|| format!("erl_call on {}: {text}", self.name))?;
        Ok(inner.trim().to_string())
    }

    /// The pid of the OS process (from the start script's pid file).
    pub fn os_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("node.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL the node (whoever started it).
    pub fn kill(&self) {
        if let Some(pid) = self.os_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kill the node and wait until epmd forgets it.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.kill();
        poll(
            &format!("node {} to go away", self.name),
            Duration::from_secs(10),
            Duration::from_millis(100),
            || Ok(self.eval("node().").is_err().then_some(())),
        )
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ErlNode {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run_with_stdin(mut command: Command, input: &str, timeout: Duration) -> anyhow::Result<String> {
    use std::io::Write;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("cannot run erl_call")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("erl_call did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "erl_call failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
