//! The engine's output: what the caller must send, and what it must append to the history.

use serde::{Deserialize, Serialize};

use crate::state::{NodeState, RolloutState};

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
    /// Run fleet gate `gate` (its index in `[[rollout.gates]]`, named `name`) now that wave
    /// `wave` committed; the caller answers with [`crate::Event::GateResult`].
    RunGate {
        wave: u32,
        gate: u32,
        name: String,
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
        /// On `succeeded`: what the step did not reach although it names it (a code_change
        /// that reached no process). The step still succeeded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
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
    /// How a dry run ended for one node, recorded just before its final state.
    DryRunVerdict {
        node: String,
        would_commit: bool,
        /// Why not, when it would not.
        reason: Option<String>,
    },
    Operator {
        action: String,
        reason: Option<String>,
    },
    /// A fleet gate after wave `wave`: started (reason = what it checks), passed or failed
    /// (value = the last value seen, reason = why).
    Gate {
        wave: u32,
        name: String,
        phase: GatePhase,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatePhase {
    Started,
    Passed,
    Failed,
}

impl GatePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            GatePhase::Started => "started",
            GatePhase::Passed => "passed",
            GatePhase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepPhase {
    Started,
    Succeeded,
    Failed,
}
