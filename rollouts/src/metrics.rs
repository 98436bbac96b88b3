//! The coordinator's metrics (the coordinator's `metrics` module serves them on `/metrics`,
//! `hotroll serve --metrics-listen ADDR`).
//!
//! The format is the OpenMetrics text format (`application/openmetrics-text`), which Prometheus
//! scrapes natively; counters carry the `_total` suffix, histograms `_bucket`/`_sum`/`_count`.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `hotroll_connected_agents` | gauge | | agents with a live session, read at scrape time |
//! | `hotroll_rollouts` | gauge | `state` | rollouts in the store, by state (every state listed) |
//! | `hotroll_rollouts_started_total` | counter | | rollouts started by this process |
//! | `hotroll_instruction_duration_seconds` | histogram | `instruction`, `outcome` | how long instructions of `up` ran on a node (the agent's measure), `outcome` = `succeeded` or `failed` |
//! | `hotroll_barrier_wait_seconds` | histogram | `outcome` | from the first arrival at a barrier instance to its release (`released`) or failure (`failed`) |
//! | `hotroll_barrier_fanout_seconds` | histogram | | from the last arrival at a barrier reaching the coordinator's rollouts to its last release handed to a node's connection (store commit included) |
//! | `hotroll_rollbacks_total` | counter | | nodes that confirmed a rollback to their permanent release |
//! | `hotroll_artifact_bytes_sent_total` | counter | | artifact bytes sent to agents (`FetchArtifact`) |
//! | `hotroll_watch_streams` | gauge | | open `WatchRollout` streams |
//! | `hotroll_store_commit_failures_total` | counter | | rollout steps the store failed to record (each retry of a held step counts) |
//!
//! [`Metrics`] is always there (instrumenting costs an atomic add); only the HTTP server is
//! optional. Every update is lock-free or takes a short read lock, so nothing on the rollout
//! path waits on a scrape.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::engine::RolloutState;

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstructionLabels {
    instruction: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// How an instruction ended, for the duration histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Succeeded,
    Failed,
}

/// How a barrier instance ended, for the wait histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierOutcome {
    Released,
    Failed,
}

/// The coordinator's metrics. Share it as `Arc<Metrics>`.
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    connected_agents: Gauge,
    rollouts: Family<StateLabels, Gauge>,
    rollouts_started: Counter,
    instruction_duration: Family<InstructionLabels, Histogram>,
    barrier_wait: Family<OutcomeLabels, Histogram>,
    barrier_fanout: Histogram,
    rollbacks: Counter,
    artifact_bytes_sent: Counter,
    watch_streams: Gauge,
    store_commit_failures: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// 1 ms .. ~65 s, doubling: instructions run from a hook spawn to a long health wait.
fn instruction_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// 1 ms .. ~65 s, doubling: barrier waits are bounded by their timeouts.
fn barrier_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// 50 µs .. ~1.6 s, doubling: a release fan-out is a commit and a queue push per node.
fn fanout_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("hotroll");
        let connected_agents = Gauge::default();
        registry.register(
            "connected_agents",
            "Agents with a live session",
            connected_agents.clone(),
        );
        let rollouts = Family::<StateLabels, Gauge>::default();
        // Every state, so `hotroll_rollouts` lists each one (0 included) from the start.
        for state in RolloutState::ALL {
            let _ = rollouts.get_or_create(&StateLabels {
                state: state.as_str(),
            });
        }
        registry.register(
            "rollouts",
            "Rollouts known to the coordinator, by state",
            rollouts.clone(),
        );
        let rollouts_started = Counter::default();
        registry.register(
            "rollouts_started",
            "Rollouts started by this coordinator process",
            rollouts_started.clone(),
        );
        let instruction_duration = Family::<InstructionLabels, Histogram>::new_with_constructor(
            instruction_buckets as fn() -> Histogram,
        );
        registry.register(
            "instruction_duration_seconds",
            "How long instructions ran on the nodes (as the agents measured), by instruction and outcome",
            instruction_duration.clone(),
        );
        let barrier_wait = Family::<OutcomeLabels, Histogram>::new_with_constructor(
            barrier_buckets as fn() -> Histogram,
        );
        registry.register(
            "barrier_wait_seconds",
            "From the first arrival at a sync_nodes barrier to its release or failure",
            barrier_wait.clone(),
        );
        let barrier_fanout = fanout_buckets();
        registry.register(
            "barrier_fanout_seconds",
            "From the last arrival at a barrier reaching the rollouts to its last release handed to a node's connection",
            barrier_fanout.clone(),
        );
        let rollbacks = Counter::default();
        registry.register(
            "rollbacks",
            "Nodes that confirmed a rollback to their permanent release",
            rollbacks.clone(),
        );
        let artifact_bytes_sent = Counter::default();
        registry.register(
            "artifact_bytes_sent",
            "Artifact bytes sent to agents",
            artifact_bytes_sent.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register(
            "watch_streams",
            "Open WatchRollout streams",
            watch_streams.clone(),
        );
        let store_commit_failures = Counter::default();
        registry.register(
            "store_commit_failures",
            "Rollout steps the store failed to record; the rollout holds until one succeeds",
            store_commit_failures.clone(),
        );
        Self {
            registry,
            connected_agents,
            rollouts,
            rollouts_started,
            instruction_duration,
            barrier_wait,
            barrier_fanout,
            rollbacks,
            artifact_bytes_sent,
            watch_streams,
            store_commit_failures,
        }
    }

    pub fn set_connected_agents(&self, n: usize) {
        self.connected_agents
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A rollout moved from `old` (`None`: it is new to this process) to `new`.
    pub fn rollout_state_changed(&self, old: Option<RolloutState>, new: RolloutState) {
        if old == Some(new) {
            return;
        }
        if let Some(old) = old {
            self.rollouts
                .get_or_create(&StateLabels {
                    state: old.as_str(),
                })
                .dec();
        }
        self.rollouts
            .get_or_create(&StateLabels {
                state: new.as_str(),
            })
            .inc();
    }

    pub fn rollout_started(&self) {
        self.rollouts_started.inc();
    }

    pub fn observe_instruction(&self, instruction: &str, outcome: StepOutcome, took: Duration) {
        let outcome = match outcome {
            StepOutcome::Succeeded => "succeeded",
            StepOutcome::Failed => "failed",
        };
        self.instruction_duration
            .get_or_create(&InstructionLabels {
                instruction: instruction.to_string(),
                outcome,
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_barrier_wait(&self, outcome: BarrierOutcome, waited: Duration) {
        let outcome = match outcome {
            BarrierOutcome::Released => "released",
            BarrierOutcome::Failed => "failed",
        };
        self.barrier_wait
            .get_or_create(&OutcomeLabels { outcome })
            .observe(waited.as_secs_f64());
    }

    pub fn observe_barrier_fanout(&self, took: Duration) {
        self.barrier_fanout.observe(took.as_secs_f64());
    }

    pub fn rollback_confirmed(&self) {
        self.rollbacks.inc();
    }

    /// A rollout step the store could not record (its rollout holds; see `rollouts::driver`).
    pub fn store_commit_failed(&self) {
        self.store_commit_failures.inc();
    }

    pub fn artifact_bytes_sent(&self, bytes: u64) {
        self.artifact_bytes_sent.inc_by(bytes);
    }

    /// Count an open watch stream until the returned guard is dropped.
    pub fn watch_stream(self: &Arc<Self>) -> WatchStreamGuard {
        self.watch_streams.inc();
        WatchStreamGuard {
            metrics: self.clone(),
        }
    }

    /// Everything, in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Keeps `hotroll_watch_streams` counted while a watch stream is open.
#[derive(Debug)]
pub struct WatchStreamGuard {
    metrics: Arc<Metrics>,
}

impl Drop for WatchStreamGuard {
    fn drop(&mut self) {
        self.metrics.watch_streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name_and_labels).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn metrics_encode_and_move() {
        let metrics = Arc::new(Metrics::new());
        let text = metrics.encode().expect("encode");
        assert_eq!(
            sample(&text, r#"hotroll_rollouts{state="succeeded"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "hotroll_rollbacks_total"), Some(0.0));
        assert!(text.trim_end().ends_with("# EOF"), "{text}");

        metrics.rollout_state_changed(None, RolloutState::Pending);
        metrics.rollout_state_changed(Some(RolloutState::Pending), RolloutState::Preparing);
        metrics.rollout_state_changed(Some(RolloutState::Preparing), RolloutState::Succeeded);
        metrics.observe_instruction("check", StepOutcome::Succeeded, Duration::from_millis(3));
        metrics.observe_instruction("check", StepOutcome::Failed, Duration::from_millis(40));
        metrics.observe_barrier_wait(BarrierOutcome::Released, Duration::from_millis(12));
        metrics.observe_barrier_fanout(Duration::from_micros(700));
        metrics.rollback_confirmed();
        metrics.artifact_bytes_sent(1000);
        metrics.artifact_bytes_sent(24);
        let guard = metrics.watch_stream();
        let text = metrics.encode().expect("encode");
        assert_eq!(
            sample(&text, r#"hotroll_rollouts{state="succeeded"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"hotroll_rollouts{state="pending"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"hotroll_instruction_duration_seconds_count{instruction="check",outcome="succeeded"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"hotroll_barrier_wait_seconds_count{outcome="released"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "hotroll_barrier_fanout_seconds_count"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "hotroll_rollbacks_total"), Some(1.0));
        assert_eq!(
            sample(&text, "hotroll_artifact_bytes_sent_total"),
            Some(1024.0)
        );
        assert_eq!(sample(&text, "hotroll_watch_streams"), Some(1.0));
        drop(guard);
        let text = metrics.encode().expect("encode");
        assert_eq!(sample(&text, "hotroll_watch_streams"), Some(0.0));
    }
}
