//! Rollout and node states as the coordinator reports them (wire enums as `i32`): their names,
//! which are final, and the exit code `--wait` gives for each.

use hotroll_proto::v1 as pb;

use crate::exit;

pub fn rollout_state_name(state: i32) -> &'static str {
    match pb::RolloutState::try_from(state).unwrap_or(pb::RolloutState::Unspecified) {
        pb::RolloutState::Unspecified => "unknown",
        pb::RolloutState::Pending => "pending",
        pb::RolloutState::Preparing => "preparing",
        pb::RolloutState::Committing => "committing",
        pb::RolloutState::Paused => "paused",
        pb::RolloutState::Succeeded => "succeeded",
        pb::RolloutState::Aborted => "aborted",
        pb::RolloutState::RolledBack => "rolled_back",
        pb::RolloutState::PartiallyRolledBack => "partially_rolled_back",
        pb::RolloutState::Halted => "halted",
        pb::RolloutState::Failed => "failed",
    }
}

pub fn node_state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state).unwrap_or(pb::NodeState::Unspecified) {
        pb::NodeState::Unspecified => "unknown",
        pb::NodeState::Pending => "pending",
        pb::NodeState::Preparing => "preparing",
        pb::NodeState::Prepared => "prepared",
        pb::NodeState::Committing => "committing",
        pb::NodeState::Committed => "committed",
        pb::NodeState::Aborted => "aborted",
        pb::NodeState::RollingBack => "rolling_back",
        pb::NodeState::RolledBack => "rolled_back",
        pb::NodeState::Failed => "failed",
        pb::NodeState::Permanent => "permanent",
    }
}

/// Whether a rollout state is final.
pub fn is_final(state: i32) -> bool {
    matches!(
        rollout_state_name(state),
        "succeeded" | "aborted" | "rolled_back" | "partially_rolled_back" | "halted" | "failed"
    )
}

/// The exit code `--wait` gives for a final state.
pub fn wait_exit_code(state: i32) -> u8 {
    match rollout_state_name(state) {
        "succeeded" => exit::OK,
        "aborted" | "rolled_back" | "partially_rolled_back" | "halted" => exit::NOT_SUCCEEDED,
        _ => exit::ERROR,
    }
}
