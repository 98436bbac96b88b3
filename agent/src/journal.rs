//! The agent's durable journal (docs/design.md §5): one record per rollout, written before each
//! instruction, so that a restarted agent knows where it was ([`crate::executor::recovery`] acts on it at
//! start) and can tell the coordinator in Hello.
//!
//! Stored in `<data_dir>/journal.log`, an append-only log: a record is one line, its CRC-32 in
//! hex then the record as JSON (so fields can be added without a migration), appended and
//! fdatasynced before [`Journal::record_blocking`] returns. The log is read into memory at open,
//! where the last line of a rollout wins; a torn last line (a crash mid-append) is cut off, any
//! other bad line is an error naming the file and line. When the log has grown well past what it
//! holds it is rewritten (a temp file, fsynced, renamed over it, the dir fsynced). One append
//! and one fdatasync per record: journalling costs a step microseconds of CPU rather than a
//! B-tree transaction (docs/performance.md). `<data_dir>/journal.lock` (flock) keeps a second
//! agent off the data dir. A `journal.redb` left by an older agent is read into the log once.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::report::{NodeState, Phase, now_unix_ms};

pub const FILE_NAME: &str = "journal.log";

/// Held (flock) by the agent that owns the data dir.
pub const LOCK_FILE_NAME: &str = "journal.lock";

/// The journal of agents before the log: read into the log once, then removed.
const OLD_FILE_NAME: &str = "journal.redb";
const OLD_ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");

/// Finished rollouts the journal remembers (the newest ones).
pub const KEEP_FINISHED: usize = 8;

/// The log is rewritten once it has this many more lines than records it holds.
const COMPACT_AFTER_EXTRA_LINES: usize = 256;

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
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "journal {}: another agent holds it (is an agent already running on this data dir?)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("journal {}:{line}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("journal {}: reading the old journal: {error}", path.display())]
    Old { path: PathBuf, error: redb::Error },
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
    #[error(
        "journal {}: an earlier write failed and could not be undone; restart the agent",
        path.display()
    )]
    Poisoned { path: PathBuf },
    #[error("journal {}: the writer task failed: {message}", path.display())]
    Task { path: PathBuf, message: String },
}

/// Handle to the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Mutex<Log>>,
    path: Arc<PathBuf>,
}

/// The open log and what it holds.
struct Log {
    file: File,
    /// Bytes of whole lines in the file: where the next append goes.
    len: u64,
    /// Lines in the file.
    lines: usize,
    records: BTreeMap<String, JournalRecord>,
    /// A failed append could not be cut back off the file: no more writes until a reopen.
    poisoned: bool,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Journal {
    /// Open (or create) the journal in `data_dir`; fails when another agent holds it.
    pub fn open(data_dir: &Path) -> Result<Self, JournalError> {
        let path = data_dir.join(FILE_NAME);
        let io = |error| JournalError::Io {
            path: path.clone(),
            error,
        };
        let lock_path = data_dir.join(LOCK_FILE_NAME);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    JournalError::Locked { path: path.clone() }
                } else {
                    io(std::io::Error::from(errno))
                }
            })?;
        let old = data_dir.join(OLD_FILE_NAME);
        if !path.exists() && old.exists() {
            let records = read_old(&old).map_err(|error| JournalError::Old {
                path: old.clone(),
                error,
            })?;
            write_whole(&path, &records).map_err(io)?;
            std::fs::remove_file(&old).map_err(io)?;
            tracing::info!(from = %old.display(), to = %path.display(), records = records.len(), "journal moved to the log");
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let (records, lines, len, torn) = replay(&path, &file)?;
        if torn {
            tracing::warn!(journal = %path.display(), "the journal's last line was torn (a crash while it was written); it is dropped");
            file.set_len(len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        // A journal just created must still be there after a crash.
        sync_dir(data_dir).map_err(io)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Log {
                file,
                len,
                lines,
                records,
                poisoned: false,
                _lock: lock,
            })),
            path: Arc::new(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock leaves the log as consistent as any crash would.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Durably write `record` (replacing the rollout's previous one). When a rollout is done,
    /// the oldest finished rollouts beyond [`KEEP_FINISHED`] are forgotten: the journal holds
    /// the rollout in progress and the last few finished ones, not a history (the coordinator
    /// keeps that). A few, not one: a finished rollout the journal still knows is answered with
    /// its outcome and never run again when the coordinator repeats one of its commands.
    pub fn record_blocking(&self, mut record: JournalRecord) -> Result<(), JournalError> {
        record.updated_unix_ms = now_unix_ms();
        let json = serde_json::to_vec(&record).map_err(|error| JournalError::Encode {
            path: self.path.to_path_buf(),
            error,
        })?;
        let line = encode_line(&json);
        let io = |error| JournalError::Io {
            path: self.path.to_path_buf(),
            error,
        };
        let mut log = self.log();
        if log.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.to_path_buf(),
            });
        }
        let written = (&log.file)
            .write_all(&line)
            .and_then(|()| log.file.sync_data());
        if let Err(error) = written {
            // Cut off what may have reached the file, so the next append starts on a line.
            let len = log.len;
            if log
                .file
                .set_len(len)
                .and_then(|()| log.file.sync_data())
                .is_err()
            {
                log.poisoned = true;
            }
            return Err(io(error));
        }
        log.len += line.len() as u64;
        log.lines += 1;
        apply(&mut log.records, record.clone());
        if log.lines > log.records.len() + COMPACT_AFTER_EXTRA_LINES {
            // The record is durable already; a failed rewrite only leaves the log long.
            if let Err(error) = self.compact(&mut log) {
                tracing::warn!(journal = %self.path.display(), %error, "cannot rewrite the journal; it keeps growing until it can");
            }
        }
        drop(log);
        if crate::fault::armed() {
            crate::fault::point(&record.fault_point());
        }
        Ok(())
    }

    /// Rewrite the log with one line per record it holds.
    fn compact(&self, log: &mut Log) -> std::io::Result<()> {
        let len = write_whole(&self.path, &log.records)?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&*self.path)?;
        log.file = file;
        log.len = len;
        log.lines = log.records.len();
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
        Ok(self.log().records.get(rollout_id).cloned())
    }

    /// Every record, ordered by rollout id.
    pub fn entries(&self) -> Result<Vec<JournalRecord>, JournalError> {
        Ok(self.log().records.values().cloned().collect())
    }
}

/// Take `record` into `records` as writing it does: it replaces its rollout's record, and a
/// finished one forgets the oldest finished rollouts beyond [`KEEP_FINISHED`]. Replaying the
/// log line by line therefore rebuilds exactly what the writer held.
fn apply(records: &mut BTreeMap<String, JournalRecord>, record: JournalRecord) {
    if record.phase == Phase::Done {
        let mut finished: Vec<(u64, String)> = records
            .values()
            .filter(|r| r.phase == Phase::Done && r.rollout_id != record.rollout_id)
            .map(|r| (r.updated_unix_ms, r.rollout_id.clone()))
            .collect();
        finished.sort();
        let excess = finished.len().saturating_sub(KEEP_FINISHED - 1);
        for (_, id) in finished.into_iter().take(excess) {
            records.remove(&id);
        }
    }
    records.insert(record.rollout_id.clone(), record);
}

/// `<crc32 of the JSON, 8 hex digits> <JSON>\n`.
fn encode_line(json: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(json.len() + 10);
    line.extend_from_slice(format!("{:08x} ", crc32fast::hash(json)).as_bytes());
    line.extend_from_slice(json);
    line.push(b'\n');
    line
}

/// One line without its newline: the record, or why it is not one.
pub(crate) fn decode_line(line: &[u8]) -> Result<JournalRecord, String> {
    let (crc, json) = match (line.get(..8), line.get(8), line.get(9..)) {
        (Some(crc), Some(b' '), Some(json)) => (crc, json),
        _ => return Err("not a journal line (`CRC JSON`)".into()),
    };
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|crc| u32::from_str_radix(crc, 16).ok())
        .ok_or("the checksum is not 8 hex digits")?;
    if crc32fast::hash(json) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("unreadable record: {e}"))
}

/// Read the log: the records, its lines, the length of its whole lines, and whether a torn
/// last line follows them.
#[allow(clippy::type_complexity)]
fn replay(
    path: &Path,
    file: &File,
) -> Result<(BTreeMap<String, JournalRecord>, usize, u64, bool), JournalError> {
    let io = |error| JournalError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut reader = BufReader::new(file);
    let mut records = BTreeMap::new();
    let (mut lines, mut len) = (0, 0u64);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(io)?;
        if read == 0 {
            return Ok((records, lines, len, false));
        }
        let complete = line.last() == Some(&b'\n');
        let body = if complete {
            &line[..line.len() - 1]
        } else {
            &line[..]
        };
        match decode_line(body) {
            Ok(record) if complete => apply(&mut records, record),
            outcome => {
                // Not followed by anything: a crash mid-append left it; anything after it
                // means the file was damaged some other way.
                let mut rest = Vec::new();
                std::io::Read::read_to_end(&mut reader, &mut rest).map_err(io)?;
                if rest.is_empty() {
                    return Ok((records, lines, len, true));
                }
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: lines + 1,
                    reason: outcome.err().unwrap_or_else(|| "no newline".into()),
                });
            }
        }
        lines += 1;
        len += read as u64;
    }
}

/// Write `records` as a fresh log at `path` (a temp file fsynced, then renamed over it, then the
/// dir fsynced); its length.
fn write_whole(path: &Path, records: &BTreeMap<String, JournalRecord>) -> std::io::Result<u64> {
    let temp = path.with_extension("log.tmp");
    let mut bytes = Vec::new();
    for record in records.values() {
        let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        bytes.extend(encode_line(&json));
    }
    let mut file = File::create(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(bytes.len() as u64)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The records of an older agent's `journal.redb`.
fn read_old(path: &Path) -> Result<BTreeMap<String, JournalRecord>, redb::Error> {
    let db = Database::create(path)?;
    let txn = db.begin_read()?;
    let mut records = BTreeMap::new();
    let table = match txn.open_table(OLD_ROLLOUTS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(records),
        Err(e) => return Err(e.into()),
    };
    for entry in table.iter()? {
        let (key, value) = entry?;
        match serde_json::from_slice::<JournalRecord>(value.value()) {
            Ok(record) => {
                records.insert(record.rollout_id.clone(), record);
            }
            Err(error) => {
                tracing::warn!(journal = %path.display(), rollout_id = key.value(), %error, "an unreadable record of the old journal is left out");
            }
        }
    }
    Ok(records)
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

    fn preparing(id: &str, step: u32) -> JournalRecord {
        JournalRecord::new(id, 1, step, Phase::Preparing, NodeState::Preparing)
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_log_goes_on_after_it()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let journal = Journal::open(dir.path())?;
            journal.record_blocking(preparing("a", 1))?;
            journal.record_blocking(preparing("a", 2))?;
        }
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path)?;
        // A crash in the middle of the second append.
        std::fs::write(&path, &whole[..whole.len() - 7])?;
        let journal = Journal::open(dir.path())?;
        assert_eq!(journal.get("a")?.map(|r| r.step), Some(1));
        journal.record_blocking(preparing("a", 3))?;
        drop(journal);
        let journal = Journal::open(dir.path())?;
        assert_eq!(journal.get("a")?.map(|r| r.step), Some(3));
        Ok(())
    }

    #[test]
    fn a_damaged_line_before_the_end_is_an_error_naming_its_line()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let journal = Journal::open(dir.path())?;
            for step in 0..3 {
                journal.record_blocking(preparing("a", step))?;
            }
        }
        let path = dir.path().join(FILE_NAME);
        let text = std::fs::read_to_string(&path)?;
        let damaged = text.replacen("\"step\":1", "\"step\":7", 1);
        assert_ne!(damaged, text);
        std::fs::write(&path, damaged)?;
        let error = Journal::open(dir.path()).err().map(|e| e.to_string());
        let expected = format!("journal {}:2: checksum mismatch", path.display());
        assert_eq!(error, Some(expected));
        Ok(())
    }

    #[test]
    fn the_log_is_rewritten_when_it_grows_and_keeps_what_it_held()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE_NAME);
        let journal = Journal::open(dir.path())?;
        journal.record_blocking(preparing("kept", 9))?;
        for step in 0..(2 * COMPACT_AFTER_EXTRA_LINES as u32) {
            journal.record_blocking(preparing("busy", step))?;
        }
        let lines = std::fs::read_to_string(&path)?.lines().count();
        assert!(
            lines <= COMPACT_AFTER_EXTRA_LINES + 2,
            "{lines} lines: never rewritten"
        );
        let last = 2 * COMPACT_AFTER_EXTRA_LINES as u32 - 1;
        drop(journal);
        let journal = Journal::open(dir.path())?;
        assert_eq!(journal.get("kept")?.map(|r| r.step), Some(9));
        assert_eq!(journal.get("busy")?.map(|r| r.step), Some(last));
        assert!(!dir.path().join("journal.log.tmp").exists());
        Ok(())
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused_until_the_first_is_closed()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let first = Journal::open(dir.path())?;
        let second = Journal::open(dir.path()).err().map(|e| e.to_string());
        assert!(
            second
                .as_deref()
                .is_some_and(|e| e.contains("another agent holds it")),
            "{second:?}"
        );
        drop(first);
        Journal::open(dir.path())?;
        Ok(())
    }

    #[test]
    fn an_older_agents_redb_journal_is_moved_into_the_log() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let old = dir.path().join(OLD_FILE_NAME);
        {
            let db = Database::create(&old)?;
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(OLD_ROLLOUTS)?;
                let record =
                    JournalRecord::new("r", 3, 5, Phase::Committing, NodeState::Committing);
                table.insert("r", serde_json::to_vec(&record)?.as_slice())?;
            }
            txn.commit()?;
        }
        let journal = Journal::open(dir.path())?;
        let record = journal.get("r")?.ok_or("the old record is gone")?;
        assert_eq!(
            (record.epoch, record.step, record.phase),
            (3, 5, Phase::Committing)
        );
        assert!(!old.exists());
        drop(journal);
        assert_eq!(Journal::open(dir.path())?.entries()?.len(), 1);
        Ok(())
    }
}
