//! Session liveness: one sweep over every agent session instead of a timer per session.
//!
//! Every heartbeat interval one task walks the live sessions (docs/protocol.md, "Heartbeats"):
//!
//! * a session whose node a running rollout targets is sent a heartbeat every interval; an idle
//!   one every *idle interval* (protocol 2, where the coordinator paces heartbeats and the agent
//!   answers each one). A protocol-1 agent beats on its own every interval, so it is beaten
//!   every interval whatever it does;
//! * a session that has not been heard from within three heartbeat intervals of the oldest
//!   heartbeat it has not answered is ended, as is one whose outbound queue is full.
//!
//! So an idle fleet costs one wake-up per interval and sessions / idle-interval heartbeats a
//! second each way, and a node is watched closely from the moment a rollout targets it: its
//! next heartbeat leaves at the next sweep, announcing the short interval. The idle interval
//! stretches with the fleet so that idle heartbeats stay within [`IDLE_BEATS_PER_SECOND`]
//! (10,000 idle nodes: one every 50 s), as Nomad bounds its heartbeats per second: each one
//! costs a write and a read (docs/performance.md, "Idle fleets").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::outbound::Outbound;
use crate::rollouts::{Rollouts, now_ms};

/// Heartbeat intervals without an answer after which a session is ended.
const SILENT_INTERVALS: u32 = 3;

/// Most idle heartbeats a second the sweep sends, whatever the fleet's size: beyond
/// `IDLE_BEATS_PER_SECOND × idle interval` sessions the idle interval grows with them.
pub const IDLE_BEATS_PER_SECOND: u32 = 200;

/// The sessions being watched, and the two paces.
pub struct Liveness {
    sessions: Mutex<HashMap<u64, Watched>>,
    next_id: AtomicU64,
    /// The close pace (rollout targets, protocol-1 agents) and the answer deadline's unit.
    heartbeat: Duration,
    /// The idle pace (protocol 2, nodes no running rollout targets).
    idle: Duration,
    /// What `Heard` timestamps count from.
    epoch: Instant,
}

/// One watched session.
struct Watched {
    node: String,
    tx: mpsc::Sender<Outbound>,
    /// The agent speaks protocol 2: it answers heartbeats and follows the announced pace.
    paced: bool,
    heard: Arc<AtomicU64>,
    end: Arc<Ended>,
    seq: u64,
    next_beat: Instant,
    /// When the oldest heartbeat not yet answered left (ms since `epoch`).
    unanswered_since: Option<u64>,
}

/// Why the sweep ended a session, for the session task to return.
#[derive(Default)]
struct Ended {
    notify: Notify,
    reason: Mutex<Option<&'static str>>,
}

/// A session's side of the watch: note what is heard, learn when the sweep ends the session.
/// Dropping it stops the watch.
pub struct SessionWatch {
    id: u64,
    heard: Arc<AtomicU64>,
    end: Arc<Ended>,
    liveness: Arc<Liveness>,
}

impl SessionWatch {
    /// Something arrived on the session.
    pub fn heard(&self) {
        self.heard
            .store(self.liveness.elapsed_ms(), Ordering::Relaxed);
    }

    /// Resolves when the sweep ends the session; returns why.
    pub async fn ended(&self) -> &'static str {
        loop {
            if let Some(reason) = *self.end.reason.lock().unwrap_or_else(|p| p.into_inner()) {
                return reason;
            }
            self.end.notify.notified().await;
        }
    }
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        self.liveness.lock().remove(&self.id);
    }
}

impl Liveness {
    /// `idle` is raised to `heartbeat` when shorter.
    pub fn new(heartbeat: Duration, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            heartbeat,
            idle: idle.max(heartbeat),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Watched>> {
        // Every critical section is a few field updates; a poisoned lock is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The idle interval for a fleet of `sessions`: the configured one, or longer when that
    /// would mean more than [`IDLE_BEATS_PER_SECOND`].
    pub fn idle_pace(&self, sessions: usize) -> Duration {
        let budgeted = Duration::from_secs_f64(sessions as f64 / f64::from(IDLE_BEATS_PER_SECOND));
        self.idle.max(budgeted)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Watch a session that was just welcomed. Its first heartbeat leaves within one interval.
    pub fn watch(
        self: &Arc<Self>,
        node: &str,
        tx: mpsc::Sender<Outbound>,
        paced: bool,
    ) -> SessionWatch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let heard = Arc::new(AtomicU64::new(self.elapsed_ms()));
        let end = Arc::new(Ended::default());
        self.lock().insert(
            id,
            Watched {
                node: node.to_string(),
                tx,
                paced,
                heard: heard.clone(),
                end: end.clone(),
                seq: 0,
                next_beat: Instant::now() + self.heartbeat,
                unanswered_since: None,
            },
        );
        SessionWatch {
            id,
            heard,
            end,
            liveness: self.clone(),
        }
    }

    /// Sweep every heartbeat interval until `stop` resolves.
    pub async fn run(self: Arc<Self>, rollouts: Arc<Rollouts>, stop: impl Future<Output = ()>) {
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.sweep(&rollouts),
                () = &mut stop => return,
            }
        }
    }

    /// One pass over every session (see the module docs).
    fn sweep(&self, rollouts: &Rollouts) {
        let targets = rollouts.running_targets();
        let now = Instant::now();
        let now_since_epoch = self.elapsed_ms();
        let answer_within = duration_ms(self.heartbeat * SILENT_INTERVALS);
        let mut sessions = self.lock();
        let idle = self.idle_pace(sessions.len());
        for watched in sessions.values_mut() {
            let heard = watched.heard.load(Ordering::Relaxed);
            if watched.unanswered_since.is_some_and(|since| heard >= since) {
                watched.unanswered_since = None;
            }
            if let Some(since) = watched.unanswered_since
                && now_since_epoch.saturating_sub(since) > answer_within
            {
                end(
                    watched,
                    "no answer to a heartbeat within three heartbeat intervals",
                );
                continue;
            }
            let close = !watched.paced || targets.iter().any(|t| t.contains(&watched.node));
            let pace = if close { self.heartbeat } else { idle };
            // A node a rollout just started to target is beaten now, announcing the close pace.
            let due = now >= watched.next_beat || (close && watched.next_beat > now + pace);
            if !due {
                continue;
            }
            watched.seq += 1;
            let beat = Outbound::Heartbeat {
                seq: watched.seq,
                sent_ms: now_ms(),
                next_within_ms: if watched.paced { duration_ms(pace) } else { 0 },
            };
            match watched.tx.try_send(beat) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    end(watched, "outbound queue full: the agent stopped reading");
                    continue;
                }
                // The session is ending on its own.
                Err(mpsc::error::TrySendError::Closed(_)) => continue,
            }
            watched.next_beat = now + pace;
            watched.unanswered_since.get_or_insert(now_since_epoch);
        }
    }
}

fn end(watched: &mut Watched, reason: &'static str) {
    let mut slot = watched.end.reason.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(reason);
        watched.end.notify.notify_one();
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_pace_stretches_with_the_fleet_beyond_its_budget() {
        let liveness = Liveness::new(Duration::from_secs(2), Duration::from_secs(30));
        assert_eq!(liveness.idle_pace(10), Duration::from_secs(30));
        assert_eq!(liveness.idle_pace(6_000), Duration::from_secs(30));
        assert_eq!(liveness.idle_pace(10_000), Duration::from_secs(50));
        // Never shorter than the close pace.
        let short = Liveness::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(short.idle_pace(0), Duration::from_secs(5));
    }
}
