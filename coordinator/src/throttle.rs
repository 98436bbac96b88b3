//! Failed authentications per peer address: after a few, the address must wait (exponential,
//! bounded) and is refused without its credential being looked at.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failed authentications an address may make before it has to wait.
pub const FREE_FAILURES: u32 = 3;
/// The first wait; it doubles with every further failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Addresses remembered by the throttle (the oldest are forgotten first).
const MAX_TRACKED_PEERS: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct PeerFailures {
    failures: u32,
    blocked_until: Instant,
    last: Instant,
}

/// Failed authentications per peer address, and the wait they impose.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    peers: Mutex<HashMap<IpAddr, PeerFailures>>,
}

impl AuthThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerFailures>> {
        match self.peers.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        }
    }

    /// `Err(wait left)` while `ip` must wait.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        match self.lock().get(&ip) {
            Some(p) if p.blocked_until > now => Err(p.blocked_until - now),
            _ => Ok(()),
        }
    }

    /// Count a failure of `ip`; returns the wait it now has (zero for the first few).
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut peers = self.lock();
        if peers.len() >= MAX_TRACKED_PEERS && !peers.contains_key(&ip) {
            let stale = MAX_BACKOFF * 4;
            peers.retain(|_, p| now.duration_since(p.last) < stale);
            if peers.len() >= MAX_TRACKED_PEERS
                && let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last).map(|(ip, _)| *ip)
            {
                peers.remove(&oldest);
            }
        }
        let entry = peers.entry(ip).or_insert(PeerFailures {
            failures: 0,
            blocked_until: now,
            last: now,
        });
        // A quiet spell of a few maximum waits forgives the past.
        if now.duration_since(entry.last) > MAX_BACKOFF * 4 {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
        let wait = backoff(entry.failures);
        entry.blocked_until = now + wait;
        wait
    }

    /// A successful authentication of `ip` clears its failures.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut peers = self.lock();
        if peers.contains_key(&ip) {
            peers.remove(&ip);
        }
    }

    /// A failed TLS handshake: logged (a client that just closes is not worth a warning), and
    /// counted when it is a certificate problem.
    pub fn handshake_failed(&self, ip: IpAddr, error: &std::io::Error) {
        let text = error.to_string();
        if !text.to_ascii_lowercase().contains("certificate") {
            tracing::debug!(peer = %ip, error = %text, "TLS handshake failed");
            return;
        }
        let wait = self.failed(ip);
        let failures = self.lock().get(&ip).map_or(1, |p| p.failures);
        // A flood is logged at its start and then at every doubling, not once per attempt.
        if failures <= FREE_FAILURES + 1 || failures.is_power_of_two() {
            tracing::warn!(peer = %ip, failures, backoff = ?wait, error = %text, "TLS handshake refused");
        } else {
            tracing::debug!(peer = %ip, failures, error = %text, "TLS handshake refused");
        }
    }
}

/// The wait after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    if failures <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES - 1).min(16);
    BASE_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_free_then_exponential_and_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(FREE_FAILURES), Duration::ZERO);
        assert_eq!(backoff(FREE_FAILURES + 1), BASE_BACKOFF);
        assert_eq!(backoff(FREE_FAILURES + 2), BASE_BACKOFF * 2);
        assert_eq!(backoff(FREE_FAILURES + 3), BASE_BACKOFF * 4);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_blocks_one_address_only() {
        let throttle = AuthThrottle::default();
        let bad: IpAddr = [127, 0, 0, 2].into();
        let good: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..FREE_FAILURES {
            assert_eq!(throttle.failed(bad), Duration::ZERO);
            assert!(throttle.check(bad).is_ok());
        }
        assert_eq!(throttle.failed(bad), BASE_BACKOFF);
        assert!(throttle.check(bad).is_err());
        assert!(throttle.check(good).is_ok());
        tokio::time::advance(BASE_BACKOFF).await;
        assert!(throttle.check(bad).is_ok());
        throttle.succeeded(bad);
        assert_eq!(throttle.failed(bad), Duration::ZERO);
    }
}
