//! Running rollouts: one task per rollout owns its [`Rollout`] engine, feeds it events from the
//! sessions, the clock and the operator, makes every resulting record durable, and only then
//! sends the commands to the nodes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hotroll_proto::v1 as pb;
use hotroll_script::Script;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::convert;
use crate::engine::{
    Command, Event, Millis, NodeState, NotApplicable, Record, Rollout, RolloutSpec, RolloutState,
    StepPhase,
};
use crate::metrics::{BarrierOutcome, Metrics, StepOutcome};
use crate::registry::Registry;
use crate::store::{
    ArtifactBinding, RolloutRecord, RolloutSnapshot, Store, StoreError, StoredEvent,
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
    handles: Mutex<HashMap<String, Handle>>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    timing: RolloutTiming,
    metrics: Arc<Metrics>,
    watch_buffer: usize,
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
            handles: Mutex::new(HashMap::new()),
            store,
            registry,
            timing,
            metrics: Arc::new(Metrics::new()),
            watch_buffer: crate::server::DEFAULT_WATCH_BUFFER,
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
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a new rollout durably, start its task and send the script to every target.
    pub fn start(&self, new: NewRollout) -> Result<RolloutSnapshot, RolloutError> {
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let script = &new.script;
        let spec = RolloutSpec {
            id: id.clone(),
            app: script.app.value.clone(),
            from: script.from.value.clone(),
            to: script.to.value.clone(),
            targets: new.targets.clone(),
            policy: script.rollout.clone(),
            barriers: script.barriers(),
            steps_total: u32::try_from(script.up.len()).unwrap_or(u32::MAX),
            first_commit_step: u32::try_from(script.ponr().first_commit_step()).unwrap_or(u32::MAX),
            step_deadlines: script.up.iter().map(|s| script.step_deadline(s)).collect(),
            session_grace: self.timing.session_grace,
            step_slack: self.timing.step_slack,
        };
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
        };
        self.store.put_rollout(&record)?;

        let instructions: InstructionNames = Arc::new(
            script
                .up
                .iter()
                .map(|s| s.instruction.name().to_string())
                .collect(),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let (snapshot_tx, snapshot_rx) = watch::channel(snapshot.clone());
        let (events_tx, _) = broadcast::channel(self.watch_buffer);
        let run_script = pb::RunScript {
            rollout_id: id.clone(),
            epoch,
            script_name: new.script_name,
            script_source: new.script_source,
            artifacts: new
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
        };
        let driver = Driver {
            engine,
            record,
            store: self.store.clone(),
            registry: self.registry.clone(),
            snapshot: snapshot_tx,
            events: events_tx.clone(),
            next_seq: 1,
            run_script,
            last_sent: HashMap::new(),
            metrics: self.metrics.clone(),
            instructions: instructions.clone(),
            barrier_first_arrival: HashMap::new(),
            last_state: snapshot.state,
        };
        self.metrics.rollout_started();
        self.metrics.rollout_state_changed(None, snapshot.state);
        self.lock().insert(
            id,
            Handle {
                tx: tx.clone(),
                snapshot: snapshot_rx,
                events: events_tx,
                targets: new.targets.iter().cloned().collect(),
                instructions,
            },
        );
        tokio::spawn(driver.run(rx));
        let _ = tx.send(Input::Event(Event::Start));
        Ok(snapshot)
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
        let tx = {
            let handles = self.lock();
            let handle = handles
                .get(rollout_id)
                .ok_or_else(|| RolloutError::NotFound(rollout_id.to_string()))?;
            handle.tx.clone()
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

struct Driver {
    engine: Rollout,
    record: RolloutRecord,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    snapshot: watch::Sender<RolloutSnapshot>,
    events: broadcast::Sender<StoredEvent>,
    next_seq: u64,
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
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            let sleep = self.engine.next_deadline().map(|deadline| {
                let wait = deadline.saturating_sub(now_ms());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            let input = tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => input,
                    None => return,
                },
                () = async {
                    match sleep {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Input::Event(Event::Tick),
            };
            match input {
                Input::Event(event) => {
                    let restored = match &event {
                        Event::SessionRestored { node } => Some(node.clone()),
                        _ => None,
                    };
                    if let Ok(commands) = self.engine.handle(now_ms(), event) {
                        self.apply(commands);
                    }
                    if let Some(node) = restored
                        && let Some(message) = self.last_sent.get(&node)
                    {
                        self.registry.send(&node, message.clone());
                    }
                }
                Input::Operator(event, reply) => {
                    let result = self.engine.handle(now_ms(), event).map(|commands| {
                        self.apply(commands);
                        self.snapshot.borrow().clone()
                    });
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Make the engine's records and new status durable, then send its commands.
    fn apply(&mut self, commands: Vec<Command>) {
        let now = now_ms();
        let mut stored = Vec::new();
        for command in &commands {
            if let Command::Record(record) = command {
                stored.push(StoredEvent {
                    seq: self.next_seq,
                    at_ms: now,
                    record: record.clone(),
                });
                self.next_seq += 1;
            }
        }
        let finished = if self.engine.state().is_final() {
            Some(self.snapshot.borrow().finished_ms.unwrap_or(now))
        } else {
            None
        };
        let snapshot = snapshot_of(&self.engine, self.record.created_ms, finished);
        let changed = snapshot != *self.snapshot.borrow();
        if !stored.is_empty()
            && let Err(e) = self.store.append_events(&self.record.id, &stored)
        {
            tracing::error!(rollout = %self.record.id, error = %e, "cannot store rollout events");
        }
        if changed {
            self.record.status = snapshot.clone();
            if let Err(e) = self.store.put_rollout(&self.record) {
                tracing::error!(rollout = %self.record.id, error = %e, "cannot store rollout status");
            }
            self.snapshot.send_replace(snapshot);
        }
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

    fn send(&mut self, command: &Command) {
        let (node, message) = match command {
            Command::RunScript { node } => (
                node.clone(),
                pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::RunScript(
                        self.run_script.clone(),
                    )),
                },
            ),
            other => match convert::command_message(&self.record.id, self.engine.epoch(), other) {
                Some(pair) => pair,
                None => return,
            },
        };
        self.last_sent.insert(node.clone(), message.clone());
        if !self.registry.send(&node, message) {
            tracing::warn!(rollout = %self.record.id, node, ?command, "node not connected; command not delivered");
        }
    }
}

/// Label selector as given on the command line or in the script.
pub type Selector = BTreeMap<String, String>;
