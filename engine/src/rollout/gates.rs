//! Fleet gates (`[[rollout.gates]]`): once every node of a wave settled, each gate runs in
//! order (the caller evaluates it and answers with [`crate::Event::GateResult`]) before the
//! canary pause, the next wave or make-permanent. A gate that fails — or whose result does not
//! come within its timeout plus one interval and the step slack — fails the wave: its committed
//! nodes are told to roll back (they are past the point of no return), the failure counts once
//! against `max_failures`, and the failure policy decides the rest, as for a failed node.
//! A wave none of whose nodes stayed committed has nothing to gate.

use super::{Guard, Mode, Rollout, Told, ms, record};
use crate::Millis;
use crate::command::{Command, GatePhase, Record};
use crate::state::NodeState;

/// The fleet gate running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GateRun {
    pub wave: u32,
    pub index: usize,
    /// Past this, no result is taken as a failure.
    pub deadline: Millis,
    /// How long it was given (for the message when it is overdue).
    pub allowance: Millis,
}

impl Rollout {
    /// Start the wave's next gate, or note that all of them passed. `true` once the wave is
    /// through its gates.
    pub(super) fn run_gates(&mut self, now: Millis, out: &mut Vec<Command>) -> bool {
        if self.gate.is_some() {
            return false;
        }
        let wave = self.wave;
        let Some(gate) = self.spec.policy.gates.get(self.next_gate) else {
            self.gated_through = wave;
            self.next_gate = 0;
            return true;
        };
        if self.wave_committed(wave).is_empty() {
            self.gated_through = wave;
            self.next_gate = 0;
            return true;
        }
        let allowance = ms(gate.gate.timeout)
            .saturating_add(ms(gate.gate.interval))
            .saturating_add(ms(self.spec.step_slack));
        let name = gate.name.value.clone();
        let describe = gate.gate.describe();
        self.gate = Some(GateRun {
            wave,
            index: self.next_gate,
            deadline: now.saturating_add(allowance),
            allowance,
        });
        out.push(Command::RunGate {
            wave,
            gate: u32::try_from(self.next_gate).unwrap_or(u32::MAX),
            name: name.clone(),
        });
        record(
            out,
            Record::Gate {
                wave,
                name,
                phase: GatePhase::Started,
                value: None,
                reason: Some(describe),
            },
        );
        false
    }

    /// The gate running, as `(wave, index)`: a restarted coordinator runs it again.
    pub fn running_gate(&self) -> Option<(u32, u32)> {
        self.gate
            .map(|g| (g.wave, u32::try_from(g.index).unwrap_or(u32::MAX)))
    }

    /// While a fleet gate runs: its name.
    pub fn gate_holding(&self) -> Option<&str> {
        self.gate
            .and_then(|g| self.spec.policy.gates.get(g.index))
            .map(|g| g.name.value.as_str())
    }

    /// The result of the gate running; anything else (a stale or repeated result) is ignored.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gate_result(
        &mut self,
        now: Millis,
        wave: u32,
        gate: u32,
        passed: bool,
        value: Option<String>,
        reason: String,
        out: &mut Vec<Command>,
    ) {
        let Some(run) = self.gate else {
            return;
        };
        if run.wave != wave || u32::try_from(run.index).ok() != Some(gate) {
            return;
        }
        self.end_gate(now, run, passed, value, reason, out);
    }

    /// The gate's result did not come in time: it failed.
    pub(super) fn gate_overdue(&mut self, now: Millis, out: &mut Vec<Command>) {
        let Some(run) = self.gate else {
            return;
        };
        let reason = format!(
            "no result within {} ms (the gate's timeout, one interval and the step slack)",
            run.allowance
        );
        self.end_gate(now, run, false, None, reason, out);
    }

    fn end_gate(
        &mut self,
        now: Millis,
        run: GateRun,
        passed: bool,
        value: Option<String>,
        reason: String,
        out: &mut Vec<Command>,
    ) {
        self.gate = None;
        let name = self
            .spec
            .policy
            .gates
            .get(run.index)
            .map(|g| g.name.value.clone())
            .unwrap_or_default();
        let phase = if passed {
            GatePhase::Passed
        } else {
            GatePhase::Failed
        };
        record(
            out,
            Record::Gate {
                wave: run.wave,
                name: name.clone(),
                phase,
                value,
                reason: Some(reason.clone()),
            },
        );
        if self.state.is_final() || self.mode != Mode::Normal {
            // The rollout is already rolling back, halting or aborting: nothing waits for it.
            return;
        }
        if passed {
            self.next_gate += 1;
            return;
        }
        self.next_gate = 0;
        self.gated_through = run.wave;
        let why = format!("gate `{name}` failed after wave {}: {reason}", run.wave);
        self.gate_failed(now, run.wave, why, out);
    }

    /// Roll back the wave's committed nodes, count one failure, and let the policy decide.
    fn gate_failed(&mut self, now: Millis, wave: u32, reason: String, out: &mut Vec<Command>) {
        for i in self.wave_committed(wave) {
            self.track[i].counted = true;
            self.tell(i, Told::Rollback, &reason, out);
            self.set_node_state(i, NodeState::RollingBack, Some(reason.clone()), out);
            self.arm(i, now, Guard::Rollback);
        }
        self.failures += 1;
        self.apply_policy(now, reason, out);
    }

    /// The nodes of wave `wave` that committed and have not failed.
    fn wave_committed(&self, wave: u32) -> Vec<usize> {
        let index = usize::try_from(wave)
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        self.waves
            .get(index)
            .map(|members| {
                members
                    .iter()
                    .copied()
                    .filter(|&i| {
                        self.track[i].commit_sent
                            && !self.track[i].counted
                            && self.nodes[i].state == NodeState::Committed
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
