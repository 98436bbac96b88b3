//! The background miner: one thread that examines the next range of numbers every tick and
//! appends the primes it finds to the shared state.
//!
//! * v1 tests [`V1_RANGE`] numbers a tick by trial division by the primes found so far.
//! * v2 and v3 sieve a segment of [`V2_RANGE`] numbers a tick (segmented sieve of
//!   Eratosthenes with the primes found so far as base primes): ten times the ground.
//!
//! The pace is bounded on purpose (a demo shares the machine with its whole fleet) and mining
//! stops at [`MAX_PRIMES`], so memory stays bounded however long it runs.
//!
//! Frozen (`paused`): no batch is appended. The check happens under the write lock, so once an
//! exporter has set `paused` and taken the lock, the state it reads is final.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::state::{Code, Primes};

/// Numbers v1 examines per tick.
pub const V1_RANGE: u64 = 400;
/// Numbers v2 and v3 examine per tick.
pub const V2_RANGE: u64 = 4_000;
pub const TICK: Duration = Duration::from_millis(10);
/// Mining stops here (16 MB of primes).
pub const MAX_PRIMES: usize = 2_000_000;
/// Below this, the sieve has too few base primes: trial division bootstraps it.
const SIEVE_FROM: u64 = 1_000;

/// What the miner and the HTTP handlers share.
#[derive(Debug)]
pub struct Shared {
    state: RwLock<Primes>,
    /// Frozen by an export: the miner appends nothing.
    pub paused: AtomicBool,
    /// Primes per second over the last two seconds (f64 bits).
    rate: AtomicU64,
}

impl Shared {
    pub fn new(state: Primes) -> Self {
        Self {
            state: RwLock::new(state),
            paused: AtomicBool::new(false),
            rate: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Primes> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Primes> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }
}

/// Mine until `stop`.
pub fn run(shared: Arc<Shared>, code: Code, stop: Arc<AtomicBool>) {
    let mut history: std::collections::VecDeque<(Instant, usize)> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        if !shared.paused.load(Ordering::Relaxed) {
            let batch = {
                let state = shared.read();
                if state.primes.len() < MAX_PRIMES {
                    Some(mine(&state, code))
                } else {
                    None
                }
            };
            if let Some((found, next)) = batch {
                let mut state = shared.write();
                if !shared.paused.load(Ordering::Relaxed) && state.next < next {
                    state.extend(&found, next);
                }
                let now = Instant::now();
                history.push_back((now, state.primes.len()));
                while history
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(2))
                {
                    history.pop_front();
                }
                if let (Some((t0, n0)), Some((t1, n1))) = (history.front(), history.back()) {
                    let secs = t1.duration_since(*t0).as_secs_f64();
                    if secs > 0.0 {
                        let rate = (n1 - n0) as f64 / secs;
                        shared.rate.store(rate.to_bits(), Ordering::Relaxed);
                    }
                }
            }
        }
        std::thread::sleep(TICK.saturating_sub(started.elapsed()));
    }
}

/// The primes in the next range after `state.next`, and the new `next`.
fn mine(state: &Primes, code: Code) -> (Vec<u64>, u64) {
    let lo = state.next.max(2);
    match code {
        Code::V1 => trial_division(&state.primes, lo, lo + V1_RANGE),
        Code::V2 | Code::V3 if lo < SIEVE_FROM => trial_division(&state.primes, lo, SIEVE_FROM),
        Code::V2 | Code::V3 => sieve(&state.primes, lo, lo + V2_RANGE),
    }
}

/// Primes in `[lo, hi)` by trial division by `known` (every prime below `lo`) and by those
/// found on the way.
pub fn trial_division(known: &[u64], lo: u64, hi: u64) -> (Vec<u64>, u64) {
    let mut found: Vec<u64> = Vec::new();
    for candidate in lo..hi {
        if candidate < 2 {
            continue;
        }
        let composite = known
            .iter()
            .chain(found.iter())
            .take_while(|&&p| p * p <= candidate)
            .any(|&p| candidate % p == 0);
        if !composite {
            found.push(candidate);
        }
    }
    (found, hi)
}

/// Primes in `[lo, hi)` by a segmented sieve; `known` holds every prime below `lo`, and
/// `lo * lo >= hi` (so they include every base prime needed).
pub fn sieve(known: &[u64], lo: u64, hi: u64) -> (Vec<u64>, u64) {
    let len = usize::try_from(hi - lo).unwrap_or(0);
    let mut composite = vec![false; len];
    for &p in known.iter().take_while(|&&p| p * p < hi) {
        let first = (p * p).max(lo.div_ceil(p) * p);
        let mut multiple = first;
        while multiple < hi {
            if let Ok(i) = usize::try_from(multiple - lo) {
                composite[i] = true;
            }
            multiple += p;
        }
    }
    let found = composite
        .iter()
        .enumerate()
        .filter(|(_, c)| !**c)
        .map(|(i, _)| lo + i as u64)
        .filter(|&n| n >= 2)
        .collect();
    (found, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_strategies_agree() {
        let (small, next) = trial_division(&[], 2, SIEVE_FROM);
        assert_eq!(&small[..10], &[2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert_eq!(small.len(), 168); // primes below 1000
        let (by_trial, _) = trial_division(&small, next, next + 5_000);
        let (by_sieve, _) = sieve(&small, next, next + 5_000);
        assert_eq!(by_trial, by_sieve);
    }

    #[test]
    fn mining_continues_where_the_state_ends() {
        let mut state = Primes::new(Code::V2);
        for _ in 0..5 {
            let (found, next) = mine(&state, Code::V2);
            state.extend(&found, next);
        }
        let (check, _) = trial_division(&[], 2, state.next);
        assert_eq!(state.primes, check);
    }
}
