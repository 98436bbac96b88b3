//! Durations as scripts write them: an integer and a unit (`"500ms"`, `"30s"`, `"5m"`, `"1h"`).
//!
//! Every duration is bounded (DESIGN §3): zero, negative and anything above [`MAX_DURATION`] are
//! refused, so no barrier or step can wait forever or time out before it starts.

use std::time::Duration;

/// The longest duration a script may give.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("a duration cannot be empty; write e.g. \"30s\"")]
    Empty,
    #[error("`{0}` is negative; a duration must be greater than zero")]
    Negative(String),
    #[error("`{0}` has no unit; write e.g. \"{0}s\" (units: ms, s, m, h)")]
    MissingUnit(String),
    #[error("`{text}` has an unknown unit `{unit}` (units: ms, s, m, h)")]
    UnknownUnit { text: String, unit: String },
    #[error(
        "`{0}` is not a duration; write an integer and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\""
    )]
    Malformed(String),
    #[error("`{0}` is zero; a duration must be greater than zero")]
    Zero(String),
    #[error("`{0}` is longer than 24h; every duration is bounded")]
    TooLong(String),
}

/// Parse `"<integer><unit>"` with unit `ms`, `s`, `m` or `h`, bounded by [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
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
        "" => return Err(DurationError::MissingUnit(text.to_string())),
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other if other.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: other.to_string(),
            });
        }
        // "1.5s", "1m30s", "30 s": keep the language to one simple form.
        _ => return Err(DurationError::Malformed(text.to_string())),
    };
    // Digits too many for u64 are certainly above the bound.
    let amount: u64 = digits
        .parse()
        .map_err(|_| DurationError::TooLong(text.to_string()))?;
    let millis = amount
        .checked_mul(millis_per_unit)
        .ok_or_else(|| DurationError::TooLong(text.to_string()))?;
    let duration = Duration::from_millis(millis);
    if duration.is_zero() {
        return Err(DurationError::Zero(text.to_string()));
    }
    if duration > MAX_DURATION {
        return Err(DurationError::TooLong(text.to_string()));
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
            Err(DurationError::MissingUnit(_))
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
            Err(DurationError::TooLong(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999h"),
            Err(DurationError::TooLong(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615h"),
            Err(DurationError::TooLong(_))
        ));
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
