//! `hotroll serve`: run the coordinator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::server::{ServerConfig, run};
use crate::store::RedbStore;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on for agents and the CLI.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Directory for the coordinator's store and artifacts.
    #[arg(long, default_value = "./hotroll-data")]
    pub data_dir: PathBuf,
    /// Heartbeat interval of agent sessions; three silent intervals end a session.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a node whose session dropped may take to come back during a rollout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub session_grace: Duration,
    /// Time granted over an instruction's own timeout before a silent node counts as failed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub step_slack: Duration,
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    hotroll_script::duration::parse_duration(text).map_err(|e| e.to_string())
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let store = RedbStore::open(&args.data_dir)
        .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?;
    let mut config = ServerConfig::new(args.data_dir.clone());
    config.heartbeat_interval = args.heartbeat_interval;
    config.session_grace = args.session_grace;
    config.step_slack = args.step_slack;
    run(listener, Arc::new(store), config, shutdown_signal()).await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
