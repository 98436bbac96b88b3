//! The node registry: every node the coordinator has ever seen (durable, in the store) and the
//! live session of the ones connected now (memory only: a session dies with the process).
//!
//! Node records are written behind: the memory here is what the coordinator acts on, the store
//! only remembers nodes across restarts, so a connecting agent never waits for an fsync. One
//! writer thread takes whatever has been queued, keeps the latest record of each node, and
//! commits the lot in one transaction: a storm of 10,000 reconnecting agents costs a handful of
//! fsyncs, not 10,000 of them on the async runtime's threads. [`Registry::flush`] waits for
//! what was queued; dropping the registry flushes too.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};

use tokio::sync::mpsc;

use crate::engine::Millis;
use crate::outbound::{FanoutProbe, NodeCommand, Outbound};
use crate::store::{NodeRecord, Store};

/// How the rest of the coordinator reaches a connected node.
#[derive(Debug, Clone)]
pub struct SessionLink {
    /// Unique per accepted session, so a stale session's cleanup never detaches a newer one.
    pub id: u64,
    pub epoch: u64,
    pub tx: mpsc::Sender<Outbound>,
    pub peer: String,
}

#[derive(Debug)]
struct NodeEntry {
    record: NodeRecord,
    session: Option<SessionLink>,
    /// Grows with every accepted session for this node name.
    epoch: u64,
}

/// A node as `hotroll nodes` shows it.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    pub record: NodeRecord,
    pub connected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "node `{node}` already has a live session (from {peer}); a second agent with the same \
         node name is refused — give every node a unique `node` in agent.toml"
    )]
    AlreadyConnected { node: String, peer: String },
}

pub struct Registry {
    nodes: Mutex<HashMap<String, NodeEntry>>,
    next_session: AtomicU64,
    writer: Writer,
}

/// What the writer thread is asked to do.
enum Write {
    Put(NodeRecord),
    /// Answer once everything queued before has been written.
    Flush(std_mpsc::Sender<()>),
}

/// Most queued writes the writer thread takes into one transaction.
const MAX_BATCH: usize = 10_000;

/// The write-behind queue of node records and its thread.
struct Writer {
    /// `None` once dropped (or when no thread could be started: then writes are synchronous).
    tx: Option<std_mpsc::Sender<Write>>,
    thread: Option<std::thread::JoinHandle<()>>,
    store: Arc<dyn Store>,
}

impl Writer {
    fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = std_mpsc::channel();
        let thread_store = store.clone();
        match std::thread::Builder::new()
            .name("hotroll-nodes".into())
            .spawn(move || write_nodes(thread_store.as_ref(), &rx))
        {
            Ok(thread) => Self {
                tx: Some(tx),
                thread: Some(thread),
                store,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the node writer thread; writing node records synchronously");
                Self {
                    tx: None,
                    thread: None,
                    store,
                }
            }
        }
    }

    fn put(&self, record: NodeRecord) {
        let record = match &self.tx {
            Some(tx) => match tx.send(Write::Put(record)) {
                Ok(()) => return,
                Err(std_mpsc::SendError(Write::Put(record))) => record,
                Err(_) => return,
            },
            None => record,
        };
        if let Err(e) = self.store.put_node(&record) {
            tracing::error!(node = %record.name, error = %e, "cannot persist node record");
        }
    }

    fn flush(&self) {
        let Some(tx) = &self.tx else {
            return;
        };
        let (done_tx, done_rx) = std_mpsc::channel();
        if tx.send(Write::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what is queued.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: batch whatever is queued, latest record per node, one transaction each.
fn write_nodes(store: &dyn Store, rx: &std_mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch: BTreeMap<String, NodeRecord> = BTreeMap::new();
        let mut flushed = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(write) = next {
            match write {
                Write::Put(record) => {
                    batch.insert(record.name.clone(), record);
                }
                Write::Flush(done) => flushed.push(done),
            }
            taken += 1;
            next = if taken < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            let records: Vec<NodeRecord> = batch.into_values().collect();
            if let Err(e) = store.put_nodes(&records) {
                tracing::error!(nodes = records.len(), error = %e, "cannot persist node records");
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Load every known node from the store; none is connected yet.
    pub fn load(store: Arc<dyn Store>) -> Result<Self, crate::store::StoreError> {
        let nodes = store
            .nodes()?
            .into_iter()
            .map(|record| {
                (
                    record.name.clone(),
                    NodeEntry {
                        record,
                        session: None,
                        epoch: 0,
                    },
                )
            })
            .collect();
        Ok(Self {
            nodes: Mutex::new(nodes),
            next_session: AtomicU64::new(1),
            writer: Writer::start(store),
        })
    }

    /// Wait until every node record queued so far is in the store.
    pub fn flush(&self) {
        self.writer.flush();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeEntry>> {
        // Every critical section is a few field updates; a poisoned lock is still consistent.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a new session for `record.name`, refusing a second live one.
    pub fn attach(
        &self,
        record: NodeRecord,
        tx: mpsc::Sender<Outbound>,
        peer: String,
    ) -> Result<SessionLink, AttachError> {
        let link = {
            let mut nodes = self.lock();
            let entry = nodes
                .entry(record.name.clone())
                .or_insert_with(|| NodeEntry {
                    record: record.clone(),
                    session: None,
                    epoch: 0,
                });
            if let Some(existing) = &entry.session
                && !existing.tx.is_closed()
            {
                return Err(AttachError::AlreadyConnected {
                    node: record.name,
                    peer: existing.peer.clone(),
                });
            }
            entry.epoch += 1;
            entry.record = record.clone();
            let link = SessionLink {
                id: self.next_session.fetch_add(1, Ordering::Relaxed),
                epoch: entry.epoch,
                tx,
                peer,
            };
            entry.session = Some(link.clone());
            link
        };
        self.writer.put(record);
        Ok(link)
    }

    /// Forget the session `session_id` of `node` if it is still the current one. Returns whether
    /// it was.
    pub fn detach(&self, node: &str, session_id: u64, now: Millis) -> bool {
        let record = {
            let mut nodes = self.lock();
            let Some(entry) = nodes.get_mut(node) else {
                return false;
            };
            if entry.session.as_ref().map(|s| s.id) != Some(session_id) {
                return false;
            }
            entry.session = None;
            entry.record.last_seen_ms = now;
            entry.record.clone()
        };
        self.writer.put(record);
        true
    }

    /// Replace what the coordinator knows of a node's apps (reported with each outcome).
    pub fn update_apps(&self, node: &str, apps: BTreeMap<String, crate::store::AppVersions>) {
        let record = {
            let mut nodes = self.lock();
            let Some(entry) = nodes.get_mut(node) else {
                return;
            };
            if entry.record.apps == apps {
                return;
            }
            entry.record.apps = apps;
            entry.record.clone()
        };
        self.writer.put(record);
    }

    pub fn touch(&self, node: &str, now: Millis) {
        if let Some(entry) = self.lock().get_mut(node) {
            entry.record.last_seen_ms = now;
        }
    }

    /// Queue a rollout's command for a connected node. Returns false when the node is not
    /// connected or its outbound queue is full (the session is then torn down by its own
    /// timeout).
    pub fn send(&self, node: &str, command: Arc<NodeCommand>, probe: Option<FanoutProbe>) -> bool {
        // `try_send` never waits, so it can run under the lock (no clone of the link).
        match self.lock().get(node).and_then(|e| e.session.as_ref()) {
            Some(link) => link.tx.try_send(Outbound::Rollout(command, probe)).is_ok(),
            None => false,
        }
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.lock()
            .get(node)
            .is_some_and(|e| e.session.as_ref().is_some_and(|s| !s.tx.is_closed()))
    }

    pub fn list(&self) -> Vec<NodeSnapshot> {
        let mut out: Vec<_> = self
            .lock()
            .values()
            .map(|e| NodeSnapshot {
                record: e.record.clone(),
                connected: e.session.as_ref().is_some_and(|s| !s.tx.is_closed()),
            })
            .collect();
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }

    /// Connected nodes whose labels contain every pair of `select`, sorted by name.
    /// Every known node whose labels match `select`, connected or not, in the registry's
    /// order: a node in its reconnect back-off is still part of the fleet, and a rollout that
    /// left it out silently would leave the fleet on two versions.
    pub fn select(&self, select: &BTreeMap<String, String>) -> Vec<Selected> {
        self.list()
            .into_iter()
            .filter(|n| {
                select
                    .iter()
                    .all(|(k, v)| n.record.labels.get(k).is_some_and(|have| have == v))
            })
            .map(|n| Selected {
                name: n.record.name,
                connected: n.connected,
                labels: n.record.labels,
            })
            .collect()
    }
}

/// A known node a selector matched, and whether it is connected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub name: String,
    pub connected: bool,
    pub labels: BTreeMap<String, String>,
}
