//! The hotroll coordinator: holds the fleet's rollouts.
//!
//! * [`engine`]: the rollout state machine (pure, no I/O), re-exported from `hotroll-engine`.
//! * [`rollouts`]: one task per rollout that drives its engine, persists, and sends commands.
//! * [`session`]: the `Agent` gRPC service (node sessions, artifact download).
//! * [`control`]: the `Control` gRPC service (what the CLI calls).
//! * [`registry`], [`store`], [`artifacts`]: nodes, durable state, content store.
//! * [`outbound`]: what the coordinator sends a node, before it becomes a wire message.
//! * [`metrics`]: Prometheus metrics and their `/metrics` endpoint.
//! * [`tls`], [`auth`]: the CA, TLS on the listener, who may call what, limits.
//! * [`accepted`]: the socket options every accepted connection gets.
//! * [`server::run`]: the daemon's one entry point; [`group::run`] runs it in a group of
//!   coordinators on etcd (standby until elected, fenced leader until deposed); [`standby`]
//!   is what a standby answers, [`replication`] the leader's copying of artifacts to it.

pub mod accepted;
pub mod artifacts;
pub mod auth;
pub mod console;
pub mod control;
pub mod convert;
pub mod group;
pub mod liveness;
pub mod metrics;
pub mod releases;
pub mod replication;
pub mod server;
pub mod session;
pub mod standby;
pub mod stopping;
pub mod throttle;
pub mod tls;

pub use server::{ServerConfig, run, serve};

/// The rollout state machine lives in its own crate (so it cannot do I/O or see wire types);
/// re-exported so `crate::engine::..` paths stay as they were.
pub use hotroll_engine as engine;
/// Metric gates (`hotroll-gate`): [`gate::Prometheus`] is what `ServerConfig::prometheus` takes.
pub use hotroll_gate as gate;
// The domain side lives in its own crate (no wire types there); the same paths as before.
pub use hotroll_rollouts::{outbound, registry, rollouts, store};
