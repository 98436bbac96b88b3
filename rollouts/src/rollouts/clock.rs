//! The engine's clock.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::Millis;

/// Where "now" comes from in a simulated process (see [`use_simulated_clock`]).
static SIMULATED: OnceLock<fn() -> Option<Duration>> = OnceLock::new();

/// Milliseconds since the Unix epoch, read from tokio's monotonic clock anchored to the wall
/// clock once per process: deadlines never jump with the system clock, and under a paused tokio
/// clock (tests) the engine sees paused time too.
pub fn now_ms() -> Millis {
    if let Some(since_epoch) = SIMULATED.get().and_then(|source| source()) {
        return u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
    }
    static ANCHOR: OnceLock<(Millis, tokio::time::Instant)> = OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (wall, tokio::time::Instant::now())
    });
    let since = tokio::time::Instant::now().saturating_duration_since(mono);
    wall.saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// Reads "now" from `source` (the time since the epoch; `None` falls back to the tokio clock)
/// for the rest of the process. For simulations (turmoil) that restart a coordinator in a new
/// tokio runtime: each runtime's paused clock starts from the real instant it was built, so a
/// tokio-anchored clock would jump by however long the machine took in real time, and deadlines
/// recovered from the history would fire early under load. The first call wins.
pub fn use_simulated_clock(source: fn() -> Option<Duration>) {
    let _ = SIMULATED.set(source);
}
