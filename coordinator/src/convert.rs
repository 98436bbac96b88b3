//! Conversions between the wire types (`hotroll_proto`) and the coordinator's domain types. The
//! only place besides the gRPC services that sees prost types.

use hotroll_proto::frame::CoordinatorFrame;
use hotroll_proto::v1 as pb;

use crate::engine::{
    BarrierView, Event, GatePhase, LeftOut, NodeState, NodeView, Outcome, Record, RolloutState,
    StepPhase,
};
use crate::outbound::{NodeCommand, Order, Outbound, ScriptToRun};
use crate::rollouts::LiveEvent;
use crate::store::{RolloutSnapshot, StoredEvent};

pub fn rollout_state(state: RolloutState) -> pb::RolloutState {
    match state {
        RolloutState::Pending => pb::RolloutState::Pending,
        RolloutState::Preparing => pb::RolloutState::Preparing,
        RolloutState::Committing => pb::RolloutState::Committing,
        RolloutState::Paused => pb::RolloutState::Paused,
        RolloutState::Succeeded => pb::RolloutState::Succeeded,
        RolloutState::Aborted => pb::RolloutState::Aborted,
        RolloutState::RolledBack => pb::RolloutState::RolledBack,
        RolloutState::PartiallyRolledBack => pb::RolloutState::PartiallyRolledBack,
        RolloutState::Halted => pb::RolloutState::Halted,
        RolloutState::Failed => pb::RolloutState::Failed,
    }
}

pub fn node_state(state: NodeState) -> pb::NodeState {
    match state {
        NodeState::Pending => pb::NodeState::Pending,
        NodeState::Preparing => pb::NodeState::Preparing,
        NodeState::Prepared => pb::NodeState::Prepared,
        NodeState::Committing => pb::NodeState::Committing,
        NodeState::Committed => pb::NodeState::Committed,
        NodeState::Aborted => pb::NodeState::Aborted,
        NodeState::RollingBack => pb::NodeState::RollingBack,
        NodeState::RolledBack => pb::NodeState::RolledBack,
        NodeState::Failed => pb::NodeState::Failed,
    }
}

/// The rollout state a wire number names; `None` for unspecified or a number this build does
/// not know (a newer coordinator).
pub fn rollout_state_from_wire(state: i32) -> Option<RolloutState> {
    Some(match pb::RolloutState::try_from(state).ok()? {
        pb::RolloutState::Unspecified => return None,
        pb::RolloutState::Pending => RolloutState::Pending,
        pb::RolloutState::Preparing => RolloutState::Preparing,
        pb::RolloutState::Committing => RolloutState::Committing,
        pb::RolloutState::Paused => RolloutState::Paused,
        pb::RolloutState::Succeeded => RolloutState::Succeeded,
        pb::RolloutState::Aborted => RolloutState::Aborted,
        pb::RolloutState::RolledBack => RolloutState::RolledBack,
        pb::RolloutState::PartiallyRolledBack => RolloutState::PartiallyRolledBack,
        pb::RolloutState::Halted => RolloutState::Halted,
        pb::RolloutState::Failed => RolloutState::Failed,
    })
}

/// The node state a wire number names. `permanent` is not a rollout's node state (the engine
/// records it as the node's outcome), so it is named apart; `None` for unspecified or unknown.
pub fn node_state_name_from_wire(state: i32) -> Option<&'static str> {
    Some(match pb::NodeState::try_from(state).ok()? {
        pb::NodeState::Unspecified => return None,
        pb::NodeState::Permanent => "permanent",
        pb::NodeState::Pending => NodeState::Pending.as_str(),
        pb::NodeState::Preparing => NodeState::Preparing.as_str(),
        pb::NodeState::Prepared => NodeState::Prepared.as_str(),
        pb::NodeState::Committing => NodeState::Committing.as_str(),
        pb::NodeState::Committed => NodeState::Committed.as_str(),
        pb::NodeState::Aborted => NodeState::Aborted.as_str(),
        pb::NodeState::RollingBack => NodeState::RollingBack.as_str(),
        pb::NodeState::RolledBack => NodeState::RolledBack.as_str(),
        pb::NodeState::Failed => NodeState::Failed.as_str(),
    })
}

pub fn left_out(node: &LeftOut) -> pb::LeftOutNode {
    pb::LeftOutNode {
        node: node.node.clone(),
        reason: node.reason.clone(),
    }
}

fn step_phase(phase: StepPhase) -> pb::StepPhase {
    match phase {
        StepPhase::Started => pb::StepPhase::Started,
        StepPhase::Succeeded => pb::StepPhase::Succeeded,
        StepPhase::Failed => pb::StepPhase::Failed,
    }
}

fn node_status(
    view: &NodeView,
    steps_total: u32,
    instruction: &dyn Fn(u32) -> String,
) -> pb::NodeStatus {
    pb::NodeStatus {
        name: view.name.clone(),
        wave: view.wave,
        state: node_state(view.state) as i32,
        step: view
            .step
            .map_or(-1, |s| i32::try_from(s).unwrap_or(i32::MAX)),
        instruction: view.step.map(instruction).unwrap_or_default(),
        error: view.error.clone().unwrap_or_default(),
        step_started_unix_ms: view.step_started.unwrap_or_default(),
        steps_total,
    }
}

fn barrier_status(view: &BarrierView) -> pb::BarrierStatus {
    pb::BarrierStatus {
        id: view.id.clone(),
        arrived: view.arrived,
        expected: view.expected,
        deadline_unix_ms: view.deadline,
    }
}

pub fn rollout_status(
    snapshot: &RolloutSnapshot,
    instruction: &dyn Fn(u32) -> String,
) -> pb::RolloutStatus {
    pb::RolloutStatus {
        id: snapshot.id.clone(),
        state: rollout_state(snapshot.state) as i32,
        app: snapshot.app.clone(),
        from: snapshot.from.clone(),
        to: snapshot.to.clone(),
        failures: snapshot.failures,
        max_failures: snapshot.max_failures,
        nodes: snapshot
            .nodes
            .iter()
            .map(|n| node_status(n, snapshot.steps_total, instruction))
            .collect(),
        created_unix_ms: snapshot.created_ms,
        finished_unix_ms: snapshot.finished_ms.unwrap_or_default(),
        current_wave: snapshot.current_wave,
        waves: snapshot.waves,
        barrier: snapshot.barrier.as_ref().map(barrier_status),
        error: snapshot.error.clone().unwrap_or_default(),
        held_on_store: snapshot
            .held_on_store
            .as_ref()
            .map(|h| h.error.clone())
            .unwrap_or_default(),
        held_since_unix_ms: snapshot.held_on_store.as_ref().map_or(0, |h| h.since_ms),
        left_out: snapshot.left_out.iter().map(left_out).collect(),
        dry_run: snapshot.dry_run,
        window_opens_unix_ms: snapshot.window_opens_ms.unwrap_or(0),
        gate_holding: snapshot.gate_holding.clone().unwrap_or_default(),
    }
}

pub fn rollout_summary(snapshot: &RolloutSnapshot) -> pb::RolloutSummary {
    pb::RolloutSummary {
        id: snapshot.id.clone(),
        state: rollout_state(snapshot.state) as i32,
        app: snapshot.app.clone(),
        from: snapshot.from.clone(),
        to: snapshot.to.clone(),
        nodes: u32::try_from(snapshot.nodes.len()).unwrap_or(u32::MAX),
        created_unix_ms: snapshot.created_ms,
        finished_unix_ms: snapshot.finished_ms.unwrap_or_default(),
    }
}

pub fn rollout_event(
    rollout_id: &str,
    event: &StoredEvent,
    instruction: &dyn Fn(u32) -> String,
) -> pb::RolloutEvent {
    let mut out = pb::RolloutEvent {
        rollout_id: rollout_id.to_string(),
        seq: event.seq,
        at_unix_ms: event.at_ms,
        step: -1,
        ..Default::default()
    };
    match &event.record {
        Record::RolloutState { state, reason } => {
            out.kind = "rollout_state".into();
            out.rollout_state = rollout_state(*state) as i32;
            out.message = reason.clone().unwrap_or_default();
        }
        Record::NodeState { node, state, error } => {
            out.kind = "node_state".into();
            out.node = node.clone();
            out.node_state = node_state(*state) as i32;
            out.error = error.clone().unwrap_or_default();
        }
        Record::Step {
            node,
            step,
            phase,
            error,
            duration_ms,
            warning,
        } => {
            out.kind = "step".into();
            out.node = node.clone();
            out.step = i32::try_from(*step).unwrap_or(i32::MAX);
            out.instruction = instruction(*step);
            out.step_phase = step_phase(*phase) as i32;
            out.duration_ms = duration_ms.unwrap_or_default();
            out.error = error.clone().unwrap_or_default();
            out.warning = warning.clone().unwrap_or_default();
        }
        Record::BarrierArrived {
            node,
            barrier,
            arrived,
            expected,
        } => {
            out.kind = "barrier_arrived".into();
            out.node = node.clone();
            out.barrier_id = barrier.clone();
            out.message = format!("{arrived}/{expected} arrived");
        }
        Record::BarrierReleased { barrier, wave } => {
            out.kind = "barrier_released".into();
            out.barrier_id = barrier.clone();
            out.wave = wave.unwrap_or_default();
        }
        Record::BarrierFailed {
            barrier,
            wave,
            reason,
        } => {
            out.kind = "barrier_failed".into();
            out.barrier_id = barrier.clone();
            out.wave = wave.unwrap_or_default();
            out.error = reason.clone();
        }
        Record::WaveStarted { wave, nodes } => {
            out.kind = "wave_started".into();
            out.wave = *wave;
            out.message = nodes.join(",");
        }
        Record::DryRunVerdict {
            node,
            would_commit,
            reason,
        } => {
            out.kind = "dry_run_verdict".into();
            out.node = node.clone();
            match (would_commit, reason) {
                (true, _) => out.message = "would commit".into(),
                (false, reason) => {
                    let why = reason.clone().unwrap_or_else(|| "it failed".into());
                    out.message = format!("would not commit: {why}");
                    out.error = why;
                }
            }
        }
        Record::Gate {
            wave,
            name,
            phase,
            value,
            reason,
        } => {
            out.kind = "gate".into();
            out.wave = *wave;
            out.gate_name = name.clone();
            out.gate_phase = phase.as_str().into();
            out.gate_value = value.clone().unwrap_or_default();
            out.message = reason.clone().unwrap_or_default();
            if *phase == GatePhase::Failed {
                out.error = out.message.clone();
            }
        }
        Record::Operator { action, reason } => {
            out.kind = "operator".into();
            out.message = match reason {
                Some(r) => format!("{action}: {r}"),
                None => action.clone(),
            };
        }
    }
    out
}

/// A live watch notice that is not part of the history (seq 0): the rollout started holding on
/// its store (`held_on_store`, the error) or stopped (`store_recovered`). `None` for history.
pub fn live_notice(rollout_id: &str, event: &LiveEvent) -> Option<pb::RolloutEvent> {
    let (kind, at_ms, error, message) = match event {
        LiveEvent::Stored(_) => return None,
        LiveEvent::Held(hold) => (
            "held_on_store",
            hold.since_ms,
            hold.error.clone(),
            "no command is sent until the store records the rollout's step".to_string(),
        ),
        LiveEvent::Resumed {
            at_ms,
            held_since_ms,
        } => (
            "store_recovered",
            *at_ms,
            String::new(),
            format!(
                "the store recorded the held step after {} ms; its commands are sent",
                at_ms.saturating_sub(*held_since_ms)
            ),
        ),
    };
    Some(pb::RolloutEvent {
        rollout_id: rollout_id.to_string(),
        seq: 0,
        at_unix_ms: at_ms,
        kind: kind.into(),
        step: -1,
        error,
        message,
        ..Default::default()
    })
}

/// The wire frame of what a session queued for its node. A rollout's command is encoded by
/// the first of its nodes' sessions to get here and shared by the rest (`outbound::WireForm`).
pub fn coordinator_frame(outbound: Outbound) -> CoordinatorFrame {
    match outbound {
        Outbound::Heartbeat {
            seq,
            sent_ms,
            next_within_ms,
        } => CoordinatorFrame::encode(&pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Heartbeat(pb::Heartbeat {
                seq,
                sent_unix_ms: sent_ms,
                next_within_ms,
            })),
        }),
        // The probe (if any) drops here: this release is handed to the connection.
        Outbound::Rollout(command, _probe) => {
            CoordinatorFrame::from_bytes(command.wire.get_or_encode(|| {
                CoordinatorFrame::encode(&coordinator_message(&command)).into_bytes()
            }))
        }
    }
}

/// The wire message of a rollout's command.
pub fn coordinator_message(command: &NodeCommand) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Msg;
    let rollout_id = command.rollout_id.clone();
    let epoch = command.epoch;
    let msg = match &command.order {
        Order::RunScript(script) => Msg::RunScript(run_script(rollout_id, epoch, script)),
        Order::ReleaseBarrier {
            barrier,
            ok,
            reason,
        } => Msg::BarrierRelease(pb::BarrierRelease {
            rollout_id,
            epoch,
            barrier_id: barrier.clone(),
            ok: *ok,
            reason: reason.clone().unwrap_or_default(),
        }),
        Order::Commit => Msg::Commit(pb::Commit { rollout_id, epoch }),
        Order::Abort { reason } => Msg::Abort(pb::Abort {
            rollout_id,
            epoch,
            reason: reason.clone(),
        }),
        Order::Rollback { reason } => Msg::Rollback(pb::Rollback {
            rollout_id,
            epoch,
            reason: reason.clone(),
        }),
        Order::MakePermanent => Msg::MakePermanent(pb::MakePermanent { rollout_id, epoch }),
    };
    pb::CoordinatorMessage { msg: Some(msg) }
}

fn run_script(rollout_id: String, epoch: u64, script: &ScriptToRun) -> pb::RunScript {
    pb::RunScript {
        rollout_id,
        epoch,
        script_name: script.script_name.clone(),
        script_source: script.script_source.clone(),
        artifacts: script
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
        step_timeout_ms: script.step_timeout_ms,
        barrier_timeout_ms: script.barrier_timeout_ms,
    }
}

fn outcome(state: pb::NodeState) -> Option<Outcome> {
    Some(match state {
        pb::NodeState::Committed => Outcome::Committed,
        pb::NodeState::Aborted => Outcome::Aborted,
        pb::NodeState::RollingBack => Outcome::RollingBack,
        pb::NodeState::RolledBack => Outcome::RolledBack,
        pb::NodeState::Failed => Outcome::Failed,
        pb::NodeState::Permanent => Outcome::Permanent,
        _ => return None,
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The rollout an agent message belongs to and the engine event it means. `None` for messages
/// that are not about a rollout (heartbeat, goodbye, hello) or that make no sense (unknown enum
/// values): those are logged by the caller, never fed to an engine.
pub fn agent_event(node: &str, message: &pb::agent_message::Msg) -> Option<(String, Event)> {
    use pb::agent_message::Msg;
    let node = node.to_string();
    Some(match message {
        Msg::ScriptAccepted(m) => (
            m.rollout_id.clone(),
            Event::ScriptAccepted {
                node,
                epoch: m.epoch,
            },
        ),
        Msg::ScriptRefused(m) => (
            m.rollout_id.clone(),
            Event::ScriptRefused {
                node,
                epoch: m.epoch,
                errors: m.errors.clone(),
            },
        ),
        Msg::Step(m) => {
            // Steps of the rollback list are reported for the history only through outcomes.
            if m.list() == pb::StepList::Down {
                return None;
            }
            let event = match m.phase() {
                pb::StepPhase::Started => Event::StepStarted {
                    node,
                    epoch: m.epoch,
                    step: m.step,
                },
                pb::StepPhase::Succeeded => Event::StepSucceeded {
                    node,
                    epoch: m.epoch,
                    step: m.step,
                    duration_ms: Some(m.duration_ms),
                    warning: bounded_warnings(&m.warnings),
                },
                pb::StepPhase::Failed => Event::StepFailed {
                    node,
                    epoch: m.epoch,
                    step: m.step,
                    error: m.error.clone(),
                    duration_ms: Some(m.duration_ms),
                },
                pb::StepPhase::Unspecified => return None,
            };
            (m.rollout_id.clone(), event)
        }
        Msg::BarrierArrive(m) => (
            m.rollout_id.clone(),
            Event::BarrierArrived {
                node,
                epoch: m.epoch,
                barrier: m.barrier_id.clone(),
            },
        ),
        Msg::Prepared(m) => (
            m.rollout_id.clone(),
            Event::Prepared {
                node,
                epoch: m.epoch,
            },
        ),
        Msg::Outcome(m) => (
            m.rollout_id.clone(),
            Event::Outcome {
                node,
                epoch: m.epoch,
                outcome: outcome(m.state())?,
                error: non_empty(&m.error),
            },
        ),
        Msg::Hello(_) | Msg::Heartbeat(_) | Msg::Goodbye(_) => return None,
    })
}

/// The outcomes a node's Hello reports from its journal: one event per rollout the node
/// finished (aborted, rolled back, failed, made permanent), perhaps while the coordinator was
/// away or after the agent restarted and recovered. Entries still in progress say nothing new:
/// a running agent re-sends what it waits with once connected.
pub fn journal_events(node: &str, journal: &[pb::JournalEntry]) -> Vec<(String, Event)> {
    journal
        .iter()
        .filter_map(|entry| {
            let outcome = match entry.node_state() {
                pb::NodeState::Aborted => Outcome::Aborted,
                pb::NodeState::RolledBack => Outcome::RolledBack,
                pb::NodeState::Failed => Outcome::Failed,
                pb::NodeState::Permanent => Outcome::Permanent,
                _ => return None,
            };
            Some((
                entry.rollout_id.clone(),
                Event::Outcome {
                    node: node.to_string(),
                    epoch: entry.epoch,
                    outcome,
                    error: non_empty(&entry.error),
                },
            ))
        })
        .collect()
}

/// An agent's warnings as one history line each, bounded: a node cannot make the history grow
/// without limit.
fn bounded_warnings(warnings: &[String]) -> Option<String> {
    const MAX_WARNINGS: usize = 16;
    const MAX_CHARS: usize = 1_000;
    let lines: Vec<String> = warnings
        .iter()
        .take(MAX_WARNINGS)
        .map(|w| w.chars().take(MAX_CHARS).collect())
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}
