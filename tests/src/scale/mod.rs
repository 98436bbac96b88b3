//! The scale bench (`scale-bench`): one real `hotroll serve` process and thousands of agents —
//! the real `hotroll_agent::Agent` session and executor code — spread over a few worker
//! processes, over real gRPC on 127.0.0.1.
//!
//! * [`worker`] runs M agents in one process (the bench binary re-executed with `worker ...`)
//!   and reports their barrier timings.
//! * [`marks`] reads those timings off the agents' own tracing events (no change to the agent).
//! * [`procfs`] reads a process's resident memory and CPU time from `/proc`.
//! * [`floor`] measures the wire's floor for a fan-out in the same run.
//! * [`perf`] runs `perf record` around one phase.
//!
//! Timestamps are `CLOCK_MONOTONIC` nanoseconds ([`monotonic_ns`]). On Linux that clock is one
//! system-wide clock (time since boot), so values taken in different processes on the same host
//! compare directly; it never jumps with NTP, unlike `CLOCK_REALTIME`. (Rust's `Instant` reads
//! the same clock but cannot be passed between processes.)

pub mod floor;
pub mod marks;
pub mod perf;
pub mod procfs;
pub mod run;
pub mod worker;

use anyhow::Context;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::time::{ClockId, clock_gettime};

/// `CLOCK_MONOTONIC` in nanoseconds; comparable across processes on this host.
pub fn monotonic_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        }
        // CLOCK_MONOTONIC always exists on Linux; 0 only makes the sample look absurd.
        Err(_) => 0,
    }
}

/// Raise the soft limit on open files to the hard limit (children inherit it). Returns the new
/// soft limit.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    Ok(soft)
}

/// Summary statistics of samples (ms), nearest-rank percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let len = samples.len();
        let rank = |p: f64| {
            let index = ((p * len as f64).ceil() as usize).clamp(1, len) - 1;
            samples[index]
        };
        Self {
            n: len,
            min: samples[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[len - 1],
            mean: samples.iter().sum::<f64>() / len as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank() {
        let s = Stats::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (s.n, s.min, s.p50, s.p99, s.max),
            (100, 1.0, 50.0, 99.0, 100.0)
        );
        assert_eq!(Stats::of(vec![]).n, 0);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
