//! `hotroll demo`: a whole local fleet in one process — a coordinator and N agents on 127.0.0.1
//! in a temp dir — running a real rollout of an embedded script while its events stream by.
//!
//! The agents are the real agent library (`hotroll_agent::run`) talking real gRPC to the real
//! coordinator (`server::run`); only the processes are folded into one for convenience.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hotroll_proto::v1 as pb;
use tokio::sync::watch as signal;

use super::client::{CoordinatorArgs, connect, status_error, upload_artifacts};
use super::rollout::print_status;
use super::{Output, watch};
use crate::server::{ServerConfig, run};
use crate::store::RedbStore;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes (agents) in the local fleet.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub nodes: u32,
    /// Keep the fleet's temp dir (stores, journals, hook logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// The embedded upgrade: stage, check, barrier, point of no return, then each wave commits and
/// meets at a second barrier. Hooks record what ran where in `<fleet>/journal.log`.
const DEMO_SCRIPT: &str = r#"# hotroll demo: a canary wave, then the rest, with deadline barriers on both sides of the
# point of no return.
app = "demo"
from = "1.0.0"
to = "2.0.0"
description = "hotroll demo upgrade"

[rollout]
canary = 1
max_in_flight = 0
on_failure = "rollback_node"
barrier_timeout = "10s"
step_timeout = "10s"

[script]
up = [
  { check = "preflight" },
  { apply = { hook = "record", args = ["staged"] } },
  { sync_nodes = "staged" },
  "point_of_no_return",
  { apply = { hook = "record", args = ["switched"] } },
  { sync_nodes = { id = "switched", timeout = "10s" } },
]
down = [ { apply = { hook = "record", args = ["rolled-back"] } } ]
"#;

fn agent_config(dir: &Path, url: &str, index: u32, journal: &Path) -> hotroll_agent::Config {
    let mut config = hotroll_agent::Config::new(
        format!("node-{index}"),
        url.to_string(),
        dir.join(format!("node-{index}")),
    );
    config.labels.insert("role".into(), "demo".into());
    config.labels.insert(
        "zone".into(),
        if index.is_multiple_of(2) { "b" } else { "a" }.to_string(),
    );
    config.hooks.insert(
        "preflight".into(),
        hotroll_agent::HookConfig {
            command: vec!["sh".into(), "-c".into(), "test -w .".into()],
            timeout: Some(Duration::from_secs(5)),
        },
    );
    config.hooks.insert(
        "record".into(),
        hotroll_agent::HookConfig {
            command: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "echo \"$HOTROLL_NODE $1\" >> '{}'",
                    journal.display().to_string().replace('\'', "")
                ),
                "record".into(),
            ],
            timeout: Some(Duration::from_secs(5)),
        },
    );
    config
}

pub async fn run_demo(args: DemoArgs) -> anyhow::Result<u8> {
    let dir = tempfile::Builder::new()
        .prefix("hotroll-demo-")
        .tempdir()
        .context("cannot create a temp dir for the demo fleet")?;
    let root: PathBuf = dir.path().to_path_buf();
    let journal = root.join("journal.log");
    let text = args.output == Output::Text;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = signal::channel(false);
    let store = RedbStore::open(&root.join("coordinator"))?;
    let mut config = ServerConfig::new(root.join("coordinator"));
    config.heartbeat_interval = Duration::from_millis(500);
    let stopped = |mut rx: signal::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let coordinator = tokio::spawn(run(
        listener,
        Arc::new(store),
        config,
        stopped(stop_rx.clone()),
    ));
    let mut agents = Vec::new();
    for i in 1..=args.nodes {
        let config = agent_config(&root, &url, i, &journal);
        agents.push(tokio::spawn(hotroll_agent::run(
            config,
            stopped(stop_rx.clone()),
        )));
    }
    if text {
        println!(
            "local fleet: coordinator at {url}, {} agents in {}",
            args.nodes,
            root.display()
        );
    }

    let result = drive(&url, &root, args.nodes, args.output).await;

    let _ = stop_tx.send(true);
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), coordinator).await;
    if args.keep {
        let kept = dir.keep();
        if text {
            println!("kept the fleet's files in {}", kept.display());
        }
    }
    result
}

async fn drive(url: &str, root: &Path, nodes: u32, output: Output) -> anyhow::Result<u8> {
    let coordinator = CoordinatorArgs {
        coordinator: url.to_string(),
    };
    let mut client = connect(&coordinator).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .nodes;
        if listed.iter().filter(|n| n.connected).count() == nodes as usize {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {nodes} agents connected within 20s",
            listed.iter().filter(|n| n.connected).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let script_path = root.join("demo-upgrade.toml");
    std::fs::write(&script_path, DEMO_SCRIPT)?;
    let parsed = hotroll_script::parse("demo-upgrade.toml", DEMO_SCRIPT)
        .map_err(|d| anyhow::anyhow!("the embedded demo script is invalid:\n{d}"))?;
    let artifacts = upload_artifacts(&mut client, &parsed.script, root).await?;
    let started = client
        .start_rollout(pb::StartRolloutRequest {
            script_name: "demo-upgrade.toml".into(),
            script_source: DEMO_SCRIPT.into(),
            select: Default::default(),
            artifacts,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if output == Output::Text {
        println!(
            "rollout {} of demo 1.0.0 -> 2.0.0 on {}",
            started.rollout_id,
            started.nodes.join(", ")
        );
    }

    // The same view as `hotroll rollout watch`: live on a terminal, one line per event in a
    // pipe, JSON events with --output json.
    let mode = watch::Mode::detect(output);
    let code = watch::watch(
        &mut client,
        &started.rollout_id,
        mode,
        0,
        Some(Duration::from_secs(120)),
    )
    .await?;
    let status = client
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: started.rollout_id,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if output == Output::Text {
        if mode == watch::Mode::Lines {
            // The final status of every node (on a terminal the live view's last frame has it).
            println!();
            print_status(&status, Output::Text)?;
        }
        if let Ok(log) = std::fs::read_to_string(root.join("journal.log")) {
            println!("what the hooks recorded on the nodes:");
            for line in log.lines() {
                println!("  {line}");
            }
        }
    }
    Ok(code)
}
