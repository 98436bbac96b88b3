//! Conversions between the agent's own types and the protobuf messages of `hotroll_proto`. The
//! rest of the agent does not see prost types except for the session code that sends them.

use std::time::Duration;

use hotroll_proto::v1 as pb;
use hotroll_proto::v1::agent_message::Msg as Out;
use hotroll_proto::v1::coordinator_message::Msg as In;

use crate::executor::{Command, CommandKind, RunScript};
use crate::journal::JournalRecord;
use crate::report::{AppStatus, NodeState, Phase, Report, StepList, StepPhase, millis};
use crate::runtime::ArtifactRef;

/// A coordinator message, sorted by who handles it.
#[derive(Debug)]
pub enum Inbound {
    Welcome(pb::Welcome),
    /// `next_within_ms`: the coordinator's next heartbeat comes within it (0: the Welcome's
    /// interval; protocol 2).
    Heartbeat {
        seq: u64,
        next_within_ms: u64,
    },
    Goodbye(String),
    Command(Command),
    /// A message with no body (a newer coordinator's message this build does not know).
    Unknown,
}

pub fn inbound(message: pb::CoordinatorMessage) -> Inbound {
    let Some(msg) = message.msg else {
        return Inbound::Unknown;
    };
    let command = |rollout_id: String, epoch: u64, kind: CommandKind| {
        Inbound::Command(Command {
            rollout_id,
            epoch,
            kind,
        })
    };
    match msg {
        In::Welcome(w) => Inbound::Welcome(w),
        In::Heartbeat(h) => Inbound::Heartbeat {
            seq: h.seq,
            next_within_ms: h.next_within_ms,
        },
        In::Goodbye(g) => Inbound::Goodbye(g.reason),
        In::RunScript(r) => command(
            r.rollout_id,
            r.epoch,
            CommandKind::RunScript(RunScript {
                script_name: r.script_name,
                script_source: r.script_source,
                artifacts: r
                    .artifacts
                    .into_iter()
                    .map(|a| ArtifactRef {
                        name: a.name,
                        digest: a.digest,
                        size: a.size,
                        mode: a.mode,
                        unpack: a.unpack,
                    })
                    .collect(),
                // 0 = not overridden: the script's own value applies.
                step_timeout: (r.step_timeout_ms > 0)
                    .then(|| Duration::from_millis(r.step_timeout_ms)),
                barrier_timeout: (r.barrier_timeout_ms > 0)
                    .then(|| Duration::from_millis(r.barrier_timeout_ms)),
            }),
        ),
        In::BarrierRelease(b) => command(
            b.rollout_id,
            b.epoch,
            CommandKind::BarrierRelease {
                barrier_id: b.barrier_id,
                ok: b.ok,
                reason: b.reason,
            },
        ),
        In::Commit(c) => command(c.rollout_id, c.epoch, CommandKind::Commit),
        In::Abort(a) => command(
            a.rollout_id,
            a.epoch,
            CommandKind::Abort { reason: a.reason },
        ),
        In::Rollback(r) => command(
            r.rollout_id,
            r.epoch,
            CommandKind::Rollback { reason: r.reason },
        ),
        In::MakePermanent(m) => command(m.rollout_id, m.epoch, CommandKind::MakePermanent),
    }
}

pub fn message(msg: Out) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

pub fn report(report: Report) -> pb::AgentMessage {
    message(match report {
        Report::ScriptAccepted { rollout_id, epoch } => {
            Out::ScriptAccepted(pb::ScriptAccepted { rollout_id, epoch })
        }
        Report::ScriptRefused {
            rollout_id,
            epoch,
            errors,
        } => Out::ScriptRefused(pb::ScriptRefused {
            rollout_id,
            epoch,
            errors,
        }),
        Report::Step(s) => Out::Step(pb::StepReport {
            rollout_id: s.rollout_id,
            epoch: s.epoch,
            step: s.step,
            list: step_list(s.list) as i32,
            instruction: s.instruction,
            phase: step_phase(s.phase) as i32,
            duration_ms: millis(s.duration),
            error: s.error,
            output: s.output,
            warnings: s.warnings,
            at_unix_ms: s.at_unix_ms,
        }),
        Report::BarrierArrive {
            rollout_id,
            epoch,
            barrier_id,
            step,
        } => Out::BarrierArrive(pb::BarrierArrive {
            rollout_id,
            epoch,
            barrier_id,
            step,
        }),
        Report::Prepared { rollout_id, epoch } => Out::Prepared(pb::Prepared { rollout_id, epoch }),
        Report::Outcome {
            rollout_id,
            epoch,
            state,
            error,
            step,
            apps,
        } => Out::Outcome(pb::NodeOutcome {
            rollout_id,
            epoch,
            state: node_state(state) as i32,
            error,
            step,
            apps: apps.into_iter().map(app_state).collect(),
        }),
    })
}

pub fn journal_entry(record: JournalRecord) -> pb::JournalEntry {
    pb::JournalEntry {
        rollout_id: record.rollout_id,
        epoch: record.epoch,
        step: record.step,
        phase: phase(record.phase) as i32,
        node_state: node_state(record.node_state) as i32,
        error: record.error,
    }
}

pub fn app_state(app: AppStatus) -> pb::AppState {
    pb::AppState {
        app: app.app,
        current: app.current,
        permanent: app.permanent,
        releases: app
            .releases
            .into_iter()
            .map(|r| pb::OtpReleaseState {
                name: r.name,
                version: r.version,
                status: r.status,
            })
            .collect(),
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
        NodeState::Permanent => pb::NodeState::Permanent,
    }
}

fn phase(phase: Phase) -> pb::JournalPhase {
    match phase {
        Phase::Preparing => pb::JournalPhase::Preparing,
        Phase::Prepared => pb::JournalPhase::Prepared,
        Phase::Committing => pb::JournalPhase::Committing,
        Phase::RollingBack => pb::JournalPhase::RollingBack,
        Phase::Done => pb::JournalPhase::Done,
    }
}

fn step_list(list: StepList) -> pb::StepList {
    match list {
        StepList::Up => pb::StepList::Up,
        StepList::Down => pb::StepList::Down,
    }
}

fn step_phase(phase: StepPhase) -> pb::StepPhase {
    match phase {
        StepPhase::Started => pb::StepPhase::Started,
        StepPhase::Succeeded => pb::StepPhase::Succeeded,
        StepPhase::Failed => pb::StepPhase::Failed,
    }
}
