//! Node sessions dropping and coming back: a lost node has the grace period to return; a node
//! that returns hears again what it was told while away.

use super::{Rollout, Told, ms};
use crate::Millis;
use crate::command::Command;
use crate::state::NodeState;

impl Rollout {
    pub(super) fn session_lost(&mut self, now: Millis, i: usize) {
        if !self.nodes[i].connected {
            return;
        }
        self.nodes[i].connected = false;
        // Once told to make the release permanent, a node is only held to the make-permanent
        // deadline: it may well have done so while away.
        let watched = !matches!(
            self.nodes[i].state,
            NodeState::Aborted | NodeState::RolledBack | NodeState::Failed
        ) && !self.track[i].make_permanent_sent;
        if !self.state.is_final() && watched {
            self.track[i].grace = Some(now.saturating_add(ms(self.spec.session_grace)));
        }
    }

    pub(super) fn session_restored(&mut self, i: usize, out: &mut Vec<Command>) {
        if self.nodes[i].connected {
            return;
        }
        self.nodes[i].connected = true;
        self.track[i].grace = None;
        // A node given up on, or told to stop while away, hears it again: it is rolled back (or
        // aborted), never resumed.
        if let (Some((told, reason)), false) = (&self.track[i].told, self.track[i].confirmed) {
            let node = self.nodes[i].name.clone();
            let reason = reason.clone();
            out.push(match told {
                Told::Abort => Command::Abort { node, reason },
                Told::Rollback => Command::Rollback { node, reason },
            });
        }
    }
}
