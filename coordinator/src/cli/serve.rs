//! `hotroll serve`: run the coordinator.

use std::net::SocketAddr;
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
    /// Serve Prometheus metrics (OpenMetrics text) over HTTP on this address, path /metrics:
    /// connected agents, rollouts by state, instruction durations, barrier waits, rollbacks,
    /// artifact bytes sent. Not served unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Events buffered per rollout for live watchers; a watcher that falls further behind is
    /// told to reconnect from its last event (the CLI does so on its own). The rollout never
    /// waits for a watcher.
    #[arg(long, default_value_t = crate::server::DEFAULT_WATCH_BUFFER, value_name = "EVENTS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub watch_buffer: usize,
    /// Log format on stderr: `text` (human-readable; colours on a terminal) or `json` (one
    /// object per line, for log shippers). The level follows RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// `--log-format` of the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Log through `tracing` to stderr in `format`, at the level RUST_LOG says (default: info).
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .flatten_event(true)
            .init(),
    }
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
    config.metrics_listen = args.metrics_listen;
    config.watch_buffer = args.watch_buffer;
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
