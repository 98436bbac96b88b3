//! One barrier instance (`sync_nodes`), keyed by (rollout, epoch, barrier id[, wave]).
//!
//! One [`Rollout`](crate::Rollout) is one (rollout, epoch): events of another epoch never reach
//! its barriers. Inside it an instance is keyed by the barrier id and, for a barrier after the
//! point of no return that names no members, the wave. An instance is created by its first
//! arrival and is never reopened once released or failed, so an arrival for an instance that is
//! already over (a repeat, or a node of a wave whose instance released) never satisfies a later
//! one.

use std::collections::BTreeSet;

use crate::Millis;
use crate::view::BarrierView;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::rollout) enum Status {
    Open,
    Released,
    Failed,
}

/// One barrier instance. Nodes are indexes into the rollout's node list.
///
/// `participants` and `arrived` change only through [`Instance::arrive`] and
/// [`Instance::leave`], which keep the number of participants that arrived up to date: an
/// arrival is O(log n) however many nodes take part, not a set intersection.
#[derive(Debug, Clone)]
pub(in crate::rollout) struct Instance {
    pub id: String,
    /// `Some(wave)` for a wave-scoped barrier after the point of no return.
    pub wave: Option<u32>,
    /// The nodes the barrier waits for; a participant that fails leaves it.
    participants: BTreeSet<usize>,
    /// Every node waiting at the barrier. May include non-participants (a target that is not a
    /// named member still waits for the members, like OTP's `sync_nodes`).
    arrived: BTreeSet<usize>,
    /// `|participants ∩ arrived|`.
    arrived_participants: usize,
    /// First arrival plus the barrier's timeout.
    pub deadline: Millis,
    /// Sequence number of the latest arrival: the most recent open instance is "the" barrier.
    pub last_arrival: u64,
    pub status: Status,
}

impl Instance {
    /// An open instance waiting for `participants`, nobody arrived yet.
    pub fn new(
        id: String,
        wave: Option<u32>,
        participants: BTreeSet<usize>,
        deadline: Millis,
    ) -> Self {
        Self {
            id,
            wave,
            participants,
            arrived: BTreeSet::new(),
            arrived_participants: 0,
            deadline,
            last_arrival: 0,
            status: Status::Open,
        }
    }

    pub fn is_open(&self) -> bool {
        self.status == Status::Open
    }

    /// Every node waiting at the barrier, in node order.
    pub fn arrived(&self) -> &BTreeSet<usize> {
        &self.arrived
    }

    pub fn has_arrived(&self, node: usize) -> bool {
        self.arrived.contains(&node)
    }

    /// `node` arrives (a repeat changes nothing).
    pub fn arrive(&mut self, node: usize) {
        if self.arrived.insert(node) && self.participants.contains(&node) {
            self.arrived_participants += 1;
        }
    }

    /// `node` leaves the barrier (it failed): it is neither waited for nor waiting any more.
    /// Returns whether it was either.
    pub fn leave(&mut self, node: usize) -> bool {
        let participant = self.participants.remove(&node);
        let arrived = self.arrived.remove(&node);
        if participant && arrived {
            self.arrived_participants -= 1;
        }
        participant || arrived
    }

    /// Participants that have arrived.
    pub fn arrived_count(&self) -> u32 {
        count(self.arrived_participants)
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
        self.arrived_participants == self.participants.len()
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
