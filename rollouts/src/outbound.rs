//! What the coordinator sends a node, in its own terms. The rollout drivers address
//! [`NodeCommand`]s to nodes through the registry, which queues them with the session's
//! heartbeats ([`Outbound`]); the session turns each into a wire message
//! (`convert::coordinator_message`) only as it writes its stream.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::engine::{Command, Millis};
use crate::metrics::Metrics;
use crate::store::ArtifactBinding;

/// One message on a session's outbound queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A rollout's command; the probe, when there is one, measures the fan-out it is part of.
    Rollout(NodeCommand, Option<FanoutProbe>),
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

/// A rollout's instruction to one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommand {
    pub rollout_id: String,
    pub epoch: u64,
    pub order: Order,
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
    /// The node an engine command addresses and what it is told; `None` for history records.
    pub fn from_engine(
        rollout_id: &str,
        epoch: u64,
        script: &Arc<ScriptToRun>,
        command: &Command,
    ) -> Option<(String, Self)> {
        let (node, order) = match command {
            // Records are history; a gate runs on the coordinator.
            Command::Record(_) | Command::RunGate { .. } => return None,
            Command::RunScript { node } => (node, Order::RunScript(script.clone())),
            Command::ReleaseBarrier {
                node,
                barrier,
                ok,
                reason,
            } => (
                node,
                Order::ReleaseBarrier {
                    barrier: barrier.clone(),
                    ok: *ok,
                    reason: reason.clone(),
                },
            ),
            Command::Commit { node } => (node, Order::Commit),
            Command::Abort { node, reason } => (
                node,
                Order::Abort {
                    reason: reason.clone(),
                },
            ),
            Command::Rollback { node, reason } => (
                node,
                Order::Rollback {
                    reason: reason.clone(),
                },
            ),
            Command::MakePermanent { node } => (node, Order::MakePermanent),
        };
        Some((
            node.clone(),
            Self {
                rollout_id: rollout_id.to_string(),
                epoch,
                order,
            },
        ))
    }
}
