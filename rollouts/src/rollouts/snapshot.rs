//! Status building: the snapshot `status`, `list` and `watch` show, and the instruction names
//! they label steps with.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Millis, Rollout};
use crate::store::{RolloutRecord, RolloutSnapshot};

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

pub(super) fn snapshot_of(
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
        held_on_store: None,
        left_out: spec.left_out.clone(),
        dry_run: spec.dry_run,
        window_opens_ms: engine.waiting_for_window(),
        gate_holding: engine.gate_holding().map(str::to_string),
    }
}

pub(super) fn instruction_names_of(record: &RolloutRecord) -> InstructionNames {
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

/// How stale the published status snapshot may get while a burst of node reports is handled:
/// rebuilding it is O(nodes), so it is rebuilt at most this often, and at once for operator
/// replies, rollout state changes and the end.
pub(super) const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(50);
/// Up to this many nodes the snapshot is cheap enough to rebuild after every batch.
pub(super) const SNAPSHOT_ALWAYS_UP_TO: usize = 128;

/// Whether the rollout-level part of a status differs (everything but the nodes and the
/// barrier's arrival count). The stored record is rewritten only then: the node detail of an
/// unfinished rollout is rebuilt from its stored inputs after a restart, so rewriting the whole
/// record (O(nodes)) on every batch would only cost I/O.
pub(super) fn summary_differs(a: &RolloutSnapshot, b: &RolloutSnapshot) -> bool {
    let barrier = |s: &RolloutSnapshot| s.barrier.as_ref().map(|b| (b.id.clone(), b.wave));
    a.state != b.state
        || a.failures != b.failures
        || a.current_wave != b.current_wave
        || a.waves != b.waves
        || a.error != b.error
        || a.finished_ms != b.finished_ms
        || a.window_opens_ms != b.window_opens_ms
        || a.gate_holding != b.gate_holding
        || barrier(a) != barrier(b)
}
