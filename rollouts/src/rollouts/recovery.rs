//! After a restart: rebuild the engine of every unfinished rollout from its stored inputs, and
//! revive a finished one when a node reports an outcome its history lacks.

use std::time::Duration;

use tokio::sync::mpsc;

use super::driver::Driver;
use super::snapshot::snapshot_of;
use super::spec::{StartedWith, build_spec};
use super::{Input, Rollouts};
use crate::engine::{Event, NodeState, Outcome, Rollout, RolloutState};
use crate::store::{RolloutRecord, StoreError};

/// Why an unfinished rollout could not be rebuilt after a restart.
#[derive(Debug, thiserror::Error)]
enum RecoverError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rollout `{id}` cannot be recovered: {why}")]
    Unrecoverable { id: String, why: String },
}

impl Rollouts {
    /// After a restart: rebuild every rollout that had not finished and start its task (see the
    /// module docs). Returns the ids of the rollouts that continue.
    pub fn recover(&self) -> Result<Vec<String>, StoreError> {
        let mut recovered = Vec::new();
        for record in self.store.list_rollouts()? {
            if record.status.state.is_final() {
                continue;
            }
            let id = record.id.clone();
            match self.recover_one(record) {
                Ok(()) => recovered.push(id),
                Err(e) => {
                    tracing::error!(rollout = %id, error = %e, "cannot recover the rollout");
                }
            }
        }
        Ok(recovered)
    }

    fn recover_one(&self, record: RolloutRecord) -> Result<(), RecoverError> {
        let targets = record.targets.clone();
        let mut driver = self.rebuild(record)?;
        if driver.engine.state() == RolloutState::Pending {
            // Stored, but the coordinator stopped before the rollout began.
            let _ = driver.handle(Event::Start);
        }
        // Every session died with the previous process: grace periods run from now.
        for node in targets {
            if !self.registry.is_connected(&node) {
                let _ = driver.handle(Event::SessionLost { node });
            }
        }
        self.spawn(driver);
        Ok(())
    }

    /// The driver of a stored rollout, its engine rebuilt by replaying its inputs and the last
    /// command of each node recomputed; not running yet.
    fn rebuild(&self, mut record: RolloutRecord) -> Result<Driver, RecoverError> {
        let parsed =
            hotroll_script::parse(&record.script_name, &record.script_source).map_err(|d| {
                RecoverError::Unrecoverable {
                    id: record.id.clone(),
                    why: format!(
                        "its stored script no longer parses: {}",
                        d.to_short_lines().join("; ")
                    ),
                }
            })?;
        let script = parsed.script;
        let grace = record
            .session_grace_ms
            .map_or(self.timing.session_grace, Duration::from_millis);
        let slack = record
            .step_slack_ms
            .map_or(self.timing.step_slack, Duration::from_millis);
        let spec = build_spec(&record.id, &script, &StartedWith::of(&record), grace, slack);
        let mut engine = Rollout::new(spec, record.epoch, record.created_ms);
        let inputs = self.store.inputs(&record.id)?;
        if inputs.is_empty() && record.status.state != RolloutState::Pending {
            // Started by a coordinator that kept no inputs: its engine cannot be rebuilt.
            return Err(RecoverError::Unrecoverable {
                id: record.id.clone(),
                why: "no engine inputs are stored for it".into(),
            });
        }
        let mut replayed = Vec::new();
        for input in &inputs {
            if let Ok(commands) = engine.handle(input.at_ms, input.event.clone()) {
                replayed.extend(commands);
            }
        }
        let rebuilt = snapshot_of(&engine, record.created_ms, record.status.finished_ms);
        if rebuilt != record.status {
            // Expected for an unfinished rollout: its stored status is rewritten only when its
            // rollout-level summary changes (see `summary_differs`).
            tracing::debug!(rollout = %record.id, "the replayed rollout is ahead of its stored status");
            record.status = rebuilt;
        }
        let next_seq = self
            .store
            .events(&record.id, 0)?
            .last()
            .map_or(1, |e| e.seq + 1);
        let next_input = inputs.last().map_or(1, |i| i.seq + 1);
        let mut driver = self.driver(engine, record, &script, next_seq, next_input);
        for command in &replayed {
            driver.remember(command);
        }
        tracing::info!(
            rollout = %driver.record.id,
            state = driver.engine.state().as_str(),
            inputs = inputs.len(),
            "rollout recovered; continuing as its nodes reconnect"
        );
        Ok(driver)
    }

    /// A rollout this process does not run, named by `node`'s journal with an outcome its
    /// stored status does not show: it ended before the coordinator restarted while the node
    /// was away (e.g. make-permanent unconfirmed, and the node's agent then restarted and rolled
    /// back). Its engine is rebuilt so that the outcome is recorded and the final state
    /// corrected. Returns its input channel; `None` when there is nothing new to record.
    pub(super) fn revive(
        &self,
        rollout_id: &str,
        node: &str,
        event: &Event,
    ) -> Option<mpsc::UnboundedSender<Input>> {
        let Event::Outcome { outcome, .. } = event else {
            return None;
        };
        let record = self.store.get_rollout(rollout_id).ok()??;
        let shown = record.status.nodes.iter().find(|n| n.name == node)?.state;
        let news = match outcome {
            Outcome::Aborted => shown != NodeState::Aborted,
            Outcome::RolledBack => shown != NodeState::RolledBack,
            Outcome::Failed => shown != NodeState::Failed,
            Outcome::Committed | Outcome::RollingBack | Outcome::Permanent => false,
        };
        if !news || !record.status.state.is_final() {
            return None;
        }
        // One revival at a time, so that two Hellos cannot start two drivers.
        let _reviving = self.reviving.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = self.lock().get(rollout_id) {
            return Some(handle.tx.clone());
        }
        match self.rebuild(record) {
            Ok(driver) => Some(self.spawn(driver)),
            Err(e) => {
                tracing::warn!(rollout_id, node, error = %e, "cannot rebuild a finished rollout to record a late outcome");
                None
            }
        }
    }
}
