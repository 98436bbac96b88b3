//! Rollout and node states, and their names.
//!
//! The names here are the single spelling of each state everywhere it is shown or stored:
//! `as_str`/`Display` give it, `FromStr` reads it back, and serde writes the same (checked by
//! the engine's tests).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
    /// Every state, in lifecycle order (e.g. one metric series per state).
    pub const ALL: [RolloutState; 10] = [
        RolloutState::Pending,
        RolloutState::Preparing,
        RolloutState::Committing,
        RolloutState::Paused,
        RolloutState::Succeeded,
        RolloutState::Aborted,
        RolloutState::RolledBack,
        RolloutState::PartiallyRolledBack,
        RolloutState::Halted,
        RolloutState::Failed,
    ];

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

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutState {
    type Err = UnknownState;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| UnknownState::new("rollout", name))
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
    /// Every state, in lifecycle order.
    pub const ALL: [NodeState; 9] = [
        NodeState::Pending,
        NodeState::Preparing,
        NodeState::Prepared,
        NodeState::Committing,
        NodeState::Committed,
        NodeState::Aborted,
        NodeState::RollingBack,
        NodeState::RolledBack,
        NodeState::Failed,
    ];

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

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = UnknownState;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| UnknownState::new("node", name))
    }
}

/// A name that is not one of the states' (see [`RolloutState::as_str`], [`NodeState::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is not a {of} state")]
pub struct UnknownState {
    /// `"rollout"` or `"node"`.
    pub of: &'static str,
    pub name: String,
}

impl UnknownState {
    fn new(of: &'static str, name: &str) -> Self {
        Self {
            of,
            name: name.to_string(),
        }
    }
}
