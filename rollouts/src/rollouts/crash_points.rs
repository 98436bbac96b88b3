//! The fault points of the crash-safety tests (`HOTROLL_FAULT_FILE`): names for the history
//! records and node commands a test can make the coordinator die at.

use crate::engine::{Command, Record, StepPhase};

/// The fault point of a history record: `step <node> <step> <phase>`, `node <node> <state>`,
/// `rollout <state>`.
pub(super) fn record_point(record: &Record) -> Option<String> {
    Some(match record {
        Record::Step {
            node, step, phase, ..
        } => {
            let phase = match phase {
                StepPhase::Started => "started",
                StepPhase::Succeeded => "succeeded",
                StepPhase::Failed => "failed",
            };
            format!("step {node} {step} {phase}")
        }
        Record::NodeState { node, state, .. } => format!("node {node} {}", state.as_str()),
        Record::RolloutState { state, .. } => format!("rollout {}", state.as_str()),
        _ => return None,
    })
}

/// The fault point of a command to a node: `command <kind> <node>`.
pub(super) fn command_point(command: &Command) -> Option<String> {
    let (kind, node) = match command {
        Command::RunScript { node } => ("run_script", node),
        Command::ReleaseBarrier { node, .. } => ("release_barrier", node),
        Command::Commit { node } => ("commit", node),
        Command::Abort { node, .. } => ("abort", node),
        Command::Rollback { node, .. } => ("rollback", node),
        Command::MakePermanent { node } => ("make_permanent", node),
        Command::Record(_) | Command::RunGate { .. } => return None,
    };
    Some(format!("command {kind} {node}"))
}
