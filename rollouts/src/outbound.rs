//! What the coordinator sends a node, in its own terms. The rollout drivers address
//! [`NodeCommand`]s to nodes through the registry, which queues them with the session's
//! heartbeats ([`Outbound`]); the session turns each into a wire message
//! (`convert::coordinator_message`) only as it writes its stream.

use std::sync::Arc;

use crate::engine::{Command, Millis};
use crate::store::ArtifactBinding;

/// One message on a session's outbound queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Rollout(NodeCommand),
    Heartbeat { seq: u64, sent_ms: Millis },
}

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
            Command::Record(_) => return None,
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
