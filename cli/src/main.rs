//! `hotroll`: the coordinator daemon and the operator's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hotroll_cli::{check, demo, nodes, plan, rollout, serve, token};

/// hotroll coordinates upgrades across a fleet: it pushes upgrade scripts to the agents, holds
/// them at sync_nodes barriers and at the point of no return until the fleet is ready, and rolls
/// back any node that fails.
#[derive(Debug, Parser)]
#[command(name = "hotroll", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole local fleet (a coordinator and N agents on 127.0.0.1, in a temp dir) and
    /// perform a real rollout on it, streaming its events.
    Demo(demo::DemoArgs),
    /// Run the coordinator.
    Serve(Box<serve::ServeArgs>),
    /// Validate an upgrade script and print its plan (exit 0 valid, 2 invalid, 1 unreadable).
    Check(check::CheckArgs),
    /// List the nodes the coordinator knows, connected or not.
    Nodes(nodes::NodesArgs),
    /// Start, inspect and steer rollouts.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Write an upgrade script from two builds (`plan beam --from OLD_EBIN --to NEW_EBIN`).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Create, list and revoke join and CLI tokens (run on the coordinator's machine: reads and
    /// writes its data dir; no running server needed).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Issue client certificates for the CLI (run on the coordinator's machine).
    #[command(subcommand)]
    Cert(token::CertCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return failed(&anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    // Every subcommand has the same shape: `async fn run(args) -> anyhow::Result<exit code>`.
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Serve(args) => serve::run(*args).await,
            Command::Check(args) => check::run(args).await,
            Command::Nodes(args) => nodes::run(args).await,
            Command::Rollout(command) => rollout::run(command).await,
            Command::Plan(command) => plan::run(command).await,
            Command::Token(command) => token::run_token(command).await,
            Command::Cert(command) => token::run_cert(command).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => failed(&e),
    }
}

/// The one error-to-exit-code path: the error and its causes on one line, exit 1.
fn failed(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::from(hotroll_cli::exit::ERROR)
}
