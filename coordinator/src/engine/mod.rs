//! The rollout engine: a pure state machine `(state, event) -> (state, commands)` implementing
//! DESIGN §4. It does no I/O and reads no clock: the caller passes `now` with every event, sends
//! the returned commands, appends the returned records to the store, and calls
//! [`Rollout::handle`] with [`Event::Tick`] at [`Rollout::next_deadline`].
//!
//! The transitions, and the choices the design leaves open (barrier deadline counted from the
//! first arrival, what a lost or silent node becomes, which final state a mix of outcomes gives),
//! are documented in `machine.rs`; barrier keying in `barrier.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use hotroll_script::{BarrierSpec, RolloutPolicy};
use serde::{Deserialize, Serialize};

mod barrier;
mod machine;
#[cfg(test)]
mod tests;

pub use barrier::BarrierView;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Everything the engine needs to know about a rollout, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub id: String,
    pub app: String,
    pub from: String,
    pub to: String,
    /// Target nodes in wave order: the first `canary` form the canary wave, and so on.
    pub targets: Vec<String>,
    #[serde(skip, default)]
    pub policy: RolloutPolicy,
    #[serde(skip, default)]
    pub barriers: Vec<BarrierSpec>,
    /// Number of instructions in `up`.
    pub steps_total: u32,
    /// Index in `up` of the first instruction that runs only after Commit.
    pub first_commit_step: u32,
    /// Deadline of each instruction of `up` (barrier timeout for `sync_nodes`), by index. The
    /// engine fails a node whose step runs past its deadline plus `step_slack`.
    #[serde(skip, default)]
    pub step_deadlines: Vec<Duration>,
    /// How long a node whose session dropped may take to come back before it counts as failed.
    #[serde(skip, default)]
    pub session_grace: Duration,
    /// Extra time granted over an instruction's own deadline before the coordinator gives up on
    /// a node that does not report (the agent enforces the deadline itself).
    #[serde(skip, default)]
    pub step_slack: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Pending,
    Preparing,
    Committing,
    Paused,
    Succeeded,
    Aborted,
    RolledBack,
    PartiallyRolledBack,
    Halted,
    Failed,
}

impl RolloutState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Aborted
                | RolloutState::RolledBack
                | RolloutState::PartiallyRolledBack
                | RolloutState::Halted
                | RolloutState::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Pending => "pending",
            RolloutState::Preparing => "preparing",
            RolloutState::Committing => "committing",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Aborted => "aborted",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::PartiallyRolledBack => "partially_rolled_back",
            RolloutState::Halted => "halted",
            RolloutState::Failed => "failed",
        }
    }
}

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
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Preparing => "preparing",
            NodeState::Prepared => "prepared",
            NodeState::Committing => "committing",
            NodeState::Committed => "committed",
            NodeState::Aborted => "aborted",
            NodeState::RollingBack => "rolling_back",
            NodeState::RolledBack => "rolled_back",
            NodeState::Failed => "failed",
        }
    }

    /// The node will not change again in this rollout (before make-permanent).
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            NodeState::Committed | NodeState::Aborted | NodeState::RolledBack | NodeState::Failed
        )
    }
}

/// How a node says it ended (agent `NodeOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Ran the whole `up` list.
    Committed,
    /// Discarded what it staged (before the point of no return).
    Aborted,
    /// Rolling back now (after the point of no return), e.g. its own step failed.
    RollingBack,
    /// Finished rolling back to the permanent release.
    RolledBack,
    /// Could not even roll back, or refused the script.
    Failed,
    /// Made the new release permanent.
    Permanent,
}

/// What happened, as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// The rollout was just created: send the script to every target.
    Start,
    ScriptAccepted {
        node: String,
        epoch: u64,
    },
    ScriptRefused {
        node: String,
        epoch: u64,
        errors: Vec<String>,
    },
    StepStarted {
        node: String,
        epoch: u64,
        step: u32,
    },
    StepSucceeded {
        node: String,
        epoch: u64,
        step: u32,
        /// How long the instruction ran, as the agent measured it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    /// An instruction of `up` failed on the node. The node reports its outcome separately.
    StepFailed {
        node: String,
        epoch: u64,
        step: u32,
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    BarrierArrived {
        node: String,
        epoch: u64,
        barrier: String,
    },
    Prepared {
        node: String,
        epoch: u64,
    },
    Outcome {
        node: String,
        epoch: u64,
        outcome: Outcome,
        error: Option<String>,
    },
    /// The node's session dropped without Goodbye (or with it: the node is leaving).
    SessionLost {
        node: String,
    },
    /// The node is connected again.
    SessionRestored {
        node: String,
    },
    /// Time passed: check deadlines.
    Tick,
    OperatorAbort {
        reason: String,
    },
    OperatorPause,
    OperatorResume,
    OperatorPromote,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    RunScript {
        node: String,
    },
    ReleaseBarrier {
        node: String,
        barrier: String,
        ok: bool,
        reason: Option<String>,
    },
    Commit {
        node: String,
    },
    Abort {
        node: String,
        reason: String,
    },
    Rollback {
        node: String,
        reason: String,
    },
    MakePermanent {
        node: String,
    },
    /// Append to the rollout's history (what `watch` and `events` show).
    Record(Record),
}

/// One entry of a rollout's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Record {
    RolloutState {
        state: RolloutState,
        reason: Option<String>,
    },
    NodeState {
        node: String,
        state: NodeState,
        error: Option<String>,
    },
    Step {
        node: String,
        step: u32,
        phase: StepPhase,
        error: Option<String>,
        /// How long the instruction ran (the agent's measure), on `succeeded` and `failed`.
        /// Absent in histories written before it was recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    BarrierArrived {
        node: String,
        barrier: String,
        arrived: u32,
        expected: u32,
    },
    BarrierReleased {
        barrier: String,
        wave: Option<u32>,
    },
    BarrierFailed {
        barrier: String,
        wave: Option<u32>,
        reason: String,
    },
    WaveStarted {
        wave: u32,
        nodes: Vec<String>,
    },
    Operator {
        action: String,
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepPhase {
    Started,
    Succeeded,
    Failed,
}

/// An operator command that does not apply in the rollout's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} rollout in state {state}: {why}")]
pub struct NotApplicable {
    pub action: &'static str,
    pub state: &'static str,
    pub why: &'static str,
}

/// What status and watch show about one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    /// 1-based.
    pub wave: u32,
    pub state: NodeState,
    /// Index of the current or last instruction of `up`; `None` before the first.
    pub step: Option<u32>,
    pub step_started: Option<Millis>,
    pub error: Option<String>,
    pub connected: bool,
}

pub use machine::Rollout;

/// Per-node snapshot keyed by name, for callers that want lookups.
pub type NodeViews = BTreeMap<String, NodeView>;
