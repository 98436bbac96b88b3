//! The engine's clock.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::Millis;

/// Milliseconds since the Unix epoch, read from tokio's monotonic clock anchored to the wall
/// clock once per process: deadlines never jump with the system clock, and under a simulated
/// or paused tokio clock (turmoil, tests) the engine sees simulated time too.
pub fn now_ms() -> Millis {
    static ANCHOR: std::sync::OnceLock<(Millis, tokio::time::Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (wall, tokio::time::Instant::now())
    });
    let since = tokio::time::Instant::now().saturating_duration_since(mono);
    wall.saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}
