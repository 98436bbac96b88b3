//! The architecture's rules that a compiler does not check by itself (ARCHITECTURE.md,
//! "Invariants"): which crate may depend on which, what never enters the daemon library, and no
//! import cycles between the modules of any crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use hotroll_tests::modules;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// `cargo metadata --no-deps`: every workspace package with its direct dependencies
/// (name → kinds) and its lib/bin root files.
struct Package {
    dependencies: BTreeMap<String, BTreeSet<String>>,
    roots: Vec<PathBuf>,
}

fn packages() -> anyhow::Result<BTreeMap<String, Package>> {
    let output = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let mut packages = BTreeMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default().to_string();
        let mut dependencies: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let kind = dep["kind"].as_str().unwrap_or("normal").to_string();
            dependencies
                .entry(dep["name"].as_str().unwrap_or_default().to_string())
                .or_default()
                .insert(kind);
        }
        let roots = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "bin"))
            })
            .filter_map(|t| t["src_path"].as_str().map(PathBuf::from))
            .collect();
        packages.insert(
            name,
            Package {
                dependencies,
                roots,
            },
        );
    }
    Ok(packages)
}

/// Every package linked into `package` or its tests (normal and dev edges; build scripts'
/// tools such as protox are not part of the daemon).
fn tree(package: &str) -> anyhow::Result<BTreeSet<String>> {
    let output = cargo()
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal,dev",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .context("cannot run cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect())
}

#[test]
fn crates_depend_on_each_other_as_the_architecture_says() -> anyhow::Result<()> {
    let packages = packages()?;
    let depends = |from: &str, to: &str| {
        packages
            .get(from)
            .is_some_and(|p| p.dependencies.contains_key(to))
    };
    let mut wrong = Vec::new();
    for (from, to) in [
        ("hotroll-cli", "hotroll-coordinator"),
        ("hotroll-cli", "hotroll-script"),
        ("hotroll-cli", "hotroll-proto"),
        ("hotroll-cli", "hotroll-tls"),
        ("hotroll-agent", "hotroll-fault"),
        ("hotroll-coordinator", "hotroll-fault"),
    ] {
        if !depends(from, to) {
            wrong.push(format!("{from} should depend on {to}"));
        }
    }
    for (from, to) in [
        ("hotroll-coordinator", "hotroll-agent"),
        ("hotroll-coordinator", "hotroll-cli"),
        ("hotroll-agent", "hotroll-coordinator"),
        ("hotroll-agent", "hotroll-cli"),
    ] {
        if depends(from, to) {
            wrong.push(format!("{from} must not depend on {to}"));
        }
    }
    // The engine is pure: nothing that could do I/O, keep time or see the wire.
    if let Some(engine) = packages.get("hotroll-engine") {
        for (dep, kinds) in &engine.dependencies {
            let allowed = ["hotroll-script", "serde", "thiserror"].contains(&dep.as_str());
            if !allowed && kinds.iter().any(|k| k != "dev") {
                wrong.push(format!("hotroll-engine must not depend on {dep}"));
            }
        }
    } else {
        wrong.push("no hotroll-engine crate".to_string());
    }
    // prost types stay inside the wire contracts: hotroll's own (hotroll-proto) and etcd's,
    // which hotroll-etcd keeps in a private module (checked below).
    for (name, package) in &packages {
        if !["hotroll-proto", "hotroll-etcd"].contains(&name.as_str())
            && package
                .dependencies
                .get("prost")
                .is_some_and(|kinds| kinds.iter().any(|k| k != "dev"))
        {
            wrong.push(format!(
                "{name} depends on prost (only hotroll-proto and hotroll-etcd may)"
            ));
        }
    }
    let etcd_lib = std::fs::read_to_string(workspace_root().join("etcd/src/lib.rs"))?;
    if !etcd_lib.lines().any(|line| line.trim() == "mod wire {") {
        wrong.push("hotroll-etcd must keep etcd's wire types in a private `mod wire`".into());
    }
    anyhow::ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

#[test]
fn the_daemon_library_has_no_terminal_or_erlang_crates() -> anyhow::Result<()> {
    let tree = tree("hotroll-coordinator")?;
    let banned = [
        "hotroll-agent",
        "hotroll-cli",
        // terminal: the CLI's tables, live view, colours and terminal emulation
        "crossterm",
        "comfy-table",
        "anstream",
        "owo-colors",
        "supports-color",
        "terminal_size",
        "vt100",
        "pty-process",
        // Erlang: the agent's BEAM runtime and `hotroll plan beam`
        "erl_dist",
        "eetf",
    ];
    let found: Vec<&str> = banned
        .iter()
        .copied()
        .filter(|name| tree.contains(*name))
        .collect();
    anyhow::ensure!(
        found.is_empty(),
        "cargo tree -p hotroll-coordinator contains {found:?}"
    );
    Ok(())
}

#[test]
fn no_crate_has_import_cycles_between_its_modules() -> anyhow::Result<()> {
    let mut report = Vec::new();
    let mut crates = 0;
    for (name, package) in packages()? {
        for root in &package.roots {
            crates += 1;
            let graph = modules::read_crate(root)
                .with_context(|| format!("cannot read {name} at {}", root.display()))?;
            for cycle in graph.cycles() {
                report.push(format!("{name}: {cycle}"));
            }
        }
    }
    anyhow::ensure!(crates > 5, "found only {crates} crate roots");
    anyhow::ensure!(
        report.is_empty(),
        "import cycles between modules (ARCHITECTURE.md):\n{}",
        report.join("\n")
    );
    Ok(())
}

/// The rollout driver, the registry and the store speak domain types: they live in
/// `hotroll-rollouts`, which cannot name a wire type because it does not depend on the crates
/// that have them (the compiler keeps the boundary; this keeps the Cargo.toml honest).
#[test]
fn the_driver_and_the_store_see_no_wire_types() -> anyhow::Result<()> {
    let packages = packages()?;
    let rollouts = packages
        .get("hotroll-rollouts")
        .context("no hotroll-rollouts crate")?;
    let wire: Vec<&String> = rollouts
        .dependencies
        .iter()
        .filter(|(dep, kinds)| {
            ["hotroll-proto", "prost", "tonic", "hotroll-coordinator"].contains(&dep.as_str())
                && kinds.iter().any(|k| k != "dev")
        })
        .map(|(dep, _)| dep)
        .collect();
    anyhow::ensure!(
        wire.is_empty(),
        "hotroll-rollouts (driver, store, registry) must not depend on {wire:?}"
    );
    anyhow::ensure!(
        packages
            .get("hotroll-coordinator")
            .is_some_and(|c| c.dependencies.contains_key("hotroll-rollouts")),
        "the coordinator should run its rollouts through hotroll-rollouts"
    );
    Ok(())
}

/// The web console reads the same domain sources as Control (`hotroll-rollouts`) and sees no
/// wire type; the coordinator serves it, so it must not depend on the coordinator either.
#[test]
fn the_console_sees_no_wire_types() -> anyhow::Result<()> {
    let packages = packages()?;
    let console = packages
        .get("hotroll-console")
        .context("no hotroll-console crate")?;
    let wrong: Vec<&String> = console
        .dependencies
        .iter()
        .filter(|(dep, kinds)| {
            ["hotroll-proto", "prost", "tonic", "hotroll-coordinator"].contains(&dep.as_str())
                && kinds.iter().any(|k| k != "dev")
        })
        .map(|(dep, _)| dep)
        .collect();
    anyhow::ensure!(
        wrong.is_empty(),
        "hotroll-console must not depend on {wrong:?}"
    );
    anyhow::ensure!(
        packages
            .get("hotroll-coordinator")
            .is_some_and(|c| c.dependencies.contains_key("hotroll-console")),
        "the coordinator should serve the console (hotroll-console)"
    );
    Ok(())
}
