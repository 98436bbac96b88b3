//! Polling with a deadline: the only way tests wait.

use std::time::{Duration, Instant};

use anyhow::bail;

/// Call `probe` every `interval` until it returns `Ok(Some(_))`, or fail after `timeout`.
///
/// `Ok(None)` means "not yet"; an `Err` is remembered (and reported on timeout) but does not end
/// the wait, since a process that is still starting may refuse connections.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        let last_error = match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(interval);
    }
}
