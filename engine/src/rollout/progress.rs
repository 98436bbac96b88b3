//! Progress: start, waves, pauses, make-permanent, final states.

use super::{Guard, Mode, PauseKind, Rollout, ms, record};
use crate::Millis;
use crate::command::{Command, Record};
use crate::state::{NodeState, RolloutState};
use hotroll_script::duration::format_duration;
use hotroll_script::{format_utc, window_opens_at};

/// Whether wave N may start now (see [`Rollout::window_for_wave`]).
enum Window {
    Open,
    /// Not yet: a tick at the opening moves on.
    Wait,
    /// No window opens within `window_timeout`: the rollout is ending.
    Ended,
}

/// The reason of a dry run's first record.
const DRY_RUN_START: &str = "dry run: prepare on every node, then abort; nothing commits";
/// The reason a dry run ends with when every node prepared.
const DRY_RUN_PASSED: &str = "dry run: every node would commit";

impl Rollout {
    /// Wave `wave` starts only inside a window: record once that it waits and until when, or
    /// end the rollout (aborted before the point of no return, halted after it) when the next
    /// window opens later than `window_timeout` from now.
    fn window_for_wave(&mut self, now: Millis, wave: u32, out: &mut Vec<Command>) -> Window {
        let opens = window_opens_at(&self.spec.policy.windows, now);
        if opens <= now {
            self.window_opens = None;
            return Window::Open;
        }
        let limit = ms(self.spec.policy.window_timeout);
        if opens - now > limit {
            self.window_opens = None;
            let reason = format!(
                "no window opens within window_timeout {} for wave {wave}: the next opens at {}",
                format_duration(self.spec.policy.window_timeout),
                format_utc(opens)
            );
            if self.past_ponr() {
                self.halt(reason, out);
            } else {
                self.abort_prepare(now, None, reason, out);
            }
            return Window::Ended;
        }
        if self.window_opens != Some(opens) {
            self.window_opens = Some(opens);
            let reason = format!(
                "waiting for window: wave {wave} starts at {}",
                format_utc(opens)
            );
            record(
                out,
                Record::RolloutState {
                    state: self.state,
                    reason: Some(reason),
                },
            );
        }
        Window::Wait
    }

    /// One verdict per node: it would commit if it prepared and did not fail.
    fn dry_run_verdicts(&self, ended: Option<&str>, out: &mut Vec<Command>) {
        for (i, node) in self.nodes.iter().enumerate() {
            let t = &self.track[i];
            let would_commit = t.was_prepared && !t.counted;
            let reason = if would_commit {
                None
            } else if t.counted {
                Some(
                    node.error
                        .clone()
                        .unwrap_or_else(|| "it failed".to_string()),
                )
            } else {
                Some(format!(
                    "it had not finished preparing when the dry run stopped ({})",
                    ended.unwrap_or("aborted")
                ))
            };
            record(
                out,
                Record::DryRunVerdict {
                    node: node.name.clone(),
                    would_commit,
                    reason,
                },
            );
        }
    }

    pub(super) fn start(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.state != RolloutState::Pending {
            return;
        }
        // The first record names every node the operator left out, so the history says so.
        let left_out = self.spec.left_out_summary();
        let reason = match (self.spec.dry_run, left_out) {
            (false, left_out) => left_out,
            (true, None) => Some(DRY_RUN_START.to_string()),
            (true, Some(left_out)) => Some(format!("{DRY_RUN_START}; {left_out}")),
        };
        self.set_rollout_state(RolloutState::Preparing, reason, out);
        for i in 0..self.nodes.len() {
            out.push(Command::RunScript {
                node: self.nodes[i].name.clone(),
            });
            self.set_node_state(i, NodeState::Preparing, None, out);
            self.arm(i, now, Guard::Idle);
        }
    }

    /// Move on as far as the current state allows.
    pub(super) fn advance(&mut self, now: Millis, out: &mut Vec<Command>) {
        loop {
            if self.state.is_final() {
                return;
            }
            match self.mode {
                Mode::Aborting => {
                    if self.all_settled() {
                        let reason = self.error.clone();
                        self.finish(RolloutState::Aborted, reason, out);
                    }
                    return;
                }
                Mode::RollingBackAll => {
                    if self.all_settled() {
                        let (state, reason) = if self.rollback_failed {
                            (RolloutState::Failed, self.rollback_failed_reason())
                        } else {
                            (RolloutState::RolledBack, self.error.clone())
                        };
                        if state == RolloutState::Failed {
                            self.error = Some(reason.clone().unwrap_or_default());
                        }
                        self.finish(state, reason, out);
                    }
                    return;
                }
                Mode::Halting => {
                    let settled = (0..self.nodes.len())
                        .filter(|&i| self.track[i].commit_sent)
                        .all(|i| self.nodes[i].state.is_settled());
                    if settled {
                        let reason = self.error.clone();
                        self.finish(RolloutState::Halted, reason, out);
                    }
                    return;
                }
                Mode::MakingPermanent => {
                    // Every node told to make the release permanent confirmed, or is no longer
                    // committed.
                    if self.tally.awaiting_permanent == 0 {
                        self.finish_permanent(&[], out);
                    }
                    return;
                }
                Mode::Normal => {}
            }
            match self.state {
                RolloutState::Preparing => {
                    if self.spec.dry_run {
                        let failed = usize::try_from(self.failures).unwrap_or(usize::MAX);
                        if self.tally.prepared.saturating_add(failed) >= self.nodes.len() {
                            let reason = match failed {
                                0 => DRY_RUN_PASSED.to_string(),
                                n => format!(
                                    "dry run: {n} of {} nodes would not commit",
                                    self.nodes.len()
                                ),
                            };
                            self.abort_prepare(now, None, reason, out);
                        }
                        return;
                    }
                    if self.tally.prepared != self.nodes.len() {
                        return;
                    }
                    if self.pause_requested {
                        self.pause(
                            PauseKind::Operator,
                            "paused by the operator before wave 1",
                            out,
                        );
                        return;
                    }
                    match self.window_for_wave(now, 1, out) {
                        Window::Open => {}
                        Window::Wait => return,
                        Window::Ended => continue,
                    }
                    self.set_rollout_state(RolloutState::Committing, None, out);
                }
                RolloutState::Committing => {
                    if !self.settled_through(self.wave) {
                        return;
                    }
                    // The wave's nodes committed: its fleet gates run before anything moves on.
                    if self.gated_through < self.wave && !self.run_gates(now, out) {
                        return;
                    }
                    let canary = self.canary_first
                        && self.spec.policy.pause_after_canary
                        && self.wave == 1
                        && !self.promoted;
                    if canary {
                        self.pause(
                            PauseKind::Canary,
                            "canary wave done: promote to continue",
                            out,
                        );
                        return;
                    }
                    if self.pause_requested {
                        self.pause(PauseKind::Operator, "paused by the operator", out);
                        return;
                    }
                    if self.wave >= self.waves() {
                        self.start_permanent(now, out);
                    } else {
                        match self.window_for_wave(now, self.wave + 1, out) {
                            Window::Open => self.start_wave(now, self.wave + 1, out),
                            Window::Wait => return,
                            Window::Ended => continue,
                        }
                    }
                }
                _ => return,
            }
        }
    }

    fn pause(&mut self, kind: PauseKind, reason: &str, out: &mut Vec<Command>) {
        self.pause_requested = false;
        self.paused = Some(kind);
        self.set_rollout_state(RolloutState::Paused, Some(reason.to_string()), out);
    }

    fn start_wave(&mut self, now: Millis, wave: u32, out: &mut Vec<Command>) {
        self.wave = wave;
        let members = self
            .waves
            .get(
                usize::try_from(wave)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1),
            )
            .cloned()
            .unwrap_or_default();
        // A node that failed while waiting (lost, aborted) is not committed.
        let go: Vec<usize> = members
            .into_iter()
            .filter(|&i| self.nodes[i].state == NodeState::Prepared && !self.track[i].counted)
            .collect();
        record(
            out,
            Record::WaveStarted {
                wave,
                nodes: self.names_list(&go),
            },
        );
        for i in go {
            self.track[i].commit_sent = true;
            out.push(Command::Commit {
                node: self.nodes[i].name.clone(),
            });
            self.set_node_state(i, NodeState::Committing, None, out);
            self.arm(i, now, Guard::Idle);
        }
    }

    fn start_permanent(&mut self, now: Millis, out: &mut Vec<Command>) {
        self.mode = Mode::MakingPermanent;
        self.pause_requested = false;
        let mut sent = false;
        for i in 0..self.nodes.len() {
            if self.nodes[i].state == NodeState::Committed && !self.track[i].counted {
                let awaiting = self.awaiting_permanent(i);
                let t = &mut self.track[i];
                t.make_permanent_sent = true;
                t.grace = None;
                self.retally_permanent(i, awaiting);
                out.push(Command::MakePermanent {
                    node: self.nodes[i].name.clone(),
                });
                sent = true;
            }
        }
        if sent {
            self.permanent_deadline = Some(now.saturating_add(self.confirm_allowance()));
        } else {
            self.finish_permanent(&[], out);
        }
    }

    /// End after make-permanent; `unconfirmed` nodes did not confirm in time.
    pub(super) fn finish_permanent(&mut self, unconfirmed: &[usize], out: &mut Vec<Command>) {
        let committed = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Committed)
            .count();
        let others: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].state != NodeState::Committed)
            .collect();
        let (state, mut reason) = if self.rollback_failed {
            (RolloutState::Failed, self.rollback_failed_reason())
        } else if others.is_empty() {
            (RolloutState::Succeeded, None)
        } else if committed == 0 {
            (
                RolloutState::RolledBack,
                Some("every node failed and rolled back".to_string()),
            )
        } else {
            (
                RolloutState::PartiallyRolledBack,
                Some(format!("not upgraded: {}", self.names(&others))),
            )
        };
        if !unconfirmed.is_empty() {
            let note = format!(
                "make_permanent not confirmed within {} ms by {}",
                self.confirm_allowance(),
                self.names(unconfirmed)
            );
            reason = Some(match reason {
                Some(r) => format!("{r}; {note}"),
                None => note,
            });
        }
        if reason.is_some() {
            self.error = reason.clone();
        }
        self.finish(state, reason, out);
    }

    fn rollback_failed_reason(&self) -> Option<String> {
        let failed: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.track[i].commit_sent
                    && self.track[i].confirmed
                    && self.nodes[i].state == NodeState::Failed
            })
            .collect();
        Some(format!("rollback failed on {}", self.names(&failed)))
    }

    /// Enter a final state: nothing is armed any more.
    pub(super) fn finish(
        &mut self,
        state: RolloutState,
        reason: Option<String>,
        out: &mut Vec<Command>,
    ) {
        self.pause_requested = false;
        self.paused = None;
        self.permanent_deadline = None;
        self.window_opens = None;
        self.gate = None;
        for t in &mut self.track {
            t.deadline = None;
            t.grace = None;
        }
        self.close_barriers(None, out);
        if self.spec.dry_run {
            self.dry_run_verdicts(reason.as_deref(), out);
        }
        // A node that is away when the rollout ends cannot say where it stands: show it failed
        // rather than forever "preparing". It is told again when it returns, and its late
        // outcome (aborted, rolled back) still replaces this.
        for i in 0..self.nodes.len() {
            if !self.nodes[i].connected && !self.nodes[i].state.is_settled() {
                let error = Some("unreachable when the rollout ended".to_string());
                self.set_node_state(i, NodeState::Failed, error, out);
            }
        }
        self.set_rollout_state(state, reason, out);
    }
}
