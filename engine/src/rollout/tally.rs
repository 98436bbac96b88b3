//! Tallies of nodes kept as their states change, so that deciding whether to move on does not
//! scan every node; and summaries of node sets for reasons.

use super::Rollout;
use crate::state::NodeState;

/// Counts of nodes by what [`Rollout::advance`] asks about. `set_node_state`, `start_permanent`
/// and the `Permanent` outcome keep them current; debug builds check them against a recount
/// after every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tally {
    /// Nodes in state `prepared`.
    pub(super) prepared: usize,
    /// Settled nodes per wave (index = wave - 1).
    pub(super) settled_in_wave: Vec<usize>,
    /// Settled nodes in all.
    pub(super) settled: usize,
    /// Nodes told to make the release permanent that are committed and have not confirmed.
    pub(super) awaiting_permanent: usize,
}

impl Rollout {
    /// Node `i` counts in [`Tally::awaiting_permanent`].
    pub(super) fn awaiting_permanent(&self, i: usize) -> bool {
        let t = &self.track[i];
        t.make_permanent_sent && !t.permanent && self.nodes[i].state == NodeState::Committed
    }

    /// Node `i` may have joined or left [`Tally::awaiting_permanent`]; `before` is whether it
    /// was in it.
    pub(super) fn retally_permanent(&mut self, i: usize, before: bool) {
        match (before, self.awaiting_permanent(i)) {
            (false, true) => self.tally.awaiting_permanent += 1,
            (true, false) => {
                self.tally.awaiting_permanent = self.tally.awaiting_permanent.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// A node of `wave` went from `old` to `new`.
    pub(super) fn retally_state(&mut self, old: NodeState, new: NodeState, wave: u32) {
        let t = &mut self.tally;
        if old == NodeState::Prepared {
            t.prepared = t.prepared.saturating_sub(1);
        }
        if new == NodeState::Prepared {
            t.prepared += 1;
        }
        let w = usize::try_from(wave)
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        if old.is_settled() {
            t.settled = t.settled.saturating_sub(1);
            if let Some(n) = t.settled_in_wave.get_mut(w) {
                *n = n.saturating_sub(1);
            }
        }
        if new.is_settled() {
            t.settled += 1;
            if let Some(n) = t.settled_in_wave.get_mut(w) {
                *n += 1;
            }
        }
    }

    /// The tallies counted from scratch (debug builds check the kept ones against this).
    pub(super) fn recount(&self) -> Tally {
        let mut t = Tally {
            settled_in_wave: vec![0; self.waves.len()],
            ..Tally::default()
        };
        for (i, n) in self.nodes.iter().enumerate() {
            if n.state == NodeState::Prepared {
                t.prepared += 1;
            }
            if n.state.is_settled() {
                t.settled += 1;
                let w = usize::try_from(n.wave)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1);
                if let Some(c) = t.settled_in_wave.get_mut(w) {
                    *c += 1;
                }
            }
            if self.awaiting_permanent(i) {
                t.awaiting_permanent += 1;
            }
        }
        t
    }

    /// Every node settled.
    pub(super) fn all_settled(&self) -> bool {
        self.tally.settled == self.nodes.len()
    }

    /// Every node of waves `1..=wave` settled.
    pub(super) fn settled_through(&self, wave: u32) -> bool {
        let upto = usize::try_from(wave).unwrap_or(usize::MAX);
        self.waves
            .iter()
            .zip(&self.tally.settled_in_wave)
            .take(upto)
            .all(|(members, settled)| *settled == members.len())
    }

    pub(super) fn names_list(&self, nodes: &[usize]) -> Vec<String> {
        nodes.iter().map(|&i| self.nodes[i].name.clone()).collect()
    }

    pub(super) fn names(&self, nodes: &[usize]) -> String {
        self.names_list(nodes).join(", ")
    }
}
