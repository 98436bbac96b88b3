//! Running a command on a pseudo-terminal and reading its screen through a terminal emulator
//! (`vt100`), as a person would see it.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let mut term = hotroll_tests::terminal::Terminal::spawn("top", &["-b"], &[], 24, 80)?;
//! term.wait_for_screen("a header", Duration::from_secs(5), |s| s.contains("PID"))?;
//! let code = term.wait(Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::io::Read;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A process attached to a pty of a fixed size, its output fed to a terminal emulator.
pub struct Terminal {
    child: Child,
    parser: Arc<Mutex<vt100::Parser>>,
    raw: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    exited: Option<Option<i32>>,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal")
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Terminal {
    /// Start `program ARGS` with `env` on a new `rows` x `cols` pty (TERM=xterm-256color).
    pub fn spawn(
        program: impl AsRef<Path>,
        args: &[&str],
        env: &[(&str, &str)],
        rows: u16,
        cols: u16,
    ) -> anyhow::Result<Self> {
        let (Some(rows_nz), Some(cols_nz)) = (
            std::num::NonZeroU16::new(rows),
            std::num::NonZeroU16::new(cols),
        ) else {
            bail!("a terminal needs at least one row and one column");
        };
        let parser = Arc::new(Mutex::new(vt100::Parser::new(rows_nz, cols_nz, 0)));
        let (pty, pts) = pty_process::blocking::open().context("cannot open a pty")?;
        pty.resize(pty_process::Size::new(rows, cols))
            .context("cannot size the pty")?;
        let mut command = pty_process::blocking::Command::new(program.as_ref())
            .args(args)
            .env("TERM", "xterm-256color")
            .env_remove("NO_COLOR");
        for (k, v) in env {
            command = command.env(k, v);
        }
        let child = command
            .spawn(pts)
            .with_context(|| format!("cannot start {} on a pty", program.as_ref().display()))?;
        let raw = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let parser = parser.clone();
            let raw = raw.clone();
            let mut pty = pty;
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                // Ends with EIO once the child and everything it started closed the pty.
                while let Ok(n) = pty.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut p) = parser.lock() {
                        p.process(&buf[..n]);
                    }
                    if let Ok(mut r) = raw.lock() {
                        r.extend_from_slice(&buf[..n]);
                    }
                }
            })
        };
        Ok(Self {
            child,
            parser,
            raw,
            reader: Some(reader),
            exited: None,
        })
    }

    /// What the screen shows now (text only, one line per row, trailing blanks trimmed).
    pub fn screen(&self) -> String {
        self.parser
            .lock()
            .map(|p| p.screen().contents())
            .unwrap_or_default()
    }

    /// Everything the program wrote, escape codes included.
    pub fn raw(&self) -> Vec<u8> {
        self.raw.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Wait until `done(screen)` holds; returns that screen.
    pub fn wait_for_screen(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return Ok(screen);
            }
            if let Some(code) = self.try_exit()? {
                let screen = self.screen();
                if done(&screen) {
                    return Ok(screen);
                }
                bail!("the program exited ({code:?}) before showing {what}; screen:\n{screen}");
            }
            if Instant::now() >= deadline {
                bail!("the screen did not show {what} within {timeout:?}; screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_exit(&mut self) -> anyhow::Result<Option<Option<i32>>> {
        if let Some(code) = self.exited {
            return Ok(Some(code));
        }
        Ok(self.child.try_wait()?.map(|status| {
            self.exited = Some(status.code());
            status.code()
        }))
    }

    /// Wait for the program to exit (killed after `timeout`) and for its last output.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(code) = self.try_exit()? {
                break code;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "still running after {timeout:?}; screen:\n{}",
                    self.screen()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let until = Instant::now() + Duration::from_secs(5);
            while !reader.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        Ok(code)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
