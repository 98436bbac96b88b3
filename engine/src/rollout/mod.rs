//! The rollout state machine (docs/design.md §4, docs/protocol.md): the [`Rollout`], its per-node
//! bookkeeping and the dispatch of events. The transitions are split by concern: `operator`
//! (abort, pause, resume, promote), `reports` (what nodes report), `sessions` (lost and back),
//! `barriers`, `deadlines` (ticks, silent nodes, grace, confirmations), `failure` (the failure
//! policy), `progress` (waves, make-permanent, final states), `gates` (fleet gates after each
//! wave) and `tally` (counts and summaries).
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
//!   permanent release, docs/design.md §5) or failed. `succeeded` then becomes `partially_rolled_back`
//!   (`rolled_back` when no node kept the new release, `failed` when the node could not get
//!   back): the recorded outcome agrees with what the nodes run.
//! * **Operator abort** while paused before wave 1 aborts (nothing committed); after the first
//!   commit it rolls back like `rollback_all`. A pause takes effect at the next wave boundary,
//!   including the one before `make_permanent`; the canary pause also applies when the canary
//!   wave is the only wave.
//! * `Outcome::Permanent` has no node state of its own (`NodeState` has none): it is tracked
//!   internally and ends the rollout once every committed node confirmed it.

mod barriers;
mod deadlines;
mod failure;
mod gates;
mod operator;
mod progress;
mod reports;
mod sessions;
mod tally;

use std::collections::BTreeMap;
use std::time::Duration;

use hotroll_script::{NO_LABELS, WaveTarget, plan_waves};

use crate::Millis;
use crate::command::{Command, Record, StepPhase};
use crate::event::Event;
use crate::spec::RolloutSpec;
use crate::state::{NodeState, RolloutState};
use crate::view::NodeView;

use barriers::instance::Instance;
use reports::Reported;
use tally::Tally;

pub use operator::NotApplicable;

/// What the rollout does besides running waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
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
pub(crate) enum PauseKind {
    Operator,
    Canary,
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
    /// Reported prepared at some point (a dry run's "would commit").
    was_prepared: bool,
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
    /// Node indexes of each wave, as [`plan_waves`] formed them.
    waves: Vec<Vec<usize>>,
    /// The first wave is the canary.
    canary_first: bool,
    /// The next wave waits for a window that opens at this time.
    window_opens: Option<Millis>,
    /// The fleet gate running, if one is.
    gate: Option<gates::GateRun>,
    /// Every wave up to this one passed (or failed) its fleet gates.
    gated_through: u32,
    /// Index of the next fleet gate of the wave being gated.
    next_gate: usize,
    /// 1-based wave being committed; 0 before the first `Commit`.
    wave: u32,
    pub(crate) mode: Mode,
    pause_requested: bool,
    pub(crate) paused: Option<PauseKind>,
    promoted: bool,
    barriers: Vec<Instance>,
    arrivals: u64,
    permanent_deadline: Option<Millis>,
    rollback_failed: bool,
    /// Tallies kept as node states change (see [`Tally`]), so that deciding whether to move on
    /// after an event does not scan every node.
    tally: Tally,
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
        let wave_targets: Vec<WaveTarget<'_>> = names
            .iter()
            .map(|name| WaveTarget {
                name,
                labels: spec.labels.get(name).unwrap_or(&NO_LABELS),
            })
            .collect();
        let planned = plan_waves(&wave_targets, &spec.policy);
        let canary_first = planned.first().is_some_and(|w| w.canary);
        let waves: Vec<Vec<usize>> = planned
            .iter()
            .map(|w| {
                w.nodes
                    .iter()
                    .filter_map(|n| index.get(n).copied())
                    .collect()
            })
            .collect();
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
            canary_first,
            window_opens: None,
            gate: None,
            gated_through: 0,
            next_gate: 0,
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
            Event::GateResult {
                wave,
                gate,
                passed,
                value,
                reason,
            } => self.gate_result(now, wave, gate, passed, value, reason, &mut out),
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
                warning,
            } => {
                if let Some(i) = self.node_of(&node, epoch) {
                    let report = Reported {
                        phase: StepPhase::Succeeded,
                        error: None,
                        duration_ms,
                        warning,
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
                        warning: None,
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

    /// Why the rollout failed, aborted or rolled back, when it did.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// When the window the next wave waits for opens, while it waits.
    pub fn waiting_for_window(&self) -> Option<Millis> {
        self.window_opens
    }

    /// The node's index, for an event of this rollout's epoch about one of its targets.
    fn node_of(&self, node: &str, epoch: u64) -> Option<usize> {
        // Nothing was sent before Start, so no node can report on this rollout yet.
        if epoch != self.epoch || self.state == RolloutState::Pending {
            return None;
        }
        self.index.get(node).copied()
    }

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
        if state == NodeState::Prepared {
            self.track[i].was_prepared = true;
        }
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
}
