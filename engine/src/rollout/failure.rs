//! Failures and the failure policy: counting a failed node once, aborting before the point of
//! no return, after it `rollback_node` (with its budget escalating to `rollback_all`),
//! `rollback_all` and `halt`.

use hotroll_script::OnFailure;

use super::{Guard, Mode, Rollout, Told, record};
use crate::Millis;
use crate::command::{Command, Record};
use crate::state::{NodeState, RolloutState};

/// How a failure came to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
    /// The node said so (step failed, outcome): it aborts or rolls back on its own.
    Reported,
    /// A live node missed a barrier deadline: it is told to roll back (or abort).
    Missed,
    /// Lost past the grace period or silent past its deadline: marked failed at once.
    Dead,
}

impl Rollout {
    pub(super) fn past_ponr(&self) -> bool {
        self.wave > 0
    }

    /// Handle node `i` failing: update it (unless it reported the failure itself), count it
    /// once, then abort (before the point of no return) or apply the policy.
    pub(super) fn fail_node(
        &mut self,
        now: Millis,
        i: usize,
        reason: String,
        how: How,
        out: &mut Vec<Command>,
    ) {
        let committed = self.track[i].commit_sent;
        match how {
            How::Reported => {}
            How::Missed if committed => {
                self.tell(i, Told::Rollback, &reason, out);
                self.set_node_state(i, NodeState::RollingBack, Some(reason.clone()), out);
                self.arm(i, now, Guard::Rollback);
            }
            How::Missed | How::Dead => {
                let told = if committed {
                    Told::Rollback
                } else {
                    Told::Abort
                };
                self.tell(i, told, &reason, out);
                self.track[i].deadline = None;
                self.set_node_state(i, NodeState::Failed, Some(reason.clone()), out);
            }
        }
        if self.state.is_final() || self.track[i].counted {
            return;
        }
        self.track[i].counted = true;
        self.failures += 1;
        if !self.past_ponr() {
            if self.spec.dry_run && self.mode == Mode::Normal {
                // A dry run wants every node's verdict: the others go on preparing (the failed
                // node leaves the barriers), and the abort comes once every node is done.
                self.leave_barriers(now, i, out);
                return;
            }
            if self.mode != Mode::Aborting {
                self.abort_prepare(now, Some(i), reason, out);
            }
            return;
        }
        self.apply_policy(now, reason, out);
        if matches!(self.mode, Mode::Normal | Mode::Halting) {
            self.leave_barriers(now, i, out);
        }
    }

    pub(super) fn apply_policy(&mut self, now: Millis, reason: String, out: &mut Vec<Command>) {
        if self.mode != Mode::Normal {
            return;
        }
        let policy = &self.spec.policy;
        match policy.on_failure {
            OnFailure::RollbackNode => {
                if self.failures > policy.max_failures {
                    let why = format!(
                        "failure budget exceeded: {} failures, max_failures {} (last: {reason})",
                        self.failures, policy.max_failures
                    );
                    self.rollback_all(now, why, out);
                }
            }
            OnFailure::RollbackAll => {
                self.rollback_all(now, format!("on_failure rollback_all: {reason}"), out);
            }
            OnFailure::Halt => self.halt(reason, out),
        }
    }

    /// Roll back every committed node and abort every prepared one.
    pub(super) fn rollback_all(&mut self, now: Millis, reason: String, out: &mut Vec<Command>) {
        self.mode = Mode::RollingBackAll;
        self.pause_requested = false;
        self.paused = None;
        self.error = Some(reason.clone());
        self.state = RolloutState::Committing;
        record(
            out,
            Record::RolloutState {
                state: RolloutState::Committing,
                reason: Some(format!("rolling back every node: {reason}")),
            },
        );
        self.close_barriers(Some("the rollout is rolling back"), out);
        for i in 0..self.nodes.len() {
            let state = self.nodes[i].state;
            if self.track[i].commit_sent
                && matches!(state, NodeState::Committing | NodeState::Committed)
            {
                self.tell(i, Told::Rollback, &reason, out);
                self.set_node_state(i, NodeState::RollingBack, None, out);
                self.arm(i, now, Guard::Rollback);
            } else if !self.track[i].commit_sent && state == NodeState::Prepared {
                self.tell(i, Told::Abort, &reason, out);
                self.arm(i, now, Guard::Abort);
            }
        }
    }

    /// Let the wave in flight finish, abort the nodes that have not committed, start nothing.
    pub(super) fn halt(&mut self, reason: String, out: &mut Vec<Command>) {
        self.mode = Mode::Halting;
        self.pause_requested = false;
        self.error = Some(reason.clone());
        record(
            out,
            Record::RolloutState {
                state: self.state,
                reason: Some(format!("halting after the wave in flight: {reason}")),
            },
        );
        for i in 0..self.nodes.len() {
            if !self.track[i].commit_sent && self.nodes[i].state == NodeState::Prepared {
                self.tell(i, Told::Abort, &reason, out);
            }
        }
    }

    /// Before the point of no return: tell every other unsettled target to abort, and end
    /// `aborted` once the reachable ones have confirmed. A node that is away is shown failed at
    /// once (nothing waits for it); it hears the abort again when it returns.
    pub(super) fn abort_prepare(
        &mut self,
        now: Millis,
        culprit: Option<usize>,
        reason: String,
        out: &mut Vec<Command>,
    ) {
        if self.state == RolloutState::Pending {
            // Nothing was sent yet: no node has anything to discard.
            for i in 0..self.nodes.len() {
                self.set_node_state(i, NodeState::Aborted, None, out);
            }
            self.error = Some(reason.clone());
            self.finish(RolloutState::Aborted, Some(reason), out);
            return;
        }
        self.mode = Mode::Aborting;
        self.pause_requested = false;
        self.paused = None;
        self.error = Some(reason.clone());
        self.state = RolloutState::Preparing;
        record(
            out,
            Record::RolloutState {
                state: RolloutState::Preparing,
                reason: Some(format!("aborting every node: {reason}")),
            },
        );
        self.close_barriers(None, out);
        for i in 0..self.nodes.len() {
            if self.nodes[i].state.is_settled() {
                continue;
            }
            if Some(i) != culprit {
                self.tell(i, Told::Abort, &reason, out);
            }
            self.track[i].grace = None;
            if self.nodes[i].connected {
                self.arm(i, now, Guard::Abort);
            } else {
                self.track[i].deadline = None;
                let why = "unreachable when the rollout aborted".to_string();
                self.set_node_state(i, NodeState::Failed, Some(why), out);
            }
        }
    }

    pub(super) fn tell(&mut self, i: usize, told: Told, reason: &str, out: &mut Vec<Command>) {
        let t = &mut self.track[i];
        if matches!(&t.told, Some((k, _)) if *k == told) {
            return;
        }
        t.told = Some((told, reason.to_string()));
        t.confirmed = false;
        let node = self.nodes[i].name.clone();
        let reason = reason.to_string();
        out.push(match told {
            Told::Abort => Command::Abort { node, reason },
            Told::Rollback => Command::Rollback { node, reason },
        });
    }
}
