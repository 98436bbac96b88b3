//! The node registry: every node the coordinator has ever seen (durable, in the store) and the
//! live session of the ones connected now (memory only: a session dies with the process).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hotroll_proto::v1::CoordinatorMessage;
use tokio::sync::mpsc;

use crate::engine::Millis;
use crate::store::{NodeRecord, Store};

/// How the rest of the coordinator reaches a connected node.
#[derive(Debug, Clone)]
pub struct SessionLink {
    /// Unique per accepted session, so a stale session's cleanup never detaches a newer one.
    pub id: u64,
    pub epoch: u64,
    pub tx: mpsc::Sender<CoordinatorMessage>,
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
    store: Arc<dyn Store>,
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
            store,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeEntry>> {
        // Every critical section is a few field updates; a poisoned lock is still consistent.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a new session for `record.name`, refusing a second live one.
    pub fn attach(
        &self,
        record: NodeRecord,
        tx: mpsc::Sender<CoordinatorMessage>,
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
        if let Err(e) = self.store.put_node(&record) {
            tracing::error!(node = %record.name, error = %e, "cannot persist node record");
        }
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
        if let Err(e) = self.store.put_node(&record) {
            tracing::error!(node, error = %e, "cannot persist node record");
        }
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
        if let Err(e) = self.store.put_node(&record) {
            tracing::error!(node, error = %e, "cannot persist node record");
        }
    }

    pub fn touch(&self, node: &str, now: Millis) {
        if let Some(entry) = self.lock().get_mut(node) {
            entry.record.last_seen_ms = now;
        }
    }

    /// Queue a message for a connected node. Returns false when the node is not connected or its
    /// outbound queue is full (the session is then torn down by its own timeout).
    pub fn send(&self, node: &str, message: CoordinatorMessage) -> bool {
        let link = self.lock().get(node).and_then(|e| e.session.clone());
        match link {
            Some(link) => link.tx.try_send(message).is_ok(),
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
    pub fn select(&self, select: &BTreeMap<String, String>) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|n| n.connected)
            .filter(|n| {
                select
                    .iter()
                    .all(|(k, v)| n.record.labels.get(k).is_some_and(|have| have == v))
            })
            .map(|n| n.record.name)
            .collect()
    }
}
