//! A [`Store`] that fails on demand, for tests of what the coordinator does when its store
//! cannot take a write (a full disk, an I/O error): public so that other crates' tests can use
//! it too.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    Commit, MemoryStore, NodeRecord, RolloutRecord, Store, StoreError, StoredEvent, StoredInput,
};

/// Decides whether a commit trips the store (see [`FailingStore::fail_from`]).
type Trigger = Box<dyn Fn(&Commit<'_>) -> bool + Send + Sync>;

/// What the store does with writes now.
enum Arm {
    Healthy,
    /// Waiting for a commit that matches; writes pass until one does.
    Waiting(Trigger),
    /// Every write fails until [`FailingStore::heal`].
    Failing,
}

/// A store around `S` (a [`MemoryStore`] by default) whose writes fail while it is armed, like
/// a disk that filled up: once tripped, every commit and every other write fails until
/// [`FailingStore::heal`]. Reads always pass.
pub struct FailingStore<S = MemoryStore> {
    inner: S,
    arm: Mutex<Arm>,
    failed_commits: AtomicU64,
}

impl<S> std::fmt::Debug for FailingStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailingStore")
            .field(
                "failed_commits",
                &self.failed_commits.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Default for FailingStore<MemoryStore> {
    fn default() -> Self {
        Self::new(MemoryStore::default())
    }
}

/// The error every failing write returns.
pub const INJECTED_ERROR: &str = "injected fault: No space left on device";

impl<S: Store> FailingStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            arm: Mutex::new(Arm::Healthy),
            failed_commits: AtomicU64::new(0),
        }
    }

    /// The wrapped store (what was stored before and after the failures).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Fail every write from now on, until [`FailingStore::heal`].
    pub fn fail_every_commit(&self) {
        *self.lock() = Arm::Failing;
    }

    /// Let writes pass until a commit for which `trigger` holds: that commit fails, and so does
    /// every write after it, until [`FailingStore::heal`].
    pub fn fail_from(&self, trigger: impl Fn(&Commit<'_>) -> bool + Send + Sync + 'static) {
        *self.lock() = Arm::Waiting(Box::new(trigger));
    }

    /// Writes pass again.
    pub fn heal(&self) {
        *self.lock() = Arm::Healthy;
    }

    /// Whether writes fail now (a trigger of [`FailingStore::fail_from`] has matched).
    pub fn is_failing(&self) -> bool {
        matches!(*self.lock(), Arm::Failing)
    }

    /// How many commits have failed so far.
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arm> {
        // Every critical section is one assignment or one match: a poisoned lock is consistent.
        self.arm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a write other than a commit fails now.
    fn check_write(&self) -> Result<(), StoreError> {
        match *self.lock() {
            Arm::Failing => Err(StoreError::Injected(INJECTED_ERROR.into())),
            Arm::Healthy | Arm::Waiting(_) => Ok(()),
        }
    }
}

impl<S: Store> Store for FailingStore<S> {
    fn put_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        self.check_write()?;
        self.inner.put_rollout(record)
    }

    fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        self.inner.get_rollout(id)
    }

    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.inner.list_rollouts()
    }

    fn newest_rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        self.inner.newest_rollouts(limit)
    }

    fn newest_rollouts_unless(
        &self,
        limit: usize,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Option<RolloutRecord>)>, StoreError> {
        self.inner.newest_rollouts_unless(limit, known)
    }

    fn append_events(&self, rollout: &str, events: &[StoredEvent]) -> Result<(), StoreError> {
        self.check_write()?;
        self.inner.append_events(rollout, events)
    }

    fn events(&self, rollout: &str, from_seq: u64) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.events(rollout, from_seq)
    }

    fn commit(&self, commit: Commit<'_>) -> Result<(), StoreError> {
        {
            let mut arm = self.lock();
            let trips = match &*arm {
                Arm::Healthy => false,
                Arm::Waiting(trigger) => trigger(&commit),
                Arm::Failing => true,
            };
            if trips {
                *arm = Arm::Failing;
                self.failed_commits.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Injected(INJECTED_ERROR.into()));
            }
        }
        self.inner.commit(commit)
    }

    fn inputs(&self, rollout: &str) -> Result<Vec<StoredInput>, StoreError> {
        self.inner.inputs(rollout)
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.check_write()?;
        self.inner.put_node(node)
    }

    fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<(), StoreError> {
        self.check_write()?;
        self.inner.put_nodes(nodes)
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.nodes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Event;

    fn commit_of<'a>(inputs: &'a [StoredInput]) -> Commit<'a> {
        Commit {
            rollout: "r",
            inputs,
            events: &[],
            record: None,
        }
    }

    #[test]
    fn a_tripped_store_fails_every_write_until_healed() {
        let store = FailingStore::default();
        let tick = [StoredInput {
            seq: 1,
            at_ms: 1,
            event: Event::Tick,
        }];
        let start = [StoredInput {
            seq: 2,
            at_ms: 2,
            event: Event::Start,
        }];
        store.fail_from(|c| c.inputs.iter().any(|i| i.event == Event::Start));
        assert!(store.commit(commit_of(&tick)).is_ok(), "not the trigger");
        assert!(store.commit(commit_of(&start)).is_err(), "the trigger");
        assert!(store.is_failing());
        assert!(store.commit(commit_of(&tick)).is_err(), "sticky");
        assert!(store.put_node(&NodeRecord::default()).is_err());
        assert_eq!(store.failed_commits(), 2);
        store.heal();
        assert!(store.commit(commit_of(&start)).is_ok());
        let stored: Vec<u64> = store
            .inputs("r")
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|i| i.seq)
            .collect();
        assert_eq!(stored, vec![1, 2], "failed commits stored nothing");
    }
}
