//! Rollout windows (`[rollout] windows = ["Mon-Fri 02:00-05:00 UTC", …]`): when a new wave may
//! start. Pure arithmetic on Unix milliseconds (the engine passes the time of each event; this
//! crate reads no clock).
//!
//! A window is `DAYS START-END UTC`: DAYS is `daily`, a day (`Mon`), a range (`Mon-Fri`,
//! `Sat-Mon` wraps) or a comma list of those; START and END are `HH:MM` or `HH:MM:SS` (END may
//! be `24:00`); an END before START crosses midnight (the window opens on the listed day).
//! Only UTC is accepted, so a window means the same on every coordinator.

use serde::Serialize;

const DAY_MS: u64 = 86_400_000;
const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One window, as parsed from its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// The text the script wrote, for messages and the plan.
    pub text: String,
    /// Monday first.
    #[serde(skip)]
    days: [bool; 7],
    /// Seconds after midnight UTC.
    #[serde(skip)]
    start_s: u32,
    /// Length in seconds (1..=86400).
    #[serde(skip)]
    length_s: u32,
}

/// Day of the week of the UTC day starting at `day_start_ms`, Monday = 0 (1970-01-01 was a
/// Thursday).
fn weekday(day_start_ms: u64) -> usize {
    usize::try_from((day_start_ms / DAY_MS + 3) % 7).unwrap_or(0)
}

impl Window {
    /// Parse `DAYS START-END UTC`; the error says what is wrong in words.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [days, times, zone] = parts.as_slice() else {
            return Err(format!(
                "window `{text}` is not `DAYS START-END UTC` (e.g. \"Mon-Fri 02:00-05:00 UTC\")"
            ));
        };
        if *zone != "UTC" {
            return Err(format!(
                "window `{text}`: only UTC windows are accepted, found `{zone}`"
            ));
        }
        let days = parse_days(days).map_err(|e| format!("window `{text}`: {e}"))?;
        let (start, end) = times.split_once('-').ok_or_else(|| {
            format!("window `{text}`: the times must be START-END, e.g. 02:00-05:00")
        })?;
        let start_s = parse_time(start, false).map_err(|e| format!("window `{text}`: {e}"))?;
        let end_s = parse_time(end, true).map_err(|e| format!("window `{text}`: {e}"))?;
        if start_s == end_s {
            return Err(format!("window `{text}` opens and closes at the same time"));
        }
        let length_s = if end_s > start_s {
            end_s - start_s
        } else {
            end_s + 86_400 - start_s
        };
        Ok(Self {
            text: text.to_string(),
            days,
            start_s,
            length_s,
        })
    }

    /// The first instant `>= now` inside this window (`now` itself when it is open).
    fn opens_at(&self, now: u64) -> u64 {
        let today = now - now % DAY_MS;
        let mut best = u64::MAX;
        // Yesterday's window may still be open (it crosses midnight); a week ahead covers every
        // listed day.
        for offset in 0..=8u64 {
            let Some(day) = (today + offset * DAY_MS).checked_sub(DAY_MS) else {
                continue;
            };
            if !self.days[weekday(day)] {
                continue;
            }
            let open = day + u64::from(self.start_s) * 1000;
            let close = open + u64::from(self.length_s) * 1000;
            if close > now {
                best = best.min(open.max(now));
            }
        }
        best
    }
}

/// The first instant `>= now` at which one of `windows` is open: `now` when one is (or when
/// there are none), `u64::MAX` only if no window ever opens (impossible for parsed windows).
pub fn window_opens_at(windows: &[Window], now: u64) -> u64 {
    if windows.is_empty() {
        return now;
    }
    windows.iter().map(|w| w.opens_at(now)).min().unwrap_or(now)
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    if text == "daily" || text == "*" {
        return Ok([true; 7]);
    }
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("unknown day `{name}` (write Mon, Tue, …, Sun or daily)"))
    };
    let mut days = [false; 7];
    for item in text.split(',') {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(item)?] = true,
        }
    }
    Ok(days)
}

/// `HH:MM` or `HH:MM:SS` as seconds after midnight; `24:00` only as an end.
fn parse_time(text: &str, end: bool) -> Result<u32, String> {
    let bad = || format!("`{text}` is not a time HH:MM or HH:MM:SS");
    let fields: Vec<u32> = text
        .split(':')
        .map(|f| {
            if f.len() == 2 && f.bytes().all(|b| b.is_ascii_digit()) {
                f.parse::<u32>().map_err(|_| bad())
            } else {
                Err(bad())
            }
        })
        .collect::<Result<_, _>>()?;
    let (h, m, s) = match fields.as_slice() {
        [h, m] => (*h, *m, 0),
        [h, m, s] => (*h, *m, *s),
        _ => return Err(bad()),
    };
    if end && (h, m, s) == (24, 0, 0) {
        return Ok(86_400);
    }
    if h > 23 || m > 59 || s > 59 {
        return Err(format!("`{text}` is not a time of day"));
    }
    Ok(h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::utc::format_utc;

    /// 2026-12-07T00:00:00Z, a Monday.
    const MONDAY: u64 = 1_796_601_600_000;
    const H: u64 = 3_600_000;

    fn w(text: &str) -> Window {
        Window::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_reference_monday_is_a_monday() {
        assert_eq!(format_utc(MONDAY), "2026-12-07T00:00:00Z");
        assert_eq!(weekday(MONDAY), 0);
    }

    #[test]
    fn weekday_windows_open_on_their_days_only() {
        let office = [w("Mon-Fri 02:00-05:00 UTC")];
        assert_eq!(window_opens_at(&office, MONDAY), MONDAY + 2 * H);
        assert_eq!(window_opens_at(&office, MONDAY + 3 * H), MONDAY + 3 * H);
        assert_eq!(
            window_opens_at(&office, MONDAY + 5 * H),
            MONDAY + 24 * H + 2 * H
        );
        // Friday after the window: next Monday.
        let friday_noon = MONDAY + 4 * 24 * H + 12 * H;
        assert_eq!(
            window_opens_at(&office, friday_noon),
            MONDAY + 7 * 24 * H + 2 * H
        );
    }

    #[test]
    fn a_window_across_midnight_and_a_wrapping_day_range() {
        let night = [w("Sun 22:00-02:00 UTC")];
        // Monday 01:00 is still inside Sunday's window.
        assert_eq!(window_opens_at(&night, MONDAY + H), MONDAY + H);
        assert_eq!(
            window_opens_at(&night, MONDAY + 3 * H),
            MONDAY + 6 * 24 * H + 22 * H
        );
        let weekend = [w("Sat-Mon 00:00-24:00 UTC")];
        assert_eq!(window_opens_at(&weekend, MONDAY + 5 * H), MONDAY + 5 * H);
        assert_eq!(
            window_opens_at(&weekend, MONDAY + 30 * H),
            MONDAY + 5 * 24 * H
        );
    }

    #[test]
    fn seconds_and_several_windows() {
        let windows = [w("daily 10:00:03-11:00 UTC"), w("Tue,Thu 09:00-09:30 UTC")];
        assert_eq!(
            window_opens_at(&windows, MONDAY + 10 * H),
            MONDAY + 10 * H + 3000
        );
        assert_eq!(
            window_opens_at(&windows, MONDAY + 24 * H + 8 * H),
            MONDAY + 24 * H + 9 * H
        );
        assert_eq!(window_opens_at(&[], 42), 42);
    }

    #[test]
    fn bad_windows_say_why() {
        for (text, want) in [
            ("Mon-Fri 02:00-05:00", "is not `DAYS START-END UTC`"),
            ("Mon-Fri 02:00-05:00 CET", "only UTC"),
            ("Mon-Fry 02:00-05:00 UTC", "unknown day `Fry`"),
            ("daily 2:00-05:00 UTC", "is not a time"),
            ("daily 02:00-25:00 UTC", "is not a time of day"),
            ("daily 24:00-05:00 UTC", "is not a time of day"),
            ("daily 02:00-02:00 UTC", "same time"),
            ("daily 02:00 UTC", "START-END"),
        ] {
            let error = Window::parse(text).err().unwrap_or_default();
            assert!(error.contains(want), "{text}: {error}");
        }
    }
}
