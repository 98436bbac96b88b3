//! Durations as scripts write them: an integer and a unit (`"500ms"`, `"30s"`, `"5m"`, `"1h"`).
//!
//! Every duration is bounded (docs/design.md §3): zero, negative and anything above [`MAX_DURATION`] are
//! refused, so no barrier or step can wait forever or time out before it starts.

use std::time::Duration;

/// The longest duration a script may give.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// What one place that takes durations accepts: its bound and whether days (`d`) are a unit.
/// Every duration in hotroll goes through [`parse_duration_within`] with one of these, so the
/// syntax and the error messages are the same in scripts, configs and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationLimit {
    /// The longest duration accepted.
    pub max: Duration,
    /// Whether `d` (24h) is a unit here (token and certificate lifetimes).
    pub days: bool,
}

impl DurationLimit {
    /// Scripts, agent configs and the daemons' timers: `ms`, `s`, `m`, `h`, at most 24h.
    pub const SCRIPT: Self = Self {
        max: MAX_DURATION,
        days: false,
    };

    /// Credential lifetimes: `ms` to `d`, at most `max`.
    pub const fn with_days(max: Duration) -> Self {
        Self { max, days: true }
    }

    fn units(self) -> &'static str {
        if self.days {
            "ms, s, m, h, d"
        } else {
            "ms, s, m, h"
        }
    }

    fn max_text(self) -> String {
        let secs = self.max.as_secs();
        if self.days && secs.is_multiple_of(86_400) && self.max.subsec_nanos() == 0 {
            format!("{}d", secs / 86_400)
        } else {
            format_duration(self.max)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("a duration cannot be empty; write e.g. \"30s\"")]
    Empty,
    #[error("`{0}` is negative; a duration must be greater than zero")]
    Negative(String),
    #[error("`{text}` has no unit; write e.g. \"{text}s\" (units: {units})")]
    MissingUnit { text: String, units: &'static str },
    #[error("`{text}` has an unknown unit `{unit}` (units: {units})")]
    UnknownUnit {
        text: String,
        unit: String,
        units: &'static str,
    },
    #[error(
        "`{0}` is not a duration; write an integer and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\""
    )]
    Malformed(String),
    #[error("`{0}` is zero; a duration must be greater than zero")]
    Zero(String),
    #[error("`{text}` is longer than {max}; every duration is bounded")]
    TooLong { text: String, max: String },
}

/// Parse `"<integer><unit>"` with unit `ms`, `s`, `m` or `h`, bounded by [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    parse_duration_within(text, DurationLimit::SCRIPT)
}

/// Parse `"<integer><unit>"` within `limit`: greater than zero, at most `limit.max`, in the
/// units `limit` allows.
pub fn parse_duration_within(text: &str, limit: DurationLimit) -> Result<Duration, DurationError> {
    let too_long = || DurationError::TooLong {
        text: text.to_string(),
        max: limit.max_text(),
    };
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.starts_with('-') {
        return Err(DurationError::Negative(text.to_string()));
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(DurationError::Malformed(text.to_string()));
    }
    let millis_per_unit: u64 = match unit {
        "" => {
            return Err(DurationError::MissingUnit {
                text: text.to_string(),
                units: limit.units(),
            });
        }
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" if limit.days => 86_400_000,
        other if other.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: other.to_string(),
                units: limit.units(),
            });
        }
        // "1.5s", "1m30s", "30 s": keep the language to one simple form.
        _ => return Err(DurationError::Malformed(text.to_string())),
    };
    // Digits too many for u64 are certainly above the bound.
    let amount: u64 = digits.parse().map_err(|_| too_long())?;
    let millis = amount.checked_mul(millis_per_unit).ok_or_else(too_long)?;
    let duration = Duration::from_millis(millis);
    if duration.is_zero() {
        return Err(DurationError::Zero(text.to_string()));
    }
    if duration > limit.max {
        return Err(too_long());
    }
    Ok(duration)
}

/// Render a duration the way scripts write them, in the largest unit that is exact:
/// `30s`, `500ms`, `5m`, `1h`, `90s`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_string();
    }
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
        if millis.is_multiple_of(size) {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
    }

    #[test]
    fn refuses_unbounded_or_malformed() {
        assert!(matches!(parse_duration(""), Err(DurationError::Empty)));
        assert!(matches!(parse_duration("0s"), Err(DurationError::Zero(_))));
        assert!(matches!(
            parse_duration("-5s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            parse_duration("30"),
            Err(DurationError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("3d"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1.5s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("25h"),
            Err(DurationError::TooLong { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999h"),
            Err(DurationError::TooLong { .. })
        ));
        assert!(matches!(
            parse_duration("18446744073709551615h"),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn days_only_where_the_limit_allows_them() {
        let year = DurationLimit::with_days(Duration::from_secs(365 * 86_400));
        assert_eq!(
            parse_duration_within("7d", year),
            Ok(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            parse_duration_within("90m", year),
            Ok(Duration::from_secs(5_400))
        );
        let too_long = parse_duration_within("366d", year).unwrap_err();
        assert_eq!(
            too_long.to_string(),
            "`366d` is longer than 365d; every duration is bounded"
        );
        assert!(parse_duration_within("1y", year).is_err());
        assert!(parse_duration_within("d", year).is_err());
        assert!(parse_duration_within("99999999999999999999d", year).is_err());
        let no_days = parse_duration("2d").unwrap_err();
        assert_eq!(
            no_days.to_string(),
            "`2d` has an unknown unit `d` (units: ms, s, m, h)"
        );
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    }
}
