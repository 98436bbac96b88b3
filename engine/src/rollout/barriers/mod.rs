//! Barriers (`sync_nodes`): arrivals, release, wave scoping, timeouts. One barrier instance
//! and its keying are in [`instance`].

pub(super) mod instance;

use std::collections::BTreeSet;

use instance::{Instance, Status};

use super::failure::How;
use super::{Guard, Mode, Rollout, ms, record};
use crate::Millis;
use crate::command::{Command, Record};
use crate::state::NodeState;
use crate::view::BarrierView;

impl Rollout {
    /// The barrier currently being waited at, if any: the open instance with the most recent
    /// arrival.
    pub fn barrier(&self) -> Option<BarrierView> {
        self.barriers
            .iter()
            .filter(|b| b.is_open())
            .max_by_key(|b| b.last_arrival)
            .map(Instance::view)
    }

    pub(super) fn waiting_at_barrier(&self, i: usize) -> bool {
        self.barriers
            .iter()
            .any(|b| b.is_open() && b.has_arrived(i))
    }

    pub(super) fn barrier_arrived(
        &mut self,
        now: Millis,
        i: usize,
        id: &str,
        out: &mut Vec<Command>,
    ) {
        if self.state.is_final() || self.track[i].counted {
            return;
        }
        let Some(spec) = self.spec.barriers.iter().find(|b| b.id == id) else {
            return;
        };
        let state = self.nodes[i].state;
        let eligible = if spec.before_ponr {
            state == NodeState::Preparing
        } else {
            state == NodeState::Committing && self.track[i].commit_sent
        };
        if !eligible {
            return;
        }
        let wave = (!spec.before_ponr && spec.members.is_empty()).then(|| self.nodes[i].wave);
        let b = match self
            .barriers
            .iter()
            .position(|b| b.id == spec.id && b.wave == wave)
        {
            Some(b) => {
                let inst = &self.barriers[b];
                // Over already (stale), or a repeat: never counts again.
                if !inst.is_open() || inst.has_arrived(i) {
                    return;
                }
                b
            }
            None => {
                let participants = self.participants(spec.before_ponr, &spec.members, wave);
                self.barriers.push(Instance::new(
                    spec.id.clone(),
                    wave,
                    participants,
                    now.saturating_add(ms(spec.timeout)),
                ));
                self.barriers.len() - 1
            }
        };
        self.arrivals += 1;
        let inst = &mut self.barriers[b];
        inst.arrive(i);
        inst.last_arrival = self.arrivals;
        let (arrived, expected) = (inst.arrived_count(), inst.expected_count());
        // The barrier deadline governs a node waiting at it.
        self.track[i].deadline = None;
        record(
            out,
            Record::BarrierArrived {
                node: self.nodes[i].name.clone(),
                barrier: id.to_string(),
                arrived,
                expected,
            },
        );
        self.check_release(now, b, out);
    }

    fn participants(
        &self,
        before_ponr: bool,
        members: &[String],
        wave: Option<u32>,
    ) -> BTreeSet<usize> {
        let live = |i: usize| {
            !self.track[i].counted
                && (before_ponr
                    || matches!(
                        self.nodes[i].state,
                        NodeState::Prepared | NodeState::Committing
                    ))
        };
        if members.is_empty() {
            (0..self.nodes.len())
                .filter(|&i| match wave {
                    Some(w) => self.nodes[i].wave == w && self.track[i].commit_sent,
                    None => true,
                })
                .filter(|&i| live(i))
                .collect()
        } else {
            members
                .iter()
                .filter_map(|m| self.index.get(m).copied())
                .filter(|&i| live(i))
                .collect()
        }
    }

    /// Release the barrier if every remaining participant is there.
    fn check_release(&mut self, now: Millis, b: usize, out: &mut Vec<Command>) {
        let inst = &mut self.barriers[b];
        if !inst.is_open() || !inst.complete() {
            return;
        }
        inst.status = Status::Released;
        if inst.arrived().is_empty() {
            return;
        }
        let (id, wave) = (inst.id.clone(), inst.wave);
        let arrived: Vec<usize> = inst.arrived().iter().copied().collect();
        record(
            out,
            Record::BarrierReleased {
                barrier: id.clone(),
                wave,
            },
        );
        for j in arrived {
            out.push(Command::ReleaseBarrier {
                node: self.nodes[j].name.clone(),
                barrier: id.clone(),
                ok: true,
                reason: None,
            });
            self.arm(j, now, Guard::Idle);
        }
    }

    /// A failed node leaves every barrier; the others may now be complete.
    pub(super) fn leave_barriers(&mut self, now: Millis, i: usize, out: &mut Vec<Command>) {
        for b in 0..self.barriers.len() {
            let inst = &mut self.barriers[b];
            if inst.is_open() && inst.leave(i) {
                self.check_release(now, b, out);
            }
        }
    }

    pub(super) fn barrier_timeout(&mut self, now: Millis, b: usize, out: &mut Vec<Command>) {
        let inst = &mut self.barriers[b];
        inst.status = Status::Failed;
        let inst = inst.clone();
        let missing = inst.missing();
        let names = self.names(&missing);
        let reason = format!(
            "barrier `{}` timed out with {}/{} arrived, missing {names}",
            inst.id,
            inst.arrived_count(),
            inst.expected_count()
        );
        record(
            out,
            Record::BarrierFailed {
                barrier: inst.id.clone(),
                wave: inst.wave,
                reason: reason.clone(),
            },
        );
        if !self.past_ponr() {
            self.abort_prepare(now, None, reason, out);
            return;
        }
        for m in missing {
            let why = format!(
                "node {} missed the deadline of barrier `{}`",
                self.nodes[m].name, inst.id
            );
            self.fail_node(now, m, why, How::Missed, out);
        }
        if self.state.is_final() || !matches!(self.mode, Mode::Normal | Mode::Halting) {
            // Rolling back: the arrived nodes were told so.
            return;
        }
        for &a in inst.arrived() {
            if self.nodes[a].state == NodeState::Committing && !self.track[a].counted {
                out.push(Command::ReleaseBarrier {
                    node: self.nodes[a].name.clone(),
                    barrier: inst.id.clone(),
                    ok: true,
                    reason: Some(format!("released without {names} (missed the deadline)")),
                });
                self.arm(a, now, Guard::Idle);
            }
        }
    }

    /// Close every open barrier (the rollout stops waiting at them), recording why if given.
    pub(super) fn close_barriers(&mut self, reason: Option<&str>, out: &mut Vec<Command>) {
        for inst in self.barriers.iter_mut().filter(|b| b.is_open()) {
            inst.status = Status::Failed;
            if let Some(reason) = reason {
                record(
                    out,
                    Record::BarrierFailed {
                        barrier: inst.id.clone(),
                        wave: inst.wave,
                        reason: reason.to_string(),
                    },
                );
            }
        }
    }
}
