//! The agent's durable journal (docs/design.md §5): one record per rollout, written before each
//! instruction, so that a restarted agent knows where it was ([`crate::executor::recovery`] acts on it at
//! start) and can tell the coordinator in Hello.
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

/// Finished rollouts the journal remembers (the newest ones).
pub const KEEP_FINISHED: usize = 8;

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
    /// What the rollout changes, so that recovery can discard or roll back without the script.
    /// Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
}

/// The app and versions a rollout moves, and the runtime that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// `process` or `beam`.
    pub runtime: String,
    pub app: String,
    pub from: String,
    pub to: String,
}

impl Scope {
    pub fn of(rollout: &crate::runtime::RolloutContext) -> Self {
        Self {
            runtime: rollout.runtime.as_str().to_string(),
            app: rollout.app.clone(),
            from: rollout.from.clone(),
            to: rollout.to.clone(),
        }
    }

    /// The script runtime it names (`None` for a name this agent does not know).
    pub fn runtime(&self) -> Option<hotroll_script::Runtime> {
        match self.runtime.as_str() {
            "process" => Some(hotroll_script::Runtime::Process),
            "beam" => Some(hotroll_script::Runtime::Beam),
            "otp_release" => Some(hotroll_script::Runtime::OtpRelease),
            _ => None,
        }
    }
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
            scope: None,
        }
    }

    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = error.into();
        self
    }

    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// The name of the fault point reached once this record is durable (see [`crate::fault`]):
    /// `journal <phase> <node state> <step>`, e.g. `journal committing committing 5`.
    pub fn fault_point(&self) -> String {
        format!(
            "journal {} {} {}",
            phase_name(self.phase),
            state_name(self.node_state),
            self.step
        )
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Preparing => "preparing",
        Phase::Prepared => "prepared",
        Phase::Committing => "committing",
        Phase::RollingBack => "rolling_back",
        Phase::Done => "done",
    }
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Pending => "pending",
        NodeState::Preparing => "preparing",
        NodeState::Prepared => "prepared",
        NodeState::Committing => "committing",
        NodeState::Committed => "committed",
        NodeState::Aborted => "aborted",
        NodeState::RollingBack => "rolling_back",
        NodeState::RolledBack => "rolled_back",
        NodeState::Failed => "failed",
        NodeState::Permanent => "permanent",
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
    /// the oldest finished rollouts beyond [`KEEP_FINISHED`] are forgotten: the journal holds
    /// the rollout in progress and the last few finished ones, not a history (the coordinator
    /// keeps that). A few, not one: a finished rollout the journal still knows is answered with
    /// its outcome and never run again when the coordinator repeats one of its commands.
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
                // (last update, id) of the other finished rollouts; unreadable ones go first.
                let mut finished = Vec::new();
                for entry in table.iter().map_err(|e| self.db_err(e))? {
                    let (key, value) = entry.map_err(|e| self.db_err(e))?;
                    let id = key.value().to_string();
                    let done = serde_json::from_slice::<JournalRecord>(value.value())
                        .map(|r| (r.phase == Phase::Done).then_some(r.updated_unix_ms))
                        .unwrap_or(Some(0));
                    if let Some(updated) = done
                        && id != record.rollout_id
                    {
                        finished.push((updated, id));
                    }
                }
                finished.sort();
                let excess = finished.len().saturating_sub(KEEP_FINISHED - 1);
                for (_, id) in finished.into_iter().take(excess) {
                    table.remove(id.as_str()).map_err(|e| self.db_err(e))?;
                }
            }
            table
                .insert(record.rollout_id.as_str(), value.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        if crate::fault::armed() {
            crate::fault::point(&record.fault_point());
        }
        Ok(())
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

    /// The record of one rollout, if the journal has it.
    pub fn get(&self, rollout_id: &str) -> Result<Option<JournalRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(ROLLOUTS).map_err(|e| self.db_err(e))?;
        let Some(value) = table.get(rollout_id).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|error| JournalError::Decode {
                path: self.path.to_path_buf(),
                rollout_id: rollout_id.to_string(),
                error,
            })
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
        assert_eq!(
            entries.len(),
            2,
            "a finished rollout is remembered: {entries:?}"
        );
        assert_eq!(entries[1].rollout_id, "b");
        assert_eq!(entries[1].error, "x");
        assert_eq!(journal.get("b")?.map(|r| r.phase), Some(Phase::Done));
        assert_eq!(journal.get("zzz")?, None);

        // Only the newest KEEP_FINISHED finished rollouts stay; one in progress always does.
        journal.record_blocking(JournalRecord::new(
            "running",
            1,
            0,
            Phase::Preparing,
            NodeState::Preparing,
        ))?;
        for k in 0..2 * KEEP_FINISHED {
            std::thread::sleep(std::time::Duration::from_millis(2));
            journal.record_blocking(JournalRecord::new(
                &format!("f{k:02}"),
                1,
                0,
                Phase::Done,
                NodeState::Aborted,
            ))?;
        }
        let ids: Vec<String> = journal
            .entries()?
            .into_iter()
            .map(|r| r.rollout_id)
            .collect();
        let mut expected: Vec<String> = (KEEP_FINISHED..2 * KEEP_FINISHED)
            .map(|k| format!("f{k:02}"))
            .collect();
        expected.push("running".into());
        assert_eq!(ids, expected);
        Ok(())
    }

    #[test]
    fn the_scope_is_kept_and_old_records_read_without_it() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let journal = Journal::open(dir.path())?;
        let scope = Scope {
            runtime: "process".into(),
            app: "web".into(),
            from: "1.0".into(),
            to: "2.0".into(),
        };
        let record = JournalRecord::new("r", 1, 4, Phase::Committing, NodeState::Committing)
            .with_scope(scope.clone());
        assert_eq!(record.fault_point(), "journal committing committing 4");
        journal.record_blocking(record)?;
        let read = journal.get("r")?.ok_or("no record")?;
        assert_eq!(read.scope.as_ref(), Some(&scope));
        assert_eq!(scope.runtime(), Some(hotroll_script::Runtime::Process));
        let old: JournalRecord = serde_json::from_str(
            r#"{"rollout_id":"o","epoch":1,"step":0,"phase":"preparing","node_state":"preparing"}"#,
        )?;
        assert_eq!(old.scope, None);
        Ok(())
    }
}
