//! The per-rollout task: it owns the rollout's engine, feeds it the inputs that arrive, makes
//! what each batch of inputs did durable and only then sends the batch's commands.
//!
//! A command leaves only after the commit that produced it is durable. When a commit fails
//! (a full disk, an I/O error) the rollout holds: none of the batch's commands is sent, no
//! further input goes through the engine (inputs wait in the channel, deadlines that pass are
//! handled once it resumes), status and the watch stream say why, and the same commit is
//! retried with backoff until the store takes it; then the held commands go out in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotroll_script::{FleetGate, Script};
use tokio::sync::{broadcast, mpsc, watch};

use super::batch::{Batch, LINGER, MAX_BATCH};
use super::clock::now_ms;
use super::crash_points::{command_point, record_point};
use super::gates::GateRunner;
use super::hold::Held;
use super::snapshot::{
    InstructionNames, SNAPSHOT_ALWAYS_UP_TO, SNAPSHOT_INTERVAL, snapshot_of, summary_differs,
};
use super::spec::script_to_run;
use super::{Handle, Input, LiveEvent, Rollouts, lock_handles};
use crate::engine::{
    Command, Event, Millis, NodeState, NotApplicable, Record, Rollout, RolloutState, StepPhase,
};
use crate::metrics::{BarrierOutcome, Metrics, StepOutcome};
use crate::outbound::{FanoutProbe, NodeCommand, Order, ScriptToRun};
use crate::registry::Registry;
use crate::store::{
    Commit, RolloutRecord, RolloutSnapshot, Store, StoreError, StoredEvent, StoredInput,
};

pub(super) struct Driver {
    pub(super) engine: Rollout,
    pub(super) record: RolloutRecord,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    pub(super) snapshot: watch::Sender<RolloutSnapshot>,
    pub(super) events: broadcast::Sender<LiveEvent>,
    next_seq: u64,
    /// Position of the next engine input in the store.
    next_input: u64,
    script: Arc<ScriptToRun>,
    /// The last command sent to each node, re-sent when its session comes back: a command sent
    /// while the node was away is lost with the old stream, and agents treat repeats as no-ops.
    last_sent: HashMap<String, Arc<NodeCommand>>,
    /// The node command built last: the next node told the same is sent this one, so that a
    /// fan-out is one command and one encoding (see `outbound`).
    last_built: Option<Arc<NodeCommand>>,
    metrics: Arc<Metrics>,
    pub(super) instructions: InstructionNames,
    /// When the first participant arrived at each open barrier, for the wait histogram.
    barrier_first_arrival: HashMap<String, Millis>,
    /// The rollout state last reported to the metrics.
    last_state: RolloutState,
    /// The registry of running rollouts, which the driver leaves when it retires.
    handles: Arc<Mutex<HashMap<String, Handle>>>,
    /// When the status snapshot was last rebuilt, and whether the engine changed since.
    snapshot_at: tokio::time::Instant,
    /// How long the last store commit took (a fan-out probe reports it).
    last_commit: std::time::Duration,
    snapshot_stale: bool,
    /// The rollout's record has a status the store did not take (a failed flush): the next
    /// commit rewrites it.
    record_unsaved: bool,
    /// The batch whose commit failed, while the rollout holds on its store.
    held: Option<Held>,
    /// The rollout's own input channel (set when its task is spawned): where gate results go.
    pub(super) inputs: Option<mpsc::WeakUnboundedSender<Input>>,
    gates: GateRunner,
    /// The script's fleet gates.
    fleet_gates: Arc<Vec<FleetGate>>,
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
pub(super) const RETIRE_AFTER: Duration = Duration::from_secs(5);

/// What [`Driver::settle`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Nothing is held: go on.
    Clear,
    /// The store refused a write fenced by an older epoch: stop.
    Deposed,
}

impl Driver {
    /// A driver for `engine`, before it runs.
    pub(super) fn new(
        rollouts: &Rollouts,
        engine: Rollout,
        record: RolloutRecord,
        script: &Script,
        next_seq: u64,
        next_input: u64,
    ) -> Self {
        let snapshot = record.status.clone();
        let (snapshot_tx, _) = watch::channel(snapshot);
        let (events_tx, _) = broadcast::channel(rollouts.watch_buffer);
        Self {
            script: Arc::new(script_to_run(&record, script)),
            instructions: Arc::new(
                script
                    .up
                    .iter()
                    .map(|s| s.instruction.name().to_string())
                    .collect(),
            ),
            last_state: engine.state(),
            handles: rollouts.handles.clone(),
            snapshot_at: tokio::time::Instant::now(),
            last_commit: std::time::Duration::ZERO,
            snapshot_stale: false,
            record_unsaved: false,
            held: None,
            inputs: None,
            gates: rollouts.gates.clone(),
            fleet_gates: Arc::new(script.rollout.gates.clone()),
            engine,
            record,
            store: rollouts.store.clone(),
            registry: rollouts.registry.clone(),
            snapshot: snapshot_tx,
            events: events_tx,
            next_seq,
            next_input,
            last_sent: HashMap::new(),
            last_built: None,
            metrics: rollouts.metrics.clone(),
            barrier_first_arrival: HashMap::new(),
        }
    }

    /// Take inputs as they come. Whatever is already queued when the driver gets to it (up to
    /// [`MAX_BATCH`]) is handled in one go: every input goes through the engine in order, then
    /// all of it is made durable in one transaction, then the commands are sent. So a burst of
    /// reports (10,000 nodes arriving at a barrier) costs a few fsyncs and a few status
    /// snapshots, not one per report, and the more the driver falls behind the more each batch
    /// takes in. While the rollout holds on its store nothing is taken (see the module docs).
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            if self.settle().await == Settled::Deposed {
                return;
            }
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
                () = sleep_until_some(sleep) => Input::event(Event::Tick),
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
            self.take_queued(&mut rx, &mut batch);
            if batch.is_quiet() {
                self.linger(&mut rx, &mut batch).await;
            }
            self.apply(batch);
        }
    }

    /// Take what is already queued into `batch`, up to [`MAX_BATCH`].
    fn take_queued(&mut self, rx: &mut mpsc::UnboundedReceiver<Input>, batch: &mut Batch) {
        while batch.inputs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(input) => self.take(input, batch),
                Err(_) => return,
            }
        }
    }

    /// A quiet batch (nothing to send, nobody waiting for it) waits up to [`LINGER`] for more
    /// inputs before it is committed, and stops waiting at the first input that makes it
    /// send something. A burst of reports that only advance the history (steps started and
    /// ended, arrivals before the last) then costs a few commits instead of one per handful,
    /// and the input that releases a barrier is still committed at once: the wait is never on
    /// a command's path (docs/performance.md, "Group commit").
    async fn linger(&mut self, rx: &mut mpsc::UnboundedReceiver<Input>, batch: &mut Batch) {
        let until = tokio::time::Instant::now() + LINGER;
        while batch.is_quiet() && batch.inputs.len() < MAX_BATCH {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => {
                        self.take(input, batch);
                        self.take_queued(rx, batch);
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(until) => return,
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
            Input::Event(event, received) => {
                if let Event::SessionRestored { node } = &event {
                    batch.restored.push(node.clone());
                }
                let commands_before = batch.commands.len();
                let _ = self.step(event, batch);
                for command in &batch.commands[commands_before..] {
                    if let Command::ReleaseBarrier { barrier, .. } = command {
                        batch.releases.entry(barrier.clone()).or_insert(received);
                    }
                }
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
    /// changes nothing and stores nothing. Used before the task runs (start, recovery).
    pub(super) fn handle(&mut self, event: Event) -> Result<(), NotApplicable> {
        if let Some(mut held) = self.held.take() {
            // Already held: the event joins the held batch and is stored with it, in order,
            // once the store takes it.
            let result = self.step(event, &mut held.batch);
            let (_, write_record) = self.fresh_snapshot(held.batch.now);
            held.write_record |= write_record;
            self.held = Some(held);
            self.show_hold();
            return result;
        }
        let mut batch = Batch::default();
        self.step(event, &mut batch)?;
        self.apply(batch);
        // The status must be current at once.
        if self.snapshot_stale && self.held.is_none() {
            self.flush_snapshot();
        }
        Ok(())
    }

    /// Make the batch's inputs, records and the new status durable, then send its commands;
    /// when the store fails, hold the batch instead (see [`Driver::settle`]).
    fn apply(&mut self, batch: Batch) {
        let mut write_record = false;
        let mut snapshot = None;
        if !batch.inputs.is_empty() {
            let refresh = self.engine.nodes().len() <= SNAPSHOT_ALWAYS_UP_TO
                || !batch.replies.is_empty()
                || self.engine.state() != self.snapshot.borrow().state
                || self.engine.state().is_final()
                || self.snapshot_at.elapsed() >= SNAPSHOT_INTERVAL;
            if refresh {
                (snapshot, write_record) = self.fresh_snapshot(batch.now);
            } else {
                self.snapshot_stale = true;
            }
            write_record |= self.record_unsaved;
            tracing::trace!(
                inputs = batch.inputs.len(),
                records = batch.stored.len(),
                commands = batch.commands.len(),
                "batch"
            );
        }
        match self.commit(&batch, write_record) {
            Ok(()) => {
                if let Some(snapshot) = snapshot {
                    self.snapshot.send_replace(snapshot);
                }
                self.release(batch);
            }
            Err(error) => self.hold(Held::new(batch, write_record, &error, now_ms()), &error),
        }
    }

    /// Store the batch (nothing to store for a batch without inputs).
    fn commit(&mut self, batch: &Batch, write_record: bool) -> Result<(), StoreError> {
        if batch.inputs.is_empty() {
            return Ok(());
        }
        let commit = Commit {
            rollout: &self.record.id,
            inputs: &batch.inputs,
            events: &batch.stored,
            record: write_record.then_some(&self.record),
        };
        let started = std::time::Instant::now();
        let store = &self.store;
        let result = off_the_workers(|| store.commit(commit));
        self.last_commit = started.elapsed();
        tracing::trace!(
            rollout = %self.record.id,
            inputs = batch.inputs.len(),
            commit_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "batch committed"
        );
        match &result {
            Ok(()) => self.record_unsaved = false,
            Err(_) => self.metrics.store_commit_failed(),
        }
        result
    }

    /// The batch is durable: what it did leaves (history to watchers, commands to the nodes,
    /// replies to the operator).
    fn release(&mut self, batch: Batch) {
        let Batch {
            stored,
            commands,
            restored,
            replies,
            releases,
            ..
        } = batch;
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
            let _ = self.events.send(LiveEvent::Stored(event));
        }
        let probes = self.fanout_probes(&releases, &commands);
        for command in &commands {
            let probe = match command {
                Command::ReleaseBarrier { barrier, .. } => probes.get(barrier).cloned(),
                _ => None,
            };
            self.send(command, probe);
        }
        for probe in probes.values() {
            probe.queued();
        }
        drop(probes);
        // A node whose session came back hears the last command it was sent (it may have been
        // lost with the old stream).
        for node in &restored {
            if let Some(command) = self.resend(node) {
                self.registry.send(node, command.clone(), None);
            }
        }
        for (reply, result) in replies {
            let _ = reply.send(result.map(|()| self.snapshot.borrow().clone()));
        }
    }

    /// Start holding `held` (its commit just failed with `error`).
    fn hold(&mut self, held: Held, error: &StoreError) {
        tracing::error!(
            rollout = %self.record.id,
            error = %error,
            inputs = held.batch.inputs.len(),
            commands = held.batch.commands.len(),
            "cannot store the rollout's step; the rollout holds (none of the step's commands is \
             sent) and retries until the store takes it"
        );
        let _ = self.events.send(LiveEvent::Held(held.hold.clone()));
        self.held = Some(held);
        self.show_hold();
    }

    /// Publish the hold in the status snapshot.
    fn show_hold(&mut self) {
        if let Some(held) = &self.held {
            let hold = held.hold.clone();
            self.snapshot
                .send_modify(|snapshot| snapshot.held_on_store = Some(hold));
        }
    }

    /// While the rollout holds: retry the held commit with backoff until the store takes it,
    /// then release the held batch. Returns at once when nothing is held.
    async fn settle(&mut self) -> Settled {
        while let Some(mut held) = self.held.take() {
            tokio::time::sleep(held.next_wait()).await;
            let write_record = held.write_record || self.record_unsaved;
            match self.commit(&held.batch, write_record) {
                Ok(()) => {
                    tracing::info!(
                        rollout = %self.record.id,
                        attempts = held.attempts + 1,
                        held_ms = now_ms().saturating_sub(held.hold.since_ms),
                        commands = held.batch.commands.len(),
                        "the store took the held step; sending its commands"
                    );
                    let _ = self.events.send(LiveEvent::Resumed {
                        at_ms: now_ms(),
                        held_since_ms: held.hold.since_ms,
                    });
                    // The status the batch led to (rebuilt now: the published one predates it).
                    let (snapshot, _) = self.fresh_snapshot(held.batch.now);
                    match snapshot {
                        Some(snapshot) => {
                            self.snapshot.send_replace(snapshot);
                        }
                        None => self
                            .snapshot
                            .send_modify(|snapshot| snapshot.held_on_store = None),
                    }
                    self.release(held.batch);
                }
                Err(StoreError::Fenced { epoch }) => {
                    // Another coordinator leads (docs/ha.md): it continues the rollout from
                    // the store; this one neither sends nor retries anything more.
                    tracing::warn!(
                        rollout = %self.record.id,
                        epoch,
                        "this coordinator no longer leads: the rollout's driver stops"
                    );
                    return Settled::Deposed;
                }
                Err(error) => {
                    let (log, changed) = held.failed_again(&error);
                    if log {
                        tracing::warn!(
                            rollout = %self.record.id,
                            error = %error,
                            attempts = held.attempts,
                            held_ms = now_ms().saturating_sub(held.hold.since_ms),
                            "the rollout still holds: the store does not take its step"
                        );
                    }
                    if changed {
                        let _ = self.events.send(LiveEvent::Held(held.hold.clone()));
                    }
                    self.held = Some(held);
                    if changed {
                        self.show_hold();
                    }
                }
            }
        }
        Settled::Clear
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
            tracing::error!(rollout = %self.record.id, error = %e, "cannot store the rollout's status; the next step's commit rewrites it");
            self.record_unsaved = true;
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

    /// The node an engine command addresses and the command it is sent (`None` for records and
    /// gates): the one built last when it says the same, else a new one.
    fn node_command<'c>(&mut self, command: &'c Command) -> Option<(&'c str, Arc<NodeCommand>)> {
        let node = NodeCommand::addressee(command)?;
        let epoch = self.engine.epoch();
        if let Some(last) = &self.last_built
            && last.says(&self.record.id, epoch, command)
        {
            return Some((node, last.clone()));
        }
        let built = Arc::new(NodeCommand::from_engine(
            &self.record.id,
            epoch,
            &self.script,
            command,
        )?);
        self.last_built = Some(built.clone());
        Some((node, built))
    }

    /// Note `command` as the last one `node` was sent (no allocation once the node is known).
    fn note_sent(&mut self, node: &str, command: Arc<NodeCommand>) {
        match self.last_sent.get_mut(node) {
            Some(slot) => *slot = command,
            None => {
                self.last_sent.insert(node.to_string(), command);
            }
        }
    }

    /// What to send again to `node` when its session comes back: its last command, except a
    /// RunScript of a rollout that has ended — a node that never started it must not start it
    /// now, and one that ran it and forgot it (a restarted agent keeps a bounded journal) would
    /// run it a second time.
    fn resend(&self, node: &str) -> Option<&Arc<NodeCommand>> {
        let command = self.last_sent.get(node)?;
        let run_script = matches!(command.order, Order::RunScript(_));
        (!(run_script && self.engine.state().is_final())).then_some(command)
    }

    /// Note a command as the last one its node was sent, without sending it (replay).
    pub(super) fn remember(&mut self, command: &Command) {
        if let Some((node, message)) = self.node_command(command) {
            self.note_sent(node, message);
        }
    }

    /// One probe per barrier the batch releases, shared by every release of it.
    fn fanout_probes(
        &self,
        releases: &HashMap<String, std::time::Instant>,
        commands: &[Command],
    ) -> HashMap<String, FanoutProbe> {
        releases
            .iter()
            .map(|(barrier, started)| {
                let nodes = commands
                    .iter()
                    .filter(
                        |c| matches!(c, Command::ReleaseBarrier { barrier: b, .. } if b == barrier),
                    )
                    .count();
                let probe = FanoutProbe::start(
                    *started,
                    self.last_commit,
                    &self.record.id,
                    barrier,
                    nodes,
                    self.metrics.clone(),
                );
                (barrier.clone(), probe)
            })
            .collect()
    }

    /// Evaluate a fleet gate; its result comes back as an input.
    fn run_gate(&self, wave: u32, gate: u32) {
        match &self.inputs {
            Some(inputs) => {
                self.gates.start(
                    &self.record.id,
                    &self.fleet_gates,
                    wave,
                    gate,
                    inputs.clone(),
                );
            }
            None => {
                tracing::error!(rollout = %self.record.id, wave, gate, "gate not run: the rollout's task is not running")
            }
        }
    }

    /// After a restart: the gate the engine waits for runs again (its first run's result, if
    /// any, died with the previous process).
    pub(super) fn rerun_gate(&self) {
        if let Some((wave, gate)) = self.engine.running_gate() {
            tracing::info!(rollout = %self.record.id, wave, gate, "running the fleet gate again after a restart");
            self.run_gate(wave, gate);
        }
    }

    fn send(&mut self, command: &Command, probe: Option<FanoutProbe>) {
        if let Command::RunGate { wave, gate, .. } = command {
            self.run_gate(*wave, *gate);
            return;
        }
        let Some((node, message)) = self.node_command(command) else {
            return;
        };
        self.note_sent(node, message.clone());
        if !self.registry.send(node, message, probe) {
            tracing::warn!(rollout = %self.record.id, node, ?command, "node not connected; command not delivered");
        }
    }
}

/// Run `work`, which blocks (a store commit waits for its fsync), without holding up the other
/// tasks of this worker: on a multi-threaded runtime the worker hands them to another thread
/// meanwhile, so the sessions' connections keep being polled and a barrier's fan-out is not
/// queued behind the commit of the reports that came back first. A current-thread runtime (the
/// simulations, unit tests) just runs it.
fn off_the_workers<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
