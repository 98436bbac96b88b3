//! Deadline barriers (`sync_nodes`), keyed by (rollout, epoch, barrier id).

use serde::{Deserialize, Serialize};

use super::Millis;

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
