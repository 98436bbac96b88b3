//! What the coordinator sends a node, in its own terms. The rollout drivers address
//! [`NodeCommand`]s to nodes through the registry, which queues them with the session's
//! heartbeats ([`Outbound`]); the session turns each into a wire message
//! (`convert::coordinator_frame`) only as it writes its stream.
//!
//! A command the same for many nodes (a barrier's release) is one [`NodeCommand`] behind an
//! `Arc`, queued to every one of them, and its wire form is encoded by the first session that
//! writes it and kept in the command ([`WireForm`]) for the others: one encode per fan-out,
//! and no allocation per node (docs/performance.md, "One encode per fan-out").

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::engine::{Command, Millis};
use crate::metrics::Metrics;
use crate::store::ArtifactBinding;

/// One message on a session's outbound queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A rollout's command, shared by every node it says the same to; the probe, when there
    /// is one, measures the fan-out it is part of.
    Rollout(Arc<NodeCommand>, Option<FanoutProbe>),
    /// `next_within_ms`: when the next heartbeat comes at the latest (protocol 2; 0 for 1).
    Heartbeat {
        seq: u64,
        sent_ms: Millis,
        next_within_ms: u64,
    },
}

/// Measures one barrier release's fan-out: from the moment the input that completed the
/// barrier reached the coordinator's rollouts (the last arrival, decoded) to the moment the
/// last release was handed to its node's connection. Every release of the fan-out carries a
/// clone; the session drops it once the message is converted for the wire, so the last drop
/// is the end of the fan-out (a release to a node whose queue refused it drops at once).
#[derive(Clone)]
pub struct FanoutProbe(Arc<FanoutTimer>);

struct FanoutTimer {
    started: Instant,
    /// From `started` to the probe's creation: the driver's queue, the engine and the commit
    /// that made the release durable.
    durable_after: Duration,
    /// The store commit's own share of `durable_after`.
    commit: Duration,
    /// From `started` to the last release queued to its session (set once, after the loop).
    queued_after: OnceLock<Duration>,
    rollout: String,
    barrier: String,
    nodes: usize,
    metrics: Arc<Metrics>,
}

impl FanoutProbe {
    /// `started`: when the last arrival reached the rollouts; `commit`: how long the commit
    /// that made the release durable took (the probe is made right after it).
    pub fn start(
        started: Instant,
        commit: Duration,
        rollout: &str,
        barrier: &str,
        nodes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Arc::new(FanoutTimer {
            started,
            durable_after: started.elapsed(),
            commit,
            queued_after: OnceLock::new(),
            rollout: rollout.to_string(),
            barrier: barrier.to_string(),
            nodes,
            metrics,
        }))
    }
}

impl FanoutProbe {
    /// Every release of the fan-out is on its session's queue.
    pub fn queued(&self) {
        let _ = self.0.queued_after.set(self.0.started.elapsed());
    }
}

impl Drop for FanoutTimer {
    fn drop(&mut self) {
        let took: Duration = self.started.elapsed();
        self.metrics.observe_barrier_fanout(took);
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // One line per barrier instance (not per node): scale-bench reads the `*_us` fields off
        // it (durable, then queued to every session, then the last one taken for the wire).
        tracing::info!(
            rollout = %self.rollout,
            barrier = %self.barrier,
            nodes = self.nodes,
            commit_us = us(self.commit),
            durable_us = us(self.durable_after),
            queued_us = self.queued_after.get().copied().map_or(0, us),
            fanout_us = us(took),
            "barrier release handed to every node's connection"
        );
    }
}

impl std::fmt::Debug for FanoutProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutProbe")
            .field("barrier", &self.0.barrier)
            .finish_non_exhaustive()
    }
}

/// A probe measures a message; it is not part of what the message says.
impl PartialEq for FanoutProbe {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for FanoutProbe {}

/// A rollout's instruction to a node (to several, when it is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommand {
    pub rollout_id: String,
    pub epoch: u64,
    pub order: Order,
    /// Its encoding for the wire, once a session has made it.
    pub wire: WireForm,
}

/// A command's wire form, encoded by the first session that writes the command and read by
/// the others. Opaque here: the coordinator's `convert` makes it (only `proto` and `convert`
/// see the wire types).
///
/// It is a cache, not content: two commands that say the same compare equal whatever their
/// caches hold, and a clone starts empty (a clone may be changed before it is sent).
#[derive(Default)]
pub struct WireForm(OnceLock<Bytes>);

impl WireForm {
    /// The wire form, encoded by `encode` if no session has encoded it yet.
    pub fn get_or_encode(&self, encode: impl FnOnce() -> Bytes) -> Bytes {
        self.0.get_or_init(encode).clone()
    }

    /// Whether a session has encoded it already.
    pub fn is_encoded(&self) -> bool {
        self.0.get().is_some()
    }
}

impl Clone for WireForm {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for WireForm {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for WireForm {}

impl std::fmt::Debug for WireForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_encoded() {
            "WireForm(encoded)"
        } else {
            "WireForm(not yet)"
        })
    }
}

/// What a [`NodeCommand`] tells the node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Shared by every target of the rollout (the script source can be large).
    RunScript(Arc<ScriptToRun>),
    ReleaseBarrier {
        barrier: String,
        ok: bool,
        reason: Option<String>,
    },
    Commit,
    Abort {
        reason: String,
    },
    Rollback {
        reason: String,
    },
    MakePermanent,
}

/// The script a rollout's nodes run, as they are sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptToRun {
    pub script_name: String,
    pub script_source: String,
    pub artifacts: Vec<ArtifactBinding>,
    pub step_timeout_ms: u64,
    pub barrier_timeout_ms: u64,
}

impl NodeCommand {
    /// What an engine command tells its node ([`NodeCommand::addressee`]); `None` for history
    /// records and gates.
    pub fn from_engine(
        rollout_id: &str,
        epoch: u64,
        script: &Arc<ScriptToRun>,
        command: &Command,
    ) -> Option<Self> {
        let order = match command {
            // Records are history; a gate runs on the coordinator.
            Command::Record(_) | Command::RunGate { .. } => return None,
            Command::RunScript { .. } => Order::RunScript(script.clone()),
            Command::ReleaseBarrier {
                barrier,
                ok,
                reason,
                ..
            } => Order::ReleaseBarrier {
                barrier: barrier.clone(),
                ok: *ok,
                reason: reason.clone(),
            },
            Command::Commit { .. } => Order::Commit,
            Command::Abort { reason, .. } => Order::Abort {
                reason: reason.clone(),
            },
            Command::Rollback { reason, .. } => Order::Rollback {
                reason: reason.clone(),
            },
            Command::MakePermanent { .. } => Order::MakePermanent,
        };
        Some(Self {
            rollout_id: rollout_id.to_string(),
            epoch,
            order,
            wire: WireForm::default(),
        })
    }

    /// The node an engine command addresses (`None` for records and gates).
    pub fn addressee(command: &Command) -> Option<&str> {
        match command {
            Command::Record(_) | Command::RunGate { .. } => None,
            Command::RunScript { node }
            | Command::ReleaseBarrier { node, .. }
            | Command::Commit { node }
            | Command::Abort { node, .. }
            | Command::Rollback { node, .. }
            | Command::MakePermanent { node } => Some(node),
        }
    }

    /// Whether this command says to its node what `command` says to its own, in rollout
    /// `rollout_id` at `epoch`: then the two nodes can be sent the same command (and the same
    /// encoding). Compares without building anything.
    pub fn says(&self, rollout_id: &str, epoch: u64, command: &Command) -> bool {
        if self.rollout_id != rollout_id || self.epoch != epoch {
            return false;
        }
        match (&self.order, command) {
            (Order::RunScript(_), Command::RunScript { .. })
            | (Order::Commit, Command::Commit { .. })
            | (Order::MakePermanent, Command::MakePermanent { .. }) => true,
            (
                Order::ReleaseBarrier {
                    barrier,
                    ok,
                    reason,
                },
                Command::ReleaseBarrier {
                    barrier: b,
                    ok: o,
                    reason: r,
                    ..
                },
            ) => barrier == b && ok == o && reason == r,
            (Order::Abort { reason }, Command::Abort { reason: r, .. })
            | (Order::Rollback { reason }, Command::Rollback { reason: r, .. }) => reason == r,
            _ => false,
        }
    }
}
