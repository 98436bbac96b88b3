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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hotroll_proto::v1 as pb;
use hotroll_script::Script;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::convert;
use crate::engine::{
    Command, Event, Millis, NodeState, NotApplicable, Outcome, Record, Rollout, RolloutSpec,
    RolloutState, StepPhase,
};
use crate::metrics::{BarrierOutcome, Metrics, StepOutcome};
use crate::registry::Registry;
use crate::store::{
    ArtifactBinding, Commit, RolloutRecord, RolloutSnapshot, Store, StoreError, StoredEvent,
    StoredInput,
};

/// Milliseconds since the Unix epoch, read from tokio's monotonic clock anchored to the wall
/// clock once per process: deadlines never jump with the system clock, and under a simulated
/// or paused tokio clock (turmoil, tests) the engine sees simulated time too.
pub fn now_ms() -> Millis {
    static ANCHOR: std::sync::OnceLock<(Millis, tokio::time::Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (wall, tokio::time::Instant::now())
    });
    let since = tokio::time::Instant::now().saturating_duration_since(mono);
    wall.saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

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
}

/// Why an unfinished rollout could not be rebuilt after a restart.
#[derive(Debug, thiserror::Error)]
enum RecoverError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rollout `{id}` cannot be recovered: {why}")]
    Unrecoverable { id: String, why: String },
}

enum Input {
    Event(Event),
    Operator(
        Event,
        oneshot::Sender<Result<RolloutSnapshot, NotApplicable>>,
    ),
}

struct Handle {
    tx: mpsc::UnboundedSender<Input>,
    snapshot: watch::Receiver<RolloutSnapshot>,
    events: broadcast::Sender<StoredEvent>,
    targets: HashSet<String>,
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
}

pub struct Rollouts {
    handles: Arc<Mutex<HashMap<String, Handle>>>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    timing: RolloutTiming,
    metrics: Arc<Metrics>,
    watch_buffer: usize,
    /// Held while a finished rollout is rebuilt to record a late outcome.
    reviving: Mutex<()>,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

/// Instruction name of step `index` of a rollout, or "" when out of range.
pub type InstructionNames = Arc<Vec<String>>;

pub fn instruction_namer(names: &InstructionNames) -> impl Fn(u32) -> String + '_ {
    move |i| {
        names
            .get(usize::try_from(i).unwrap_or(usize::MAX))
            .cloned()
            .unwrap_or_default()
    }
}

fn snapshot_of(
    engine: &Rollout,
    created_ms: Millis,
    finished_ms: Option<Millis>,
) -> RolloutSnapshot {
    let spec = engine.spec();
    RolloutSnapshot {
        id: spec.id.clone(),
        state: engine.state(),
        app: spec.app.clone(),
        from: spec.from.clone(),
        to: spec.to.clone(),
        failures: engine.failures(),
        max_failures: spec.policy.max_failures,
        current_wave: engine.current_wave(),
        waves: engine.waves(),
        steps_total: spec.steps_total,
        nodes: engine.nodes().to_vec(),
        barrier: engine.barrier(),
        error: engine.error().map(str::to_string),
        created_ms,
        finished_ms,
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
            watch_buffer: crate::server::DEFAULT_WATCH_BUFFER,
            reviving: Mutex::new(()),
        }
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
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let spec = build_spec(
            &id,
            &new.script,
            &new.targets,
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
        };
        self.store.put_rollout(&record)?;
        self.metrics.rollout_started();
        self.metrics.rollout_state_changed(None, snapshot.state);
        let driver = self.driver(engine, record, &new.script, 1, 1);
        let tx = self.spawn(driver);
        let _ = tx.send(Input::Event(Event::Start));
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
        let snapshot = record.status.clone();
        let (snapshot_tx, _) = watch::channel(snapshot.clone());
        let (events_tx, _) = broadcast::channel(self.watch_buffer);
        Driver {
            run_script: run_script_message(&record, script),
            instructions: Arc::new(
                script
                    .up
                    .iter()
                    .map(|s| s.instruction.name().to_string())
                    .collect(),
            ),
            last_state: engine.state(),
            handles: self.handles.clone(),
            snapshot_at: tokio::time::Instant::now(),
            snapshot_stale: false,
            engine,
            record,
            store: self.store.clone(),
            registry: self.registry.clone(),
            snapshot: snapshot_tx,
            events: events_tx,
            next_seq,
            next_input,
            last_sent: HashMap::new(),
            metrics: self.metrics.clone(),
            barrier_first_arrival: HashMap::new(),
        }
    }

    /// Register `driver`'s handle and start its task; returns its input channel.
    fn spawn(&self, driver: Driver) -> mpsc::UnboundedSender<Input> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(
            driver.record.id.clone(),
            Handle {
                tx: tx.clone(),
                snapshot: driver.snapshot.subscribe(),
                events: driver.events.clone(),
                targets: driver.record.targets.iter().cloned().collect(),
                instructions: driver.instructions.clone(),
            },
        );
        tokio::spawn(driver.run(rx));
        tx
    }

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
        let spec = build_spec(&record.id, &script, &record.targets, grace, slack);
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
    fn revive(
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

    /// Hand an event reported by `node` to the rollout it names. Unknown rollouts are logged and
    /// dropped: a node may report on a rollout this coordinator has forgotten.
    pub fn deliver(&self, rollout_id: &str, event: Event) {
        let handles = self.lock();
        match handles.get(rollout_id) {
            Some(handle) => {
                let _ = handle.tx.send(Input::Event(event));
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
                    let _ = tx.send(Input::Event(event));
                }
                None => tracing::debug!(
                    node,
                    rollout_id,
                    "journal entry for a rollout not running here"
                ),
            }
        }
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
                let _ = handle.tx.send(Input::Event(event));
            }
        }
    }

    /// Apply an operator command; answers with the rollout's new status.
    pub async fn operate(
        &self,
        rollout_id: &str,
        event: Event,
    ) -> Result<RolloutSnapshot, RolloutError> {
        let tx = self.lock().get(rollout_id).map(|h| h.tx.clone());
        let Some(tx) = tx else {
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
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Input::Operator(event, reply_tx))
            .map_err(|_| RolloutError::Stopped)?;
        Ok(reply_rx.await.map_err(|_| RolloutError::Stopped)??)
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
        Ok(self
            .store
            .list_rollouts()?
            .into_iter()
            .take(limit)
            .map(|r| live.get(&r.id).cloned().unwrap_or(r.status))
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
    pub live: Option<broadcast::Receiver<StoredEvent>>,
    pub names: InstructionNames,
}

fn instruction_names_of(record: &RolloutRecord) -> InstructionNames {
    let names = hotroll_script::parse(&record.script_name, &record.script_source)
        .map(|p| {
            p.script
                .up
                .iter()
                .map(|s| s.instruction.name().to_string())
                .collect()
        })
        .unwrap_or_default();
    Arc::new(names)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The engine's spec of a rollout of `script` over `targets`: the same inputs give the same
/// spec, which is what lets a restarted coordinator rebuild the engine.
fn build_spec(
    id: &str,
    script: &Script,
    targets: &[String],
    session_grace: Duration,
    step_slack: Duration,
) -> RolloutSpec {
    RolloutSpec {
        id: id.to_string(),
        app: script.app.value.clone(),
        from: script.from.value.clone(),
        to: script.to.value.clone(),
        targets: targets.to_vec(),
        policy: script.rollout.clone(),
        barriers: script.barriers(),
        steps_total: u32::try_from(script.up.len()).unwrap_or(u32::MAX),
        first_commit_step: u32::try_from(script.ponr().first_commit_step()).unwrap_or(u32::MAX),
        step_deadlines: script.up.iter().map(|s| script.step_deadline(s)).collect(),
        session_grace,
        step_slack,
    }
}

fn run_script_message(record: &RolloutRecord, script: &Script) -> pb::RunScript {
    pb::RunScript {
        rollout_id: record.id.clone(),
        epoch: record.epoch,
        script_name: record.script_name.clone(),
        script_source: record.script_source.clone(),
        artifacts: record
            .artifacts
            .iter()
            .map(|a| pb::ScriptArtifact {
                name: a.name.clone(),
                digest: a.digest.clone(),
                size: a.size,
                mode: a.mode,
                unpack: a.unpack,
            })
            .collect(),
        step_timeout_ms: duration_ms(script.rollout.step_timeout),
        barrier_timeout_ms: duration_ms(script.rollout.barrier_timeout),
    }
}

/// Most inputs the driver handles before it makes them durable and sends their commands.
const MAX_BATCH: usize = 4096;

/// Inputs handled together (see [`Driver::run`]).
#[derive(Default)]
struct Batch {
    inputs: Vec<StoredInput>,
    stored: Vec<StoredEvent>,
    commands: Vec<Command>,
    /// The time given to the engine with the last input.
    now: Millis,
    /// Nodes whose session came back.
    restored: Vec<String>,
    /// Operator commands, answered once the batch is durable and sent.
    replies: Vec<PendingReply>,
}

/// An operator command's reply channel and the engine's verdict on it.
type PendingReply = (
    oneshot::Sender<Result<RolloutSnapshot, NotApplicable>>,
    Result<(), NotApplicable>,
);

struct Driver {
    engine: Rollout,
    record: RolloutRecord,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    snapshot: watch::Sender<RolloutSnapshot>,
    events: broadcast::Sender<StoredEvent>,
    next_seq: u64,
    /// Position of the next engine input in the store.
    next_input: u64,
    run_script: pb::RunScript,
    /// The last command sent to each node, re-sent when its session comes back: a command sent
    /// while the node was away is lost with the old stream, and agents treat repeats as no-ops.
    last_sent: HashMap<String, pb::CoordinatorMessage>,
    metrics: Arc<Metrics>,
    instructions: InstructionNames,
    /// When the first participant arrived at each open barrier, for the wait histogram.
    barrier_first_arrival: HashMap<String, Millis>,
    /// The rollout state last reported to the metrics.
    last_state: RolloutState,
    /// The registry of running rollouts, which the driver leaves when it retires.
    handles: Arc<Mutex<HashMap<String, Handle>>>,
    /// When the status snapshot was last rebuilt, and whether the engine changed since.
    snapshot_at: tokio::time::Instant,
    snapshot_stale: bool,
}

/// The running rollouts; a panic while holding the lock leaves the map usable.
fn lock_handles(
    handles: &Mutex<HashMap<String, Handle>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
    handles.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleep until `at`, or forever when there is nothing to wait for (a `select!` branch).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long a finished rollout with nothing left to wait for keeps its task. Then it retires:
/// its status and history are served from the store, so the coordinator's memory does not grow
/// with past rollouts; a node that reports on it later (its Hello's journal) revives it.
const RETIRE_AFTER: Duration = Duration::from_secs(5);

/// How stale the published status snapshot may get while a burst of node reports is handled:
/// rebuilding it is O(nodes), so it is rebuilt at most this often, and at once for operator
/// replies, rollout state changes and the end.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(50);
/// Up to this many nodes the snapshot is cheap enough to rebuild after every batch.
const SNAPSHOT_ALWAYS_UP_TO: usize = 128;

/// Whether the rollout-level part of a status differs (everything but the nodes and the
/// barrier's arrival count). The stored record is rewritten only then: the node detail of an
/// unfinished rollout is rebuilt from its stored inputs after a restart, so rewriting the whole
/// record (O(nodes)) on every batch would only cost I/O.
fn summary_differs(a: &RolloutSnapshot, b: &RolloutSnapshot) -> bool {
    let barrier = |s: &RolloutSnapshot| s.barrier.as_ref().map(|b| (b.id.clone(), b.wave));
    a.state != b.state
        || a.failures != b.failures
        || a.current_wave != b.current_wave
        || a.waves != b.waves
        || a.error != b.error
        || a.finished_ms != b.finished_ms
        || barrier(a) != barrier(b)
}

impl Driver {
    /// Take inputs as they come. Whatever is already queued when the driver gets to it (up to
    /// [`MAX_BATCH`]) is handled in one go: every input goes through the engine in order, then
    /// all of it is made durable in one transaction, then the commands are sent. So a burst of
    /// reports (10,000 nodes arriving at a barrier) costs a few fsyncs and a few status
    /// snapshots, not one per report, and the more the driver falls behind the more each batch
    /// takes in.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            let sleep = self.engine.next_deadline().map(|deadline| {
                let wait = deadline.saturating_sub(now_ms());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            let flush_at = self
                .snapshot_stale
                .then(|| self.snapshot_at + SNAPSHOT_INTERVAL);
            let retire_at =
                (self.engine.state().is_final() && sleep.is_none() && flush_at.is_none())
                    .then(|| tokio::time::Instant::now() + RETIRE_AFTER);
            let input = tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => input,
                    None => return,
                },
                () = sleep_until_some(sleep) => Input::Event(Event::Tick),
                () = sleep_until_some(flush_at) => {
                    self.flush_snapshot();
                    continue;
                }
                () = sleep_until_some(retire_at) => {
                    if self.retire(&mut rx) {
                        return;
                    }
                    continue;
                }
            };
            let mut batch = Batch::default();
            self.take(input, &mut batch);
            while batch.inputs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(input) => self.take(input, &mut batch),
                    Err(_) => break,
                }
            }
            self.apply(&mut batch);
            // A node whose session came back hears the last command it was sent (it may have
            // been lost with the old stream).
            for node in &batch.restored {
                if let Some(message) = self.resend(node) {
                    self.registry.send(node, message.clone());
                }
            }
            for (reply, result) in batch.replies {
                let _ = reply.send(result.map(|()| self.snapshot.borrow().clone()));
            }
        }
    }

    /// Leave the registry of running rollouts, unless an input arrived meanwhile (checked under
    /// its lock, so no sender can still find this driver afterwards).
    fn retire(&mut self, rx: &mut mpsc::UnboundedReceiver<Input>) -> bool {
        let mut handles = lock_handles(&self.handles);
        if !rx.is_empty() {
            return false;
        }
        handles.remove(&self.record.id);
        tracing::debug!(rollout = %self.record.id, "finished rollout retired; served from the store");
        true
    }

    /// Run one input through the engine into `batch` (nothing is stored or sent yet).
    fn take(&mut self, input: Input, batch: &mut Batch) {
        match input {
            Input::Event(event) => {
                if let Event::SessionRestored { node } = &event {
                    batch.restored.push(node.clone());
                }
                let _ = self.step(event, batch);
            }
            Input::Operator(event, reply) => {
                let result = self.step(event, batch);
                batch.replies.push((reply, result));
            }
        }
    }

    /// Feed one event to the engine at the current time and add what it did to `batch`. An
    /// operator event that does not apply changes nothing and adds nothing.
    fn step(&mut self, event: Event, batch: &mut Batch) -> Result<(), NotApplicable> {
        let now = now_ms();
        let commands = self.engine.handle(now, event.clone())?;
        batch.inputs.push(StoredInput {
            seq: self.next_input,
            at_ms: now,
            event,
        });
        self.next_input += 1;
        for command in &commands {
            if let Command::Record(record) = command {
                batch.stored.push(StoredEvent {
                    seq: self.next_seq,
                    at_ms: now,
                    record: record.clone(),
                });
                self.next_seq += 1;
            }
        }
        batch.commands.extend(commands);
        batch.now = now;
        Ok(())
    }

    /// Feed one event to the engine at the current time; what it did is durable (input,
    /// records, status) before its commands are sent. An operator event that does not apply
    /// changes nothing and stores nothing.
    fn handle(&mut self, event: Event) -> Result<(), NotApplicable> {
        let mut batch = Batch::default();
        self.step(event, &mut batch)?;
        self.apply(&mut batch);
        // Used before the task runs (start, recovery): the status must be current at once.
        if self.snapshot_stale {
            self.flush_snapshot();
        }
        Ok(())
    }

    /// Make the batch's inputs, records and the new status durable, then send its commands.
    fn apply(&mut self, batch: &mut Batch) {
        if batch.inputs.is_empty() {
            return;
        }
        let now = batch.now;
        let stored = std::mem::take(&mut batch.stored);
        let commands = std::mem::take(&mut batch.commands);
        let refresh = self.engine.nodes().len() <= SNAPSHOT_ALWAYS_UP_TO
            || !batch.replies.is_empty()
            || self.engine.state() != self.snapshot.borrow().state
            || self.engine.state().is_final()
            || self.snapshot_at.elapsed() >= SNAPSHOT_INTERVAL;
        let (snapshot, write_record) = if refresh {
            self.fresh_snapshot(now)
        } else {
            self.snapshot_stale = true;
            (None, false)
        };
        let commit = Commit {
            rollout: &self.record.id,
            inputs: &batch.inputs,
            events: &stored,
            record: write_record.then_some(&self.record),
        };
        tracing::trace!(
            inputs = batch.inputs.len(),
            records = stored.len(),
            commands = commands.len(),
            "batch"
        );
        if let Err(e) = self.store.commit(commit) {
            tracing::error!(rollout = %self.record.id, error = %e, "cannot store the rollout's step");
        }
        if let Some(snapshot) = snapshot {
            self.snapshot.send_replace(snapshot);
        }
        self.fault_points(&stored, &commands);
        for event in &stored {
            self.observe(event);
        }
        let state = self.engine.state();
        if state != self.last_state {
            self.metrics
                .rollout_state_changed(Some(self.last_state), state);
            self.last_state = state;
        }
        // Never blocks: a watcher that falls more than the buffer behind is told so and
        // reconnects from the store.
        for event in stored {
            let _ = self.events.send(event);
        }
        for command in &commands {
            self.send(command);
        }
    }

    /// Rebuild the status snapshot from the engine. Returns it when it changed, and whether the
    /// stored record must be rewritten (then `self.record.status` is already updated).
    fn fresh_snapshot(&mut self, now: Millis) -> (Option<RolloutSnapshot>, bool) {
        self.snapshot_at = tokio::time::Instant::now();
        self.snapshot_stale = false;
        let finished = if self.engine.state().is_final() {
            Some(self.snapshot.borrow().finished_ms.unwrap_or(now))
        } else {
            None
        };
        let snapshot = snapshot_of(&self.engine, self.record.created_ms, finished);
        if snapshot == *self.snapshot.borrow() {
            return (None, false);
        }
        let write_record =
            snapshot.state.is_final() || summary_differs(&snapshot, &self.record.status);
        if write_record {
            self.record.status = snapshot.clone();
        }
        (Some(snapshot), write_record)
    }

    /// Publish a snapshot whose rebuild was put off during a burst (see [`SNAPSHOT_INTERVAL`]).
    fn flush_snapshot(&mut self) {
        let (snapshot, write_record) = self.fresh_snapshot(now_ms());
        if write_record && let Err(e) = self.store.put_rollout(&self.record) {
            tracing::error!(rollout = %self.record.id, error = %e, "cannot store the rollout's status");
        }
        if let Some(snapshot) = snapshot {
            self.snapshot.send_replace(snapshot);
        }
    }

    /// Feed one history record to the metrics.
    fn observe(&mut self, event: &StoredEvent) {
        match &event.record {
            Record::Step {
                step,
                phase,
                duration_ms: Some(ms),
                ..
            } => {
                let outcome = match phase {
                    StepPhase::Succeeded => StepOutcome::Succeeded,
                    StepPhase::Failed => StepOutcome::Failed,
                    StepPhase::Started => return,
                };
                let name = self
                    .instructions
                    .get(usize::try_from(*step).unwrap_or(usize::MAX))
                    .map_or("unknown", String::as_str);
                self.metrics
                    .observe_instruction(name, outcome, Duration::from_millis(*ms));
            }
            Record::BarrierArrived { barrier, .. } => {
                self.barrier_first_arrival
                    .entry(barrier.clone())
                    .or_insert(event.at_ms);
            }
            Record::BarrierReleased { barrier, .. } | Record::BarrierFailed { barrier, .. } => {
                let outcome = if matches!(event.record, Record::BarrierReleased { .. }) {
                    BarrierOutcome::Released
                } else {
                    BarrierOutcome::Failed
                };
                if let Some(first) = self.barrier_first_arrival.remove(barrier) {
                    let waited = event.at_ms.saturating_sub(first);
                    self.metrics
                        .observe_barrier_wait(outcome, Duration::from_millis(waited));
                }
            }
            Record::NodeState {
                state: NodeState::RolledBack,
                ..
            } => self.metrics.rollback_confirmed(),
            _ => {}
        }
    }

    /// Crash-safety tests: die here if a fault point armed through `HOTROLL_FAULT_FILE` names
    /// one of this step's records or commands (they are durable, the commands not yet sent).
    fn fault_points(&self, stored: &[StoredEvent], commands: &[Command]) {
        if !hotroll_fault::armed() {
            return;
        }
        for event in stored {
            if let Some(point) = record_point(&event.record) {
                hotroll_fault::point(&point);
            }
        }
        for command in commands {
            if let Some(point) = command_point(command) {
                hotroll_fault::point(&point);
            }
        }
    }

    /// The wire message of a command to a node (`None` for records).
    fn message(&self, command: &Command) -> Option<(String, pb::CoordinatorMessage)> {
        match command {
            Command::RunScript { node } => Some((
                node.clone(),
                pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::RunScript(
                        self.run_script.clone(),
                    )),
                },
            )),
            other => convert::command_message(&self.record.id, self.engine.epoch(), other),
        }
    }

    /// What to send again to `node` when its session comes back: its last command, except a
    /// RunScript of a rollout that has ended — a node that never started it must not start it
    /// now, and one that ran it and forgot it (a restarted agent keeps a bounded journal) would
    /// run it a second time.
    fn resend(&self, node: &str) -> Option<&pb::CoordinatorMessage> {
        let message = self.last_sent.get(node)?;
        let run_script = matches!(
            message.msg,
            Some(pb::coordinator_message::Msg::RunScript(_))
        );
        (!(run_script && self.engine.state().is_final())).then_some(message)
    }

    /// Note a command as the last one its node was sent, without sending it (replay).
    fn remember(&mut self, command: &Command) {
        if let Some((node, message)) = self.message(command) {
            self.last_sent.insert(node, message);
        }
    }

    fn send(&mut self, command: &Command) {
        let Some((node, message)) = self.message(command) else {
            return;
        };
        self.last_sent.insert(node.clone(), message.clone());
        if !self.registry.send(&node, message) {
            tracing::warn!(rollout = %self.record.id, node, ?command, "node not connected; command not delivered");
        }
    }
}

/// The fault point of a history record: `step <node> <step> <phase>`, `node <node> <state>`,
/// `rollout <state>`.
fn record_point(record: &Record) -> Option<String> {
    Some(match record {
        Record::Step {
            node, step, phase, ..
        } => {
            let phase = match phase {
                StepPhase::Started => "started",
                StepPhase::Succeeded => "succeeded",
                StepPhase::Failed => "failed",
            };
            format!("step {node} {step} {phase}")
        }
        Record::NodeState { node, state, .. } => format!("node {node} {}", state.as_str()),
        Record::RolloutState { state, .. } => format!("rollout {}", state.as_str()),
        _ => return None,
    })
}

/// The fault point of a command to a node: `command <kind> <node>`.
fn command_point(command: &Command) -> Option<String> {
    let (kind, node) = match command {
        Command::RunScript { node } => ("run_script", node),
        Command::ReleaseBarrier { node, .. } => ("release_barrier", node),
        Command::Commit { node } => ("commit", node),
        Command::Abort { node, .. } => ("abort", node),
        Command::Rollback { node, .. } => ("rollback", node),
        Command::MakePermanent { node } => ("make_permanent", node),
        Command::Record(_) => return None,
    };
    Some(format!("command {kind} {node}"))
}

/// Label selector as given on the command line or in the script.
pub type Selector = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const SCRIPT: &str = r#"
app = "x"
from = "1"
to = "2"
[rollout]
barrier_timeout = "30s"
step_timeout = "30s"
[script]
up = [ { sync_nodes = "b" }, "point_of_no_return" ]
"#;

    fn rollouts(store: &Arc<dyn Store>) -> Rollouts {
        let registry = Arc::new(Registry::load(store.clone()).unwrap_or_else(|e| panic!("{e}")));
        Rollouts::new(
            store.clone(),
            registry,
            RolloutTiming {
                session_grace: Duration::from_secs(60),
                step_slack: Duration::from_secs(5),
            },
        )
    }

    fn new_rollout() -> NewRollout {
        let parsed = hotroll_script::parse("s.toml", SCRIPT)
            .unwrap_or_else(|d| panic!("{}", d.to_short_lines().join("\n")));
        NewRollout {
            script_name: "s.toml".into(),
            script_source: SCRIPT.into(),
            script: parsed.script,
            artifacts: Vec::new(),
            targets: vec!["a".into(), "b".into()],
        }
    }

    /// Poll the rollout's status until `done` holds (the driver works asynchronously).
    async fn wait(rollouts: &Rollouts, id: &str, done: impl Fn(&RolloutSnapshot) -> bool) {
        for _ in 0..500 {
            if let Ok((s, _)) = rollouts.status(id)
                && done(&s)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("status of {id} never got there: {:?}", rollouts.status(id));
    }

    fn arrive(node: &str) -> Event {
        Event::BarrierArrived {
            node: node.into(),
            epoch: 1,
            barrier: "b".into(),
        }
    }

    /// A finished rollout leaves memory (its task retires) but not the record: status comes
    /// from the store with every node's final state, and operator commands are refused as for
    /// any finished rollout.
    #[tokio::test(start_paused = true)]
    async fn a_finished_rollout_retires_and_is_served_from_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let rollouts = rollouts(&store);
        let id = rollouts
            .start(new_rollout())
            .unwrap_or_else(|e| panic!("{e}"))
            .id;
        let abort = Event::OperatorAbort {
            reason: "test".into(),
        };
        rollouts
            .operate(&id, abort.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for node in ["a", "b"] {
            rollouts.deliver(
                &id,
                Event::Outcome {
                    node: node.into(),
                    epoch: 1,
                    outcome: Outcome::Aborted,
                    error: None,
                },
            );
        }
        wait(&rollouts, &id, |s| s.state == RolloutState::Aborted).await;
        assert!(
            rollouts.lock().contains_key(&id),
            "running until it retires"
        );
        tokio::time::sleep(RETIRE_AFTER + Duration::from_secs(1)).await;
        assert!(!rollouts.lock().contains_key(&id), "retired");
        let (status, names) = rollouts.status(&id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.state, RolloutState::Aborted);
        assert!(status.nodes.iter().all(|n| n.state == NodeState::Aborted));
        assert_eq!(names.as_slice(), ["sync_nodes", "point_of_no_return"]);
        match rollouts.operate(&id, abort).await {
            Err(RolloutError::NotApplicable(n)) => assert_eq!(n.state, "aborted"),
            other => panic!("abort of a retired rollout: {other:?}"),
        }
        assert_eq!(rollouts.list(10).unwrap_or_else(|e| panic!("{e}")).len(), 1);
    }

    #[tokio::test]
    async fn a_restarted_coordinator_rebuilds_an_unfinished_rollout() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let first = rollouts(&store);
        let id = first
            .start(new_rollout())
            .unwrap_or_else(|e| panic!("{e}"))
            .id;
        first.deliver(&id, arrive("a"));
        wait(&first, &id, |s| {
            s.barrier.as_ref().is_some_and(|b| b.arrived == 1)
        })
        .await;
        let before = first.status(&id).unwrap_or_else(|e| panic!("{e}")).0;
        let inputs = store.inputs(&id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inputs.first().map(|i| &i.event), Some(&Event::Start));

        // The "restart": a new coordinator over the same store.
        let second = rollouts(&store);
        assert_eq!(
            second.recover().unwrap_or_else(|e| panic!("{e}")),
            vec![id.clone()]
        );
        let (after, names) = second.status(&id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(after.barrier, before.barrier, "the barrier survives");
        assert_eq!(after.state, RolloutState::Preparing);
        assert!(
            after.nodes.iter().all(|n| !n.connected),
            "sessions lost at the restart"
        );
        assert_eq!(names.as_slice(), ["sync_nodes", "point_of_no_return"]);
        // The history goes on where it stopped.
        let seqs: Vec<u64> = store
            .events(&id, 0)
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

        // b arrives at the rebuilt coordinator: the barrier (with a's arrival) releases, and
        // both prepared start the commit.
        second.deliver(&id, arrive("b"));
        wait(&second, &id, |s| s.barrier.is_none()).await;
        for node in ["a", "b"] {
            second.deliver(
                &id,
                Event::Prepared {
                    node: node.into(),
                    epoch: 1,
                },
            );
        }
        wait(&second, &id, |s| s.state == RolloutState::Committing).await;
        let events = store.events(&id, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(events.iter().any(
            |e| matches!(&e.record, Record::BarrierReleased { barrier, .. } if barrier == "b")
        ));
    }

    #[tokio::test]
    async fn a_rollout_stored_but_never_started_starts_after_a_restart() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let first = rollouts(&store);
        let id = first
            .start(new_rollout())
            .unwrap_or_else(|e| panic!("{e}"))
            .id;
        wait(&first, &id, |s| s.state == RolloutState::Preparing).await;
        // Forget the inputs and go back to the stored-but-pending record: as if the coordinator
        // died between storing the rollout and starting it.
        let pending = {
            let mut record = store
                .get_rollout(&id)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no record"));
            record.status.state = RolloutState::Pending;
            record.id = format!("{id}-pending");
            record.status.id = record.id.clone();
            record
        };
        store
            .put_rollout(&pending)
            .unwrap_or_else(|e| panic!("{e}"));
        let second = rollouts(&store);
        let recovered = second.recover().unwrap_or_else(|e| panic!("{e}"));
        assert!(recovered.contains(&pending.id), "{recovered:?}");
        let (status, _) = second.status(&pending.id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.state, RolloutState::Preparing);
        let events: Vec<Event> = store
            .inputs(&pending.id)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|i| i.event)
            .collect();
        assert_eq!(
            events,
            vec![
                Event::Start,
                Event::SessionLost { node: "a".into() },
                Event::SessionLost { node: "b".into() },
            ]
        );
    }
}
