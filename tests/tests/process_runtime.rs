//! End-to-end tests of issue 4 ("Process runtime"): real coordinator and agent processes, and a
//! real supervised service, `version-server` (this crate's test service), which serves
//! `<version> <pid>` on a socket its agent holds. Releases "1.0", "2.0", … are the same binary
//! next to different `VERSION` artifacts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use hotroll_tests::proxy::Proxy;
use hotroll_tests::services::{
    self, ClientLoop, current_release, digest_of, log_lines, permanent_release, release_entries,
    wait_serving,
};
use hotroll_tests::{Cluster, ClusterOptions, Hook, free_port, node_name, run_command, status};

const APP: &str = "version";
const SERVICE: &str = "version";
const NODES: usize = 3;
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);
const SERVE_TIMEOUT: Duration = Duration::from_secs(20);

fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_version-server"))
}

/// One `[[artifacts]]` entry.
struct Artifact {
    name: String,
    source: PathBuf,
    /// More keys, e.g. `mode = "0755"` or `unpack = true`.
    extra: String,
}

impl Artifact {
    fn new(name: &str, source: &Path, extra: &str) -> Self {
        Self {
            name: name.to_string(),
            source: source.to_path_buf(),
            extra: extra.to_string(),
        }
    }
}

/// An upgrade script of app `version` from `from` to `to`; `rollout` is the body of
/// `[rollout]`, `up` the instructions (TOML, one per element).
fn script(from: &str, to: &str, artifacts: &[Artifact], rollout: &str, up: &[&str]) -> String {
    let mut text = format!("app = \"{APP}\"\nfrom = \"{from}\"\nto = \"{to}\"\n\n");
    for a in artifacts {
        text.push_str(&format!(
            "[[artifacts]]\nname = \"{}\"\nsource = \"{}\"\n{}\n\n",
            a.name,
            a.source.display(),
            a.extra
        ));
    }
    text.push_str(&format!("[rollout]\n{rollout}\n\n[script]\nup = [\n"));
    for step in up {
        text.push_str(&format!("  {step},\n"));
    }
    text.push_str("]\n");
    text
}

const POLICY: &str = "on_failure = \"rollback_node\"\nmax_failures = 1\nstep_timeout = \"30s\"\nbarrier_timeout = \"30s\"";

/// `<cluster>/artifacts/<version>/VERSION`.
fn version_file(cluster: &Cluster, version: &str) -> anyhow::Result<PathBuf> {
    let dir = cluster.dir().join("artifacts").join(version);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("VERSION");
    std::fs::write(&path, format!("{version}\n"))?;
    Ok(path)
}

fn binary_artifact() -> Artifact {
    Artifact::new("bin/version-server", &server_binary(), "mode = \"0755\"")
}

/// Options for `nodes` agents, each with the version service on a port of its own; `env` gives
/// a node's service more environment.
fn fleet(
    nodes: usize,
    env: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
) -> anyhow::Result<(ClusterOptions, Vec<u16>)> {
    let mut options = ClusterOptions::default().hook("ok", Hook::ok());
    let mut ports = Vec::new();
    for i in 1..=nodes {
        let port = free_port()?;
        options = options
            .node_agent_toml_extra(i, &services::version_service(SERVICE, APP, port, &env(i)));
        ports.push(port);
    }
    Ok((options, ports))
}

fn no_env(_: usize) -> Vec<(&'static str, &'static str)> {
    Vec::new()
}

/// Install release `version` (the first release) on every node and wait until each serves it.
fn install(cluster: &Cluster, ports: &[u16], version: &str) -> anyhow::Result<()> {
    let text = script(
        "none",
        version,
        &[
            binary_artifact(),
            Artifact::new("VERSION", &version_file(cluster, version)?, ""),
        ],
        POLICY,
        &[
            r#"{ load_object_code = ["bin/version-server", "VERSION"] }"#,
            r#""point_of_no_return""#,
            r#"{ load = "version" }"#,
            r#"{ health = { service = "version", timeout = "20s" } }"#,
        ],
    );
    let path = cluster.write_script(&format!("install-{version}.toml"), &text)?;
    let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
    ensure!(
        status::rollout_state(&run.status)? == "succeeded",
        "installing {version} did not succeed: {:#}\n{}",
        run.status,
        run.output.stderr
    );
    for port in ports {
        wait_serving(*port, version, SERVE_TIMEOUT)?;
    }
    Ok(())
}

/// The hot upgrade of the issue: stage, point of no return, suspend, swap, restart keeping the
/// sockets, resume, health.
fn hot_upgrade_steps() -> Vec<&'static str> {
    vec![
        r#"{ load_object_code = ["VERSION"] }"#,
        r#"{ sync_nodes = "staged" }"#,
        r#""point_of_no_return""#,
        r#"{ suspend = ["version"] }"#,
        r#"{ load = "version" }"#,
        r#"{ code_change = { service = "version", timeout = "15s" } }"#,
        r#"{ resume = ["version"] }"#,
        r#"{ health = { service = "version", timeout = "15s" } }"#,
    ]
}

/// The rollout's status once every node reports a settled state: `rollout start --wait`
/// returns when the rollout is final, and the last nodes' reports may still be on their way.
fn settled(
    cluster: &Cluster,
    run: &hotroll_tests::WaitedRollout,
) -> anyhow::Result<serde_json::Value> {
    cluster.wait_status(
        &run.id,
        "every node to settle",
        Duration::from_secs(30),
        |status| {
            status::node_states(status).iter().all(|(_, state)| {
                ["aborted", "rolled_back", "committed", "failed"].contains(&state.as_str())
            })
        },
    )
}

fn assert_release(
    cluster: &Cluster,
    i: usize,
    current: &str,
    permanent: &str,
) -> anyhow::Result<()> {
    let on_disk = (
        current_release(cluster, i, APP),
        permanent_release(cluster, i, APP),
    );
    ensure!(
        on_disk == (Some(current.to_string()), Some(permanent.to_string())),
        "{}: current/permanent on disk are {on_disk:?}, expected {current}/{permanent}",
        node_name(i)
    );
    Ok(())
}

/// `hotroll nodes` shows `current`/`permanent` of the app on every node (it catches up with
/// the nodes' last reports, so poll).
fn wait_nodes_show(cluster: &Cluster, expected: &[(&str, &str)]) -> anyhow::Result<()> {
    hotroll_tests::poll(
        "hotroll nodes to show the app's releases",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let apps = services::nodes_apps(cluster, APP)?;
            let shown: Vec<(String, String)> = (1..=expected.len())
                .map(|i| apps.get(&node_name(i)).cloned().unwrap_or_default())
                .collect();
            let want: Vec<(String, String)> = expected
                .iter()
                .map(|(c, p)| (c.to_string(), p.to_string()))
                .collect();
            Ok((shown == want).then_some(()))
        },
    )
}

/// One raw tar entry: name, type, link target, data.
type TarEntry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

/// A tar archive with raw entry names (the `tar` builder refuses `..`, which is the point).
fn raw_tar(path: &Path, entries: &[TarEntry]) -> anyhow::Result<()> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_old();
        {
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, *data)?;
    }
    std::fs::write(path, builder.into_inner()?)?;
    Ok(())
}

/// 1. Three nodes go from 1.0 to 2.0 with a hot upgrade (and a tar archive of static files):
///    every node serves 2.0 afterwards, `current` and `permanent` are 2.0 on disk and in
///    `hotroll nodes`, unchanged files were hard-linked, the service got its socket by socket
///    activation. Two more upgrades then show make-permanent keeping 3 releases.
#[test]
fn three_nodes_upgrade_from_1_0_to_2_0() -> anyhow::Result<()> {
    let (options, ports) = fleet(NODES, no_env)?;
    Cluster::start(NODES, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        for i in 1..=NODES {
            assert_release(cluster, i, "1.0", "1.0")?;
        }
        wait_nodes_show(cluster, &[("1.0", "1.0"); NODES])?;

        let archive = cluster.dir().join("artifacts/static.tar");
        std::fs::create_dir_all(cluster.dir().join("artifacts"))?;
        raw_tar(
            &archive,
            &[
                ("static/", tar::EntryType::Directory, "", b""),
                (
                    "static/index.html",
                    tar::EntryType::Regular,
                    "",
                    b"<h1>2.0</h1>\n",
                ),
                (
                    "static/home.html",
                    tar::EntryType::Symlink,
                    "index.html",
                    b"",
                ),
            ],
        )?;
        let mut up = vec![r#"{ load_object_code = ["VERSION", "."] }"#];
        up.extend(hot_upgrade_steps().into_iter().skip(1));
        let text = script(
            "1.0",
            "2.0",
            &[
                Artifact::new("VERSION", &version_file(cluster, "2.0")?, ""),
                Artifact::new(".", &archive, "unpack = true"),
            ],
            POLICY,
            &up,
        );
        let path = cluster.write_script("upgrade-2.0.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("succeeded")?;
        for (i, port) in ports.iter().enumerate() {
            let i = i + 1;
            wait_serving(*port, "2.0", SERVE_TIMEOUT)?;
            assert_release(cluster, i, "2.0", "2.0")?;
            let app = services::app_dir(cluster, i, APP);
            let (v1, v2) = (app.join("releases/1.0"), app.join("releases/2.0"));
            ensure!(
                std::fs::read_to_string(v2.join("static/home.html"))? == "<h1>2.0</h1>\n",
                "the archive was not unpacked into release 2.0"
            );
            use std::os::unix::fs::MetadataExt;
            ensure!(
                std::fs::metadata(v1.join("bin/version-server"))?.ino()
                    == std::fs::metadata(v2.join("bin/version-server"))?.ino(),
                "{}: the unchanged binary was not hard-linked from 1.0",
                node_name(i)
            );
            let log = cluster.agent_info(i).data_dir.join("logs/version.log");
            ensure!(
                !log_lines(&log, &["2.0", "socket activated, fd 3 (version)"]).is_empty(),
                "{}: the service did not get its socket by socket activation: {}",
                node_name(i),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        wait_nodes_show(cluster, &[("2.0", "2.0"); NODES])?;

        // Two more releases: make-permanent keeps 3 (keep_releases' default), so 1.0 goes.
        for (from, to) in [("2.0", "3.0"), ("3.0", "4.0")] {
            let text = script(
                from,
                to,
                &[Artifact::new("VERSION", &version_file(cluster, to)?, "")],
                POLICY,
                &[
                    r#"{ load_object_code = ["VERSION"] }"#,
                    r#"{ load = "version" }"#,
                    r#"{ restart = "version" }"#,
                    r#"{ health = { service = "version", timeout = "15s" } }"#,
                ],
            );
            let path = cluster.write_script(&format!("upgrade-{to}.toml"), &text)?;
            cluster
                .run_rollout(&path, &[], ROLLOUT_TIMEOUT)?
                .ensure_state("succeeded")?;
        }
        for (i, port) in ports.iter().enumerate() {
            wait_serving(*port, "4.0", SERVE_TIMEOUT)?;
            let releases = release_entries(cluster, i + 1, APP);
            ensure!(
                releases == ["2.0", "3.0", "4.0"],
                "{}: releases after make-permanent: {releases:?}",
                node_name(i + 1)
            );
        }
        Ok(())
    })
}

/// 2. `health` fails on node-2 after `load` (release 2.0 crashes there): node-2 rolls back and
///    serves 1.0 again with `permanent` 1.0; under `rollback_node` with a budget of one failure
///    the other nodes go on to 2.0.
#[test]
fn failed_health_rolls_that_node_back_to_1_0() -> anyhow::Result<()> {
    let (options, ports) = fleet(NODES, |i| {
        if i == 2 {
            vec![("FAIL_VERSION", "2.0")]
        } else {
            Vec::new()
        }
    })?;
    Cluster::start(NODES, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        let text = script(
            "1.0",
            "2.0",
            &[Artifact::new("VERSION", &version_file(cluster, "2.0")?, "")],
            POLICY,
            &[
                r#"{ load_object_code = ["VERSION"] }"#,
                r#""point_of_no_return""#,
                r#"{ load = "version" }"#,
                r#"{ restart = "version" }"#,
                r#"{ health = { service = "version", timeout = "3s" } }"#,
            ],
        );
        let path = cluster.write_script("upgrade.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("partially_rolled_back")?;
        let final_status = settled(cluster, &run)?;
        ensure!(
            status::node_state(&final_status, "node-2")? == "rolled_back",
            "node-2 did not roll back: {final_status:#}"
        );
        let error = status::node_error(&final_status, "node-2")?.unwrap_or_default();
        ensure!(
            error.contains("did not become ready"),
            "node-2's error does not say why: {error}"
        );
        wait_serving(ports[1], "1.0", SERVE_TIMEOUT)?;
        assert_release(cluster, 2, "1.0", "1.0")?;
        for i in [1, 3] {
            ensure!(status::node_state(&final_status, &node_name(i))? == "committed");
            wait_serving(ports[i - 1], "2.0", SERVE_TIMEOUT)?;
            assert_release(cluster, i, "2.0", "2.0")?;
        }
        wait_nodes_show(cluster, &[("2.0", "2.0"), ("1.0", "1.0"), ("2.0", "2.0")])?;
        Ok(())
    })
}

/// 3. An artifact whose bytes do not match its digest (the coordinator's copy was damaged after
///    the upload): every node aborts before the point of no return, no node changed (same
///    release, same service process), nothing is left staged or in the content store.
#[test]
fn artifact_not_matching_its_digest_aborts_before_the_point_of_no_return() -> anyhow::Result<()> {
    let (options, ports) = fleet(NODES, no_env)?;
    let options = options.hook("closed", Hook::fail());
    Cluster::start(NODES, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        let mut pids = Vec::new();
        for port in &ports {
            pids.push(wait_serving(*port, "1.0", SERVE_TIMEOUT)?.1);
        }
        let blob = cluster.dir().join("artifacts/blob.bin");
        services::write_blob(&blob, 1 << 20, 3)?;
        let digest = digest_of(&blob)?;
        let artifacts = [
            Artifact::new("VERSION", &version_file(cluster, "2.0")?, ""),
            Artifact::new("data/blob.bin", &blob, ""),
        ];
        let upgrade = [
            r#"{ load_object_code = ["VERSION", "data/blob.bin"] }"#,
            r#""point_of_no_return""#,
            r#"{ load = "version" }"#,
            r#"{ restart = "version" }"#,
        ];
        // Upload the artifacts with a rollout that stops at once (a check that fails) ...
        let mut refused = vec![r#"{ check = "closed" }"#];
        refused.extend(upgrade);
        let path = cluster.write_script(
            "upload.toml",
            &script("1.0", "2.0", &artifacts, POLICY, &refused),
        )?;
        cluster
            .run_rollout(&path, &[], ROLLOUT_TIMEOUT)?
            .ensure_state("aborted")?;
        // ... then damage the coordinator's copy (same size, other bytes).
        let hex = digest.trim_start_matches("sha256:");
        let stored = cluster.dir().join("coordinator/data/cas/sha256").join(hex);
        let mut bytes = std::fs::read(&stored).context("the coordinator did not store the blob")?;
        bytes[1000] ^= 0xff;
        std::fs::write(&stored, &bytes)?;

        let path = cluster.write_script(
            "upgrade.toml",
            &script("1.0", "2.0", &artifacts, POLICY, &upgrade),
        )?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("aborted")?;
        let final_status = settled(cluster, &run)?;
        let mut detected = 0;
        for (i, port) in ports.iter().enumerate() {
            let i = i + 1;
            let name = node_name(i);
            ensure!(status::node_state(&final_status, &name)? == "aborted");
            let error = status::node_error(&final_status, &name)?.unwrap_or_default();
            ensure!(
                error.contains("hash to") && error.contains(&digest),
                "{name}: the error does not name the mismatch: {error}"
            );
            assert_release(cluster, i, "1.0", "1.0")?;
            ensure!(
                release_entries(cluster, i, APP) == ["1.0"],
                "{name}: something is left staged: {:?}",
                release_entries(cluster, i, APP)
            );
            let (version, pid) = services::read_version(*port)?;
            ensure!(
                version == "1.0" && pid == pids[i - 1],
                "{name}: the service changed ({version}, pid {pid}, was {})",
                pids[i - 1]
            );
            // Never in the store; a node that found the mismatch also dropped the download (a
            // node whose download the abort interrupted keeps it to resume, unverified).
            let cas = cluster.agent_info(i).data_dir.join("cas/sha256");
            ensure!(
                !cas.join(hex).exists(),
                "{name}: the damaged bytes are in its content store"
            );
            let log = cluster.agent(i).log_path().to_path_buf();
            if !log_lines(&log, &["artifact does not match its digest", &digest]).is_empty() {
                detected += 1;
                ensure!(
                    !cas.join(format!("{hex}.partial")).exists(),
                    "{name}: found the mismatch but kept the download"
                );
            }
        }
        ensure!(detected > 0, "no node reported the mismatch itself");
        Ok(())
    })
}

/// Every path under `dir` whose file name starts with `prefix`.
fn find_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(path.clone());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(find_named(&path, prefix));
        }
    }
    found
}

/// 4. Tar archives with a `../` entry, an absolute path, or a symlink pointing out of the
///    release: each rollout is refused (aborted before the point of no return) and nothing is
///    written outside the release, nor left staged.
#[test]
fn tar_with_escaping_entries_is_refused() -> anyhow::Result<()> {
    let (options, ports) = fleet(1, no_env)?;
    Cluster::start(1, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        let dir = cluster.dir().join("artifacts");
        let absolute = cluster.dir().join("escape-absolute");
        let absolute_name = absolute.display().to_string();
        let cases: Vec<(&str, Vec<TarEntry>)> = vec![
            (
                "dotdot",
                vec![
                    ("ok.txt", tar::EntryType::Regular, "", b"fine"),
                    ("../../../escape-dotdot", tar::EntryType::Regular, "", b"x"),
                ],
            ),
            (
                "absolute",
                vec![(absolute_name.as_str(), tar::EntryType::Regular, "", b"x")],
            ),
            (
                "symlink",
                vec![
                    ("link", tar::EntryType::Symlink, "../../../..", b""),
                    ("link/escape-symlink", tar::EntryType::Regular, "", b"x"),
                ],
            ),
            (
                "hardlink",
                vec![(
                    "hard",
                    tar::EntryType::Link,
                    "../../../../etc/hostname",
                    b"",
                )],
            ),
        ];
        for (case, entries) in cases {
            let archive = dir.join(format!("{case}.tar"));
            std::fs::create_dir_all(&dir)?;
            raw_tar(&archive, &entries)?;
            let text = script(
                "1.0",
                "2.0",
                &[Artifact::new("static", &archive, "unpack = true")],
                POLICY,
                &[
                    r#"{ load_object_code = ["static"] }"#,
                    r#""point_of_no_return""#,
                    r#"{ load = "version" }"#,
                ],
            );
            let path = cluster.write_script(&format!("{case}.toml"), &text)?;
            let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
            run.ensure_state("aborted")?;
            let error = status::node_error(&run.status, "node-1")?.unwrap_or_default();
            ensure!(
                error.contains("refused") && error.contains("outside the release")
                    || error.contains("could leave the release"),
                "{case}: the error does not say why: {error}"
            );
            assert_release(cluster, 1, "1.0", "1.0")?;
            ensure!(
                release_entries(cluster, 1, APP) == ["1.0"],
                "{case}: left staged: {:?}",
                release_entries(cluster, 1, APP)
            );
        }
        let escaped = find_named(Path::new(cluster.dir()), "escape-");
        ensure!(escaped.is_empty(), "files escaped the release: {escaped:?}");
        ensure!(!absolute.exists());
        wait_serving(ports[0], "1.0", SERVE_TIMEOUT)?;
        Ok(())
    })
}

/// 5. Clients connect continuously while a restart-based `code_change` moves the service from
///    1.0 to 2.0: not one connection is refused (or fails), the clients saw both versions and
///    every one of them reached 2.0, so the loops spanned the change. Then a clean agent shutdown stops the service.
#[test]
fn code_change_by_restart_refuses_no_connection() -> anyhow::Result<()> {
    // Readiness by sd_notify here (READY=1 from the new instance).
    let port = free_port()?;
    let ports = [port];
    let options = ClusterOptions::default().node_agent_toml_extra(
        1,
        &services::version_service_with(SERVICE, APP, port, &[], "\"notify\""),
    );
    Cluster::start(1, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        let text = script(
            "1.0",
            "2.0",
            &[Artifact::new("VERSION", &version_file(cluster, "2.0")?, "")],
            POLICY,
            &hot_upgrade_steps(),
        );
        let path = cluster.write_script("upgrade.toml", &text)?;
        // Four clients at once, so that some connect while no instance accepts.
        let clients: Vec<ClientLoop> = (0..4)
            .map(|_| ClientLoop::start(ports[0], Duration::from_secs(120)))
            .collect();
        wait_serving(ports[0], "1.0", SERVE_TIMEOUT)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        run.ensure_state("succeeded")?;
        // Until every client got an answer from the new release.
        hotroll_tests::poll(
            "every client to reach 2.0",
            SERVE_TIMEOUT,
            Duration::from_millis(20),
            || {
                Ok(clients
                    .iter()
                    .all(|c| c.snapshot().versions.contains_key("2.0"))
                    .then_some(()))
            },
        )?;
        let mut stats = services::LoopStats::default();
        for client in clients {
            stats.merge(client.finish()?);
        }
        services::ensure_no_refusals(&stats)?;
        ensure!(
            stats.versions.get("1.0").copied().unwrap_or(0) > 0
                && stats.versions.get("2.0").copied().unwrap_or(0) > 0,
            "the client loop did not span the change: {stats:?}"
        );
        eprintln!("client loop: {stats:?}");

        // A clean agent shutdown stops the services it supervises, and closes their sockets.
        let (_, pid) = services::read_version(port)?;
        cluster.agent(1).terminate(Duration::from_secs(20))?;
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the service (pid {pid}) outlived its agent's clean shutdown"
        );
        let refused = services::read_version(port).err().is_some_and(|e| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        });
        ensure!(refused, "port {port} still accepts after the agent stopped");
        Ok(())
    })
}

/// Start `nodes` agents whose every connection to the coordinator goes through `proxy`.
fn cluster_behind(proxy: &Proxy, nodes: usize, options: ClusterOptions) -> anyhow::Result<Cluster> {
    let options = options
        .env("HOTROLL_COORDINATOR", &proxy.url())
        .wait_connected(false);
    let cluster = Cluster::start(nodes, options)?;
    proxy.set_upstream_port(cluster.port());
    cluster.wait_all_connected(Duration::from_secs(20))?;
    Ok(cluster)
}

/// 6. An agent is SIGKILLed in the middle of a large artifact transfer (slowed down by a proxy)
///    and restarted: the download resumes at the offset the killed agent reached (the
///    coordinator sends the script again when the node comes back within its grace period), so
///    the bytes fetched the second time are fewer than the artifact's size, and the upgrade
///    completes. The service the killed agent left running is stopped by the new agent before
///    it binds the port again.
#[test]
fn killed_agent_resumes_an_artifact_download() -> anyhow::Result<()> {
    let proxy = Proxy::start()?;
    let (options, ports) = fleet(1, no_env)?;
    let cluster = cluster_behind(&proxy, 1, options)?;
    cluster.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        const SIZE: usize = 24 << 20;
        let blob = cluster.dir().join("artifacts/big.bin");
        services::write_blob(&blob, SIZE, 6)?;
        let digest = digest_of(&blob)?;
        let hex = digest.trim_start_matches("sha256:").to_string();
        let text = script(
            "1.0",
            "2.0",
            &[
                Artifact::new("VERSION", &version_file(cluster, "2.0")?, ""),
                Artifact::new("data/big.bin", &blob, ""),
            ],
            "on_failure = \"rollback_node\"\nstep_timeout = \"20s\"",
            &[
                r#"{ load_object_code = ["VERSION", "data/big.bin"] }"#,
                r#""point_of_no_return""#,
                r#"{ load = "version" }"#,
                r#"{ restart = "version" }"#,
                r#"{ health = { service = "version", timeout = "15s" } }"#,
            ],
        );
        let path = cluster.write_script("upgrade.toml", &text)?;

        proxy.set_rate(3 << 20);
        let first = cluster.start_rollout(&path, &[])?;
        let partial = cluster
            .agent_info(1)
            .data_dir
            .join(format!("cas/sha256/{hex}.partial"));
        let had = hotroll_tests::poll(
            "the download to be well under way",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                let len = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                Ok((len >= 6 << 20).then_some(len))
            },
        )?;
        cluster.agent(1).kill()?;
        let kept = std::fs::metadata(&partial)?.len();
        ensure!(kept >= had && kept < SIZE as u64, "partial file: {kept} bytes");
        proxy.set_rate(0);
        cluster.agent(1).start()?;
        cluster.wait_all_connected(Duration::from_secs(20))?;
        let status = cluster.wait_final(&first, ROLLOUT_TIMEOUT)?;
        if status::rollout_state(&status)? != "succeeded" {
            // The node came back too late for that rollout (it aborted): the next one resumes.
            cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?.ensure_state("succeeded")?;
        }
        wait_serving(ports[0], "2.0", SERVE_TIMEOUT)?;
        let log = cluster.agent(1).log_path().to_path_buf();
        let offset = format!("offset={kept}");
        ensure!(
            !log_lines(&log, &["resuming an interrupted artifact download", &digest, &offset])
                .is_empty(),
            "the restarted agent did not resume at {kept}"
        );
        let fetched = log_lines(&log, &["artifact fetched and verified", &digest]);
        let line = fetched
            .last()
            .with_context(|| format!("no download of {digest} in the agent's log"))?;
        let bytes: u64 = field(line, "bytes_fetched=")?.parse()?;
        let resumed: u64 = field(line, "resumed_at=Some(")?
            .trim_end_matches(')')
            .parse()?;
        ensure!(
            resumed >= kept && bytes < SIZE as u64 && bytes + resumed == SIZE as u64,
            "second download: {bytes} bytes fetched, resumed at {resumed} (kept {kept}), size {SIZE}: {line}"
        );
        eprintln!("resumed at {resumed}: fetched {bytes} of {SIZE} bytes the second time");
        let stale = log_lines(&log, &["stopping the instance a previous agent run left running"]);
        ensure!(!stale.is_empty(), "the restarted agent did not stop the old service instance");
        Ok(())
    })
}

/// The value of a `key=value` field in a log line.
fn field<'a>(line: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let start = line
        .find(key)
        .with_context(|| format!("no `{key}` in {line}"))?
        + key.len();
    Ok(line[start..].split_whitespace().next().unwrap_or_default())
}

/// 7. A service that crashes is restarted by its agent; a release that never becomes ready
///    fails `health` at its timeout (and the node rolls back to 1.0).
#[test]
fn crashed_service_restarts_and_never_ready_fails_health() -> anyhow::Result<()> {
    let (options, ports) = fleet(1, |_| vec![("HANG_VERSION", "2.0")])?;
    Cluster::start(1, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        let (_, pid) = wait_serving(ports[0], "1.0", SERVE_TIMEOUT)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let (_, new_pid) = hotroll_tests::poll(
            "the crashed service to be restarted",
            SERVE_TIMEOUT,
            Duration::from_millis(50),
            || {
                let (version, p) = services::read_version(ports[0])?;
                Ok((p != pid).then_some((version, p)))
            },
        )?;
        ensure!(new_pid != pid);
        let log = cluster.agent(1).log_path().to_path_buf();
        ensure!(
            !log_lines(&log, &["service exited unexpectedly", "SIGKILL"]).is_empty(),
            "the agent did not log the crash"
        );

        let text = script(
            "1.0",
            "2.0",
            &[Artifact::new("VERSION", &version_file(cluster, "2.0")?, "")],
            POLICY,
            &[
                r#"{ load_object_code = ["VERSION"] }"#,
                r#""point_of_no_return""#,
                r#"{ load = "version" }"#,
                r#"{ restart = "version" }"#,
                r#"{ health = { service = "version", timeout = "2s" } }"#,
            ],
        );
        let path = cluster.write_script("hang.toml", &text)?;
        let run = cluster.run_rollout(&path, &[], ROLLOUT_TIMEOUT)?;
        let final_status = settled(cluster, &run)?;
        ensure!(
            status::node_state(&final_status, "node-1")? == "rolled_back",
            "node-1 did not roll back: {final_status:#}"
        );
        let error = status::node_error(&final_status, "node-1")?.unwrap_or_default();
        ensure!(
            error.contains("health")
                && error.contains("did not become ready")
                && error.contains("does not accept connections"),
            "the health failure does not say why: {error}"
        );
        wait_serving(ports[0], "1.0", SERVE_TIMEOUT)?;
        assert_release(cluster, 1, "1.0", "1.0")?;
        Ok(())
    })
}

/// Run `hotroll rollout start SCRIPT --wait` against `url` (a proxy).
fn rollout_via(cluster: &Cluster, url: &str, script: &Path) -> anyhow::Result<String> {
    let mut command = cluster.hotroll_command();
    command
        .args(["rollout", "start"])
        .arg(script)
        .args([
            "--wait",
            "--wait-timeout",
            "90s",
            "--output",
            "json",
            "--coordinator",
            url,
        ])
        .env("NO_COLOR", "1");
    let output = run_command(command, ROLLOUT_TIMEOUT + Duration::from_secs(10))?;
    let json = output.json()?;
    Ok(status::rollout_state(&json)?.to_string())
}

/// 8. The second rollout of the same artifact moves no artifact bytes: the CLI uploads nothing
///    (the coordinator has it) and the agents fetch nothing (their content stores have it),
///    measured on the wire by proxies in front of the coordinator.
#[test]
fn second_rollout_of_the_same_artifact_moves_no_bytes() -> anyhow::Result<()> {
    let agents = Proxy::start()?;
    let cli = Proxy::start()?;
    let (options, ports) = fleet(NODES, no_env)?;
    let options = options.hook("gate", Hook::sh("test -e {node_dir}/open"));
    let cluster = cluster_behind(&agents, NODES, options)?;
    cli.set_upstream_port(cluster.port());
    cluster.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        const SIZE: u64 = 4 << 20;
        let blob = cluster.dir().join("artifacts/blob.bin");
        services::write_blob(&blob, SIZE as usize, 8)?;
        let digest = digest_of(&blob)?;
        let text = script(
            "1.0",
            "2.0",
            &[
                Artifact::new("VERSION", &version_file(cluster, "2.0")?, ""),
                Artifact::new("data/blob.bin", &blob, ""),
            ],
            POLICY,
            &[
                r#"{ load_object_code = ["VERSION", "data/blob.bin"] }"#,
                // Every node has the whole artifact before any gate can abort the rollout.
                r#"{ sync_nodes = "staged" }"#,
                r#"{ check = "gate" }"#,
                r#""point_of_no_return""#,
                r#"{ load = "version" }"#,
                r#"{ restart = "version" }"#,
                r#"{ health = { service = "version", timeout = "15s" } }"#,
            ],
        );
        let path = cluster.write_script("upgrade.toml", &text)?;

        // First rollout: everything moves, then the closed gate aborts it after staging.
        let (up0, down0) = (cli.bytes_to_upstream(), agents.bytes_from_upstream());
        ensure!(rollout_via(cluster, &cli.url(), &path)? == "aborted");
        let uploaded = cli.bytes_to_upstream() - up0;
        let downloaded = agents.bytes_from_upstream() - down0;
        ensure!(
            uploaded >= SIZE && downloaded >= NODES as u64 * SIZE,
            "the first rollout moved {uploaded} bytes up and {downloaded} down"
        );

        // Second rollout of the same artifacts.
        for i in 1..=NODES {
            std::fs::write(cluster.agent_info(i).dir.join("open"), "")?;
        }
        let (up1, down1) = (cli.bytes_to_upstream(), agents.bytes_from_upstream());
        ensure!(rollout_via(cluster, &cli.url(), &path)? == "succeeded");
        let uploaded = cli.bytes_to_upstream() - up1;
        let downloaded = agents.bytes_from_upstream() - down1;
        eprintln!(
            "second rollout: {uploaded} bytes from the CLI to the coordinator, {downloaded} bytes \
             from the coordinator to {NODES} agents (artifact: {SIZE} bytes)"
        );
        ensure!(
            uploaded < (64 << 10) && downloaded < (64 << 10) * NODES as u64,
            "the second rollout moved {uploaded} bytes up and {downloaded} down (artifact {SIZE})"
        );
        for (i, port) in ports.iter().enumerate() {
            wait_serving(*port, "2.0", SERVE_TIMEOUT)?;
            let log = cluster.agent(i + 1).log_path().to_path_buf();
            ensure!(
                !log_lines(&log, &["already in the content store", &digest]).is_empty(),
                "{} fetched the artifact again",
                node_name(i + 1)
            );
        }
        let stored = log_lines(
            cluster.coordinator().log_path(),
            &["artifact stored", &digest],
        );
        ensure!(
            stored.len() == 1,
            "the coordinator stored it {} times",
            stored.len()
        );
        Ok(())
    })
}

/// The other instructions on one node: a first install by `restart_new_emulator` (it stages the
/// release itself), a hot upgrade whose `suspend`/`resume` run the service's declared drain and
/// undrain hooks instead of SIGSTOP/SIGCONT, and a bare `purge` that deletes every release but
/// the current, permanent and new one.
#[test]
fn restart_new_emulator_drain_hooks_and_purge() -> anyhow::Result<()> {
    let port = free_port()?;
    let service = services::version_service(SERVICE, APP, port, &[])
        + "drain = \"drain\"\nundrain = \"undrain\"\n";
    let options = ClusterOptions::default()
        .hook(
            "drain",
            Hook::sh(r#"echo "drain $HOTROLL_SERVICE $HOTROLL_PID" >> "{node_dir}/drain.log""#),
        )
        .hook(
            "undrain",
            Hook::sh(r#"echo "undrain $HOTROLL_SERVICE" >> "{node_dir}/drain.log""#),
        )
        .node_agent_toml_extra(1, &service);
    Cluster::start(1, options)?.run(|cluster| {
        let text = script(
            "none",
            "1.0",
            &[
                binary_artifact(),
                Artifact::new("VERSION", &version_file(cluster, "1.0")?, ""),
            ],
            POLICY,
            &[
                r#""restart_new_emulator""#,
                r#"{ health = { service = "version", timeout = "20s" } }"#,
            ],
        );
        let path = cluster.write_script("install.toml", &text)?;
        cluster
            .run_rollout(&path, &[], ROLLOUT_TIMEOUT)?
            .ensure_state("succeeded")?;
        wait_serving(port, "1.0", SERVE_TIMEOUT)?;
        assert_release(cluster, 1, "1.0", "1.0")?;

        let mut up = hot_upgrade_steps();
        up.push(r#""purge""#);
        let path = cluster.write_script(
            "upgrade-2.0.toml",
            &script(
                "1.0",
                "2.0",
                &[Artifact::new("VERSION", &version_file(cluster, "2.0")?, "")],
                POLICY,
                &up,
            ),
        )?;
        cluster
            .run_rollout(&path, &[], ROLLOUT_TIMEOUT)?
            .ensure_state("succeeded")?;
        wait_serving(port, "2.0", SERVE_TIMEOUT)?;
        let drains = std::fs::read_to_string(cluster.agent_info(1).dir.join("drain.log"))?;
        let lines: Vec<&str> = drains.lines().collect();
        ensure!(
            lines.len() == 2
                && lines[0].starts_with("drain version ")
                && lines[1] == "undrain version",
            "drain hooks ran: {lines:?}"
        );
        // 1.0 is still the rollback target during that rollout, so its purge kept it.
        ensure!(release_entries(cluster, 1, APP) == ["1.0", "2.0"]);

        let path = cluster.write_script(
            "upgrade-3.0.toml",
            &script(
                "2.0",
                "3.0",
                &[Artifact::new("VERSION", &version_file(cluster, "3.0")?, "")],
                POLICY,
                &[
                    r#"{ load_object_code = ["VERSION"] }"#,
                    r#"{ load = "version" }"#,
                    r#"{ restart = "version" }"#,
                    r#""purge""#,
                ],
            ),
        )?;
        cluster
            .run_rollout(&path, &[], ROLLOUT_TIMEOUT)?
            .ensure_state("succeeded")?;
        wait_serving(port, "3.0", SERVE_TIMEOUT)?;
        let releases = release_entries(cluster, 1, APP);
        ensure!(
            releases == ["2.0", "3.0"],
            "purge left {releases:?} (it keeps 2.0, the permanent release, and 3.0)"
        );
        Ok(())
    })
}

/// Every entry under `dir` (relative path; a symlink's target, a file's size and modification
/// time), sorted: what a node's app directory holds, to compare before and after.
fn listing(dir: &Path) -> anyhow::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.display().to_string();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                out.push(format!("{rel} -> {}", std::fs::read_link(&path)?.display()));
            } else if meta.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &path, out)?;
            } else {
                out.push(format!("{rel} {} bytes {:?}", meta.len(), meta.modified()?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Issue 18, test 1: `rollout start --dry-run` over three nodes where node-2's check fails:
/// exit 3, node-2 named with its reason, the two others "would commit"; every node's
/// `current`, `permanent`, running service and release directories exactly as before.
#[test]
fn a_dry_run_prepares_everywhere_changes_nothing_and_names_the_node_that_would_fail()
-> anyhow::Result<()> {
    let (options, ports) = fleet(NODES, no_env)?;
    let options = options.hook("ready", Hook::ok()).node_hook(
        2,
        "ready",
        Hook::sh("echo 'disk too full for 2.0' >&2; exit 1"),
    );
    Cluster::start(NODES, options)?.run(|cluster| {
        install(cluster, &ports, "1.0")?;
        let mut before = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let served = wait_serving(*port, "1.0", SERVE_TIMEOUT)?;
            before.push((listing(&services::app_dir(cluster, i + 1, APP))?, served));
        }
        let text = script(
            "1.0",
            "2.0",
            &[Artifact::new("VERSION", &version_file(cluster, "2.0")?, "")],
            POLICY,
            &[
                r#"{ load_object_code = ["VERSION"] }"#,
                r#"{ check = "ready" }"#,
                r#"{ sync_nodes = "staged" }"#,
                r#""point_of_no_return""#,
                r#"{ load = "version" }"#,
                r#"{ restart = "version" }"#,
            ],
        );
        let path = cluster.write_script("dry.toml", &text)?;
        let path = path.display().to_string();
        let out =
            cluster.hotroll_timeout(&["rollout", "start", &path, "--dry-run"], ROLLOUT_TIMEOUT)?;
        ensure!(
            out.code == Some(3),
            "exit {:?}, expected 3\nstdout: {}\nstderr: {}",
            out.code,
            out.stdout,
            out.stderr
        );
        ensure!(
            out.stdout.contains("node-1: would commit\n")
                && out.stdout.contains("node-3: would commit\n"),
            "{}",
            out.stdout
        );
        let node2 = out
            .stdout
            .lines()
            .find(|l| l.starts_with("node-2: "))
            .with_context(|| format!("no verdict for node-2: {}", out.stdout))?;
        ensure!(
            node2.contains("would not commit") && node2.contains("ready"),
            "node-2's verdict does not name its check: {node2}"
        );
        let id = out
            .stdout
            .lines()
            .next()
            .context("no rollout id")?
            .to_string();
        let status = cluster.hotroll(&["rollout", "status", &id, "--output", "json"])?;
        let status = status.json()?;
        ensure!(
            status["dry_run"] == true,
            "not shown as a dry run: {status:#}"
        );
        ensure!(status::rollout_state(&status)? == "aborted", "{status:#}");
        // The history records it as a dry run, with a verdict per node.
        let events = cluster.hotroll(&["rollout", "events", &id, "--output", "json"])?;
        ensure!(
            events.stdout.contains("dry run: prepare on every node")
                && events.stdout.matches("dry_run_verdict").count() == NODES,
            "{}",
            events.stdout
        );
        // Nothing a service sees changed, nothing is left staged.
        for (i, port) in ports.iter().enumerate() {
            let node = i + 1;
            // The agent discards its staging as it reports `aborted`; allow its last step.
            let _ = hotroll_tests::poll(
                "the app dir to be as before",
                Duration::from_secs(10),
                Duration::from_millis(100),
                || {
                    let now = listing(&services::app_dir(cluster, node, APP))?;
                    Ok((now == before[i].0).then_some(()))
                },
            );
            let after = listing(&services::app_dir(cluster, node, APP))?;
            ensure!(
                after == before[i].0,
                "{}: the app dir changed:\nbefore {:#?}\nafter {after:#?}",
                node_name(node),
                before[i].0
            );
            assert_release(cluster, node, "1.0", "1.0")?;
            let served = services::read_version(*port)?;
            ensure!(
                served == before[i].1,
                "{}: the service changed: {served:?}, was {:?}",
                node_name(node),
                before[i].1
            );
        }
        Ok(())
    })
}
