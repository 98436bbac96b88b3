//! The agent's durable journal (DESIGN §5): one record per rollout, written before each
//! instruction, so that a restarted agent knows where it was (recovery acts on it in a later
//! issue) and can tell the coordinator in Hello.
//!
//! Stored in `<data_dir>/journal.redb`, one redb table keyed by rollout id with JSON values, so
//! that fields can be added without a migration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::report::{NodeState, Phase, now_unix_ms};

const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");

pub const FILE_NAME: &str = "journal.redb";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub rollout_id: String,
    pub epoch: u64,
    /// Index into `up` of the instruction in progress or last finished.
    pub step: u32,
    pub phase: Phase,
    pub node_state: NodeState,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub updated_unix_ms: u64,
}

impl JournalRecord {
    pub fn new(
        rollout_id: &str,
        epoch: u64,
        step: u32,
        phase: Phase,
        node_state: NodeState,
    ) -> Self {
        Self {
            rollout_id: rollout_id.to_string(),
            epoch,
            step,
            phase,
            node_state,
            error: String::new(),
            updated_unix_ms: 0,
        }
    }

    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = error.into();
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {error}", path.display())]
    Db { path: PathBuf, error: redb::Error },
    #[error("journal {}: record for rollout `{rollout_id}` is unreadable: {error}", path.display())]
    Decode {
        path: PathBuf,
        rollout_id: String,
        error: serde_json::Error,
    },
    #[error("journal {}: cannot encode record: {error}", path.display())]
    Encode {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("journal {}: the writer task failed: {message}", path.display())]
    Task { path: PathBuf, message: String },
}

/// Handle to the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Journal {
    /// Open (or create) the journal in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, JournalError> {
        let path = data_dir.join(FILE_NAME);
        let db_err = |e: redb::Error| JournalError::Db {
            path: path.clone(),
            error: e,
        };
        let db = Database::create(&path).map_err(|e| db_err(e.into()))?;
        // Create the table up front so that readers never see "table does not exist".
        let txn = db.begin_write().map_err(|e| db_err(e.into()))?;
        txn.open_table(ROLLOUTS).map_err(|e| db_err(e.into()))?;
        txn.commit().map_err(|e| db_err(e.into()))?;
        Ok(Self {
            db: Arc::new(db),
            path: Arc::new(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> JournalError {
        JournalError::Db {
            path: self.path.to_path_buf(),
            error: e.into(),
        }
    }

    /// Durably write `record` (replacing the rollout's previous one). When a rollout is done,
    /// older finished rollouts are forgotten: the journal holds the rollout in progress and the
    /// last finished one, not a history (the coordinator keeps that).
    pub fn record_blocking(&self, mut record: JournalRecord) -> Result<(), JournalError> {
        record.updated_unix_ms = now_unix_ms();
        let value = serde_json::to_vec(&record).map_err(|error| JournalError::Encode {
            path: self.path.to_path_buf(),
            error,
        })?;
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(ROLLOUTS).map_err(|e| self.db_err(e))?;
            if record.phase == Phase::Done {
                let mut stale = Vec::new();
                for entry in table.iter().map_err(|e| self.db_err(e))? {
                    let (key, value) = entry.map_err(|e| self.db_err(e))?;
                    let id = key.value().to_string();
                    let done = serde_json::from_slice::<JournalRecord>(value.value())
                        .map(|r| r.phase == Phase::Done)
                        .unwrap_or(true);
                    if done && id != record.rollout_id {
                        stale.push(id);
                    }
                }
                for id in stale {
                    table.remove(id.as_str()).map_err(|e| self.db_err(e))?;
                }
            }
            table
                .insert(record.rollout_id.as_str(), value.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// [`Journal::record_blocking`] off the async runtime's worker threads (it fsyncs).
    pub async fn record(&self, record: JournalRecord) -> Result<(), JournalError> {
        let journal = self.clone();
        tokio::task::spawn_blocking(move || journal.record_blocking(record))
            .await
            .map_err(|e| JournalError::Task {
                path: self.path.to_path_buf(),
                message: e.to_string(),
            })?
    }

    /// Every record, ordered by rollout id.
    pub fn entries(&self) -> Result<Vec<JournalRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(ROLLOUTS).map_err(|e| self.db_err(e))?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            let record =
                serde_json::from_slice(value.value()).map_err(|error| JournalError::Decode {
                    path: self.path.to_path_buf(),
                    rollout_id: key.value().to_string(),
                    error,
                })?;
            records.push(record);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_done_rollouts_are_pruned()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let journal = Journal::open(dir.path())?;
            journal.record_blocking(JournalRecord::new(
                "a",
                1,
                0,
                Phase::Preparing,
                NodeState::Preparing,
            ))?;
            journal.record_blocking(JournalRecord::new(
                "a",
                1,
                3,
                Phase::Done,
                NodeState::Permanent,
            ))?;
            journal.record_blocking(JournalRecord::new(
                "b",
                2,
                1,
                Phase::Committing,
                NodeState::Committing,
            ))?;
        }
        let journal = Journal::open(dir.path())?;
        let entries = journal.entries()?;
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].step, 3);
        assert_eq!(entries[1].phase, Phase::Committing);

        journal.record_blocking(
            JournalRecord::new("b", 2, 4, Phase::Done, NodeState::RolledBack).with_error("x"),
        )?;
        let entries = journal.entries()?;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].rollout_id, "b");
        assert_eq!(entries[0].error, "x");
        Ok(())
    }
}
