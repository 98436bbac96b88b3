//! `hotroll-agent`: the node agent binary. Parses flags, sets up logging and signals, and runs
//! [`hotroll_agent::Agent`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use hotroll_agent::{Agent, Config};

/// hotroll node agent.
///
/// Keeps a session with the hotroll coordinator, runs the upgrade scripts it sends (staging,
/// sync_nodes barriers, the point of no return, rollback) and reports every step. It supervises
/// the services its config declares ([[services]]: releases, held listening sockets, restarts).
/// The only commands it ever runs are the hooks and services declared in its own config file.
///
/// Logging goes to stderr and follows RUST_LOG (default: info), e.g. RUST_LOG=hotroll_agent=debug.
/// SIGTERM or SIGINT shut the agent down cleanly: it says Goodbye to the coordinator, kills any
/// hook it is running and stops its services (stop signal, then SIGKILL after stop_timeout).
#[derive(Debug, Parser)]
#[command(name = "hotroll-agent", version, about, long_about)]
struct Args {
    /// The agent's config file (node name, coordinator address, data_dir, labels, [hooks],
    /// [[services]]).
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/hotroll/agent.toml"
    )]
    config: PathBuf,

    /// Node name, overriding `node` in the config file.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,

    /// Coordinator address (https://host:port), overriding `coordinator` in the config file.
    #[arg(long, value_name = "URL", env = "HOTROLL_COORDINATOR")]
    coordinator: Option<String>,

    /// Join token (`hotroll token create --role agent` on the coordinator): used once, when the
    /// data dir holds no node certificate for this node, to get one. Overrides `join_token`.
    #[arg(
        long = "join",
        value_name = "TOKEN",
        env = "HOTROLL_JOIN_TOKEN",
        hide_env_values = true
    )]
    join: Option<String>,

    /// Talk plaintext http:// to a coordinator started with `serve --insecure` (no TLS, no
    /// node identity). Same as `insecure = true` in the config file.
    #[arg(long)]
    insecure: bool,

    /// Log format on stderr: `text` (human-readable; colours on a terminal) or `json` (one
    /// object per line, for log shippers and the journal).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the error and its causes on one line, for an operator (no backtrace).
            eprintln!("hotroll-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        // Colours only on a terminal: under systemd the journal would store escape codes.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(false)
            .flatten_event(true)
            .init(),
    }

    let mut config = Config::load(&args.config)?;
    config.apply_overrides(args.node, args.coordinator)?;
    config.apply_security_overrides(args.insecure, args.join)?;
    config.check_transport()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        Agent::builder(config).build().run(shutdown).await?;
        Ok(())
    })
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
