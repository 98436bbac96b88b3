//! Metric gates: a PromQL query, the condition its value must meet, how long it must hold, how
//! often it is sampled and when the gate gives up. Fleet gates (`[[rollout.gates]]`) run on the
//! coordinator after each wave; the `gate` instruction runs on a node (`$node` in its query is
//! the node's name). This module holds the condition and the defaults; the gates themselves are
//! [`crate::model::GateSpec`] and [`crate::model::FleetGate`]; `hotroll-gate` evaluates them.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// How a sampled value is compared with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Operator {
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessOrEqual,
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterOrEqual,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Less => "<",
            Operator::LessOrEqual => "<=",
            Operator::Greater => ">",
            Operator::GreaterOrEqual => ">=",
        }
    }
}

/// `pass_if`: `< 0.5`, `>= 99.9`… A NaN never meets it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Comparison {
    pub operator: Operator,
    pub threshold: f64,
}

// The threshold is a finite number (parse refuses NaN), so equality is total.
impl Eq for Comparison {}

impl Comparison {
    /// Parse `OP NUMBER` (spaces optional): `< 0.5`, `>=100`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (operator, rest) = if let Some(rest) = text.strip_prefix("<=") {
            (Operator::LessOrEqual, rest)
        } else if let Some(rest) = text.strip_prefix(">=") {
            (Operator::GreaterOrEqual, rest)
        } else if let Some(rest) = text.strip_prefix('<') {
            (Operator::Less, rest)
        } else if let Some(rest) = text.strip_prefix('>') {
            (Operator::Greater, rest)
        } else {
            return Err(format!(
                "`{text}` is not a comparison: write `<`, `<=`, `>` or `>=` and a number, e.g. \"< 0.5\""
            ));
        };
        let number = rest.trim();
        let threshold: f64 = number
            .parse()
            .map_err(|_| format!("`{number}` in `{text}` is not a number; write e.g. \"< 0.5\""))?;
        if !threshold.is_finite() {
            return Err(format!("the threshold in `{text}` must be a finite number"));
        }
        Ok(Self {
            operator,
            threshold,
        })
    }

    /// Whether `value` meets the condition (NaN never does).
    pub fn holds(self, value: f64) -> bool {
        match self.operator {
            Operator::Less => value < self.threshold,
            Operator::LessOrEqual => value <= self.threshold,
            Operator::Greater => value > self.threshold,
            Operator::GreaterOrEqual => value >= self.threshold,
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.operator.as_str(), self.threshold)
    }
}

/// Defaults of a gate's keys when the script leaves them out.
pub const DEFAULT_GATE_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_GATE_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_parse_and_hold() {
        let c = Comparison::parse("< 0.5").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.holds(0.1) && !c.holds(0.5) && !c.holds(f64::NAN));
        let c = Comparison::parse(">=99.9").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.holds(99.9) && !c.holds(99.8));
        assert_eq!(c.to_string(), ">= 99.9");
        for (bad, want) in [
            ("== 1", "not a comparison"),
            ("< abc", "not a number"),
            ("< NaN", "finite"),
            ("0.5", "not a comparison"),
        ] {
            let error = Comparison::parse(bad).err().unwrap_or_default();
            assert!(error.contains(want), "{bad}: {error}");
        }
    }
}
