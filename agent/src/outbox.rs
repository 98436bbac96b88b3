//! Reports waiting to be sent. The executor never blocks on the network: while the session is
//! down its reports queue here (bounded) and go out after the next Welcome. Duplicates are
//! fine for the coordinator, losses of final states are not, so overflow drops progress reports
//! first.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::report::Report;

pub const DEFAULT_CAPACITY: usize = 1024;

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<VecDeque<Report>>,
    notify: Notify,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Report>> {
        // A panic while holding this lock cannot leave the queue half-updated (every operation
        // is a single VecDeque call), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, report: Report) {
        {
            let mut queue = self.lock();
            if queue.len() >= self.capacity {
                let victim = queue.iter().position(Report::is_progress).unwrap_or(0);
                if let Some(dropped) = queue.remove(victim) {
                    tracing::warn!(
                        ?dropped,
                        "outbox full while disconnected; dropping a report"
                    );
                }
            }
            queue.push_back(report);
        }
        self.notify.notify_one();
    }

    /// Put back a report that could not be sent, ahead of everything else.
    pub fn push_front(&self, report: Report) {
        {
            let mut queue = self.lock();
            if queue.len() >= self.capacity {
                queue.pop_back();
            }
            queue.push_front(report);
        }
        self.notify.notify_one();
    }

    pub fn try_pop(&self) -> Option<Report> {
        self.lock().pop_front()
    }

    /// Wait for the next report. Cancel-safe: a report is removed only in the poll that returns
    /// it.
    pub async fn pop(&self) -> Report {
        loop {
            let notified = self.notify.notified();
            if let Some(report) = self.try_pop() {
                return report;
            }
            notified.await;
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(n: u64) -> Report {
        Report::Prepared {
            rollout_id: "r".into(),
            epoch: n,
        }
    }

    #[test]
    fn overflow_drops_progress_first() {
        let outbox = Outbox::new(2);
        outbox.push(prepared(1));
        outbox.push(Report::Step(crate::report::StepReport {
            rollout_id: "r".into(),
            epoch: 1,
            step: 0,
            list: crate::report::StepList::Up,
            instruction: "apply".into(),
            phase: crate::report::StepPhase::Started,
            duration: std::time::Duration::ZERO,
            error: String::new(),
            output: String::new(),
            warnings: Vec::new(),
            at_unix_ms: 0,
        }));
        outbox.push(prepared(2));
        assert_eq!(outbox.try_pop(), Some(prepared(1)));
        assert_eq!(outbox.try_pop(), Some(prepared(2)));
        assert_eq!(outbox.try_pop(), None);
    }
}
