//! Metric gates: a PromQL instant query against Prometheus' HTTP API
//! (`GET /api/v1/query?query=…`, HTTP/1 over a fresh TCP connection per sample) and the gate's
//! verdict.
//!
//! [`evaluate`] samples every `interval`; the condition must hold on every sample for `hold` to
//! pass. A sample that violates it fails the gate at once with the value seen; not having passed
//! by `timeout` fails it. **An error never passes**: an unreachable Prometheus, an HTTP error, a
//! PromQL error, an empty result or a NaN all fail the gate with what went wrong. Both the
//! coordinator (fleet gates, after each wave) and the agent (the `gate` instruction) call it.

mod prometheus;

use std::time::Duration;

use hotroll_script::duration::format_duration;
use hotroll_script::{Comparison, GateSpec};
use tokio::time::Instant;

pub use prometheus::{Prometheus, QueryError, UrlError};

/// What is checked, with the query as it is sent (a node gate's `$node` already replaced).
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub query: String,
    pub pass_if: Comparison,
    pub hold: Duration,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Gate {
    /// The gate a script describes, its query sent as written.
    pub fn from_spec(spec: &GateSpec) -> Self {
        Self::with_query(spec, spec.query.value.clone())
    }

    /// A node gate: `$node` in the query is `node`.
    pub fn for_node(spec: &GateSpec, node: &str) -> Self {
        Self::with_query(spec, spec.query_for_node(node))
    }

    fn with_query(spec: &GateSpec, query: String) -> Self {
        Self {
            query,
            pass_if: spec.pass_if,
            hold: spec.hold,
            interval: spec.interval,
            timeout: spec.timeout,
        }
    }
}

/// How a gate ended.
#[derive(Debug, Clone, PartialEq)]
pub enum GateOutcome {
    /// The condition held on every sample for `held_for` (at least the gate's `hold`); `value`
    /// is the last one seen.
    Passed { value: f64, held_for: Duration },
    /// `value` is the last value seen, when there was one; `reason` says why in words.
    Failed { value: Option<f64>, reason: String },
}

impl GateOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, GateOutcome::Passed { .. })
    }

    /// The last value seen.
    pub fn value(&self) -> Option<f64> {
        match self {
            GateOutcome::Passed { value, .. } => Some(*value),
            GateOutcome::Failed { value, .. } => *value,
        }
    }

    /// One line: why it passed or failed.
    pub fn reason(&self, gate: &Gate) -> String {
        match self {
            GateOutcome::Passed { value, held_for } => format!(
                "`{}` = {value} held {} for {}",
                gate.query,
                gate.pass_if,
                format_duration(*held_for)
            ),
            GateOutcome::Failed { reason, .. } => reason.clone(),
        }
    }
}

/// The shortest time a query is given, even when the gate's deadline is closer: a last sample
/// at the deadline still gets an answer.
const MIN_QUERY_TIME: Duration = Duration::from_millis(500);

/// Run `gate` against `prometheus` until it passes or fails (at the latest at its timeout, plus
/// the last query's time). Time is tokio's clock.
pub async fn evaluate(prometheus: &Prometheus, gate: &Gate) -> GateOutcome {
    let started = Instant::now();
    let deadline = started + gate.timeout;
    let mut held_since: Option<Instant> = None;
    let mut last: Option<f64> = None;
    loop {
        let sampled = Instant::now();
        let answer_within = deadline
            .saturating_duration_since(sampled)
            .max(MIN_QUERY_TIME);
        let answer = tokio::time::timeout(answer_within, prometheus.query(&gate.query)).await;
        let value = match answer {
            Err(_) => {
                return GateOutcome::Failed {
                    value: last,
                    reason: format!(
                        "Prometheus at {} did not answer `{}` within {}",
                        prometheus.url(),
                        gate.query,
                        format_duration(answer_within)
                    ),
                };
            }
            Ok(Err(error)) => {
                return GateOutcome::Failed {
                    value: last,
                    reason: format!("query `{}` failed: {error}", gate.query),
                };
            }
            Ok(Ok(values)) => match worst(&values, gate.pass_if) {
                Some(value) => value,
                None => {
                    return GateOutcome::Failed {
                        value: last,
                        reason: format!(
                            "query `{}` returned no series: a gate never passes without data",
                            gate.query
                        ),
                    };
                }
            },
        };
        last = Some(value);
        if !gate.pass_if.holds(value) {
            return GateOutcome::Failed {
                value: Some(value),
                reason: format!("`{}` = {value}, not {}", gate.query, gate.pass_if),
            };
        }
        let since = *held_since.get_or_insert(sampled);
        let held_for = sampled.duration_since(since);
        if held_for >= gate.hold {
            return GateOutcome::Passed { value, held_for };
        }
        if Instant::now() >= deadline {
            return GateOutcome::Failed {
                value: Some(value),
                reason: format!(
                    "`{}` = {value} held {} for only {} of {} within the gate's timeout {}",
                    gate.query,
                    gate.pass_if,
                    format_duration(held_for),
                    format_duration(gate.hold),
                    format_duration(gate.timeout)
                ),
            };
        }
        tokio::time::sleep_until((sampled + gate.interval).min(deadline)).await;
    }
}

/// The value that decides: one that violates the condition if any series does, else the one
/// closest to the threshold. `None` for no series.
fn worst(values: &[f64], pass_if: Comparison) -> Option<f64> {
    use hotroll_script::Operator;
    if let Some(bad) = values.iter().copied().find(|v| !pass_if.holds(*v)) {
        return Some(bad);
    }
    let upper = matches!(pass_if.operator, Operator::Less | Operator::LessOrEqual);
    values
        .iter()
        .copied()
        .reduce(|a, b| if upper == (b > a) { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(text: &str) -> Comparison {
        Comparison::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_deciding_value_is_a_violation_or_the_closest_to_the_threshold() {
        assert_eq!(worst(&[0.1, 0.4, 0.2], cmp("< 0.5")), Some(0.4));
        assert_eq!(worst(&[0.1, 0.7, 0.9], cmp("< 0.5")), Some(0.7));
        assert_eq!(worst(&[5.0, 3.0], cmp("> 1")), Some(3.0));
        assert_eq!(worst(&[], cmp("> 1")), None);
        assert!(worst(&[f64::NAN], cmp("> 1")).is_some_and(f64::is_nan));
    }
}
