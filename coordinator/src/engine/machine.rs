//! The rollout state machine (DESIGN §4, docs/protocol.md).
//!
//! Every input is an [`Event`] with the caller's `now`; the output is the commands to send and
//! the records to append. Nothing here reads a clock or does I/O, and iteration is always in
//! node order, so replaying the stored events rebuilds the same state.
//!
//! Choices the documents leave open, and why:
//!
//! * **Point of no return** is crossed, for the rollout, when the first `Commit` is sent. Until
//!   then (including while paused before wave 1) any failure aborts every node: nothing changed
//!   anywhere, so abort is always the clean answer.
//! * **Barrier deadline = first arrival + the barrier's timeout.** Counting from the first
//!   arrival (not from the rollout's start or a wave's start) bounds how long any node is held
//!   at the barrier, whatever the time nodes took to get there. A node that never gets to the
//!   barrier at all is caught by its step deadline (below), so nothing waits forever.
//! * **Barrier participants**: every target before the point of no return; after it the wave's
//!   committed, live nodes; the named members (∩ targets) when the script names them. Named
//!   members in a later wave cannot arrive before their wave commits, so such a barrier times
//!   out: the script should name members of one wave only. A target that is not a named member
//!   and arrives anyway waits with the members and is released with them.
//! * **Step deadlines**: while a node runs a step it must report within the step's deadline plus
//!   `step_slack`; between reports (after `RunScript`, after a step, after a barrier release or
//!   `Commit`) within `step_slack` plus the policy's `step_timeout`. A node waiting at a barrier
//!   it arrived at is governed by the barrier deadline, and a prepared or committed node has no
//!   step deadline. A node past its deadline counts as failed, exactly like a lost node.
//! * **Dead nodes are never waited for**: a node lost past the grace period or silent past its
//!   deadline is marked `failed` at once (and told to abort or roll back, which is re-sent when
//!   its session comes back). A live node told to roll back is `rolling_back` until it confirms;
//!   its wave waits for it, bounded by the rollback deadline (`step_slack` + the sum of the step
//!   deadlines: a rollback runs at most about as long as the upgrade), after which it is marked
//!   `failed`. Aborts and `make_permanent` are bounded by `step_slack` + the largest step deadline.
//! * **Waves**: a wave starts only when every node of every earlier wave is settled, so a node
//!   that rolls back late (e.g. its agent restarted after it committed) holds the next wave.
//! * **Policy**: `max_failures` is the budget of `rollback_node`; `rollback_all` and `halt` act
//!   on the first failure after the point of no return. While every node is rolling back, being
//!   halted or making the release permanent, further failures are counted but decide nothing.
//! * **Final state**: `failed` when some node reported that its rollback failed
//!   (`Outcome::Failed` after it committed), whatever the policy; a rollback that was not
//!   confirmed in time marks the node `failed` but not the rollout. Otherwise `rolled_back`
//!   after a `rollback_all` (or when no node stayed committed), `partially_rolled_back` when
//!   some nodes rolled back under `rollback_node`, `halted` after `halt`, else `succeeded`.
//! * **A final state is corrected** in one case only: the rollout ended (make-permanent
//!   deadline) while a node had not confirmed make-permanent, and that node then reports it
//!   rolled back (its agent restarted before making the release permanent and recovered to the
//!   permanent release, DESIGN §5) or failed. `succeeded` then becomes `partially_rolled_back`
//!   (`rolled_back` when no node kept the new release, `failed` when the node could not get
//!   back): the recorded outcome agrees with what the nodes run.
//! * **Operator abort** while paused before wave 1 aborts (nothing committed); after the first
//!   commit it rolls back like `rollback_all`. A pause takes effect at the next wave boundary,
//!   including the one before `make_permanent`; the canary pause also applies when the canary
//!   wave is the only wave.
//! * `Outcome::Permanent` has no node state of its own (`NodeState` has none): it is tracked
//!   internally and ends the rollout once every committed node confirmed it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hotroll_script::{OnFailure, wave_sizes};

use super::barrier::{Instance, Status};
use super::{
    BarrierView, Command, Event, Millis, NodeState, NodeView, NotApplicable, Outcome, Record,
    RolloutSpec, RolloutState, StepPhase,
};

/// What the rollout does besides running waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Prepare, then commit wave after wave.
    Normal,
    /// `halt`: the wave in flight finishes, nothing else starts.
    Halting,
    /// Every committed node rolls back, every prepared one aborts.
    RollingBackAll,
    /// `MakePermanent` was sent; waiting for the confirmations.
    MakingPermanent,
    /// Before the point of no return every node was told to abort; the rollout ends `aborted`
    /// once the reachable ones confirm (or their confirmation deadline passes), so `aborted`
    /// means the fleet is back where it was, not merely that the decision was taken.
    Aborting,
}

/// What a node's deadline guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// A step is running.
    Step(u32),
    /// The node owes its next report (between steps).
    Idle,
    /// The node was told, or said, it rolls back.
    Rollback,
    /// A prepared node was told to abort after the point of no return.
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Abort,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PauseKind {
    Operator,
    Canary,
}

/// How a failure came to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// The node said so (step failed, outcome): it aborts or rolls back on its own.
    Reported,
    /// A live node missed a barrier deadline: it is told to roll back (or abort).
    Missed,
    /// Lost past the grace period or silent past its deadline: marked failed at once.
    Dead,
}

/// What a node reported about one instruction.
#[derive(Debug, Clone)]
struct Reported {
    phase: StepPhase,
    error: Option<String>,
    duration_ms: Option<u64>,
}

impl Reported {
    fn started() -> Self {
        Self {
            phase: StepPhase::Started,
            error: None,
            duration_ms: None,
        }
    }
}

/// What the engine keeps about a node besides its [`NodeView`].
#[derive(Debug, Clone, Default)]
struct Track {
    deadline: Option<(Millis, Guard)>,
    grace: Option<Millis>,
    /// Counted in `failures` (each node at most once).
    counted: bool,
    refused: bool,
    commit_sent: bool,
    told: Option<(Told, String)>,
    /// The node reported how it ended after being told (or on its own).
    confirmed: bool,
    make_permanent_sent: bool,
    permanent: bool,
}

#[derive(Debug, Clone)]
pub struct Rollout {
    spec: RolloutSpec,
    epoch: u64,
    state: RolloutState,
    nodes: Vec<NodeView>,
    failures: u32,
    error: Option<String>,
    track: Vec<Track>,
    index: BTreeMap<String, usize>,
    /// Node indexes of each wave, in target order.
    waves: Vec<Vec<usize>>,
    /// 1-based wave being committed; 0 before the first `Commit`.
    wave: u32,
    pub(super) mode: Mode,
    pause_requested: bool,
    pub(super) paused: Option<PauseKind>,
    promoted: bool,
    barriers: Vec<Instance>,
    arrivals: u64,
    permanent_deadline: Option<Millis>,
    rollback_failed: bool,
    /// Tallies kept as node states change (see [`Tally`]), so that deciding whether to move on
    /// after an event does not scan every node.
    tally: Tally,
}

/// Counts of nodes by what [`Rollout::advance`] asks about. `set_node_state`, `start_permanent`
/// and the `Permanent` outcome keep them current; debug builds check them against a recount
/// after every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    /// Nodes in state `prepared`.
    prepared: usize,
    /// Settled nodes per wave (index = wave - 1).
    settled_in_wave: Vec<usize>,
    /// Settled nodes in all.
    settled: usize,
    /// Nodes told to make the release permanent that are committed and have not confirmed.
    awaiting_permanent: usize,
}

fn ms(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn record(out: &mut Vec<Command>, record: Record) {
    out.push(Command::Record(record));
}

impl Rollout {
    /// A new rollout in state `pending`; feed it [`Event::Start`] to begin. A target named twice
    /// takes part once, at its first position.
    pub fn new(spec: RolloutSpec, epoch: u64, _now: Millis) -> Self {
        let mut index = BTreeMap::new();
        let mut names: Vec<String> = Vec::new();
        for target in &spec.targets {
            if !index.contains_key(target) {
                index.insert(target.clone(), names.len());
                names.push(target.clone());
            }
        }
        let mut waves = Vec::new();
        let mut next = 0;
        for size in wave_sizes(names.len(), &spec.policy) {
            waves.push((next..next + size).collect::<Vec<_>>());
            next += size;
        }
        let mut wave_of = vec![1u32; names.len()];
        for (w, members) in waves.iter().enumerate() {
            for &i in members {
                if let Some(slot) = wave_of.get_mut(i) {
                    *slot = to_u32(w + 1);
                }
            }
        }
        let nodes = names
            .into_iter()
            .zip(wave_of)
            .map(|(name, wave)| NodeView {
                name,
                wave,
                state: NodeState::Pending,
                step: None,
                step_started: None,
                error: None,
                connected: true,
            })
            .collect::<Vec<_>>();
        let wave_count = waves.len();
        Self {
            track: vec![Track::default(); nodes.len()],
            spec,
            epoch,
            state: RolloutState::Pending,
            nodes,
            failures: 0,
            error: None,
            index,
            waves,
            wave: 0,
            mode: Mode::Normal,
            pause_requested: false,
            paused: None,
            promoted: false,
            barriers: Vec::new(),
            arrivals: 0,
            permanent_deadline: None,
            rollback_failed: false,
            tally: Tally {
                settled_in_wave: vec![0; wave_count],
                ..Tally::default()
            },
        }
    }

    /// Apply one event. Operator events that do not apply in the current state return
    /// [`NotApplicable`] and change nothing; every other event always applies (stale or unknown
    /// input is ignored).
    pub fn handle(&mut self, now: Millis, event: Event) -> Result<Vec<Command>, NotApplicable> {
        let mut out = Vec::new();
        match event {
            Event::OperatorAbort { reason } => self.operator_abort(now, reason, &mut out)?,
            Event::OperatorPause => self.operator_pause(&mut out)?,
            Event::OperatorResume => self.operator_resume(&mut out)?,
            Event::OperatorPromote => self.operator_promote(&mut out)?,
            Event::Start => self.start(now, &mut out),
            Event::Tick => self.tick(now, &mut out),
            Event::SessionLost { node } => {
                if let Some(i) = self.index.get(&node).copied() {
                    self.session_lost(now, i);
                }
            }
            Event::SessionRestored { node } => {
                if let Some(i) = self.index.get(&node).copied() {
                    self.session_restored(i, &mut out);
                }
            }
            Event::ScriptAccepted { node, epoch } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    self.script_accepted(now, i);
                }
            }
            Event::ScriptRefused {
                node,
                epoch,
                errors,
            } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    self.script_refused(now, i, &errors, &mut out);
                }
            }
            Event::StepStarted { node, epoch, step } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    self.step(now, i, step, Reported::started(), &mut out);
                }
            }
            Event::StepSucceeded {
                node,
                epoch,
                step,
                duration_ms,
            } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    let report = Reported {
                        phase: StepPhase::Succeeded,
                        error: None,
                        duration_ms,
                    };
                    self.step(now, i, step, report, &mut out);
                }
            }
            Event::StepFailed {
                node,
                epoch,
                step,
                error,
                duration_ms,
            } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    let report = Reported {
                        phase: StepPhase::Failed,
                        error: Some(error),
                        duration_ms,
                    };
                    self.step(now, i, step, report, &mut out);
                }
            }
            Event::BarrierArrived {
                node,
                epoch,
                barrier,
            } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    self.barrier_arrived(now, i, &barrier, &mut out);
                }
            }
            Event::Prepared { node, epoch } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    self.prepared(i, &mut out);
                }
            }
            Event::Outcome {
                node,
                epoch,
                outcome,
                error,
            } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    self.outcome(now, i, outcome, error, &mut out);
                }
            }
        }
        self.advance(now, &mut out);
        debug_assert_eq!(self.tally, self.recount(), "node tallies drifted");
        Ok(out)
    }

    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn state(&self) -> RolloutState {
        self.state
    }

    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// 1-based wave being committed; 0 during prepare.
    pub fn current_wave(&self) -> u32 {
        self.wave
    }

    pub fn waves(&self) -> u32 {
        to_u32(self.waves.len())
    }

    /// The barrier currently being waited at, if any: the open instance with the most recent
    /// arrival.
    pub fn barrier(&self) -> Option<BarrierView> {
        self.barriers
            .iter()
            .filter(|b| b.is_open())
            .max_by_key(|b| b.last_arrival)
            .map(Instance::view)
    }

    /// The earliest time at which [`Event::Tick`] may change something.
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.state.is_final() {
            return None;
        }
        let nodes = self
            .track
            .iter()
            .flat_map(|t| [t.deadline.map(|(at, _)| at), t.grace]);
        let barriers = self
            .barriers
            .iter()
            .filter(|b| b.is_open())
            .map(|b| Some(b.deadline));
        nodes
            .chain(barriers)
            .chain([self.permanent_deadline])
            .flatten()
            .min()
    }

    /// Why the rollout failed, aborted or rolled back, when it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    // ----------------------------------------------------------------------------------------
    // Operator commands: check everything first, so an Err changes nothing.

    fn not_applicable(&self, action: &'static str, why: &'static str) -> NotApplicable {
        NotApplicable {
            action,
            state: self.state.as_str(),
            why,
        }
    }

    fn operator_abort(
        &mut self,
        now: Millis,
        reason: String,
        out: &mut Vec<Command>,
    ) -> Result<(), NotApplicable> {
        if self.state.is_final() {
            return Err(self.not_applicable("abort", "the rollout has already finished"));
        }
        match self.mode {
            Mode::RollingBackAll => {
                return Err(self.not_applicable("abort", "every node is already rolling back"));
            }
            Mode::Aborting => {
                return Err(self.not_applicable("abort", "the rollout is already aborting"));
            }
            Mode::MakingPermanent => {
                return Err(
                    self.not_applicable("abort", "the new release is already being made permanent")
                );
            }
            Mode::Normal | Mode::Halting => {}
        }
        record(
            out,
            Record::Operator {
                action: "abort".into(),
                reason: Some(reason.clone()),
            },
        );
        let why = format!("aborted by operator: {reason}");
        if self.past_ponr() {
            self.rollback_all(now, why, out);
        } else {
            self.abort_prepare(now, None, why, out);
        }
        Ok(())
    }

    fn operator_pause(&mut self, out: &mut Vec<Command>) -> Result<(), NotApplicable> {
        match self.state {
            RolloutState::Preparing | RolloutState::Committing => {}
            RolloutState::Paused => {
                return Err(self.not_applicable("pause", "the rollout is already paused"));
            }
            RolloutState::Pending => {
                return Err(self.not_applicable("pause", "the rollout has not started"));
            }
            _ => return Err(self.not_applicable("pause", "the rollout has already finished")),
        }
        if self.mode != Mode::Normal {
            return Err(self.not_applicable("pause", "no further wave will start"));
        }
        if self.pause_requested {
            return Err(self.not_applicable("pause", "a pause is already pending"));
        }
        record(
            out,
            Record::Operator {
                action: "pause".into(),
                reason: Some("takes effect before the next wave starts".into()),
            },
        );
        self.pause_requested = true;
        Ok(())
    }

    fn operator_resume(&mut self, out: &mut Vec<Command>) -> Result<(), NotApplicable> {
        match (self.state, self.paused) {
            (RolloutState::Paused, Some(PauseKind::Operator)) if self.mode == Mode::Normal => {
                record(
                    out,
                    Record::Operator {
                        action: "resume".into(),
                        reason: None,
                    },
                );
                self.paused = None;
                self.set_rollout_state(RolloutState::Committing, None, out);
                Ok(())
            }
            (RolloutState::Paused, Some(PauseKind::Canary)) if self.mode == Mode::Normal => {
                Err(self.not_applicable(
                    "resume",
                    "paused after the canary wave: promote to continue",
                ))
            }
            (RolloutState::Paused, _) => {
                Err(self.not_applicable("resume", "the rollout is halting or rolling back"))
            }
            (RolloutState::Preparing | RolloutState::Committing, _) if self.pause_requested => {
                record(
                    out,
                    Record::Operator {
                        action: "resume".into(),
                        reason: Some("pending pause cancelled".into()),
                    },
                );
                self.pause_requested = false;
                Ok(())
            }
            _ => Err(self.not_applicable("resume", "the rollout is not paused")),
        }
    }

    fn operator_promote(&mut self, out: &mut Vec<Command>) -> Result<(), NotApplicable> {
        if self.state != RolloutState::Paused
            || self.paused != Some(PauseKind::Canary)
            || self.mode != Mode::Normal
        {
            return Err(self.not_applicable(
                "promote",
                "only a rollout paused after its canary wave can be promoted",
            ));
        }
        record(
            out,
            Record::Operator {
                action: "promote".into(),
                reason: None,
            },
        );
        self.promoted = true;
        self.paused = None;
        // Promote is an explicit go: it also answers a pause requested during the canary wave.
        self.pause_requested = false;
        self.set_rollout_state(RolloutState::Committing, None, out);
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Node events.

    /// The node's index, for an event of this rollout's epoch about one of its targets.
    fn node_of(&self, node: &str, epoch: u64) -> Option<usize> {
        // Nothing was sent before Start, so no node can report on this rollout yet.
        if epoch != self.epoch || self.state == RolloutState::Pending {
            return None;
        }
        self.index.get(node).copied()
    }

    fn start(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.state != RolloutState::Pending {
            return;
        }
        self.set_rollout_state(RolloutState::Preparing, None, out);
        for i in 0..self.nodes.len() {
            out.push(Command::RunScript {
                node: self.nodes[i].name.clone(),
            });
            self.set_node_state(i, NodeState::Preparing, None, out);
            self.arm(i, now, Guard::Idle);
        }
    }

    fn script_accepted(&mut self, now: Millis, i: usize) {
        if !self.state.is_final() && self.nodes[i].state == NodeState::Preparing {
            self.arm(i, now, Guard::Idle);
        }
    }

    fn script_refused(&mut self, now: Millis, i: usize, errors: &[String], out: &mut Vec<Command>) {
        if self.nodes[i].state != NodeState::Preparing {
            return;
        }
        let error = format!("script refused: {}", errors.join("; "));
        let t = &mut self.track[i];
        t.refused = true;
        t.confirmed = true;
        t.deadline = None;
        self.set_node_state(i, NodeState::Failed, Some(error.clone()), out);
        let reason = format!(
            "node {} refused the script: {}",
            self.nodes[i].name,
            errors.join("; ")
        );
        self.fail_node(now, i, reason, How::Reported, out);
    }

    fn step(&mut self, now: Millis, i: usize, step: u32, report: Reported, out: &mut Vec<Command>) {
        let Reported {
            phase,
            error,
            duration_ms,
        } = report;
        if self.state.is_final() || self.track[i].counted {
            return;
        }
        let valid = match self.nodes[i].state {
            NodeState::Preparing => step < self.spec.first_commit_step,
            // Lenient about the index: an explicit point of no return may be reported as done
            // after Commit.
            NodeState::Committing => step < self.spec.steps_total,
            _ => false,
        };
        if !valid {
            return;
        }
        let view = &mut self.nodes[i];
        view.step = Some(step);
        if phase == StepPhase::Started {
            view.step_started = Some(now);
        }
        if let Some(e) = &error {
            view.error = Some(e.clone());
        }
        let name = view.name.clone();
        record(
            out,
            Record::Step {
                node: name.clone(),
                step,
                phase,
                error: error.clone(),
                duration_ms,
            },
        );
        match phase {
            StepPhase::Started => {
                if !self.waiting_at_barrier(i) {
                    self.arm(i, now, Guard::Step(step));
                }
            }
            StepPhase::Succeeded => self.arm(i, now, Guard::Idle),
            StepPhase::Failed => {
                let error = error.unwrap_or_default();
                let reason = format!("node {name} failed step {step}: {error}");
                if self.nodes[i].state == NodeState::Committing {
                    // After the point of no return the agent rolls back on its own.
                    self.set_node_state(i, NodeState::RollingBack, Some(error), out);
                    self.arm(i, now, Guard::Rollback);
                } else {
                    // It aborts on its own and reports `Aborted`.
                    self.arm(i, now, Guard::Idle);
                }
                self.fail_node(now, i, reason, How::Reported, out);
            }
        }
    }

    fn prepared(&mut self, i: usize, out: &mut Vec<Command>) {
        if self.state != RolloutState::Preparing || self.nodes[i].state != NodeState::Preparing {
            return;
        }
        self.track[i].deadline = None;
        self.set_node_state(i, NodeState::Prepared, None, out);
    }

    fn outcome(
        &mut self,
        now: Millis,
        i: usize,
        outcome: Outcome,
        error: Option<String>,
        out: &mut Vec<Command>,
    ) {
        let state = self.nodes[i].state;
        let is_final = self.state.is_final();
        let committed = self.track[i].commit_sent;
        let told_rollback = matches!(self.track[i].told, Some((Told::Rollback, _)));
        let told_abort = matches!(self.track[i].told, Some((Told::Abort, _)));
        let name = self.nodes[i].name.clone();
        let detail = error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        match outcome {
            Outcome::Committed => {
                if is_final || state != NodeState::Committing {
                    return;
                }
                self.track[i].deadline = None;
                self.set_node_state(i, NodeState::Committed, None, out);
            }
            Outcome::Permanent => {
                let awaiting = self.awaiting_permanent(i);
                let t = &mut self.track[i];
                if state == NodeState::Committed && t.make_permanent_sent {
                    t.permanent = true;
                    t.grace = None;
                }
                self.retally_permanent(i, awaiting);
            }
            Outcome::Aborted => {
                let ok = match state {
                    NodeState::Pending | NodeState::Preparing | NodeState::Prepared => !committed,
                    // Told to roll back before the Commit reached it: it never crossed the point
                    // of no return, so it discards its staging instead — the same end.
                    NodeState::Committing | NodeState::RollingBack => committed && told_rollback,
                    // A node given up on (lost, silent) that comes back and aborts.
                    NodeState::Failed => !self.track[i].confirmed,
                    _ => false,
                };
                if !ok {
                    return;
                }
                let t = &mut self.track[i];
                t.confirmed = true;
                t.deadline = None;
                self.set_node_state(i, NodeState::Aborted, error, out);
                if !is_final && !told_abort && !told_rollback {
                    let reason = format!("node {name} aborted{detail}");
                    self.fail_node(now, i, reason, How::Reported, out);
                }
            }
            Outcome::RollingBack => {
                if !committed || !matches!(state, NodeState::Committing | NodeState::Committed) {
                    return;
                }
                self.track[i].confirmed = false;
                self.set_node_state(i, NodeState::RollingBack, error, out);
                if !is_final {
                    self.arm(i, now, Guard::Rollback);
                    if !told_rollback {
                        let reason = format!("node {name} is rolling back{detail}");
                        self.fail_node(now, i, reason, How::Reported, out);
                    }
                }
            }
            Outcome::RolledBack => {
                let ok = match state {
                    NodeState::Committing | NodeState::Committed | NodeState::RollingBack => true,
                    NodeState::Failed => !self.track[i].confirmed,
                    _ => false,
                };
                // A node that made the release permanent has nothing left to roll back.
                if !committed || !ok || self.track[i].permanent {
                    return;
                }
                let unconfirmed = self.unconfirmed_permanent(i);
                let t = &mut self.track[i];
                t.confirmed = true;
                t.deadline = None;
                self.set_node_state(i, NodeState::RolledBack, error, out);
                if !is_final && !told_rollback {
                    let reason = format!("node {name} rolled back{detail}");
                    self.fail_node(now, i, reason, How::Reported, out);
                }
                if is_final && unconfirmed {
                    self.amend_final(i, "rolled back", &detail, out);
                }
            }
            Outcome::Failed => {
                let ok = match state {
                    NodeState::Aborted | NodeState::RolledBack => false,
                    NodeState::Failed => !self.track[i].confirmed,
                    _ => true,
                };
                if !ok || self.track[i].permanent {
                    return;
                }
                let unconfirmed = self.unconfirmed_permanent(i);
                let t = &mut self.track[i];
                t.confirmed = true;
                t.deadline = None;
                if committed && !is_final {
                    // The node went past the point of no return and could not get back.
                    self.rollback_failed = true;
                }
                self.set_node_state(i, NodeState::Failed, error, out);
                if !is_final {
                    let reason = format!("node {name} failed{detail}");
                    self.fail_node(now, i, reason, How::Reported, out);
                }
                if is_final && unconfirmed {
                    self.amend_final(i, "failed", &detail, out);
                }
            }
        }
    }

    /// Node `i` was told to make the release permanent and has not confirmed it.
    fn unconfirmed_permanent(&self, i: usize) -> bool {
        let t = &self.track[i];
        self.nodes[i].state == NodeState::Committed && t.make_permanent_sent && !t.permanent
    }

    /// The rollout ended while node `i` had not confirmed make-permanent, and the node now says
    /// it rolled back (its agent restarted before making the release permanent, DESIGN §5) or
    /// failed. The recorded outcome must agree with the nodes': the final state is corrected
    /// (`succeeded` becomes `partially_rolled_back`, `rolled_back` when no node kept the new
    /// release, `failed` when the node could not get back) and the node counts as a failure.
    fn amend_final(&mut self, i: usize, what: &str, detail: &str, out: &mut Vec<Command>) {
        if !matches!(
            self.state,
            RolloutState::Succeeded | RolloutState::PartiallyRolledBack
        ) {
            return;
        }
        if !self.track[i].counted {
            self.track[i].counted = true;
            self.failures += 1;
        }
        let failed = self.nodes[i].state == NodeState::Failed;
        if failed {
            self.rollback_failed = true;
        }
        let state = if failed {
            RolloutState::Failed
        } else if self.nodes.iter().any(|n| n.state == NodeState::Committed) {
            RolloutState::PartiallyRolledBack
        } else {
            RolloutState::RolledBack
        };
        let note = format!(
            "node {} {what} after the rollout ended, before confirming make_permanent{detail}",
            self.nodes[i].name
        );
        self.error = Some(match self.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.clone(),
        });
        self.set_rollout_state(state, Some(note), out);
    }

    fn session_lost(&mut self, now: Millis, i: usize) {
        if !self.nodes[i].connected {
            return;
        }
        self.nodes[i].connected = false;
        // Once told to make the release permanent, a node is only held to the make-permanent
        // deadline: it may well have done so while away.
        let watched = !matches!(
            self.nodes[i].state,
            NodeState::Aborted | NodeState::RolledBack | NodeState::Failed
        ) && !self.track[i].make_permanent_sent;
        if !self.state.is_final() && watched {
            self.track[i].grace = Some(now.saturating_add(ms(self.spec.session_grace)));
        }
    }

    fn session_restored(&mut self, i: usize, out: &mut Vec<Command>) {
        if self.nodes[i].connected {
            return;
        }
        self.nodes[i].connected = true;
        self.track[i].grace = None;
        // A node given up on, or told to stop while away, hears it again: it is rolled back (or
        // aborted), never resumed.
        if let (Some((told, reason)), false) = (&self.track[i].told, self.track[i].confirmed) {
            let node = self.nodes[i].name.clone();
            let reason = reason.clone();
            out.push(match told {
                Told::Abort => Command::Abort { node, reason },
                Told::Rollback => Command::Rollback { node, reason },
            });
        }
    }

    // ----------------------------------------------------------------------------------------
    // Barriers.

    fn waiting_at_barrier(&self, i: usize) -> bool {
        self.barriers
            .iter()
            .any(|b| b.is_open() && b.has_arrived(i))
    }

    fn barrier_arrived(&mut self, now: Millis, i: usize, id: &str, out: &mut Vec<Command>) {
        if self.state.is_final() || self.track[i].counted {
            return;
        }
        let Some(spec) = self.spec.barriers.iter().find(|b| b.id == id) else {
            return;
        };
        let state = self.nodes[i].state;
        let eligible = if spec.before_ponr {
            state == NodeState::Preparing
        } else {
            state == NodeState::Committing && self.track[i].commit_sent
        };
        if !eligible {
            return;
        }
        let wave = (!spec.before_ponr && spec.members.is_empty()).then(|| self.nodes[i].wave);
        let b = match self
            .barriers
            .iter()
            .position(|b| b.id == spec.id && b.wave == wave)
        {
            Some(b) => {
                let inst = &self.barriers[b];
                // Over already (stale), or a repeat: never counts again.
                if !inst.is_open() || inst.has_arrived(i) {
                    return;
                }
                b
            }
            None => {
                let participants = self.participants(spec.before_ponr, &spec.members, wave);
                self.barriers.push(Instance::new(
                    spec.id.clone(),
                    wave,
                    participants,
                    now.saturating_add(ms(spec.timeout)),
                ));
                self.barriers.len() - 1
            }
        };
        self.arrivals += 1;
        let inst = &mut self.barriers[b];
        inst.arrive(i);
        inst.last_arrival = self.arrivals;
        let (arrived, expected) = (inst.arrived_count(), inst.expected_count());
        // The barrier deadline governs a node waiting at it.
        self.track[i].deadline = None;
        record(
            out,
            Record::BarrierArrived {
                node: self.nodes[i].name.clone(),
                barrier: id.to_string(),
                arrived,
                expected,
            },
        );
        self.check_release(now, b, out);
    }

    fn participants(
        &self,
        before_ponr: bool,
        members: &[String],
        wave: Option<u32>,
    ) -> BTreeSet<usize> {
        let live = |i: usize| {
            !self.track[i].counted
                && (before_ponr
                    || matches!(
                        self.nodes[i].state,
                        NodeState::Prepared | NodeState::Committing
                    ))
        };
        if members.is_empty() {
            (0..self.nodes.len())
                .filter(|&i| match wave {
                    Some(w) => self.nodes[i].wave == w && self.track[i].commit_sent,
                    None => true,
                })
                .filter(|&i| live(i))
                .collect()
        } else {
            members
                .iter()
                .filter_map(|m| self.index.get(m).copied())
                .filter(|&i| live(i))
                .collect()
        }
    }

    /// Release the barrier if every remaining participant is there.
    fn check_release(&mut self, now: Millis, b: usize, out: &mut Vec<Command>) {
        let inst = &mut self.barriers[b];
        if !inst.is_open() || !inst.complete() {
            return;
        }
        inst.status = Status::Released;
        if inst.arrived().is_empty() {
            return;
        }
        let (id, wave) = (inst.id.clone(), inst.wave);
        let arrived: Vec<usize> = inst.arrived().iter().copied().collect();
        record(
            out,
            Record::BarrierReleased {
                barrier: id.clone(),
                wave,
            },
        );
        for j in arrived {
            out.push(Command::ReleaseBarrier {
                node: self.nodes[j].name.clone(),
                barrier: id.clone(),
                ok: true,
                reason: None,
            });
            self.arm(j, now, Guard::Idle);
        }
    }

    /// A failed node leaves every barrier; the others may now be complete.
    fn leave_barriers(&mut self, now: Millis, i: usize, out: &mut Vec<Command>) {
        for b in 0..self.barriers.len() {
            let inst = &mut self.barriers[b];
            if inst.is_open() && inst.leave(i) {
                self.check_release(now, b, out);
            }
        }
    }

    fn barrier_timeout(&mut self, now: Millis, b: usize, out: &mut Vec<Command>) {
        let inst = &mut self.barriers[b];
        inst.status = Status::Failed;
        let inst = inst.clone();
        let missing = inst.missing();
        let names = self.names(&missing);
        let reason = format!(
            "barrier `{}` timed out with {}/{} arrived, missing {names}",
            inst.id,
            inst.arrived_count(),
            inst.expected_count()
        );
        record(
            out,
            Record::BarrierFailed {
                barrier: inst.id.clone(),
                wave: inst.wave,
                reason: reason.clone(),
            },
        );
        if !self.past_ponr() {
            self.abort_prepare(now, None, reason, out);
            return;
        }
        for m in missing {
            let why = format!(
                "node {} missed the deadline of barrier `{}`",
                self.nodes[m].name, inst.id
            );
            self.fail_node(now, m, why, How::Missed, out);
        }
        if self.state.is_final() || !matches!(self.mode, Mode::Normal | Mode::Halting) {
            // Rolling back: the arrived nodes were told so.
            return;
        }
        for &a in inst.arrived() {
            if self.nodes[a].state == NodeState::Committing && !self.track[a].counted {
                out.push(Command::ReleaseBarrier {
                    node: self.nodes[a].name.clone(),
                    barrier: inst.id.clone(),
                    ok: true,
                    reason: Some(format!("released without {names} (missed the deadline)")),
                });
                self.arm(a, now, Guard::Idle);
            }
        }
    }

    /// Close every open barrier (the rollout stops waiting at them), recording why if given.
    fn close_barriers(&mut self, reason: Option<&str>, out: &mut Vec<Command>) {
        for inst in self.barriers.iter_mut().filter(|b| b.is_open()) {
            inst.status = Status::Failed;
            if let Some(reason) = reason {
                record(
                    out,
                    Record::BarrierFailed {
                        barrier: inst.id.clone(),
                        wave: inst.wave,
                        reason: reason.to_string(),
                    },
                );
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Failures and policy.

    fn past_ponr(&self) -> bool {
        self.wave > 0
    }

    /// Handle node `i` failing: update it (unless it reported the failure itself), count it
    /// once, then abort (before the point of no return) or apply the policy.
    fn fail_node(
        &mut self,
        now: Millis,
        i: usize,
        reason: String,
        how: How,
        out: &mut Vec<Command>,
    ) {
        let committed = self.track[i].commit_sent;
        match how {
            How::Reported => {}
            How::Missed if committed => {
                self.tell(i, Told::Rollback, &reason, out);
                self.set_node_state(i, NodeState::RollingBack, Some(reason.clone()), out);
                self.arm(i, now, Guard::Rollback);
            }
            How::Missed | How::Dead => {
                let told = if committed {
                    Told::Rollback
                } else {
                    Told::Abort
                };
                self.tell(i, told, &reason, out);
                self.track[i].deadline = None;
                self.set_node_state(i, NodeState::Failed, Some(reason.clone()), out);
            }
        }
        if self.state.is_final() || self.track[i].counted {
            return;
        }
        self.track[i].counted = true;
        self.failures += 1;
        if !self.past_ponr() {
            if self.mode != Mode::Aborting {
                self.abort_prepare(now, Some(i), reason, out);
            }
            return;
        }
        self.apply_policy(now, reason, out);
        if matches!(self.mode, Mode::Normal | Mode::Halting) {
            self.leave_barriers(now, i, out);
        }
    }

    fn apply_policy(&mut self, now: Millis, reason: String, out: &mut Vec<Command>) {
        if self.mode != Mode::Normal {
            return;
        }
        let policy = &self.spec.policy;
        match policy.on_failure {
            OnFailure::RollbackNode => {
                if self.failures > policy.max_failures {
                    let why = format!(
                        "failure budget exceeded: {} failures, max_failures {} (last: {reason})",
                        self.failures, policy.max_failures
                    );
                    self.rollback_all(now, why, out);
                }
            }
            OnFailure::RollbackAll => {
                self.rollback_all(now, format!("on_failure rollback_all: {reason}"), out);
            }
            OnFailure::Halt => self.halt(reason, out),
        }
    }

    /// Roll back every committed node and abort every prepared one.
    fn rollback_all(&mut self, now: Millis, reason: String, out: &mut Vec<Command>) {
        self.mode = Mode::RollingBackAll;
        self.pause_requested = false;
        self.paused = None;
        self.error = Some(reason.clone());
        self.state = RolloutState::Committing;
        record(
            out,
            Record::RolloutState {
                state: RolloutState::Committing,
                reason: Some(format!("rolling back every node: {reason}")),
            },
        );
        self.close_barriers(Some("the rollout is rolling back"), out);
        for i in 0..self.nodes.len() {
            let state = self.nodes[i].state;
            if self.track[i].commit_sent
                && matches!(state, NodeState::Committing | NodeState::Committed)
            {
                self.tell(i, Told::Rollback, &reason, out);
                self.set_node_state(i, NodeState::RollingBack, None, out);
                self.arm(i, now, Guard::Rollback);
            } else if !self.track[i].commit_sent && state == NodeState::Prepared {
                self.tell(i, Told::Abort, &reason, out);
                self.arm(i, now, Guard::Abort);
            }
        }
    }

    /// Let the wave in flight finish, abort the nodes that have not committed, start nothing.
    fn halt(&mut self, reason: String, out: &mut Vec<Command>) {
        self.mode = Mode::Halting;
        self.pause_requested = false;
        self.error = Some(reason.clone());
        record(
            out,
            Record::RolloutState {
                state: self.state,
                reason: Some(format!("halting after the wave in flight: {reason}")),
            },
        );
        for i in 0..self.nodes.len() {
            if !self.track[i].commit_sent && self.nodes[i].state == NodeState::Prepared {
                self.tell(i, Told::Abort, &reason, out);
            }
        }
    }

    /// Before the point of no return: tell every other unsettled target to abort, and end
    /// `aborted` once the reachable ones have confirmed. A node that is away is shown failed at
    /// once (nothing waits for it); it hears the abort again when it returns.
    fn abort_prepare(
        &mut self,
        now: Millis,
        culprit: Option<usize>,
        reason: String,
        out: &mut Vec<Command>,
    ) {
        if self.state == RolloutState::Pending {
            // Nothing was sent yet: no node has anything to discard.
            for i in 0..self.nodes.len() {
                self.set_node_state(i, NodeState::Aborted, None, out);
            }
            self.error = Some(reason.clone());
            self.finish(RolloutState::Aborted, Some(reason), out);
            return;
        }
        self.mode = Mode::Aborting;
        self.pause_requested = false;
        self.paused = None;
        self.error = Some(reason.clone());
        self.state = RolloutState::Preparing;
        record(
            out,
            Record::RolloutState {
                state: RolloutState::Preparing,
                reason: Some(format!("aborting every node: {reason}")),
            },
        );
        self.close_barriers(None, out);
        for i in 0..self.nodes.len() {
            if self.nodes[i].state.is_settled() {
                continue;
            }
            if Some(i) != culprit {
                self.tell(i, Told::Abort, &reason, out);
            }
            self.track[i].grace = None;
            if self.nodes[i].connected {
                self.arm(i, now, Guard::Abort);
            } else {
                self.track[i].deadline = None;
                let why = "unreachable when the rollout aborted".to_string();
                self.set_node_state(i, NodeState::Failed, Some(why), out);
            }
        }
    }

    fn tell(&mut self, i: usize, told: Told, reason: &str, out: &mut Vec<Command>) {
        let t = &mut self.track[i];
        if matches!(&t.told, Some((k, _)) if *k == told) {
            return;
        }
        t.told = Some((told, reason.to_string()));
        t.confirmed = false;
        let node = self.nodes[i].name.clone();
        let reason = reason.to_string();
        out.push(match told {
            Told::Abort => Command::Abort { node, reason },
            Told::Rollback => Command::Rollback { node, reason },
        });
    }

    // ----------------------------------------------------------------------------------------
    // Progress: waves, pauses, make-permanent, final states.

    /// Move on as far as the current state allows.
    fn advance(&mut self, now: Millis, out: &mut Vec<Command>) {
        loop {
            if self.state.is_final() {
                return;
            }
            match self.mode {
                Mode::Aborting => {
                    if self.all_settled() {
                        let reason = self.error.clone();
                        self.finish(RolloutState::Aborted, reason, out);
                    }
                    return;
                }
                Mode::RollingBackAll => {
                    if self.all_settled() {
                        let (state, reason) = if self.rollback_failed {
                            (RolloutState::Failed, self.rollback_failed_reason())
                        } else {
                            (RolloutState::RolledBack, self.error.clone())
                        };
                        if state == RolloutState::Failed {
                            self.error = Some(reason.clone().unwrap_or_default());
                        }
                        self.finish(state, reason, out);
                    }
                    return;
                }
                Mode::Halting => {
                    let settled = (0..self.nodes.len())
                        .filter(|&i| self.track[i].commit_sent)
                        .all(|i| self.nodes[i].state.is_settled());
                    if settled {
                        let reason = self.error.clone();
                        self.finish(RolloutState::Halted, reason, out);
                    }
                    return;
                }
                Mode::MakingPermanent => {
                    // Every node told to make the release permanent confirmed, or is no longer
                    // committed.
                    if self.tally.awaiting_permanent == 0 {
                        self.finish_permanent(&[], out);
                    }
                    return;
                }
                Mode::Normal => {}
            }
            match self.state {
                RolloutState::Preparing => {
                    if self.tally.prepared != self.nodes.len() {
                        return;
                    }
                    if self.pause_requested {
                        self.pause(
                            PauseKind::Operator,
                            "paused by the operator before wave 1",
                            out,
                        );
                        return;
                    }
                    self.set_rollout_state(RolloutState::Committing, None, out);
                }
                RolloutState::Committing => {
                    if !self.settled_through(self.wave) {
                        return;
                    }
                    let canary = self.spec.policy.canary > 0
                        && self.spec.policy.pause_after_canary
                        && self.wave == 1
                        && !self.promoted;
                    if canary {
                        self.pause(
                            PauseKind::Canary,
                            "canary wave done: promote to continue",
                            out,
                        );
                        return;
                    }
                    if self.pause_requested {
                        self.pause(PauseKind::Operator, "paused by the operator", out);
                        return;
                    }
                    if self.wave >= self.waves() {
                        self.start_permanent(now, out);
                    } else {
                        self.start_wave(now, self.wave + 1, out);
                    }
                }
                _ => return,
            }
        }
    }

    fn pause(&mut self, kind: PauseKind, reason: &str, out: &mut Vec<Command>) {
        self.pause_requested = false;
        self.paused = Some(kind);
        self.set_rollout_state(RolloutState::Paused, Some(reason.to_string()), out);
    }

    fn start_wave(&mut self, now: Millis, wave: u32, out: &mut Vec<Command>) {
        self.wave = wave;
        let members = self
            .waves
            .get(
                usize::try_from(wave)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1),
            )
            .cloned()
            .unwrap_or_default();
        // A node that failed while waiting (lost, aborted) is not committed.
        let go: Vec<usize> = members
            .into_iter()
            .filter(|&i| self.nodes[i].state == NodeState::Prepared && !self.track[i].counted)
            .collect();
        record(
            out,
            Record::WaveStarted {
                wave,
                nodes: self.names_list(&go),
            },
        );
        for i in go {
            self.track[i].commit_sent = true;
            out.push(Command::Commit {
                node: self.nodes[i].name.clone(),
            });
            self.set_node_state(i, NodeState::Committing, None, out);
            self.arm(i, now, Guard::Idle);
        }
    }

    fn start_permanent(&mut self, now: Millis, out: &mut Vec<Command>) {
        self.mode = Mode::MakingPermanent;
        self.pause_requested = false;
        let mut sent = false;
        for i in 0..self.nodes.len() {
            if self.nodes[i].state == NodeState::Committed && !self.track[i].counted {
                let awaiting = self.awaiting_permanent(i);
                let t = &mut self.track[i];
                t.make_permanent_sent = true;
                t.grace = None;
                self.retally_permanent(i, awaiting);
                out.push(Command::MakePermanent {
                    node: self.nodes[i].name.clone(),
                });
                sent = true;
            }
        }
        if sent {
            self.permanent_deadline = Some(now.saturating_add(self.confirm_allowance()));
        } else {
            self.finish_permanent(&[], out);
        }
    }

    /// End after make-permanent; `unconfirmed` nodes did not confirm in time.
    fn finish_permanent(&mut self, unconfirmed: &[usize], out: &mut Vec<Command>) {
        let committed = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Committed)
            .count();
        let others: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].state != NodeState::Committed)
            .collect();
        let (state, mut reason) = if self.rollback_failed {
            (RolloutState::Failed, self.rollback_failed_reason())
        } else if others.is_empty() {
            (RolloutState::Succeeded, None)
        } else if committed == 0 {
            (
                RolloutState::RolledBack,
                Some("every node failed and rolled back".to_string()),
            )
        } else {
            (
                RolloutState::PartiallyRolledBack,
                Some(format!("not upgraded: {}", self.names(&others))),
            )
        };
        if !unconfirmed.is_empty() {
            let note = format!(
                "make_permanent not confirmed within {} ms by {}",
                self.confirm_allowance(),
                self.names(unconfirmed)
            );
            reason = Some(match reason {
                Some(r) => format!("{r}; {note}"),
                None => note,
            });
        }
        if reason.is_some() {
            self.error = reason.clone();
        }
        self.finish(state, reason, out);
    }

    fn rollback_failed_reason(&self) -> Option<String> {
        let failed: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.track[i].commit_sent
                    && self.track[i].confirmed
                    && self.nodes[i].state == NodeState::Failed
            })
            .collect();
        Some(format!("rollback failed on {}", self.names(&failed)))
    }

    /// Enter a final state: nothing is armed any more.
    fn finish(&mut self, state: RolloutState, reason: Option<String>, out: &mut Vec<Command>) {
        self.pause_requested = false;
        self.paused = None;
        self.permanent_deadline = None;
        for t in &mut self.track {
            t.deadline = None;
            t.grace = None;
        }
        self.close_barriers(None, out);
        // A node that is away when the rollout ends cannot say where it stands: show it failed
        // rather than forever "preparing". It is told again when it returns, and its late
        // outcome (aborted, rolled back) still replaces this.
        for i in 0..self.nodes.len() {
            if !self.nodes[i].connected && !self.nodes[i].state.is_settled() {
                let error = Some("unreachable when the rollout ended".to_string());
                self.set_node_state(i, NodeState::Failed, error, out);
            }
        }
        self.set_rollout_state(state, reason, out);
    }

    // ----------------------------------------------------------------------------------------
    // Deadlines.

    /// Process every deadline `<= now`, earliest first, moving on after each so a late tick
    /// ends the same way as timely ones.
    fn tick(&mut self, now: Millis, out: &mut Vec<Command>) {
        // Each deadline handled disarms itself; the cap only guards against a bug looping.
        let mut budget = 8 * (self.nodes.len() + self.barriers.len()) + 16;
        while budget > 0 && !self.state.is_final() {
            budget -= 1;
            let Some(due) = self.earliest_due(now) else {
                return;
            };
            match due {
                Due::Node(i) => self.node_deadline(now, i, out),
                Due::Grace(i) => self.grace_expired(now, i, out),
                Due::Barrier(b) => self.barrier_timeout(now, b, out),
                Due::Permanent => {
                    self.permanent_deadline = None;
                    let unconfirmed: Vec<usize> = (0..self.nodes.len())
                        .filter(|&i| {
                            self.track[i].make_permanent_sent
                                && !self.track[i].permanent
                                && self.nodes[i].state == NodeState::Committed
                        })
                        .collect();
                    self.finish_permanent(&unconfirmed, out);
                }
            }
            self.advance(now, out);
        }
    }

    fn earliest_due(&self, now: Millis) -> Option<Due> {
        let nodes = self.track.iter().enumerate().flat_map(|(i, t)| {
            [
                t.deadline.map(|(at, _)| (at, 0, i, Due::Node(i))),
                t.grace.map(|at| (at, 1, i, Due::Grace(i))),
            ]
        });
        let barriers = self
            .barriers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_open())
            .map(|(b, inst)| Some((inst.deadline, 2, b, Due::Barrier(b))));
        let permanent = self.permanent_deadline.map(|at| (at, 3, 0, Due::Permanent));
        nodes
            .chain(barriers)
            .chain([permanent])
            .flatten()
            .filter(|(at, ..)| *at <= now)
            .min_by_key(|(at, class, i, _)| (*at, *class, *i))
            .map(|(.., due)| due)
    }

    fn node_deadline(&mut self, now: Millis, i: usize, out: &mut Vec<Command>) {
        let Some((_, guard)) = self.track[i].deadline.take() else {
            return;
        };
        let name = self.nodes[i].name.clone();
        match guard {
            Guard::Step(step) => {
                let why = format!(
                    "node {name} made no progress on step {step} within {} ms (deadline + slack)",
                    self.step_allowance(step)
                );
                self.fail_node(now, i, why, How::Dead, out);
            }
            Guard::Idle => {
                let why = format!(
                    "node {name} sent no report within {} ms",
                    self.idle_allowance()
                );
                self.fail_node(now, i, why, How::Dead, out);
            }
            Guard::Rollback => {
                if self.nodes[i].state == NodeState::RollingBack {
                    let why = format!(
                        "rollback not confirmed within {} ms",
                        self.rollback_allowance()
                    );
                    self.set_node_state(i, NodeState::Failed, Some(why), out);
                }
            }
            Guard::Abort => {
                if matches!(
                    self.nodes[i].state,
                    NodeState::Pending | NodeState::Preparing | NodeState::Prepared
                ) {
                    let why = format!("abort not confirmed within {} ms", self.confirm_allowance());
                    self.set_node_state(i, NodeState::Failed, Some(why), out);
                }
            }
        }
    }

    fn grace_expired(&mut self, now: Millis, i: usize, out: &mut Vec<Command>) {
        self.track[i].grace = None;
        if self.nodes[i].connected || self.track[i].make_permanent_sent {
            return;
        }
        let why = format!(
            "node {} lost: no session for {} ms",
            self.nodes[i].name,
            ms(self.spec.session_grace)
        );
        match self.nodes[i].state {
            NodeState::Aborted | NodeState::RolledBack | NodeState::Failed => {}
            NodeState::RollingBack => {
                self.track[i].deadline = None;
                self.set_node_state(i, NodeState::Failed, Some(why), out);
            }
            _ => self.fail_node(now, i, why, How::Dead, out),
        }
    }

    fn arm(&mut self, i: usize, now: Millis, guard: Guard) {
        let allowance = match guard {
            Guard::Step(step) => self.step_allowance(step),
            Guard::Idle => self.idle_allowance(),
            Guard::Rollback => self.rollback_allowance(),
            Guard::Abort => self.confirm_allowance(),
        };
        self.track[i].deadline = Some((now.saturating_add(allowance), guard));
    }

    fn step_deadline(&self, step: u32) -> Millis {
        usize::try_from(step)
            .ok()
            .and_then(|s| self.spec.step_deadlines.get(s))
            .map_or(ms(self.spec.policy.step_timeout), |d| ms(*d))
    }

    fn step_allowance(&self, step: u32) -> Millis {
        self.step_deadline(step)
            .saturating_add(ms(self.spec.step_slack))
    }

    fn idle_allowance(&self) -> Millis {
        ms(self.spec.step_slack).saturating_add(ms(self.spec.policy.step_timeout))
    }

    /// Abort and make-permanent confirmations: one step's worth.
    fn confirm_allowance(&self) -> Millis {
        let largest = self
            .spec
            .step_deadlines
            .iter()
            .map(|d| ms(*d))
            .max()
            .unwrap_or(ms(self.spec.policy.step_timeout));
        ms(self.spec.step_slack).saturating_add(largest)
    }

    /// A rollback runs the `down` list, which the engine does not see: allow the whole `up`.
    fn rollback_allowance(&self) -> Millis {
        let total = if self.spec.step_deadlines.is_empty() {
            ms(self.spec.policy.step_timeout)
        } else {
            self.spec
                .step_deadlines
                .iter()
                .fold(0, |acc: Millis, d| acc.saturating_add(ms(*d)))
        };
        ms(self.spec.step_slack).saturating_add(total)
    }

    // ----------------------------------------------------------------------------------------
    // Small helpers.

    fn set_rollout_state(
        &mut self,
        state: RolloutState,
        reason: Option<String>,
        out: &mut Vec<Command>,
    ) {
        self.state = state;
        record(out, Record::RolloutState { state, reason });
    }

    /// Change a node's state (recording it); `error`, when given, replaces the node's error.
    fn set_node_state(
        &mut self,
        i: usize,
        state: NodeState,
        error: Option<String>,
        out: &mut Vec<Command>,
    ) {
        let awaiting = self.awaiting_permanent(i);
        let view = &mut self.nodes[i];
        if error.is_some() {
            view.error = error;
        }
        if view.state != state {
            let (old, wave) = (view.state, view.wave);
            view.state = state;
            record(
                out,
                Record::NodeState {
                    node: view.name.clone(),
                    state,
                    error: view.error.clone(),
                },
            );
            self.retally_state(old, state, wave);
            self.retally_permanent(i, awaiting);
        }
    }

    /// Node `i` counts in [`Tally::awaiting_permanent`].
    fn awaiting_permanent(&self, i: usize) -> bool {
        let t = &self.track[i];
        t.make_permanent_sent && !t.permanent && self.nodes[i].state == NodeState::Committed
    }

    /// Node `i` may have joined or left [`Tally::awaiting_permanent`]; `before` is whether it
    /// was in it.
    fn retally_permanent(&mut self, i: usize, before: bool) {
        match (before, self.awaiting_permanent(i)) {
            (false, true) => self.tally.awaiting_permanent += 1,
            (true, false) => {
                self.tally.awaiting_permanent = self.tally.awaiting_permanent.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// A node of `wave` went from `old` to `new`.
    fn retally_state(&mut self, old: NodeState, new: NodeState, wave: u32) {
        let t = &mut self.tally;
        if old == NodeState::Prepared {
            t.prepared = t.prepared.saturating_sub(1);
        }
        if new == NodeState::Prepared {
            t.prepared += 1;
        }
        let w = usize::try_from(wave)
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        if old.is_settled() {
            t.settled = t.settled.saturating_sub(1);
            if let Some(n) = t.settled_in_wave.get_mut(w) {
                *n = n.saturating_sub(1);
            }
        }
        if new.is_settled() {
            t.settled += 1;
            if let Some(n) = t.settled_in_wave.get_mut(w) {
                *n += 1;
            }
        }
    }

    /// The tallies counted from scratch (debug builds check the kept ones against this).
    fn recount(&self) -> Tally {
        let mut t = Tally {
            settled_in_wave: vec![0; self.waves.len()],
            ..Tally::default()
        };
        for (i, n) in self.nodes.iter().enumerate() {
            if n.state == NodeState::Prepared {
                t.prepared += 1;
            }
            if n.state.is_settled() {
                t.settled += 1;
                let w = usize::try_from(n.wave)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1);
                if let Some(c) = t.settled_in_wave.get_mut(w) {
                    *c += 1;
                }
            }
            if self.awaiting_permanent(i) {
                t.awaiting_permanent += 1;
            }
        }
        t
    }

    /// Every node settled.
    fn all_settled(&self) -> bool {
        self.tally.settled == self.nodes.len()
    }

    /// Every node of waves `1..=wave` settled.
    fn settled_through(&self, wave: u32) -> bool {
        let upto = usize::try_from(wave).unwrap_or(usize::MAX);
        self.waves
            .iter()
            .zip(&self.tally.settled_in_wave)
            .take(upto)
            .all(|(members, settled)| *settled == members.len())
    }

    fn names_list(&self, nodes: &[usize]) -> Vec<String> {
        nodes.iter().map(|&i| self.nodes[i].name.clone()).collect()
    }

    fn names(&self, nodes: &[usize]) -> String {
        self.names_list(nodes).join(", ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Node(usize),
    Grace(usize),
    Barrier(usize),
    Permanent,
}
