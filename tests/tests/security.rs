//! Security end to end (docs/security.md): a real TLS cluster (the harness's default) and
//! hostile clients and agents against it. Each case gets a clear error, is logged by the
//! coordinator, changes nothing on any node, and the cluster keeps serving everyone else.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::cluster::{CLI_TIMEOUT, Cluster, ClusterOptions, run_command};
use hotroll_tests::hooks::Hook;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

fn options() -> ClusterOptions {
    ClusterOptions::default().hook("ok", Hook::sh("true"))
}

const SCRIPT: &str = r#"app = "demo"
from = "1"
to = "2"
[rollout]
step_timeout = "20s"
barrier_timeout = "20s"
[script]
up = [{ check = "ok" }, { sync_nodes = "ready" }, "point_of_no_return", { apply = { hook = "ok" } }]
"#;

/// `hotroll ARGS` with only the environment given (no harness credentials).
fn bare_hotroll(
    cluster: &Cluster,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<hotroll_tests::cluster::CmdOutput> {
    let mut command = std::process::Command::new(&cluster.binaries().hotroll);
    command
        .args(args)
        .env_remove("HOTROLL_TOKEN")
        .env_remove("HOTROLL_CA")
        .env_remove("HOTROLL_INSECURE")
        .env("HOTROLL_COORDINATOR", cluster.url())
        .env("NO_COLOR", "1")
        .current_dir(cluster.dir());
    for (k, v) in env {
        command.env(k, v);
    }
    run_command(command, CLI_TIMEOUT)
}

fn coordinator_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.dir().join("logs/coordinator.log")).unwrap_or_default()
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

/// Agents joined with their tokens and hold their keys 0600; the coordinator keeps no token in
/// the clear; the CLI needs credentials, and a viewer may look but not act.
#[test]
fn the_cli_needs_credentials_and_a_viewer_cannot_start_a_rollout() -> anyhow::Result<()> {
    Cluster::start(2, options())?.run(|cluster| {
        let ca = cluster.credentials().context("a TLS cluster")?.ca.clone();
        let ca = ca.display().to_string();
        for i in 1..=2 {
            let tls = cluster.agent_info(i).data_dir.join("tls");
            ensure!(mode(&tls.join("node.key"))? == 0o600, "node key not 0600");
            ensure!(tls.join("node.pem").is_file() && tls.join("ca.pem").is_file());
        }
        let data = cluster.coordinator_data_dir();
        ensure!(mode(&data.join("tls/ca.key.pem"))? == 0o600);
        let operator = cluster.credentials().context("creds")?.token.clone();
        for entry in std::fs::read_dir(data.join("tokens"))? {
            let path = entry?.path();
            if path.is_file() {
                ensure!(mode(&path)? == 0o600);
                let text = std::fs::read_to_string(&path)?;
                ensure!(
                    !text.contains(&operator[4..68]),
                    "a token secret is stored in the clear"
                );
            }
        }

        // No credentials.
        let none = bare_hotroll(cluster, &["nodes", "--ca", &ca], &[])?;
        ensure!(none.code == Some(1), "{none:?}");
        ensure!(none.stderr.contains("no credentials"), "{}", none.stderr);
        // Plaintext to a TLS coordinator is refused by the CLI itself.
        let plain = cluster.url().replace("https://", "http://");
        let refused = bare_hotroll(cluster, &["nodes", "--coordinator", &plain], &[])?;
        ensure!(refused.code == Some(1), "{refused:?}");
        ensure!(refused.stderr.contains("--insecure"), "{}", refused.stderr);
        // A token of another coordinator's CA: the pin does not match.
        let alien = format!("hr1.{}.{}", "1".repeat(64), "2".repeat(64));
        let other = bare_hotroll(cluster, &["nodes", "--token", &alien], &[])?;
        ensure!(other.code == Some(1), "{other:?}");
        ensure!(
            other.stderr.contains("does not contain the CA"),
            "{}",
            other.stderr
        );

        // A viewer.
        let viewer = cluster.create_token(&["--role", "viewer"])?;
        let env = [
            ("HOTROLL_TOKEN", viewer.as_str()),
            ("HOTROLL_CA", ca.as_str()),
        ];
        let script = cluster.write_script("upgrade.toml", SCRIPT)?;
        let script_text = script.display().to_string();
        let start = bare_hotroll(cluster, &["rollout", "start", &script_text], &env)?;
        ensure!(start.code == Some(1), "{start:?}");
        ensure!(
            start.stderr.contains("may not start rollout"),
            "{}",
            start.stderr
        );
        let abort = bare_hotroll(cluster, &["rollout", "abort", "x"], &env)?;
        ensure!(
            abort.stderr.contains("may not abort rollout"),
            "{}",
            abort.stderr
        );
        let nodes = bare_hotroll(cluster, &["nodes", "--output", "json"], &env)?.ok()?;
        ensure!(nodes.json()?.as_array().is_some_and(|n| n.len() == 2));
        let list = bare_hotroll(cluster, &["rollout", "list", "--output", "json"], &env)?.ok()?;
        ensure!(
            list.json()?.as_array().is_some_and(Vec::is_empty),
            "{}",
            list.stdout
        );
        let log = coordinator_log(cluster);
        ensure!(log.contains("refused: not allowed for this role"), "{log}");
        ensure!(
            !log.contains(&operator[4..68]) && !log.contains(&viewer[4..68]),
            "a token was logged"
        );

        // The operator (the harness's token) is served: a whole rollout works.
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(run.code == Some(0), "{:?}", run.output);
        Ok(())
    })
}

/// Agents that must not get in: a reused join token, another node's certificate, plaintext
/// without `--insecure`, no token at all. Each exits with a clear error; the fleet is
/// unchanged and keeps working.
#[test]
fn agents_without_a_valid_identity_stay_out() -> anyhow::Result<()> {
    Cluster::start(2, options())?.run(|cluster| {
        let agent_bin = cluster.binaries().agent.clone();
        let node1 = cluster.agent_info(1);
        let node1_toml = std::fs::read_to_string(&node1.config)?;
        let used_token = node1_toml
            .lines()
            .find_map(|l| l.strip_prefix("join_token = "))
            .map(|t| t.trim_matches('"').to_string())
            .context("node-1's config has no join token")?;
        let url = cluster.url().to_string();
        let dir = cluster.dir().join("intruders");
        std::fs::create_dir_all(&dir)?;

        let run_agent = |name: &str, toml: String| -> anyhow::Result<String> {
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(&config, toml)?;
            let mut command = std::process::Command::new(&agent_bin);
            command.args(["--config", &config.display().to_string()]);
            let out = run_command(command, Duration::from_secs(30))?;
            ensure!(out.code == Some(1), "{name}: expected exit 1, got {out:?}");
            Ok(out.stderr)
        };
        let data = |name: &str| dir.join(name).display().to_string();

        // 1. node-1's token again, for a new node-3.
        let reused = run_agent(
            "reused",
            format!(
                "node = \"node-3\"\ncoordinator = \"{url}\"\ndata_dir = \"{}\"\njoin_token = \"{used_token}\"\n",
                data("reused")
            ),
        )?;
        ensure!(reused.contains("already used (by node `node-1`)"), "{reused}");

        // 2. node-1's certificate copied into a node that calls itself node-2.
        let stolen = dir.join("stolen");
        std::fs::create_dir_all(stolen.join("tls"))?;
        for f in ["node.pem", "node.key", "ca.pem"] {
            std::fs::copy(node1.data_dir.join("tls").join(f), stolen.join("tls").join(f))?;
        }
        let impostor = run_agent(
            "impostor",
            format!(
                "node = \"node-2\"\ncoordinator = \"{url}\"\ndata_dir = \"{}\"\n",
                stolen.display()
            ),
        )?;
        ensure!(impostor.contains("rather than node `node-2`"), "{impostor}");

        // 3. Plaintext without --insecure.
        let plain = run_agent(
            "plain",
            format!(
                "node = \"node-4\"\ncoordinator = \"{}\"\ndata_dir = \"{}\"\n",
                url.replace("https://", "http://"),
                data("plain")
            ),
        )?;
        ensure!(plain.contains("insecure"), "{plain}");

        // 4. No certificate and no token.
        let nothing = run_agent(
            "nothing",
            format!("node = \"node-5\"\ncoordinator = \"{url}\"\ndata_dir = \"{}\"\n", data("nothing")),
        )?;
        ensure!(nothing.contains("--join TOKEN"), "{nothing}");

        // 5. An expired token.
        let expired = cluster.create_token(&["--role", "agent", "--ttl", "1ms"])?;
        std::thread::sleep(Duration::from_millis(20));
        let late = run_agent(
            "late",
            format!(
                "node = \"node-6\"\ncoordinator = \"{url}\"\ndata_dir = \"{}\"\njoin_token = \"{expired}\"\n",
                data("late")
            ),
        )?;
        ensure!(late.contains("expired"), "{late}");

        let log = coordinator_log(cluster);
        ensure!(log.contains("join refused") || log.contains("authentication failed"), "{log}");
        ensure!(!log.contains(&used_token[4..68]), "a token was logged");

        // The fleet is as it was, and works.
        let nodes = cluster.nodes()?;
        let names: Vec<&str> = nodes
            .as_array()
            .map(|a| a.iter().filter_map(|n| n["name"].as_str()).collect())
            .unwrap_or_default();
        ensure!(names == ["node-1", "node-2"], "nodes: {nodes}");
        cluster.wait_all_connected(Duration::from_secs(10))?;
        let script = cluster.write_script("upgrade.toml", SCRIPT)?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(run.code == Some(0), "{:?}", run.output);
        Ok(())
    })
}

/// A restarted agent uses the certificate it stored (its join token is used up), and a
/// restarted coordinator keeps its CA: the fleet comes back on its own.
#[test]
fn identities_survive_restarts() -> anyhow::Result<()> {
    Cluster::start(2, options())?.run(|cluster| {
        let serial = std::fs::read(cluster.agent_info(1).data_dir.join("tls/node.pem"))?;
        cluster.agent(1).restart()?;
        cluster.restart_coordinator()?;
        cluster.wait_all_connected(Duration::from_secs(30))?;
        ensure!(
            std::fs::read(cluster.agent_info(1).data_dir.join("tls/node.pem"))? == serial,
            "the agent got a new certificate instead of using its own"
        );
        let script = cluster.write_script("upgrade.toml", SCRIPT)?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(run.code == Some(0), "{:?}", run.output);
        Ok(())
    })
}

/// Node certificates renewed while everything runs: with 10 s certificates the agents renew
/// theirs (new serials on disk, "renewed" in their logs), their sessions move to the new ones,
/// and a rollout across the renewals succeeds. Nothing is restarted.
#[test]
fn node_certificates_renew_without_restarts() -> anyhow::Result<()> {
    let options = options()
        .coordinator_arg("--node-cert-ttl")
        .coordinator_arg("10s");
    Cluster::start(2, options)?.run(|cluster| {
        let pem = |i: usize| std::fs::read(cluster.agent_info(i).data_dir.join("tls/node.pem"));
        let first = [pem(1)?, pem(2)?];
        hotroll_tests::poll(
            "both agents to renew their certificates twice",
            Duration::from_secs(40),
            Duration::from_millis(200),
            || {
                let renewed = (1..=2).all(|i| {
                    let log =
                        std::fs::read_to_string(cluster.dir().join(format!("logs/node-{i}.log")))
                            .unwrap_or_default();
                    log.matches("node certificate renewed").count() >= 2
                });
                Ok(renewed.then_some(()))
            },
        )?;
        ensure!(
            pem(1)? != first[0] && pem(2)? != first[1],
            "the files were not replaced"
        );
        cluster.wait_all_connected(Duration::from_secs(20))?;
        let script = cluster.write_script("upgrade.toml", SCRIPT)?;
        let run = cluster.run_rollout(&script, &[], ROLLOUT_TIMEOUT)?;
        ensure!(run.code == Some(0), "{:?}", run.output);
        let log = coordinator_log(cluster);
        ensure!(log.contains("node certificate renewed"), "{log}");
        Ok(())
    })
}
