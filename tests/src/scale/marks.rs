//! Barrier timings of in-process agents, read off the executor's own tracing events, so the
//! agent code runs unchanged:
//!
//! * arrival: `"arrived at barrier; waiting for its release"` (fields `rollout_id`, `step`),
//!   logged when the executor queues `BarrierArrive`;
//! * release: `"step succeeded"` with `instruction = "sync_nodes"` (fields `rollout_id`, `step`),
//!   logged as soon as the executor has taken the `BarrierRelease` off its inbox, before it
//!   journals the next step.
//!
//! So a sample covers the coordinator's whole part (the last `BarrierArrive` leaving the agent,
//! the engine's decision, the store's commit, every release being queued, encoded and sent) plus
//! the receiving agent's session and executor hand-off.
//!
//! The agent's own part is split out from two more events: the session's trace-level
//! `"barrier release received"` (fields `node`, `rollout_id`, `barrier_id`, logged as the frame
//! is decoded) and the executor's `"step started"` of the step after the barrier (field `node`,
//! logged once the step is journaled and about to run): per node, their difference is the
//! agent's time from frame to next step. The layer only subscribes to those call sites; every
//! other agent event costs nothing.
//!
//! If the agent's messages change, the bench finds no samples and says so.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use super::monotonic_ns;

/// Where the executor logs.
pub const EXECUTOR_TARGET: &str = "hotroll_agent::executor";
const ARRIVED: &str = "arrived at barrier; waiting for its release";
const SUCCEEDED: &str = "step succeeded";
const FAILED: &str = "step failed";
const STARTED: &str = "step started";
/// Where the agent's session logs the barrier releases it receives.
pub const SESSION_TARGET: &str = "hotroll_agent::session";
const RECEIVED: &str = "barrier release received";

/// Timings of one barrier step of one rollout, in one process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierMarks {
    /// `CLOCK_MONOTONIC` ns of each agent's arrival.
    pub arrivals: Vec<u64>,
    /// `CLOCK_MONOTONIC` ns of each agent's release.
    pub releases: Vec<u64>,
    /// Agents whose barrier step failed.
    pub failed: usize,
    /// Per agent: from the release frame decoded to the next step started, ns (none for a
    /// barrier that is the last step).
    #[serde(default)]
    pub agent_ns: Vec<u64>,
}

impl BarrierMarks {
    pub fn merge(&mut self, other: BarrierMarks) {
        self.arrivals.extend(other.arrivals);
        self.releases.extend(other.releases);
        self.failed += other.failed;
        self.agent_ns.extend(other.agent_ns);
    }
}

/// Marks by rollout id, then by step index of the barrier in `up`.
pub type Marks = BTreeMap<String, BTreeMap<u64, BarrierMarks>>;

/// The tracing layer; [`MarkLayer::marks`] reads what it collected.
#[derive(Debug, Clone, Default)]
pub struct MarkLayer {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    marks: Marks,
    /// (rollout, barrier id) -> its step, learnt from the arrivals.
    barrier_steps: BTreeMap<(String, String), u64>,
    /// (rollout, node) -> (barrier step, when its release frame was decoded).
    received: BTreeMap<(String, String), (u64, u64)>,
}

impl MarkLayer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far.
    pub fn marks(&self) -> Marks {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .marks
            .clone()
    }

    /// Whether the layer wants events of this call site.
    pub fn wants(metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
            && (metadata.target() == EXECUTOR_TARGET || metadata.target() == SESSION_TARGET)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rollout_id: String,
    instruction: String,
    list: String,
    node: String,
    barrier_id: String,
    step: Option<u64>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "rollout_id" => self.rollout_id = value.to_string(),
            "instruction" => self.instruction = value.to_string(),
            "list" => self.list = value.to_string(),
            "node" => self.node = value.to_string(),
            "barrier_id" => self.barrier_id = value.to_string(),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "step" {
            self.step = Some(value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "step" {
            self.step = u64::try_from(value).ok();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields and the message arrive here, formatted with Display.
        match field.name() {
            "message" | "rollout_id" | "instruction" | "list" | "node" | "barrier_id" => {
                self.record_str(field, &format!("{value:?}"));
            }
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for MarkLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let now = monotonic_ns();
        if !Self::wants(event.metadata()) {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if fields.message == RECEIVED {
            let key = (fields.rollout_id.clone(), fields.barrier_id);
            if let Some(step) = state.barrier_steps.get(&key).copied() {
                state
                    .received
                    .insert((fields.rollout_id, fields.node), (step, now));
            }
            return;
        }
        let Some(step) = fields.step else {
            return;
        };
        if fields.list != "up" {
            return;
        }
        if fields.message == STARTED {
            let key = (fields.rollout_id, fields.node);
            if let Some((barrier_step, received)) = state.received.get(&key).copied()
                && barrier_step + 1 == step
            {
                state.received.remove(&key);
                state
                    .marks
                    .entry(key.0)
                    .or_default()
                    .entry(barrier_step)
                    .or_default()
                    .agent_ns
                    .push(now.saturating_sub(received));
            }
            return;
        }
        enum Kind {
            Arrived,
            Released,
            Failed,
        }
        let kind = match fields.message.as_str() {
            ARRIVED => Kind::Arrived,
            SUCCEEDED if fields.instruction == "sync_nodes" => Kind::Released,
            FAILED if fields.instruction == "sync_nodes" => Kind::Failed,
            _ => return,
        };
        if matches!(kind, Kind::Arrived) && !fields.barrier_id.is_empty() {
            state
                .barrier_steps
                .insert((fields.rollout_id.clone(), fields.barrier_id), step);
        }
        let entry = state
            .marks
            .entry(fields.rollout_id)
            .or_default()
            .entry(step)
            .or_default();
        match kind {
            Kind::Arrived => entry.arrivals.push(now),
            Kind::Released => entry.releases.push(now),
            Kind::Failed => entry.failed += 1,
        }
    }
}
