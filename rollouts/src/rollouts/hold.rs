//! A rollout held on its store: the batch whose commit failed, kept (nothing of it has left)
//! until a retry of the same commit succeeds, and the pace of those retries and their logs.

use std::time::Duration;

use super::batch::Batch;
use crate::engine::Millis;
use crate::store::{StoreError, StoreHold};

/// First wait before the held commit is tried again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// At most one log line per this long about a commit that keeps failing.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The held batch and its retries.
pub(super) struct Held {
    pub(super) batch: Batch,
    /// Whether the commit rewrites the rollout's record (with the driver's current status).
    pub(super) write_record: bool,
    /// What `status` shows while held.
    pub(super) hold: StoreHold,
    /// Failed attempts, the first one included.
    pub(super) attempts: u64,
    retry_in: Duration,
    logged_at: tokio::time::Instant,
}

impl Held {
    pub(super) fn new(batch: Batch, write_record: bool, error: &StoreError, now: Millis) -> Self {
        Self {
            batch,
            write_record,
            hold: StoreHold {
                error: why(error),
                since_ms: now,
            },
            attempts: 1,
            retry_in: RETRY_FIRST,
            logged_at: tokio::time::Instant::now(),
        }
    }

    /// How long to wait before the next attempt (doubling from the last).
    pub(super) fn next_wait(&mut self) -> Duration {
        let wait = self.retry_in;
        self.retry_in = (self.retry_in * 2).min(RETRY_MAX);
        wait
    }

    /// Another attempt failed with `error`. Returns whether to log it (at a bounded rate, and
    /// whenever the error changes) and whether the shown error changed.
    pub(super) fn failed_again(&mut self, error: &StoreError) -> (bool, bool) {
        self.attempts += 1;
        let why = why(error);
        let changed = why != self.hold.error;
        if changed {
            self.hold.error = why;
        }
        let log = changed || self.logged_at.elapsed() >= LOG_EVERY;
        if log {
            self.logged_at = tokio::time::Instant::now();
        }
        (log, changed)
    }
}

/// The error as `status` and the watch stream show it.
fn why(error: &StoreError) -> String {
    format!("cannot store the rollout's step: {error}")
}
