//! Deadline barriers (`sync_nodes`), keyed by (rollout, epoch, barrier id[, wave]).
//!
//! One [`Rollout`](super::Rollout) is one (rollout, epoch): events of another epoch never reach
//! its barriers. Inside it an instance is keyed by the barrier id and, for a barrier after the
//! point of no return that names no members, the wave. An instance is created by its first
//! arrival and is never reopened once released or failed, so an arrival for an instance that is
//! already over (a repeat, or a node of a wave whose instance released) never satisfies a later
//! one.

use std::collections::BTreeSet;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Open,
    Released,
    Failed,
}

/// One barrier instance. Nodes are indexes into the rollout's node list.
#[derive(Debug, Clone)]
pub(super) struct Instance {
    pub id: String,
    /// `Some(wave)` for a wave-scoped barrier after the point of no return.
    pub wave: Option<u32>,
    /// The nodes the barrier waits for; a participant that fails leaves it.
    pub participants: BTreeSet<usize>,
    /// Every node waiting at the barrier. May include non-participants (a target that is not a
    /// named member still waits for the members, like OTP's `sync_nodes`).
    pub arrived: BTreeSet<usize>,
    /// First arrival plus the barrier's timeout.
    pub deadline: Millis,
    /// Sequence number of the latest arrival: the most recent open instance is "the" barrier.
    pub last_arrival: u64,
    pub status: Status,
}

impl Instance {
    pub fn is_open(&self) -> bool {
        self.status == Status::Open
    }

    /// Participants that have arrived.
    pub fn arrived_count(&self) -> u32 {
        count(self.participants.intersection(&self.arrived).count())
    }

    pub fn expected_count(&self) -> u32 {
        count(self.participants.len())
    }

    /// Participants that have not arrived, in node order.
    pub fn missing(&self) -> Vec<usize> {
        self.participants
            .difference(&self.arrived)
            .copied()
            .collect()
    }

    /// Every remaining participant is here.
    pub fn complete(&self) -> bool {
        self.participants.is_subset(&self.arrived)
    }

    pub fn view(&self) -> BarrierView {
        BarrierView {
            id: self.id.clone(),
            wave: self.wave,
            arrived: self.arrived_count(),
            expected: self.expected_count(),
            deadline: self.deadline,
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
