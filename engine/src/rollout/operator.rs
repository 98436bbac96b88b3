//! Operator commands (abort, pause, resume, promote): each checks everything first, so an
//! `Err` changes nothing.

use super::{Mode, PauseKind, Rollout, record};
use crate::Millis;
use crate::command::{Command, Record};
use crate::state::RolloutState;

/// An operator command that does not apply in the rollout's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} rollout in state {state}: {why}")]
pub struct NotApplicable {
    pub action: &'static str,
    pub state: &'static str,
    pub why: &'static str,
}

impl Rollout {
    fn not_applicable(&self, action: &'static str, why: &'static str) -> NotApplicable {
        NotApplicable {
            action,
            state: self.state.as_str(),
            why,
        }
    }

    pub(super) fn operator_abort(
        &mut self,
        now: Millis,
        reason: String,
        out: &mut Vec<Command>,
    ) -> Result<(), NotApplicable> {
        if self.state.is_final() {
            return Err(self.not_applicable("abort", "the rollout has already finished"));
        }
        match self.mode {
            Mode::RollingBackAll => {
                return Err(self.not_applicable("abort", "every node is already rolling back"));
            }
            Mode::Aborting => {
                return Err(self.not_applicable("abort", "the rollout is already aborting"));
            }
            Mode::MakingPermanent => {
                return Err(
                    self.not_applicable("abort", "the new release is already being made permanent")
                );
            }
            Mode::Normal | Mode::Halting => {}
        }
        record(
            out,
            Record::Operator {
                action: "abort".into(),
                reason: Some(reason.clone()),
            },
        );
        let why = format!("aborted by operator: {reason}");
        if self.past_ponr() {
            self.rollback_all(now, why, out);
        } else {
            self.abort_prepare(now, None, why, out);
        }
        Ok(())
    }

    pub(super) fn operator_pause(&mut self, out: &mut Vec<Command>) -> Result<(), NotApplicable> {
        match self.state {
            RolloutState::Preparing | RolloutState::Committing => {}
            RolloutState::Paused => {
                return Err(self.not_applicable("pause", "the rollout is already paused"));
            }
            RolloutState::Pending => {
                return Err(self.not_applicable("pause", "the rollout has not started"));
            }
            _ => return Err(self.not_applicable("pause", "the rollout has already finished")),
        }
        if self.mode != Mode::Normal {
            return Err(self.not_applicable("pause", "no further wave will start"));
        }
        if self.pause_requested {
            return Err(self.not_applicable("pause", "a pause is already pending"));
        }
        record(
            out,
            Record::Operator {
                action: "pause".into(),
                reason: Some("takes effect before the next wave starts".into()),
            },
        );
        self.pause_requested = true;
        Ok(())
    }

    pub(super) fn operator_resume(&mut self, out: &mut Vec<Command>) -> Result<(), NotApplicable> {
        match (self.state, self.paused) {
            (RolloutState::Paused, Some(PauseKind::Operator)) if self.mode == Mode::Normal => {
                record(
                    out,
                    Record::Operator {
                        action: "resume".into(),
                        reason: None,
                    },
                );
                self.paused = None;
                self.set_rollout_state(RolloutState::Committing, None, out);
                Ok(())
            }
            (RolloutState::Paused, Some(PauseKind::Canary)) if self.mode == Mode::Normal => {
                Err(self.not_applicable(
                    "resume",
                    "paused after the canary wave: promote to continue",
                ))
            }
            (RolloutState::Paused, _) => {
                Err(self.not_applicable("resume", "the rollout is halting or rolling back"))
            }
            (RolloutState::Preparing | RolloutState::Committing, _) if self.pause_requested => {
                record(
                    out,
                    Record::Operator {
                        action: "resume".into(),
                        reason: Some("pending pause cancelled".into()),
                    },
                );
                self.pause_requested = false;
                Ok(())
            }
            _ => Err(self.not_applicable("resume", "the rollout is not paused")),
        }
    }

    pub(super) fn operator_promote(&mut self, out: &mut Vec<Command>) -> Result<(), NotApplicable> {
        if self.state != RolloutState::Paused
            || self.paused != Some(PauseKind::Canary)
            || self.mode != Mode::Normal
        {
            return Err(self.not_applicable(
                "promote",
                "only a rollout paused after its canary wave can be promoted",
            ));
        }
        record(
            out,
            Record::Operator {
                action: "promote".into(),
                reason: None,
            },
        );
        self.promoted = true;
        self.paused = None;
        // Promote is an explicit go: it also answers a pause requested during the canary wave.
        self.pause_requested = false;
        self.set_rollout_state(RolloutState::Committing, None, out);
        Ok(())
    }
}
