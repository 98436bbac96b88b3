//! Fleet gates on the coordinator: the engine's [`Command::RunGate`] runs `hotroll-gate`'s
//! evaluation on a task, whose result comes back as [`Event::GateResult`] through the rollout's
//! own input channel — so it is stored as an input like every other event, before any command
//! it leads to leaves. Without a Prometheus (`hotroll serve --prometheus URL`) a gate fails with
//! that error: it never passes.

use std::sync::Arc;

use hotroll_gate::{Gate, GateOutcome, Prometheus, evaluate};
use hotroll_script::FleetGate;
use tokio::sync::mpsc;

use super::Input;
use crate::engine::Event;

/// What the coordinator's drivers need to run fleet gates.
#[derive(Debug, Clone, Default)]
pub(super) struct GateRunner {
    /// `None`: no `--prometheus`; a rollout with gates does not start, and a recovered one's
    /// gates fail.
    pub prometheus: Option<Arc<Prometheus>>,
}

/// The message a gate fails with when the coordinator has no Prometheus.
pub const NO_PROMETHEUS: &str =
    "no Prometheus is configured on the coordinator (hotroll serve --prometheus URL)";

impl GateRunner {
    /// Evaluate gate `index` of `gates` after wave `wave` on a task; its result is sent to
    /// `inputs` (if the rollout is still running).
    pub fn start(
        &self,
        rollout: &str,
        gates: &[FleetGate],
        wave: u32,
        index: u32,
        inputs: mpsc::WeakUnboundedSender<Input>,
    ) {
        let spec = usize::try_from(index)
            .ok()
            .and_then(|i| gates.get(i))
            .cloned();
        let prometheus = self.prometheus.clone();
        let rollout = rollout.to_string();
        tokio::spawn(async move {
            let (passed, value, reason) = match (spec, prometheus) {
                (None, _) => (false, None, format!("the script has no gate {index}")),
                (Some(_), None) => (false, None, NO_PROMETHEUS.to_string()),
                (Some(spec), Some(prometheus)) => {
                    let gate = Gate::from_spec(&spec.gate);
                    tracing::info!(rollout, wave, gate = %spec.name.value, query = %gate.query, "fleet gate started");
                    let outcome = evaluate(&prometheus, &gate).await;
                    let reason = outcome.reason(&gate);
                    tracing::info!(rollout, wave, gate = %spec.name.value, passed = outcome.passed(), reason, "fleet gate ended");
                    let value = outcome.value().map(|v| v.to_string());
                    (matches!(outcome, GateOutcome::Passed { .. }), value, reason)
                }
            };
            if let Some(inputs) = inputs.upgrade() {
                let _ = inputs.send(Input::event(Event::GateResult {
                    wave,
                    gate: index,
                    passed,
                    value,
                    reason,
                }));
            }
        });
    }
}
