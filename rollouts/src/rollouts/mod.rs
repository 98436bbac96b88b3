//! Running rollouts: one task per rollout owns its [`Rollout`] engine, feeds it events from the
//! sessions, the clock and the operator, makes every resulting record durable, and only then
//! sends the commands to the nodes.
//!
//! Crash safety: each engine step is stored as one transaction (the input, its records, the new
//! status; [`Store::commit`]) before its commands go out. After a restart, [`Rollouts::recover`]
//! rebuilds the engine of every unfinished rollout by replaying its stored inputs (the engine
//! is deterministic, so barriers, deadlines, waves and what each node was told come back
//! exactly), recomputes the last command each node was sent (re-sent when it reconnects: it may
//! never have left), and marks every target's session lost at the restart, so grace periods
//! run from then. Nodes report where they stand in their Hello's journal
//! ([`Rollouts::journal_reported`]), which settles a node that finished, aborted or rolled
//! back while the coordinator was away.

//!
//! The parts: [`driver`] (the per-rollout task: durable commit, sending; [`batch`], and
//! [`hold`] for a store that fails), [`recovery`]
//! (rebuilding rollouts after a restart), [`snapshot`] (status building), [`spec`] (the engine's
//! spec and the script nodes run), [`crash_points`] (fault points of the crash-safety tests),
//! [`clock`] (the engine's time).

mod batch;
mod clock;
mod crash_points;
mod driver;
mod gates;
mod hold;
mod recovery;
mod snapshot;
mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotroll_script::Script;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::engine::Millis;
use crate::engine::{Event, LeftOut, NotApplicable, Rollout};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{
    ArtifactBinding, RolloutRecord, RolloutSnapshot, Store, StoreError, StoreHold, StoredEvent,
};

pub use clock::{now_ms, use_simulated_clock};
use driver::Driver;
use gates::GateRunner;
pub use gates::NO_PROMETHEUS;
pub use snapshot::{InstructionNames, instruction_namer};
use snapshot::{instruction_names_of, snapshot_of};
use spec::{StartedWith, build_spec, duration_ms};

/// Timing knobs of the coordinator that the engine needs.
#[derive(Debug, Clone)]
pub struct RolloutTiming {
    pub session_grace: Duration,
    pub step_slack: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("no rollout with id `{0}`")]
    NotFound(String),
    #[error(transparent)]
    NotApplicable(#[from] NotApplicable),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the rollout's task has stopped (coordinator shutting down)")]
    Stopped,
    /// The script has `[[rollout.gates]]` and the coordinator no Prometheus to ask.
    #[error("the script has fleet gates ({gates}) but {}", gates::NO_PROMETHEUS)]
    NoPrometheus { gates: String },
    /// The rollout holds because its store fails (see `driver`); the command was not taken.
    #[error(
        "the rollout is held: {}; nothing was changed, try again once the store recovers",
        .0.error
    )]
    Held(StoreHold),
    /// The command was taken while the rollout holds: it applies once the store recovers.
    #[error(
        "the rollout is held: {}; the command is queued and is handled once the store recovers",
        .0.error
    )]
    HeldQueued(StoreHold),
}

/// What a live watcher hears: the history as it is stored, and when the rollout starts or
/// stops holding on its store (live only: the store is what fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    Stored(StoredEvent),
    Held(StoreHold),
    Resumed {
        at_ms: Millis,
        held_since_ms: Millis,
    },
}

enum Input {
    /// An event and when it reached the rollouts (the start of a barrier fan-out it completes).
    Event(Event, std::time::Instant),
    Operator(
        Event,
        oneshot::Sender<Result<RolloutSnapshot, NotApplicable>>,
    ),
}

impl Input {
    fn event(event: Event) -> Self {
        Self::Event(event, std::time::Instant::now())
    }
}

struct Handle {
    tx: mpsc::UnboundedSender<Input>,
    snapshot: watch::Receiver<RolloutSnapshot>,
    events: broadcast::Sender<LiveEvent>,
    /// Shared, so the session liveness sweep can look at it without holding the lock.
    targets: Arc<HashSet<String>>,
    /// Instruction names of `up`, for status and history.
    instructions: Arc<Vec<String>>,
}

/// Everything a new rollout needs besides the engine spec.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub script_name: String,
    pub script_source: String,
    pub script: Script,
    pub artifacts: Vec<ArtifactBinding>,
    pub targets: Vec<String>,
    /// Nodes that matched but are not targets, and why (`--skip-unreachable`).
    pub left_out: Vec<LeftOut>,
    /// Targets that are known but not connected now: the rollout waits for them within the
    /// session grace, as for a node whose session dropped.
    pub not_connected: Vec<String>,
    /// The targets' labels (what `waves_by` groups by); kept with the rollout.
    pub labels: crate::engine::TargetLabels,
    /// Prepare everywhere, then abort: nothing commits.
    pub dry_run: bool,
}

/// Live events a rollout buffers for its watchers before a slow one is told it fell behind.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

pub struct Rollouts {
    handles: Arc<Mutex<HashMap<String, Handle>>>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    timing: RolloutTiming,
    metrics: Arc<Metrics>,
    watch_buffer: usize,
    /// Held while a finished rollout is rebuilt to record a late outcome.
    reviving: Mutex<()>,
    gates: GateRunner,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

impl Rollouts {
    pub fn new(store: Arc<dyn Store>, registry: Arc<Registry>, timing: RolloutTiming) -> Self {
        Self {
            handles: Arc::new(Mutex::new(HashMap::new())),
            store,
            registry,
            timing,
            metrics: Arc::new(Metrics::new()),
            watch_buffer: DEFAULT_WATCH_BUFFER,
            reviving: Mutex::new(()),
            gates: GateRunner::default(),
        }
    }

    /// Fleet gates query this Prometheus (`hotroll serve --prometheus URL`).
    pub fn with_prometheus(mut self, prometheus: hotroll_gate::Prometheus) -> Self {
        self.gates.prometheus = Some(Arc::new(prometheus));
        self
    }

    /// Report into `metrics` (by default a private set nobody reads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Events buffered per rollout for live watchers (at least 1); see
    /// [`crate::ServerConfig::watch_buffer`].
    pub fn with_watch_buffer(mut self, events: usize) -> Self {
        self.watch_buffer = events.max(1);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        lock_handles(&self.handles)
    }

    /// Record a new rollout durably, start its task and send the script to every target.
    pub fn start(&self, new: NewRollout) -> Result<RolloutSnapshot, RolloutError> {
        if self.gates.prometheus.is_none() && !new.script.rollout.gates.is_empty() {
            let names: Vec<&str> = new
                .script
                .rollout
                .gates
                .iter()
                .map(|g| g.name.value.as_str())
                .collect();
            return Err(RolloutError::NoPrometheus {
                gates: names.join(", "),
            });
        }
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let spec = build_spec(
            &id,
            &new.script,
            &StartedWith {
                targets: &new.targets,
                left_out: &new.left_out,
                labels: &new.labels,
                dry_run: new.dry_run,
            },
            self.timing.session_grace,
            self.timing.step_slack,
        );
        let epoch = 1;
        let engine = Rollout::new(spec, epoch, now);
        let snapshot = snapshot_of(&engine, now, None);
        let record = RolloutRecord {
            id: id.clone(),
            epoch,
            created_ms: now,
            script_name: new.script_name.clone(),
            script_source: new.script_source.clone(),
            artifacts: new.artifacts.clone(),
            targets: new.targets.clone(),
            status: snapshot.clone(),
            session_grace_ms: Some(duration_ms(self.timing.session_grace)),
            step_slack_ms: Some(duration_ms(self.timing.step_slack)),
            left_out: new.left_out.clone(),
            target_labels: new.labels.clone(),
            dry_run: new.dry_run,
        };
        self.store.put_rollout(&record)?;
        self.metrics.rollout_started();
        self.metrics.rollout_state_changed(None, snapshot.state);
        let driver = self.driver(engine, record, &new.script, 1, 1);
        let tx = self.spawn(driver);
        let _ = tx.send(Input::event(Event::Start));
        {
            // Under the handles' lock, as `session_changed` takes it: a target that connects
            // after this check is told `SessionRestored` after our `SessionLost`, never before.
            let _handles = self.lock();
            for node in &new.not_connected {
                if !self.registry.is_connected(node) {
                    let _ = tx.send(Input::event(Event::SessionLost { node: node.clone() }));
                }
            }
        }
        Ok(snapshot)
    }

    /// A driver for `engine`, before it runs.
    fn driver(
        &self,
        engine: Rollout,
        record: RolloutRecord,
        script: &Script,
        next_seq: u64,
        next_input: u64,
    ) -> Driver {
        Driver::new(self, engine, record, script, next_seq, next_input)
    }

    /// Register `driver`'s handle and start its task; returns its input channel.
    fn spawn(&self, mut driver: Driver) -> mpsc::UnboundedSender<Input> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Weak: the driver's task still ends when every outside sender is gone.
        driver.inputs = Some(tx.downgrade());
        // A gate that was running when the previous coordinator stopped runs again.
        driver.rerun_gate();
        self.lock().insert(
            driver.record.id.clone(),
            Handle {
                tx: tx.clone(),
                snapshot: driver.snapshot.subscribe(),
                events: driver.events.clone(),
                targets: Arc::new(driver.record.targets.iter().cloned().collect()),
                instructions: driver.instructions.clone(),
            },
        );
        tokio::spawn(driver.run(rx));
        tx
    }

    /// Hand an event reported by `node` to the rollout it names. Unknown rollouts are logged and
    /// dropped: a node may report on a rollout this coordinator has forgotten.
    pub fn deliver(&self, rollout_id: &str, event: Event) {
        let handles = self.lock();
        match handles.get(rollout_id) {
            Some(handle) => {
                let _ = handle.tx.send(Input::event(event));
            }
            None => tracing::warn!(rollout_id, ?event, "event for an unknown rollout ignored"),
        }
    }

    /// What a node's Hello says about rollouts (its journal): each rollout it names hears the
    /// node's recorded outcome. A rollout this coordinator does not run is skipped quietly (the
    /// journal keeps the last finished rollout, which is usually long over).
    pub fn journal_reported(&self, node: &str, events: Vec<(String, Event)>) {
        for (rollout_id, event) in events {
            let running = self.lock().get(&rollout_id).map(|h| h.tx.clone());
            match running.or_else(|| self.revive(&rollout_id, node, &event)) {
                Some(tx) => {
                    tracing::debug!(node, rollout_id, ?event, "outcome from the node's journal");
                    let _ = tx.send(Input::event(event));
                }
                None => tracing::debug!(
                    node,
                    rollout_id,
                    "journal entry for a rollout not running here"
                ),
            }
        }
    }

    /// The targets of every rollout running here (one set per rollout): the nodes whose sessions
    /// are watched closely (see the coordinator's `liveness`).
    pub fn running_targets(&self) -> Vec<Arc<HashSet<String>>> {
        self.lock().values().map(|h| h.targets.clone()).collect()
    }

    /// A node's session came or went: tell every rollout that targets it.
    pub fn session_changed(&self, node: &str, connected: bool) {
        for handle in self.lock().values() {
            if handle.targets.contains(node) {
                let event = if connected {
                    Event::SessionRestored {
                        node: node.to_string(),
                    }
                } else {
                    Event::SessionLost {
                        node: node.to_string(),
                    }
                };
                let _ = handle.tx.send(Input::event(event));
            }
        }
    }

    /// Apply an operator command; answers with the rollout's new status.
    pub async fn operate(
        &self,
        rollout_id: &str,
        event: Event,
    ) -> Result<RolloutSnapshot, RolloutError> {
        let running = self
            .lock()
            .get(rollout_id)
            .map(|h| (h.tx.clone(), h.snapshot.clone()));
        let Some((tx, snapshot)) = running else {
            // Not running here: a finished (retired) rollout refuses like the engine would.
            let record = self
                .store
                .get_rollout(rollout_id)?
                .ok_or_else(|| RolloutError::NotFound(rollout_id.to_string()))?;
            if !record.status.state.is_final() {
                return Err(RolloutError::Stopped);
            }
            let action = match event {
                Event::OperatorAbort { .. } => "abort",
                Event::OperatorPause => "pause",
                Event::OperatorResume => "resume",
                Event::OperatorPromote => "promote",
                _ => "operate",
            };
            return Err(NotApplicable {
                action,
                state: record.status.state.as_str(),
                why: "the rollout has already finished",
            }
            .into());
        };
        if let Some(hold) = snapshot.borrow().held_on_store.clone() {
            return Err(RolloutError::Held(hold));
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Input::Operator(event, reply_tx))
            .map_err(|_| RolloutError::Stopped)?;
        // Taken while the rollout goes on to hold: say so rather than wait for the store.
        tokio::select! {
            reply = reply_rx => Ok(reply.map_err(|_| RolloutError::Stopped)??),
            hold = held(snapshot) => Err(RolloutError::HeldQueued(hold)),
        }
    }

    /// The rollout's latest status (live, or from the store for one this process did not run).
    pub fn status(
        &self,
        rollout_id: &str,
    ) -> Result<(RolloutSnapshot, InstructionNames), RolloutError> {
        if let Some(handle) = self.lock().get(rollout_id) {
            return Ok((
                handle.snapshot.borrow().clone(),
                handle.instructions.clone(),
            ));
        }
        let record = self
            .store
            .get_rollout(rollout_id)?
            .ok_or_else(|| RolloutError::NotFound(rollout_id.to_string()))?;
        let names = instruction_names_of(&record);
        Ok((record.status, names))
    }

    pub fn list(&self, limit: usize) -> Result<Vec<RolloutSnapshot>, RolloutError> {
        let live: HashMap<String, RolloutSnapshot> = self
            .lock()
            .iter()
            .map(|(id, h)| (id.clone(), h.snapshot.borrow().clone()))
            .collect();
        // A live rollout's stored record is not even decoded: its live status replaces it.
        Ok(self
            .store
            .newest_rollouts_unless(limit, &|id| live.contains_key(id))?
            .into_iter()
            .filter_map(|(id, record)| live.get(&id).cloned().or(record.map(|r| r.status)))
            .collect())
    }

    /// Past events from `from_seq`, then a receiver for the ones that follow. Subscribes before
    /// reading the store so nothing falls between the two (the caller drops duplicates by seq).
    pub fn watch(&self, rollout_id: &str, from_seq: u64) -> Result<WatchStart, RolloutError> {
        let (live, names) = match self.lock().get(rollout_id) {
            Some(h) => (Some(h.events.subscribe()), h.instructions.clone()),
            None => {
                let record = self
                    .store
                    .get_rollout(rollout_id)?
                    .ok_or_else(|| RolloutError::NotFound(rollout_id.to_string()))?;
                (None, instruction_names_of(&record))
            }
        };
        let past = self.store.events(rollout_id, from_seq)?;
        Ok(WatchStart { past, live, names })
    }
}

/// What a watcher starts from: the stored history, then live events (`None` for a rollout this
/// process does not run), and the instruction names for display.
#[derive(Debug)]
pub struct WatchStart {
    pub past: Vec<StoredEvent>,
    pub live: Option<broadcast::Receiver<LiveEvent>>,
    pub names: InstructionNames,
}

/// Wait until `snapshot` shows the rollout held on its store (forever if its task ends).
async fn held(mut snapshot: watch::Receiver<RolloutSnapshot>) -> StoreHold {
    match snapshot
        .wait_for(|s| s.held_on_store.is_some())
        .await
        .map(|s| s.held_on_store.clone())
    {
        Ok(Some(hold)) => hold,
        _ => std::future::pending().await,
    }
}

/// The running rollouts; a panic while holding the lock leaves the map usable.
fn lock_handles(
    handles: &Mutex<HashMap<String, Handle>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
    handles.lock().unwrap_or_else(|p| p.into_inner())
}

/// Label selector as given on the command line or in the script.
pub type Selector = BTreeMap<String, String>;

#[cfg(test)]
mod store_fault_tests;
#[cfg(test)]
mod tests;
