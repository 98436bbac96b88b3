//! Finding the `primes` demo service (package `hotroll-primes`) that the demo's agents run.
//!
//! `cargo run --bin hotroll -- demo` builds `hotroll` only, so on a fresh clone `primes` does
//! not exist yet. In order:
//!
//! 1. `$HOTROLL_DEMO_PRIMES`: a `primes` executable to use as it is.
//! 2. Run from a cargo target directory of this source tree (the README's way):
//!    `cargo build --quiet -p hotroll-primes --bin primes` with the running executable's profile
//!    and target directory, so `primes` lands next to `hotroll` (cargo decides what is stale:
//!    a no-op when it is fresh). If cargo cannot be run, an existing `primes` there is used.
//! 3. `primes` next to the running executable (an installed pair).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The binary's name.
pub const PRIMES_BIN: &str = "primes";
/// Override: a `primes` executable to use.
pub const PRIMES_ENV: &str = "HOTROLL_DEMO_PRIMES";

/// Where cargo put the running executable, when it did: `<target>/[<triple>/]<profile>`.
struct CargoLayout {
    profile_dir: PathBuf,
    target_dir: PathBuf,
    triple: Option<String>,
    profile: String,
}

fn cargo_layout(exe_dir: &Path) -> Option<CargoLayout> {
    let mut dir = exe_dir.to_path_buf();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.pop();
    }
    let profile_name = dir.file_name()?.to_str()?.to_string();
    let parent = dir.parent()?;
    let (target_dir, triple) = if parent.join("CACHEDIR.TAG").exists() {
        (parent.to_path_buf(), None)
    } else {
        let root = parent.parent()?;
        if !root.join("CACHEDIR.TAG").exists() {
            return None;
        }
        (
            root.to_path_buf(),
            Some(parent.file_name()?.to_str()?.to_string()),
        )
    };
    let profile = if profile_name == "debug" {
        "dev".to_string()
    } else {
        profile_name
    };
    Some(CargoLayout {
        profile_dir: dir,
        target_dir,
        triple,
        profile,
    })
}

/// The workspace this binary was built from, if it is still there.
fn source_tree() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    (workspace.join("Cargo.toml").is_file() && workspace.join("demo/primes/Cargo.toml").is_file())
        .then_some(workspace)
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The `primes` executable for the demo (see the module docs). `say` prints progress.
pub fn locate(say: impl Fn(&str)) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(PRIMES_ENV) {
        let path = PathBuf::from(path);
        if !executable(&path) {
            bail!("{PRIMES_ENV}={} is not an executable file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let exe_dir = exe
        .parent()
        .context("the running executable has no directory")?;
    let layout = cargo_layout(exe_dir);
    let next_to_us = layout
        .as_ref()
        .map_or_else(|| exe_dir.to_path_buf(), |l| l.profile_dir.clone())
        .join(PRIMES_BIN);
    if let (Some(layout), Some(workspace)) = (&layout, source_tree()) {
        if !next_to_us.exists() {
            say("building the demo service once: cargo build -p hotroll-primes --bin primes");
        }
        match build(layout, &workspace) {
            Ok(()) => {}
            Err(e) if executable(&next_to_us) => {
                say(&format!(
                    "(could not rebuild primes, using the one there: {e:#})"
                ));
            }
            Err(e) => return Err(e),
        }
    }
    if executable(&next_to_us) {
        return Ok(next_to_us);
    }
    bail!(
        "the demo service `primes` is not next to this executable ({}): build it with \
         `cargo build -p hotroll-primes --bin primes`, or point {PRIMES_ENV} at it",
        next_to_us.display()
    )
}

fn build(layout: &CargoLayout, workspace: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", "hotroll-primes", "--bin", PRIMES_BIN])
        .arg("--profile")
        .arg(&layout.profile)
        .arg("--target-dir")
        .arg(&layout.target_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if let Some(triple) = &layout.triple {
        command.arg("--target").arg(triple);
    }
    let output = command
        .output()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    if !output.status.success() {
        bail!(
            "`cargo build -p hotroll-primes` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_of_cargo_target_dirs() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let target = dir.path().join("target");
        std::fs::create_dir_all(target.join("debug/deps"))?;
        std::fs::create_dir_all(target.join("x86_64-unknown-linux-gnu/release"))?;
        std::fs::write(target.join("CACHEDIR.TAG"), "")?;
        let debug = cargo_layout(&target.join("debug/deps")).context("no layout")?;
        assert_eq!(debug.profile, "dev");
        assert_eq!(debug.profile_dir, target.join("debug"));
        assert_eq!(debug.target_dir, target);
        assert_eq!(debug.triple, None);
        let cross =
            cargo_layout(&target.join("x86_64-unknown-linux-gnu/release")).context("no layout")?;
        assert_eq!(cross.profile, "release");
        assert_eq!(cross.triple.as_deref(), Some("x86_64-unknown-linux-gnu"));
        assert!(cargo_layout(dir.path()).is_none());
        Ok(())
    }
}
