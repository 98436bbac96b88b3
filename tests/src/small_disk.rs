//! A small filesystem a test can fill: a tmpfs mounted in a private mount namespace that a
//! holder process keeps alive, so nothing is mounted where the rest of the machine looks and
//! nothing is left mounted if the test dies (the holder exits when its stdin closes, and the
//! namespace goes with the last process in it). Processes that should use it run under
//! [`SmallDisk::wrapper`] (`nsenter` into the namespace); the test reads and fills it through
//! `/proc/<holder>/root`.
//!
//! Needs root (`mount`) and util-linux's `unshare` and `nsenter`: without them
//! [`SmallDisk::mount`] fails with what is missing — a test never passes without its disk.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{Context, bail};

use crate::tools;

/// The filler file [`SmallDisk::fill`] writes and [`SmallDisk::free`] removes.
const FILLER: &str = "filler";

#[derive(Debug)]
pub struct SmallDisk {
    holder: Child,
    /// Closing it ends the holder.
    stdin: Option<ChildStdin>,
    /// Where the tmpfs is mounted, as processes in the namespace see it.
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallDisk {
    /// Mount a tmpfs of `size` (`mount -o size=`, e.g. `4m`) on a fresh directory.
    pub fn mount(size: &str) -> anyhow::Result<Self> {
        if effective_uid()? != 0 {
            bail!(
                "a small filesystem for the coordinator's data dir needs root (mount -t tmpfs in a \
                 private mount namespace): run the test as root, as CI does"
            );
        }
        tools::require(&["unshare", "nsenter", "mount"], "util-linux mount")?;
        let parent = tempfile::Builder::new()
            .prefix("hotroll-small-disk-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let dir = parent.path().join("data");
        std::fs::create_dir_all(&dir)?;
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                r#"mount -t tmpfs -o "size=$1" tmpfs "$2" || exit 1; echo mounted; exec cat >/dev/null"#,
            )
            .args(["sh", size])
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run unshare")?;
        let stdout = holder.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "mounted" {
            let _ = holder.kill();
            let output = holder.wait_with_output()?;
            bail!(
                "cannot mount a tmpfs in a private mount namespace (needs CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdin = holder.stdin.take();
        Ok(Self {
            holder,
            stdin,
            dir,
            _parent: parent,
        })
    }

    /// The mount point, as processes under [`SmallDisk::wrapper`] see it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The command prefix that runs a program in the disk's mount namespace.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--mount=/proc/{}/ns/mnt", self.holder.id()),
            "--".into(),
        ]
    }

    /// `path` inside the disk (relative to its root), as this process can reach it.
    pub fn path(&self, path: impl AsRef<Path>) -> PathBuf {
        let inside = self.dir.strip_prefix("/").unwrap_or(&self.dir);
        PathBuf::from(format!("/proc/{}/root", self.holder.id()))
            .join(inside)
            .join(path)
    }

    /// Fill the disk: write a filler file until there is no space left. Returns its size.
    pub fn fill(&self) -> anyhow::Result<u64> {
        let path = self.path(FILLER);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let chunk = vec![0x5a_u8; 4096];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
        // What is left is smaller than a page.
        let _ = file.sync_all();
        Ok(written)
    }

    /// Free what [`SmallDisk::fill`] took.
    pub fn free(&self) -> anyhow::Result<()> {
        let path = self.path(FILLER);
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))
    }
}

/// This process's effective uid (`/proc/self/status`).
fn effective_uid() -> anyhow::Result<u32> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("no effective uid in /proc/self/status")
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // EOF on its stdin ends the holder's `cat`; kill it in case that did not happen.
        drop(self.stdin.take());
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
