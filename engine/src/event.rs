//! The engine's input: what happened.

use serde::{Deserialize, Serialize};

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
        /// What the step did not reach although it names it; recorded as a warning.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
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
    /// How fleet gate `gate` after wave `wave` ended (the caller ran it for
    /// [`crate::Command::RunGate`]); `value` is the last value seen, as text.
    GateResult {
        wave: u32,
        gate: u32,
        passed: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        reason: String,
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
