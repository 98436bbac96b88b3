//! End-to-end harness for hotroll: real `hotroll serve` and `hotroll-agent` processes on
//! 127.0.0.1, each cluster in its own temp dir.
//!
//! ```no_run
//! use std::time::Duration;
//! use hotroll_tests::{Cluster, ClusterOptions, Hook, status};
//!
//! # fn main() -> anyhow::Result<()> {
//! let options = ClusterOptions::default()
//!     .hook("mark", Hook::mark())
//!     .hook("ok", Hook::ok())
//!     .node_hook(2, "ok", Hook::fail()); // only node-2's check fails
//! Cluster::start(3, options)?.run(|cluster| {
//!     let script = cluster.write_script("up.toml", "app = \"demo\"\n...")?;
//!     let run = cluster.run_rollout(&script, &[], Duration::from_secs(60))?;
//!     anyhow::ensure!(status::rollout_state(&run.status)? == "aborted");
//!     anyhow::ensure!(cluster.marks(2)?.is_empty());
//!     Ok(())
//! })
//! # }
//! ```
//!
//! * [`Cluster::start`] picks a free port, starts the coordinator, writes one `agent.toml` per
//!   node (`node-1` ... `node-N`, hooks and labels from [`ClusterOptions`], per node where
//!   wanted), starts the agents and waits until `hotroll nodes` lists all of them connected.
//! * Every process ([`Cluster::coordinator`], [`Cluster::agent`]) can be SIGKILLed, SIGSTOPped,
//!   SIGCONTed, SIGTERMed and restarted ([`Process`]). Its stdout and stderr go to
//!   `<dir>/logs/<name>.log`. When a test fails, the tail of every log is printed: on a panic
//!   by `Drop`, on an `Err` by [`Cluster::run`] (write `Result` tests as
//!   `Cluster::start(..)?.run(|cluster| { .. })`). Dropping the cluster kills and reaps every
//!   process, SIGCONTing stopped ones first.
//! * Client helpers run the `hotroll` CLI against the cluster: [`Cluster::hotroll`],
//!   [`Cluster::start_rollout`], [`Cluster::run_rollout`] (`--wait`), [`Cluster::status`],
//!   [`Cluster::wait_final`]. Everything waits by polling with a deadline ([`poll()`]).
//! * [`Hook::mark`] appends `<label> <unix ns>` to the node's marker file; tests read it back with
//!   [`Cluster::marks`] to check ordering across nodes.
//!
//! # Binaries and the test command
//!
//! The harness builds `hotroll` and `hotroll-agent` itself, once per test process, with
//! `cargo build -p hotroll-cli -p hotroll-agent --bins` in the profile and target dir of
//! the running test (see [`bins`]). So the plain commands work. The README's `tests/run` sets
//! `HOTROLL_NO_BUILD=1` for a whole-suite run instead: building every test target already builds
//! `hotroll`, `hotroll-agent` and `primes` (their packages have integration tests), and one
//! feature set keeps a clean build within a CI machine's disk.
//!
//! ```text
//! cargo test -p hotroll-tests            # or: cargo nextest run -p hotroll-tests
//! tests/run                              # the whole suite, as CI runs it
//! cargo run --release -p hotroll-tests --bin barrier-bench -- --agents 3 --rounds 20
//! cargo run --release -p hotroll-tests --bin artifact-bench -- --agents 3 --size-mib 100
//! ```
//!
//! `HOTROLL_BIN_DIR=DIR` uses prebuilt binaries from `DIR` (nothing is built),
//! `HOTROLL_NO_BUILD=1` skips the build and uses the binaries next to the test executable,
//! `HOTROLL_KEEP_TEMP=1` keeps every cluster's temp dir, `RUST_LOG` is passed to the daemons.

pub mod background;
pub mod bins;
pub mod browser;
pub mod cluster;
pub mod crash;
pub mod erlang;
pub mod etcd;
pub mod golden;
pub mod hooks;
pub mod metrics;
pub mod modules;
pub mod otp_release;
pub mod poll;
pub mod ports;
pub mod primes;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod scale;
pub mod scripts;
pub mod services;
pub mod small_disk;
pub mod status;
pub mod terminal;
pub mod timed;
pub mod tools;

pub use bins::{Binaries, binaries};
pub use cluster::{
    Agent, CLI_TIMEOUT, Cluster, ClusterOptions, CmdOutput, WaitedRollout, free_port, node_name,
    run_command,
};
pub use hooks::{Hook, Mark, read_marks};
pub use poll::poll;
pub use process::Process;
