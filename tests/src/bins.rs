//! Finding, and building, the `hotroll` and `hotroll-agent` binaries.
//!
//! Cargo builds the binaries of a package only for that package's own tests
//! (`CARGO_BIN_EXE_<name>`), and artifact dependencies are unstable, so a dependency on
//! `hotroll-cli`/`hotroll-agent` would not give us their executables. Instead the harness
//! runs
//!
//! ```text
//! cargo build -p hotroll-cli -p hotroll-agent --bins --profile <P> --target-dir <T>
//! ```
//!
//! once per test process, with the profile and target directory of the running test (or bench)
//! executable. Cargo decides what is stale; when nothing is, the call costs a fraction of a
//! second. Concurrent test processes (nextest) are serialised by cargo's own lock on the target
//! directory.
//!
//! Environment:
//! * `HOTROLL_BIN_DIR=DIR`: use the binaries in `DIR` as they are; nothing is built.
//! * `HOTROLL_NO_BUILD=1`: do not run cargo; use the binaries next to the test executable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// Name of the coordinator and CLI binary.
pub const COORDINATOR_BIN: &str = "hotroll";
/// Name of the agent binary.
pub const AGENT_BIN: &str = "hotroll-agent";

/// Paths of the two executables the harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub hotroll: PathBuf,
    pub agent: PathBuf,
}

static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();

/// The binaries, built on first use (see the module docs). Later calls return the first answer.
pub fn binaries() -> anyhow::Result<&'static Binaries> {
    BINARIES
        .get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn locate() -> anyhow::Result<Binaries> {
    if let Some(dir) = std::env::var_os("HOTROLL_BIN_DIR") {
        return in_dir(Path::new(&dir));
    }
    let layout = Layout::of_current_exe()?;
    if std::env::var_os("HOTROLL_NO_BUILD").is_none() {
        layout.build()?;
    }
    in_dir(&layout.profile_dir)
}

fn in_dir(dir: &Path) -> anyhow::Result<Binaries> {
    let bins = Binaries {
        hotroll: dir.join(COORDINATOR_BIN),
        agent: dir.join(AGENT_BIN),
    };
    for path in [&bins.hotroll, &bins.agent] {
        if !path.is_file() {
            bail!(
                "{} does not exist (build it with `cargo build -p hotroll-cli -p hotroll-agent --bins`, \
                 or point HOTROLL_BIN_DIR at a directory that has it)",
                path.display()
            );
        }
    }
    Ok(bins)
}

/// Where cargo put the running executable: `<target>/[<triple>/]<profile>/[deps/]exe`.
#[derive(Debug)]
struct Layout {
    profile_dir: PathBuf,
    target_dir: PathBuf,
    triple: Option<String>,
    profile: String,
}

impl Layout {
    fn of_current_exe() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let mut dir = exe
            .parent()
            .context("the running executable has no parent directory")?
            .to_path_buf();
        if dir
            .file_name()
            .is_some_and(|n| n == "deps" || n == "examples")
        {
            dir.pop();
        }
        let profile_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("cannot tell the cargo profile of {}", dir.display()))?
            .to_string();
        let profile = match profile_name.as_str() {
            "debug" => "dev".to_string(),
            other => other.to_string(),
        };
        let parent = dir
            .parent()
            .with_context(|| format!("{} is not inside a cargo target directory", dir.display()))?;
        let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() {
            (parent.to_path_buf(), None)
        } else if let Some(root) = parent.parent().filter(|r| r.join("CACHEDIR.TAG").exists()) {
            let triple = parent
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string);
            (root.to_path_buf(), triple)
        } else {
            (parent.to_path_buf(), None)
        };
        Ok(Self {
            profile_dir: dir,
            target_dir,
            triple,
            profile,
        })
    }

    fn build(&self) -> anyhow::Result<()> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("Cargo.toml");
        let mut command = Command::new(&cargo);
        command
            .arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["-p", "hotroll-cli", "-p", "hotroll-agent", "--bins"])
            .arg("--profile")
            .arg(&self.profile)
            .arg("--target-dir")
            .arg(&self.target_dir);
        if let Some(triple) = &self.triple {
            command.arg("--target").arg(triple);
        }
        let output = command
            .output()
            .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "building the hotroll binaries failed ({}):\n{}",
                output.status,
                tail.join("\n")
            );
        }
        Ok(())
    }
}
