//! Rollout and node states as the coordinator reports them (wire enums as `i32`): their names,
//! which are final, and the exit code `--wait` gives for each. The names and finality are the
//! engine's ([`hotroll_coordinator::engine`]); this file only maps them to exit codes.

use hotroll_coordinator::convert::{node_state_name_from_wire, rollout_state_from_wire};
use hotroll_coordinator::engine::RolloutState;

use crate::exit;

pub fn rollout_state_name(state: i32) -> &'static str {
    rollout_state_from_wire(state).map_or("unknown", RolloutState::as_str)
}

pub fn node_state_name(state: i32) -> &'static str {
    node_state_name_from_wire(state).unwrap_or("unknown")
}

/// Whether a rollout state is final.
pub fn is_final(state: i32) -> bool {
    rollout_state_from_wire(state).is_some_and(RolloutState::is_final)
}

/// The exit code `--wait` gives for a final state.
pub fn wait_exit_code(state: i32) -> u8 {
    match rollout_state_from_wire(state) {
        Some(RolloutState::Succeeded) => exit::OK,
        Some(
            RolloutState::Aborted
            | RolloutState::RolledBack
            | RolloutState::PartiallyRolledBack
            | RolloutState::Halted,
        ) => exit::NOT_SUCCEEDED,
        _ => exit::ERROR,
    }
}
