//! The deploy files (`deploy/`): the Kubernetes manifests parse and have what they promise, the
//! systemd units pass `systemd-analyze verify` (where it is installed; otherwise that part is
//! skipped with a note), and the example scripts for `primes` pass `hotroll check`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use hotroll_tests::primes::primes_binary;
use hotroll_tests::run_command;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn key<'a>(doc: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(doc, |node, k| &node[*k])
}

fn text<'a>(doc: &'a Yaml, path: &[&str]) -> anyhow::Result<&'a str> {
    key(doc, path)
        .as_str()
        .with_context(|| format!("no string at {}", path.join(".")))
}

/// Every document of every manifest parses, names its apiVersion, kind and metadata.name; the
/// kustomization lists exactly the manifests; the coordinator is a StatefulSet with a volume
/// claim, the agent a DaemonSet whose ConfigMap holds a valid agent.toml with a handover
/// service.
#[test]
fn kubernetes_manifests_parse_and_hold_together() -> anyhow::Result<()> {
    let dir = repo().join("deploy/kubernetes");
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    let kustomization = YamlLoader::load_from_str(&kustomization)?;
    let resources: Vec<&str> = kustomization[0]["resources"]
        .as_vec()
        .context("kustomization has no resources")?
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let mut manifests: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    manifests.sort();
    let mut listed: Vec<String> = resources.iter().map(|s| s.to_string()).collect();
    listed.sort();
    ensure!(
        listed == manifests,
        "kustomization lists {listed:?}, the directory has {manifests:?}"
    );

    let mut kinds = Vec::new();
    for name in &manifests {
        let source = std::fs::read_to_string(dir.join(name))?;
        let docs = YamlLoader::load_from_str(&source).with_context(|| name.to_string())?;
        ensure!(!docs.is_empty(), "{name} has no document");
        for doc in &docs {
            let kind = text(doc, &["kind"]).with_context(|| name.to_string())?;
            text(doc, &["apiVersion"]).with_context(|| format!("{name}: {kind}"))?;
            let object = text(doc, &["metadata", "name"]).with_context(|| name.to_string())?;
            if kind != "Namespace" {
                ensure!(
                    text(doc, &["metadata", "namespace"])? == "hotroll",
                    "{name}: {kind} {object} is not in namespace hotroll"
                );
            }
            kinds.push((kind.to_string(), object.to_string(), doc.clone()));
        }
    }
    let find = |kind: &str, name: &str| {
        kinds
            .iter()
            .find(|(k, n, _)| k == kind && n == name)
            .map(|(_, _, doc)| doc)
            .with_context(|| format!("no {kind} {name}"))
    };
    let coordinator = find("StatefulSet", "hotroll-coordinator")?;
    ensure!(
        text(coordinator, &["spec", "serviceName"])? == "hotroll-coordinator-headless",
        "the StatefulSet's serviceName"
    );
    find("Service", "hotroll-coordinator-headless")?;
    find("Service", "hotroll-coordinator")?;
    let claims = key(coordinator, &["spec", "volumeClaimTemplates"])
        .as_vec()
        .context("the coordinator has no volumeClaimTemplates")?;
    let claim = text(&claims[0], &["metadata", "name"])?;
    let container = &key(coordinator, &["spec", "template", "spec", "containers"])[0];
    let mounted = container["volumeMounts"]
        .as_vec()
        .context("no volumeMounts")?
        .iter()
        .any(|m| {
            m["name"].as_str() == Some(claim) && m["mountPath"].as_str() == Some("/var/lib/hotroll")
        });
    ensure!(mounted, "the volume claim `{claim}` is not the data dir");
    let args: Vec<&str> = container["args"]
        .as_vec()
        .context("no args")?
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    ensure!(args.first() == Some(&"serve") && args.contains(&"--data-dir=/var/lib/hotroll"));

    let agent = find("DaemonSet", "hotroll-agent")?;
    ensure!(key(agent, &["spec", "template", "spec", "hostNetwork"]).as_bool() == Some(true));
    let config = find("ConfigMap", "hotroll-agent")?;
    let toml_text = text(config, &["data", "agent.toml"])?;
    let toml: toml::Table = toml::from_str(toml_text).context("the agent.toml in the ConfigMap")?;
    ensure!(
        toml["coordinator"].as_str() == Some("https://hotroll-coordinator.hotroll.svc:7070"),
        "the agents do not reach the coordinator's Service"
    );
    let services = toml["services"].as_array().context("no [[services]]")?;
    ensure!(services[0]["handover"].as_bool() == Some(true));
    Ok(())
}

/// `systemd-analyze verify` on the units, with their `ExecStart` binaries pointed at the ones
/// this build made (verify wants them to exist): no error and no warning.
#[test]
fn systemd_units_verify() -> anyhow::Result<()> {
    let units_dir = repo().join("deploy/systemd");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&units_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "service" || e == "socket")
        })
        .collect();
    units.sort();
    ensure!(units.len() >= 2, "expected the coordinator and agent units");
    for unit in &units {
        let source = std::fs::read_to_string(unit)?;
        for section in ["[Unit]", "[Service]", "[Install]"] {
            ensure!(source.contains(section), "{}: no {section}", unit.display());
        }
    }
    hotroll_tests::tools::require(&["systemd-analyze"], "systemd")?;
    let bins = hotroll_tests::binaries()?;
    let temp = tempfile::tempdir()?;
    let mut copies = Vec::new();
    for unit in &units {
        let source = std::fs::read_to_string(unit)?
            .replace(
                "/usr/local/bin/hotroll-agent",
                &bins.agent.display().to_string(),
            )
            .replace(
                "/usr/local/bin/hotroll ",
                &format!("{} ", bins.hotroll.display()),
            );
        let name = unit.file_name().context("unit without a name")?;
        let copy = temp.path().join(name);
        std::fs::write(&copy, source)?;
        copies.push(copy);
    }
    let mut command = Command::new("systemd-analyze");
    command.arg("verify").args(&copies);
    let output = run_command(command, Duration::from_secs(60))?;
    let diagnostics = format!("{}{}", output.stdout, output.stderr);
    if output.code != Some(0) || !diagnostics.trim().is_empty() {
        bail!(
            "systemd-analyze verify (exit {:?}):\n{diagnostics}",
            output.code
        );
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The example scripts for primes pass `hotroll check` (their `source` is
/// `../../../target/release/primes`: the layout is rebuilt in a temp dir around this build's
/// primes).
#[test]
fn primes_example_scripts_pass_check() -> anyhow::Result<()> {
    let bins = hotroll_tests::binaries()?;
    let primes = primes_binary()?;
    let temp = tempfile::tempdir()?;
    let examples = temp.path().join("deploy/examples/primes");
    copy_tree(&repo().join("deploy/examples/primes"), &examples)?;
    let release = temp.path().join("target/release");
    std::fs::create_dir_all(&release)?;
    std::fs::copy(&primes, release.join("primes"))?;
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        let is_script = path.extension().is_some_and(|e| e == "toml")
            && path.file_name().is_some_and(|n| n != "agent.toml");
        if !is_script {
            continue;
        }
        let mut command = Command::new(&bins.hotroll);
        command.arg("check").arg(&path).args(["--nodes", "3"]);
        let output = run_command(command, Duration::from_secs(60))?;
        ensure!(
            output.code == Some(0),
            "hotroll check {} failed:\n{}{}",
            path.display(),
            output.stdout,
            output.stderr
        );
        checked += 1;
    }
    ensure!(checked >= 3, "only {checked} example scripts found");
    Ok(())
}
