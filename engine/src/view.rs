//! What status and watch show about a rollout's nodes and its barrier.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::state::NodeState;

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

/// Per-node snapshot keyed by name, for callers that want lookups.
pub type NodeViews = BTreeMap<String, NodeView>;

/// The barrier currently being waited at, for status and watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierView {
    pub id: String,
    /// `None` before the point of no return (every target takes part), else the 1-based wave.
    pub wave: Option<u32>,
    pub arrived: u32,
    pub expected: u32,
    pub deadline: Millis,
}
