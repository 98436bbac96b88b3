//! `hotroll`: the coordinator daemon and the operator's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hotroll_coordinator::cli::{self, check, demo, nodes, plan, rollout, serve, token};

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
    Serve(serve::ServeArgs),
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
    if let Command::Check(args) = &cli.command {
        return check::run(args);
    }
    if let Command::Plan(command) = &cli.command {
        return match plan::run(command) {
            Ok(()) => ExitCode::from(cli::exit::OK),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(cli::exit::ERROR)
            }
        };
    }
    let local = match &cli.command {
        Command::Token(command) => Some(token::run_token(command)),
        Command::Cert(command) => Some(token::run_cert(command)),
        _ => None,
    };
    if let Some(result) = local {
        return match result {
            Ok(()) => ExitCode::from(cli::exit::OK),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(cli::exit::ERROR)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                serve::init_tracing(args.log_format);
                serve::serve(args).await.map(|()| cli::exit::OK)
            }
            Command::Demo(args) => demo::run_demo(args).await,
            Command::Nodes(args) => nodes::run(args).await.map(|()| cli::exit::OK),
            Command::Rollout(command) => rollout::run(command).await,
            Command::Check(_) | Command::Plan(_) | Command::Token(_) | Command::Cert(_) => {
                Ok(cli::exit::OK)
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::exit::ERROR)
        }
    }
}
