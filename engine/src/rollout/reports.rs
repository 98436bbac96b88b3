//! What nodes report: the script accepted or refused, steps, prepared, and how they ended.
//! A report of a node the rollout gave up on, or one that does not fit the node's state, is
//! ignored.

use super::failure::How;
use super::{Guard, Rollout, Told, record};
use crate::Millis;
use crate::command::{Command, Record, StepPhase};
use crate::event::Outcome;
use crate::state::{NodeState, RolloutState};

/// What a node reported about one instruction.
#[derive(Debug, Clone)]
pub(super) struct Reported {
    pub(super) phase: StepPhase,
    pub(super) error: Option<String>,
    pub(super) duration_ms: Option<u64>,
    /// A succeeded step that did not reach all it names (a code_change that reached no process).
    pub(super) warning: Option<String>,
}

impl Reported {
    pub(super) fn started() -> Self {
        Self {
            phase: StepPhase::Started,
            error: None,
            duration_ms: None,
            warning: None,
        }
    }
}

impl Rollout {
    pub(super) fn script_accepted(&mut self, now: Millis, i: usize) {
        if !self.state.is_final() && self.nodes[i].state == NodeState::Preparing {
            self.arm(i, now, Guard::Idle);
        }
    }

    pub(super) fn script_refused(
        &mut self,
        now: Millis,
        i: usize,
        errors: &[String],
        out: &mut Vec<Command>,
    ) {
        if self.nodes[i].state != NodeState::Preparing {
            return;
        }
        let error = format!("script refused: {}", errors.join("; "));
        let t = &mut self.track[i];
        t.refused = true;
        t.confirmed = true;
        t.deadline = None;
        self.set_node_state(i, NodeState::Failed, Some(error.clone()), out);
        let reason = format!(
            "node {} refused the script: {}",
            self.nodes[i].name,
            errors.join("; ")
        );
        self.fail_node(now, i, reason, How::Reported, out);
    }

    pub(super) fn step(
        &mut self,
        now: Millis,
        i: usize,
        step: u32,
        report: Reported,
        out: &mut Vec<Command>,
    ) {
        let Reported {
            phase,
            error,
            duration_ms,
            warning,
        } = report;
        if self.state.is_final() || self.track[i].counted {
            return;
        }
        let valid = match self.nodes[i].state {
            NodeState::Preparing => step < self.spec.first_commit_step,
            // Lenient about the index: an explicit point of no return may be reported as done
            // after Commit.
            NodeState::Committing => step < self.spec.steps_total,
            _ => false,
        };
        if !valid {
            return;
        }
        let view = &mut self.nodes[i];
        view.step = Some(step);
        if phase == StepPhase::Started {
            view.step_started = Some(now);
        }
        if let Some(e) = &error {
            view.error = Some(e.clone());
        }
        let name = view.name.clone();
        record(
            out,
            Record::Step {
                node: name.clone(),
                step,
                phase,
                error: error.clone(),
                duration_ms,
                warning,
            },
        );
        match phase {
            StepPhase::Started => {
                if !self.waiting_at_barrier(i) {
                    self.arm(i, now, Guard::Step(step));
                }
            }
            StepPhase::Succeeded => self.arm(i, now, Guard::Idle),
            StepPhase::Failed => {
                let error = error.unwrap_or_default();
                let reason = format!("node {name} failed step {step}: {error}");
                if self.nodes[i].state == NodeState::Committing {
                    // After the point of no return the agent rolls back on its own.
                    self.set_node_state(i, NodeState::RollingBack, Some(error), out);
                    self.arm(i, now, Guard::Rollback);
                } else {
                    // It aborts on its own and reports `Aborted`.
                    self.arm(i, now, Guard::Idle);
                }
                self.fail_node(now, i, reason, How::Reported, out);
            }
        }
    }

    pub(super) fn prepared(&mut self, i: usize, out: &mut Vec<Command>) {
        if self.state != RolloutState::Preparing || self.nodes[i].state != NodeState::Preparing {
            return;
        }
        self.track[i].deadline = None;
        self.set_node_state(i, NodeState::Prepared, None, out);
    }

    pub(super) fn outcome(
        &mut self,
        now: Millis,
        i: usize,
        outcome: Outcome,
        error: Option<String>,
        out: &mut Vec<Command>,
    ) {
        let state = self.nodes[i].state;
        let is_final = self.state.is_final();
        let committed = self.track[i].commit_sent;
        let told_rollback = matches!(self.track[i].told, Some((Told::Rollback, _)));
        let told_abort = matches!(self.track[i].told, Some((Told::Abort, _)));
        let name = self.nodes[i].name.clone();
        let detail = error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        match outcome {
            Outcome::Committed => {
                if is_final || state != NodeState::Committing {
                    return;
                }
                self.track[i].deadline = None;
                self.set_node_state(i, NodeState::Committed, None, out);
            }
            Outcome::Permanent => {
                let awaiting = self.awaiting_permanent(i);
                let t = &mut self.track[i];
                if state == NodeState::Committed && t.make_permanent_sent {
                    t.permanent = true;
                    t.grace = None;
                }
                self.retally_permanent(i, awaiting);
            }
            Outcome::Aborted => {
                let ok = match state {
                    NodeState::Pending | NodeState::Preparing | NodeState::Prepared => !committed,
                    // Told to roll back before the Commit reached it: it never crossed the point
                    // of no return, so it discards its staging instead — the same end.
                    NodeState::Committing | NodeState::RollingBack => committed && told_rollback,
                    // A node given up on (lost, silent) that comes back and aborts.
                    NodeState::Failed => !self.track[i].confirmed,
                    _ => false,
                };
                if !ok {
                    return;
                }
                let t = &mut self.track[i];
                t.confirmed = true;
                t.deadline = None;
                self.set_node_state(i, NodeState::Aborted, error, out);
                if !is_final && !told_abort && !told_rollback {
                    let reason = format!("node {name} aborted{detail}");
                    self.fail_node(now, i, reason, How::Reported, out);
                }
            }
            Outcome::RollingBack => {
                if !committed || !matches!(state, NodeState::Committing | NodeState::Committed) {
                    return;
                }
                self.track[i].confirmed = false;
                self.set_node_state(i, NodeState::RollingBack, error, out);
                if !is_final {
                    self.arm(i, now, Guard::Rollback);
                    if !told_rollback {
                        let reason = format!("node {name} is rolling back{detail}");
                        self.fail_node(now, i, reason, How::Reported, out);
                    }
                }
            }
            Outcome::RolledBack => {
                let ok = match state {
                    NodeState::Committing | NodeState::Committed | NodeState::RollingBack => true,
                    NodeState::Failed => !self.track[i].confirmed,
                    _ => false,
                };
                // A node that made the release permanent has nothing left to roll back.
                if !committed || !ok || self.track[i].permanent {
                    return;
                }
                let unconfirmed = self.unconfirmed_permanent(i);
                let t = &mut self.track[i];
                t.confirmed = true;
                t.deadline = None;
                self.set_node_state(i, NodeState::RolledBack, error, out);
                if !is_final && !told_rollback {
                    let reason = format!("node {name} rolled back{detail}");
                    self.fail_node(now, i, reason, How::Reported, out);
                }
                if is_final && unconfirmed {
                    self.amend_final(i, "rolled back", &detail, out);
                }
            }
            Outcome::Failed => {
                let ok = match state {
                    NodeState::Aborted | NodeState::RolledBack => false,
                    NodeState::Failed => !self.track[i].confirmed,
                    _ => true,
                };
                if !ok || self.track[i].permanent {
                    return;
                }
                let unconfirmed = self.unconfirmed_permanent(i);
                let t = &mut self.track[i];
                t.confirmed = true;
                t.deadline = None;
                if committed && !is_final {
                    // The node went past the point of no return and could not get back.
                    self.rollback_failed = true;
                }
                self.set_node_state(i, NodeState::Failed, error, out);
                if !is_final {
                    let reason = format!("node {name} failed{detail}");
                    self.fail_node(now, i, reason, How::Reported, out);
                }
                if is_final && unconfirmed {
                    self.amend_final(i, "failed", &detail, out);
                }
            }
        }
    }

    /// Node `i` was told to make the release permanent and has not confirmed it.
    fn unconfirmed_permanent(&self, i: usize) -> bool {
        let t = &self.track[i];
        self.nodes[i].state == NodeState::Committed && t.make_permanent_sent && !t.permanent
    }

    /// The rollout ended while node `i` had not confirmed make-permanent, and the node now says
    /// it rolled back (its agent restarted before making the release permanent, docs/design.md §5) or
    /// failed. The recorded outcome must agree with the nodes': the final state is corrected
    /// (`succeeded` becomes `partially_rolled_back`, `rolled_back` when no node kept the new
    /// release, `failed` when the node could not get back) and the node counts as a failure.
    fn amend_final(&mut self, i: usize, what: &str, detail: &str, out: &mut Vec<Command>) {
        if !matches!(
            self.state,
            RolloutState::Succeeded | RolloutState::PartiallyRolledBack
        ) {
            return;
        }
        if !self.track[i].counted {
            self.track[i].counted = true;
            self.failures += 1;
        }
        let failed = self.nodes[i].state == NodeState::Failed;
        if failed {
            self.rollback_failed = true;
        }
        let state = if failed {
            RolloutState::Failed
        } else if self.nodes.iter().any(|n| n.state == NodeState::Committed) {
            RolloutState::PartiallyRolledBack
        } else {
            RolloutState::RolledBack
        };
        let note = format!(
            "node {} {what} after the rollout ended, before confirming make_permanent{detail}",
            self.nodes[i].name
        );
        self.error = Some(match self.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.clone(),
        });
        self.set_rollout_state(state, Some(note), out);
    }
}
