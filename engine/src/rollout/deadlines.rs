//! Deadlines and timers: the next deadline, ticks, step and idle deadlines of silent nodes,
//! the session grace, and the confirmation (abort, rollback, make-permanent) allowances.

use super::failure::How;
use super::{Guard, Rollout, ms};
use crate::Millis;
use crate::command::{Command, Record};
use crate::state::NodeState;

impl Rollout {
    /// The earliest time at which [`Event::Tick`] may change something.
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.state.is_final() {
            return None;
        }
        let nodes = self
            .track
            .iter()
            .flat_map(|t| [t.deadline.map(|(at, _)| at), t.grace]);
        let barriers = self
            .barriers
            .iter()
            .filter(|b| b.is_open())
            .map(|b| Some(b.deadline));
        nodes
            .chain(barriers)
            .chain([
                self.permanent_deadline,
                self.window_opens,
                self.gate.as_ref().map(|g| g.deadline),
            ])
            .flatten()
            .min()
    }

    /// Process every deadline `<= now`, earliest first, moving on after each so a late tick
    /// ends the same way as timely ones.
    pub(super) fn tick(&mut self, now: Millis, out: &mut Vec<Command>) {
        // Each deadline handled disarms itself; the cap only guards against a bug looping.
        let mut budget = 8 * (self.nodes.len() + self.barriers.len()) + 16;
        while budget > 0 && !self.state.is_final() {
            budget -= 1;
            let Some(due) = self.earliest_due(now) else {
                return;
            };
            match due {
                Due::Node(i) => self.node_deadline(now, i, out),
                Due::Grace(i) => self.grace_expired(now, i, out),
                Due::Barrier(b) => self.barrier_timeout(now, b, out),
                // The window opened: `advance` starts the wave (or waits for the next one).
                Due::Window => {
                    self.window_opens = None;
                    let reason = Some("window open: the next wave may start".to_string());
                    let state = self.state;
                    out.push(Command::Record(Record::RolloutState { state, reason }));
                }
                Due::Gate => self.gate_overdue(now, out),
                Due::Permanent => {
                    self.permanent_deadline = None;
                    let unconfirmed: Vec<usize> = (0..self.nodes.len())
                        .filter(|&i| {
                            self.track[i].make_permanent_sent
                                && !self.track[i].permanent
                                && self.nodes[i].state == NodeState::Committed
                        })
                        .collect();
                    self.finish_permanent(&unconfirmed, out);
                }
            }
            self.advance(now, out);
        }
    }

    fn earliest_due(&self, now: Millis) -> Option<Due> {
        let nodes = self.track.iter().enumerate().flat_map(|(i, t)| {
            [
                t.deadline.map(|(at, _)| (at, 0, i, Due::Node(i))),
                t.grace.map(|at| (at, 1, i, Due::Grace(i))),
            ]
        });
        let barriers = self
            .barriers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_open())
            .map(|(b, inst)| Some((inst.deadline, 2, b, Due::Barrier(b))));
        let permanent = self.permanent_deadline.map(|at| (at, 3, 0, Due::Permanent));
        let window = self.window_opens.map(|at| (at, 4, 0, Due::Window));
        let gate = self.gate.as_ref().map(|g| (g.deadline, 5, 0, Due::Gate));
        nodes
            .chain(barriers)
            .chain([permanent, window, gate])
            .flatten()
            .filter(|(at, ..)| *at <= now)
            .min_by_key(|(at, class, i, _)| (*at, *class, *i))
            .map(|(.., due)| due)
    }

    fn node_deadline(&mut self, now: Millis, i: usize, out: &mut Vec<Command>) {
        let Some((_, guard)) = self.track[i].deadline.take() else {
            return;
        };
        let name = self.nodes[i].name.clone();
        match guard {
            Guard::Step(step) => {
                let why = format!(
                    "node {name} made no progress on step {step} within {} ms (deadline + slack)",
                    self.step_allowance(step)
                );
                self.fail_node(now, i, why, How::Dead, out);
            }
            Guard::Idle => {
                let why = format!(
                    "node {name} sent no report within {} ms",
                    self.idle_allowance()
                );
                self.fail_node(now, i, why, How::Dead, out);
            }
            Guard::Rollback => {
                if self.nodes[i].state == NodeState::RollingBack {
                    let why = format!(
                        "rollback not confirmed within {} ms",
                        self.rollback_allowance()
                    );
                    self.set_node_state(i, NodeState::Failed, Some(why), out);
                }
            }
            Guard::Abort => {
                if matches!(
                    self.nodes[i].state,
                    NodeState::Pending | NodeState::Preparing | NodeState::Prepared
                ) {
                    let why = format!("abort not confirmed within {} ms", self.confirm_allowance());
                    self.set_node_state(i, NodeState::Failed, Some(why), out);
                }
            }
        }
    }

    fn grace_expired(&mut self, now: Millis, i: usize, out: &mut Vec<Command>) {
        self.track[i].grace = None;
        if self.nodes[i].connected || self.track[i].make_permanent_sent {
            return;
        }
        let why = format!(
            "node {} lost: no session for {} ms",
            self.nodes[i].name,
            ms(self.spec.session_grace)
        );
        match self.nodes[i].state {
            NodeState::Aborted | NodeState::RolledBack | NodeState::Failed => {}
            NodeState::RollingBack => {
                self.track[i].deadline = None;
                self.set_node_state(i, NodeState::Failed, Some(why), out);
            }
            _ => self.fail_node(now, i, why, How::Dead, out),
        }
    }

    pub(super) fn arm(&mut self, i: usize, now: Millis, guard: Guard) {
        let allowance = match guard {
            Guard::Step(step) => self.step_allowance(step),
            Guard::Idle => self.idle_allowance(),
            Guard::Rollback => self.rollback_allowance(),
            Guard::Abort => self.confirm_allowance(),
        };
        self.track[i].deadline = Some((now.saturating_add(allowance), guard));
    }

    fn step_deadline(&self, step: u32) -> Millis {
        usize::try_from(step)
            .ok()
            .and_then(|s| self.spec.step_deadlines.get(s))
            .map_or(ms(self.spec.policy.step_timeout), |d| ms(*d))
    }

    fn step_allowance(&self, step: u32) -> Millis {
        self.step_deadline(step)
            .saturating_add(ms(self.spec.step_slack))
    }

    fn idle_allowance(&self) -> Millis {
        ms(self.spec.step_slack).saturating_add(ms(self.spec.policy.step_timeout))
    }

    /// Abort and make-permanent confirmations: one step's worth.
    pub(super) fn confirm_allowance(&self) -> Millis {
        let largest = self
            .spec
            .step_deadlines
            .iter()
            .map(|d| ms(*d))
            .max()
            .unwrap_or(ms(self.spec.policy.step_timeout));
        ms(self.spec.step_slack).saturating_add(largest)
    }

    /// A rollback runs the `down` list, which the engine does not see: allow the whole `up`.
    fn rollback_allowance(&self) -> Millis {
        let total = if self.spec.step_deadlines.is_empty() {
            ms(self.spec.policy.step_timeout)
        } else {
            self.spec
                .step_deadlines
                .iter()
                .fold(0, |acc: Millis, d| acc.saturating_add(ms(*d)))
        };
        ms(self.spec.step_slack).saturating_add(total)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Node(usize),
    Grace(usize),
    Barrier(usize),
    Permanent,
    Window,
    Gate,
}
