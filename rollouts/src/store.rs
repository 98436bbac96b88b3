//! The coordinator's durable state behind a [`Store`] trait: rollouts, their event history, the
//! inputs of their engines, and the node registry. [`RedbStore`] keeps it in one redb file;
//! [`MemoryStore`] serves tests and simulations that want no disk.
//!
//! Crash safety rests on [`Store::commit`]: one engine step (the input it was given, the records
//! it produced and the rollout's new status) lands in one transaction, before any command of
//! that step is sent. After a restart the engine of every unfinished rollout is rebuilt by
//! replaying its inputs ([`Store::inputs`]); the engine is deterministic, so that gives back its
//! exact state: barriers, deadlines, waves, what each node was told.
//!
//! Values are JSON so a record can grow fields without a migration. [`faults`] has a store that
//! fails on demand, for tests.

pub mod contract;
pub mod faults;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::engine::{Event, Millis, Record};

const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// The engine's inputs per rollout, in the order it was given them.
const INPUTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inputs");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    #[error("store: corrupt record {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("store: cannot encode record: {0}")]
    Encode(serde_json::Error),
    #[error("store: cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The database was closed after a failed write and could not be opened again yet (every
    /// later call tries again).
    #[error("store: the database is closed after a failed write and cannot be reopened: {0}")]
    Closed(String),
    /// The HA store (etcd) could not be reached in time or refused the request.
    #[error("store: {0}")]
    Remote(String),
    /// A write fenced by the leader's epoch was refused: another coordinator leads now, and
    /// this one must stop acting (docs/design.md §12).
    #[error("store: this coordinator no longer leads: a write fenced by epoch {epoch} was refused")]
    Fenced { epoch: u64 },
    /// The write is larger than the store takes in one request.
    #[error(
        "store: {what} is {bytes} bytes, more than the {limit} bytes the store takes in one write"
    )]
    TooLarge {
        what: String,
        bytes: usize,
        limit: usize,
    },
    /// A fault injected by a test store ([`faults::FailingStore`]).
    #[error("store: {0}")]
    Injected(String),
}

macro_rules! db_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Db(e.into()))
    };
}

/// Everything the coordinator keeps about one rollout besides its event history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    pub epoch: u64,
    pub created_ms: Millis,
    pub script_name: String,
    pub script_source: String,
    pub artifacts: Vec<ArtifactBinding>,
    pub targets: Vec<String>,
    /// The latest status, rewritten as the rollout moves.
    pub status: RolloutSnapshot,
    /// The coordinator's timing the engine was built with, so that a restarted coordinator
    /// (perhaps with other flags) rebuilds the same engine. Absent in records written before
    /// they were kept: the current flags are used then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_slack_ms: Option<u64>,
    /// Nodes that matched the selection but were left out on the operator's word, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<crate::engine::LeftOut>,
    /// The targets' labels when it started, which its waves were formed from.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub target_labels: crate::engine::TargetLabels,
    /// A dry run (see [`crate::engine::RolloutSpec::dry_run`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// An artifact name of the script bound to the digest the operator uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactBinding {
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub mode: u32,
    pub unpack: bool,
}

/// A rollout's status as `status`, `list` and `watch` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSnapshot {
    pub id: String,
    pub state: crate::engine::RolloutState,
    pub app: String,
    pub from: String,
    pub to: String,
    pub failures: u32,
    pub max_failures: u32,
    pub current_wave: u32,
    pub waves: u32,
    pub steps_total: u32,
    pub nodes: Vec<crate::engine::NodeView>,
    pub barrier: Option<crate::engine::BarrierView>,
    pub error: Option<String>,
    pub created_ms: Millis,
    pub finished_ms: Option<Millis>,
    /// Set while the rollout holds because the store failed to record its latest step: none
    /// of that step's commands has been sent. Live only (never stored: the store is what fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_on_store: Option<StoreHold>,
    /// Nodes the rollout left out (see [`RolloutRecord::left_out`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<crate::engine::LeftOut>,
    /// A dry run: it never commits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// While the next wave waits for a window: when it opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_opens_ms: Option<Millis>,
    /// While a fleet gate runs after a wave: its name (`gate NAME holding`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_holding: Option<String>,
}

/// Why and since when a rollout holds on its store (see [`RolloutSnapshot::held_on_store`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreHold {
    /// The store's error, e.g. `cannot store the rollout's step: ... No space left on device`.
    pub error: String,
    pub since_ms: Millis,
}

/// One entry in a rollout's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// 1-based position in the rollout's history.
    pub seq: u64,
    pub at_ms: Millis,
    pub record: Record,
}

/// One input of a rollout's engine: `Rollout::handle(at_ms, event)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInput {
    /// 1-based position among the rollout's inputs.
    pub seq: u64,
    pub at_ms: Millis,
    pub event: Event,
}

/// What one engine step (or several consecutive ones, stored together) makes durable, all or
/// nothing (see [`Store::commit`]).
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub rollout: &'a str,
    /// The engine's inputs, in order.
    pub inputs: &'a [StoredInput],
    pub events: &'a [StoredEvent],
    /// The rollout's record with its new status, when it changed.
    pub record: Option<&'a RolloutRecord>,
}

/// What the coordinator remembers about a node between sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub apps: BTreeMap<String, AppVersions>,
    pub boot_generation: u64,
    pub last_seen_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AppVersions {
    pub current: String,
    pub permanent: String,
    /// An OTP release node: its release handler's releases as last reported (older records
    /// have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<OtpRelease>,
}

/// One release an OTP node's release handler knows (`which_releases/0`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OtpRelease {
    pub name: String,
    pub version: String,
    /// `current`, `permanent`, `unpacked` or `old`.
    pub status: String,
}

pub trait Store: Send + Sync + 'static {
    fn put_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError>;
    fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError>;
    /// Every rollout, newest first.
    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;
    /// The newest `limit` rollouts, newest first (what `list_rollouts` starts with). A store
    /// that can read just those (redb, in key order) should: `rollout list` and the status
    /// polls of a watcher must not decode every rollout ever run.
    fn newest_rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut rollouts = self.list_rollouts()?;
        rollouts.truncate(limit);
        Ok(rollouts)
    }
    /// The ids of the newest `limit` rollouts, newest first, each with its record unless
    /// `known(id)` says the caller has it already (a rollout this process runs, whose live
    /// status replaces the record). A store that can skip decoding those (redb) should: a
    /// running rollout's record holds every node, and status polls ask for it again and again.
    fn newest_rollouts_unless(
        &self,
        limit: usize,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Option<RolloutRecord>)>, StoreError> {
        Ok(self
            .newest_rollouts(limit)?
            .into_iter()
            .map(|record| (record.id.clone(), (!known(&record.id)).then_some(record)))
            .collect())
    }
    /// Append to a rollout's history; `event.seq` must be the next position.
    fn append_events(&self, rollout: &str, events: &[StoredEvent]) -> Result<(), StoreError>;
    /// The rollout's history from `from_seq` on (inclusive).
    fn events(&self, rollout: &str, from_seq: u64) -> Result<Vec<StoredEvent>, StoreError>;
    /// Make engine steps durable in one transaction: their inputs, the records they produced
    /// and the rollout's new status. Either all of it is stored or none.
    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError>;
    /// Every input of the rollout's engine, in order (what [`Store::commit`] stored).
    fn inputs(&self, rollout: &str) -> Result<Vec<StoredInput>, StoreError>;
    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError>;
    /// Several node records in one transaction (the registry writes them behind, in batches).
    fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        nodes.iter().try_for_each(|node| self.put_node(node))
    }
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
}

/// A record as the stores keep it (JSON, so records can grow fields without a migration).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

/// A stored record read back; `key` names it in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// redb's page cache for the coordinator's store.
const STORE_CACHE_BYTES: usize = 32 << 20;

/// The durable store: one redb file. Every write is committed (fsynced) before it returns, so a
/// state change is durable before any command that depends on it is sent.
///
/// After a failed write redb refuses every later one ("Previous I/O error occurred") until the
/// database is closed and opened again, so a failed write closes it and opens it afresh: the
/// file holds what was committed before, and the caller's retry can succeed once the cause
/// (a full disk) is gone. Every call holds a read lock on the open database for its duration;
/// reopening takes the write lock, so it waits for calls in flight and no transaction outlives
/// the database it was begun on.
pub struct RedbStore {
    path: PathBuf,
    open: RwLock<OpenDb>,
}

/// The open database, if any, and how many times it has been (re)opened.
struct OpenDb {
    db: Result<redb::Database, String>,
    generation: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Open (or create) `<data_dir>/coordinator.redb`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join("coordinator.redb");
        let db = open_db(&path)?;
        Ok(Self {
            path,
            open: RwLock::new(OpenDb {
                db: Ok(db),
                generation: 0,
            }),
        })
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, OpenDb> {
        // A panic under the lock leaves the database open or closed, both consistent.
        self.open.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Run a read-only call on the open database (reopening a closed one first).
    fn read<T>(
        &self,
        call: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let generation = {
            let open = self.read_lock();
            match &open.db {
                Ok(db) => return call(db),
                Err(_) => open.generation,
            }
        };
        self.reopen(generation);
        match &self.read_lock().db {
            Ok(db) => call(db),
            Err(why) => Err(StoreError::Closed(why.clone())),
        }
    }

    /// Run a write on the open database; when it fails on the database, close and reopen it
    /// (see the type's docs) and return the error: the caller retries.
    fn write(
        &self,
        call: impl FnOnce(&redb::Database) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let (result, generation) = {
            let open = self.read_lock();
            let result = match &open.db {
                Ok(db) => call(db),
                Err(why) => Err(StoreError::Closed(why.clone())),
            };
            (result, open.generation)
        };
        if matches!(result, Err(StoreError::Db(_) | StoreError::Closed(_))) {
            self.reopen(generation);
        }
        result
    }

    /// Close the database and open it again, unless that already happened since `generation`.
    fn reopen(&self, generation: u64) {
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        if open.generation != generation {
            return;
        }
        open.generation += 1;
        // Dropped before it is opened again: redb allows one open handle per file.
        open.db = Err("reopening".into());
        open.db = open_db(&self.path).map_err(|e| e.to_string());
        match &open.db {
            Ok(_) => {
                tracing::info!(path = %self.path.display(), "store reopened after a failed write")
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen the store yet")
            }
        }
    }
}

fn open_db(path: &Path) -> Result<redb::Database, StoreError> {
    // redb caches pages up to its cache size (1 GiB by default): bounded here so that the
    // coordinator's memory does not grow with its history, which lives on disk.
    let db = db_err!(
        redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)
    )?;
    // Create the tables up front so readers never see "table does not exist".
    let tx = db_err!(db.begin_write())?;
    {
        db_err!(tx.open_table(ROLLOUTS))?;
        db_err!(tx.open_table(EVENTS))?;
        db_err!(tx.open_table(INPUTS))?;
        db_err!(tx.open_table(NODES))?;
    }
    db_err!(tx.commit())?;
    Ok(db)
}

impl Store for RedbStore {
    fn put_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        self.write(|db| {
            let tx = db_err!(db.begin_write())?;
            {
                let mut table = db_err!(tx.open_table(ROLLOUTS))?;
                db_err!(table.insert(record.id.as_str(), bytes.as_slice()))?;
            }
            db_err!(tx.commit())
        })
    }

    fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        self.read(|db| {
            let tx = db_err!(db.begin_read())?;
            let table = db_err!(tx.open_table(ROLLOUTS))?;
            match db_err!(table.get(id))? {
                Some(value) => Ok(Some(decode(id, value.value())?)),
                None => Ok(None),
            }
        })
    }

    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.read(|db| {
            let tx = db_err!(db.begin_read())?;
            let table = db_err!(tx.open_table(ROLLOUTS))?;
            let mut out = Vec::new();
            for entry in db_err!(table.iter())? {
                let (key, value) = db_err!(entry)?;
                out.push(decode::<RolloutRecord>(key.value(), value.value())?);
            }
            // uuid v7 ids sort by creation time.
            out.sort_by(|a, b| b.id.cmp(&a.id));
            Ok(out)
        })
    }

    fn newest_rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        Ok(self
            .newest_rollouts_unless(limit, &|_| false)?
            .into_iter()
            .filter_map(|(_, record)| record)
            .collect())
    }

    fn newest_rollouts_unless(
        &self,
        limit: usize,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Option<RolloutRecord>)>, StoreError> {
        self.read(|db| {
            let tx = db_err!(db.begin_read())?;
            let table = db_err!(tx.open_table(ROLLOUTS))?;
            let mut out = Vec::new();
            // Keys are uuid v7 ids, which sort by creation time: the newest are last.
            for entry in db_err!(table.iter())?.rev().take(limit) {
                let (key, value) = db_err!(entry)?;
                let id = key.value();
                let record = if known(id) {
                    None
                } else {
                    Some(decode::<RolloutRecord>(id, value.value())?)
                };
                out.push((id.to_string(), record));
            }
            Ok(out)
        })
    }

    fn append_events(&self, rollout: &str, events: &[StoredEvent]) -> Result<(), StoreError> {
        self.write(|db| {
            let tx = db_err!(db.begin_write())?;
            {
                let mut table = db_err!(tx.open_table(EVENTS))?;
                for event in events {
                    let bytes = encode(event)?;
                    db_err!(table.insert((rollout, event.seq), bytes.as_slice()))?;
                }
            }
            db_err!(tx.commit())
        })
    }

    fn events(&self, rollout: &str, from_seq: u64) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(|db| {
            let tx = db_err!(db.begin_read())?;
            let table = db_err!(tx.open_table(EVENTS))?;
            let mut out = Vec::new();
            for entry in db_err!(table.range((rollout, from_seq)..=(rollout, u64::MAX)))? {
                let (_, value) = db_err!(entry)?;
                out.push(decode::<StoredEvent>(rollout, value.value())?);
            }
            Ok(out)
        })
    }

    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        let inputs = commit
            .inputs
            .iter()
            .map(|i| encode(i).map(|bytes| (i.seq, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let events = commit
            .events
            .iter()
            .map(|e| encode(e).map(|bytes| (e.seq, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        let record = commit.record.map(encode).transpose()?;
        self.write(|db| {
            let tx = db_err!(db.begin_write())?;
            {
                if !inputs.is_empty() {
                    let mut table = db_err!(tx.open_table(INPUTS))?;
                    for (seq, bytes) in &inputs {
                        db_err!(table.insert((commit.rollout, *seq), bytes.as_slice()))?;
                    }
                }
                if !events.is_empty() {
                    let mut table = db_err!(tx.open_table(EVENTS))?;
                    for (seq, bytes) in &events {
                        db_err!(table.insert((commit.rollout, *seq), bytes.as_slice()))?;
                    }
                }
                if let Some(bytes) = &record {
                    let mut table = db_err!(tx.open_table(ROLLOUTS))?;
                    db_err!(table.insert(commit.rollout, bytes.as_slice()))?;
                }
            }
            db_err!(tx.commit())
        })
    }

    fn inputs(&self, rollout: &str) -> Result<Vec<StoredInput>, StoreError> {
        self.read(|db| {
            let tx = db_err!(db.begin_read())?;
            let table = db_err!(tx.open_table(INPUTS))?;
            let mut out = Vec::new();
            for entry in db_err!(table.range((rollout, 0)..=(rollout, u64::MAX)))? {
                let (_, value) = db_err!(entry)?;
                out.push(decode::<StoredInput>(rollout, value.value())?);
            }
            Ok(out)
        })
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put_nodes(std::slice::from_ref(node))
    }

    fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        let encoded = nodes
            .iter()
            .map(|node| encode(node).map(|bytes| (node.name.as_str(), bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        self.write(|db| {
            let tx = db_err!(db.begin_write())?;
            {
                let mut table = db_err!(tx.open_table(NODES))?;
                for (name, bytes) in &encoded {
                    db_err!(table.insert(*name, bytes.as_slice()))?;
                }
            }
            db_err!(tx.commit())
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.read(|db| {
            let tx = db_err!(db.begin_read())?;
            let table = db_err!(tx.open_table(NODES))?;
            let mut out = Vec::new();
            for entry in db_err!(table.iter())? {
                let (key, value) = db_err!(entry)?;
                out.push(decode::<NodeRecord>(key.value(), value.value())?);
            }
            Ok(out)
        })
    }
}

/// A store that keeps everything in memory: for tests and simulations.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    rollouts: BTreeMap<String, RolloutRecord>,
    events: BTreeMap<(String, u64), StoredEvent>,
    inputs: BTreeMap<(String, u64), StoredInput>,
    nodes: BTreeMap<String, NodeRecord>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic while holding the lock cannot leave a half-written record (every write is one
        // insert), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn put_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        self.lock()
            .rollouts
            .insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        Ok(self.lock().rollouts.get(id).cloned())
    }

    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        Ok(self.lock().rollouts.values().rev().cloned().collect())
    }

    fn append_events(&self, rollout: &str, events: &[StoredEvent]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for event in events {
            inner
                .events
                .insert((rollout.to_string(), event.seq), event.clone());
        }
        Ok(())
    }

    fn events(&self, rollout: &str, from_seq: u64) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .lock()
            .events
            .range((rollout.to_string(), from_seq)..=(rollout.to_string(), u64::MAX))
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let rollout = commit.rollout.to_string();
        for input in commit.inputs {
            inner
                .inputs
                .insert((rollout.clone(), input.seq), input.clone());
        }
        for event in commit.events {
            inner
                .events
                .insert((rollout.clone(), event.seq), event.clone());
        }
        if let Some(record) = commit.record {
            inner.rollouts.insert(rollout, record.clone());
        }
        Ok(())
    }

    fn inputs(&self, rollout: &str) -> Result<Vec<StoredInput>, StoreError> {
        Ok(self
            .lock()
            .inputs
            .range((rollout.to_string(), 0)..=(rollout.to_string(), u64::MAX))
            .map(|(_, i)| i.clone())
            .collect())
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.lock().nodes.insert(node.name.clone(), node.clone());
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.lock().nodes.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::contract::{check, record};
    use super::*;
    use crate::engine::RolloutState;

    #[test]
    fn memory_store_keeps_rollouts_events_and_nodes() {
        check(&MemoryStore::default()).unwrap();
    }

    #[test]
    fn redb_store_keeps_state_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            check(&store).unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.list_rollouts().unwrap().len(), 2);
        assert_eq!(store.events("a", 0).unwrap().len(), 9);
        assert_eq!(store.inputs("a").unwrap().len(), 6);
        let mut moved = record("a");
        moved.status.state = RolloutState::Committing;
        assert_eq!(store.get_rollout("a").unwrap().unwrap(), moved);
    }
}
