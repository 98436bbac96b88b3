//! What a rollout is, fixed when it is created.

use std::collections::BTreeMap;
use std::time::Duration;

use hotroll_script::{BarrierSpec, RolloutPolicy};
use serde::{Deserialize, Serialize};

/// Everything the engine needs to know about a rollout, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub id: String,
    pub app: String,
    pub from: String,
    pub to: String,
    /// Target nodes; [`hotroll_script::plan_waves`] forms the waves from them (in this order)
    /// and their labels.
    pub targets: Vec<String>,
    /// The targets' labels when the rollout started (what `waves_by` groups by).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: TargetLabels,
    /// A dry run: the whole prepare phase, then an abort everywhere instead of the first
    /// commit, and a verdict per node ([`crate::Record::DryRunVerdict`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
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
    /// Nodes that matched the selection but are not targets, and why (the operator's
    /// `--skip-unreachable`). Named in the rollout's first history record and in its status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<LeftOut>,
}

/// Each target's labels, by name.
pub type TargetLabels = BTreeMap<String, BTreeMap<String, String>>;

/// A node a rollout left out on the operator's word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOut {
    pub node: String,
    pub reason: String,
}

impl RolloutSpec {
    /// `left out: node-4 (not connected when the rollout started), …`, or `None`.
    pub fn left_out_summary(&self) -> Option<String> {
        if self.left_out.is_empty() {
            return None;
        }
        let nodes: Vec<String> = self
            .left_out
            .iter()
            .map(|l| format!("{} ({})", l.node, l.reason))
            .collect();
        Some(format!("left out: {}", nodes.join(", ")))
    }
}
