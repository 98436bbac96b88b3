//! What a rollout is built from: the engine's spec, and the script its nodes are sent.

use std::time::Duration;

use hotroll_script::Script;

use crate::engine::{LeftOut, RolloutSpec, TargetLabels};
use crate::outbound::ScriptToRun;
use crate::store::RolloutRecord;

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the start of a rollout fixed besides its script: the targets (with their labels),
/// the nodes left out, whether it is a dry run.
pub(super) struct StartedWith<'a> {
    pub targets: &'a [String],
    pub left_out: &'a [LeftOut],
    pub labels: &'a TargetLabels,
    pub dry_run: bool,
}

impl<'a> StartedWith<'a> {
    /// As a stored rollout says.
    pub fn of(record: &'a RolloutRecord) -> Self {
        Self {
            targets: &record.targets,
            left_out: &record.left_out,
            labels: &record.target_labels,
            dry_run: record.dry_run,
        }
    }
}

/// The engine's spec of a rollout of `script` as `started` fixed it: the same inputs give the
/// same spec, which is what lets a restarted coordinator rebuild the engine.
pub(super) fn build_spec(
    id: &str,
    script: &Script,
    started: &StartedWith<'_>,
    session_grace: Duration,
    step_slack: Duration,
) -> RolloutSpec {
    let StartedWith {
        targets,
        left_out,
        labels,
        dry_run,
    } = *started;
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
        left_out: left_out.to_vec(),
        labels: labels
            .iter()
            .filter(|(name, _)| targets.contains(name))
            .map(|(name, labels)| (name.clone(), labels.clone()))
            .collect(),
        dry_run,
    }
}

/// The script as the rollout's nodes are sent it.
pub(super) fn script_to_run(record: &RolloutRecord, script: &Script) -> ScriptToRun {
    ScriptToRun {
        script_name: record.script_name.clone(),
        script_source: record.script_source.clone(),
        artifacts: record.artifacts.clone(),
        step_timeout_ms: duration_ms(script.rollout.step_timeout),
        barrier_timeout_ms: duration_ms(script.rollout.barrier_timeout),
    }
}
