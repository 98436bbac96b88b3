//! The `hotroll` command line. Each subcommand is a module with its clap arguments and an
//! `async fn run(args) -> anyhow::Result<u8>` returning the process exit code (see [`exit`]);
//! `main` only parses and dispatches, and turns an `Err` into exit 1 in one place.

pub mod check;
pub mod client;
pub mod demo;
pub mod nodes;
pub mod nodes_file;
pub mod otp;
pub mod plan;
pub mod plan_node;
pub mod plan_release;
pub mod rollout;
pub mod serve;
pub mod states;
pub mod token;
pub mod watch;

/// Exit codes shared by every client command.
pub mod exit {
    /// Success; for `--wait`: the rollout succeeded.
    pub const OK: u8 = 0;
    /// Any error (unreachable coordinator, unreadable file, refused request).
    pub const ERROR: u8 = 1;
    /// The script is invalid.
    pub const INVALID: u8 = 2;
    /// `--wait`: the rollout ended aborted, rolled back, partially rolled back or halted.
    pub const NOT_SUCCEEDED: u8 = 3;
}

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Human-readable text (tables).
    #[default]
    Text,
    /// JSON (one document, or one event per line for streams).
    Json,
}
