//! What the agent tells the coordinator, as the agent's own types. `wire` converts them to the
//! protobuf messages at the edge of the gRPC code (docs/design.md §6).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where a node stands in one rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Pending,
    Preparing,
    Prepared,
    Committing,
    Committed,
    Aborted,
    RollingBack,
    RolledBack,
    Failed,
    Permanent,
}

impl NodeState {
    /// A state after which this rollout runs nothing more on the node.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            NodeState::Aborted | NodeState::RolledBack | NodeState::Failed | NodeState::Permanent
        )
    }
}

/// The journal's coarse phase of a rollout on this node (recovery decides by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    Prepared,
    Committing,
    RollingBack,
    Done,
}

/// Which instruction list a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepList {
    Up,
    Down,
}

impl StepList {
    /// The value of `HOTROLL_PHASE` for hooks.
    pub fn as_str(self) -> &'static str {
        match self {
            StepList::Up => "up",
            StepList::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    Started,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub rollout_id: String,
    pub epoch: u64,
    pub step: u32,
    pub list: StepList,
    pub instruction: String,
    pub phase: StepPhase,
    pub duration: Duration,
    pub error: String,
    pub output: String,
    /// The step succeeded without doing all it names (see `StepOutput::warnings`).
    pub warnings: Vec<String>,
    pub at_unix_ms: u64,
}

/// One message from the agent about a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    ScriptAccepted {
        rollout_id: String,
        epoch: u64,
    },
    ScriptRefused {
        rollout_id: String,
        epoch: u64,
        errors: Vec<String>,
    },
    Step(StepReport),
    BarrierArrive {
        rollout_id: String,
        epoch: u64,
        barrier_id: String,
        step: u32,
    },
    Prepared {
        rollout_id: String,
        epoch: u64,
    },
    Outcome {
        rollout_id: String,
        epoch: u64,
        state: NodeState,
        error: String,
        step: u32,
        /// The node's apps after this change; empty = unchanged.
        apps: Vec<AppStatus>,
    },
}

impl Report {
    /// Reports that may be dropped first when the outbox overflows during a long disconnect:
    /// they describe progress, and the states that matter are re-sent or reported again.
    pub fn is_progress(&self) -> bool {
        matches!(self, Report::Step(_))
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An app and its releases on this node, for Hello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppStatus {
    pub app: String,
    /// Version `current` names; empty when the node never had the app.
    pub current: String,
    pub permanent: String,
    /// An OTP release node: what `release_handler:which_releases/0` last answered; empty for
    /// other apps.
    pub releases: Vec<ReleaseStatus>,
}

/// One release an OTP node's release handler knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseStatus {
    pub name: String,
    pub version: String,
    /// `current`, `permanent`, `unpacked` or `old`.
    pub status: String,
}
