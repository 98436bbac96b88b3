//! Following a rollout's event stream (`WatchRollout`) across breaks: a stream that fails or
//! reports `DATA_LOSS` (the watcher fell behind the coordinator's buffer) is reopened from the
//! seq after the last event received, so the caller sees every event exactly once, in order.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use hotroll_proto::v1 as pb;
use tokio::sync::mpsc;

use super::view::is_final_state;
use hotroll_coordinator::control::HISTORY_SEQ_HEADER;

/// Consecutive failed attempts (no event received) before giving up.
pub const MAX_RETRIES: u32 = 8;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub type EventStream = BoxStream<'static, Result<pb::RolloutEvent, tonic::Status>>;

/// A `WatchRollout` stream just opened.
pub struct Opened {
    pub events: EventStream,
    /// The seq of the last event stored when the watch began, if the coordinator said.
    pub history_seq: Option<u64>,
}

/// Where rollout events come from: the coordinator, or a fake in tests.
pub trait EventSource: Send + 'static {
    fn open(&mut self, from_seq: u64)
    -> impl Future<Output = Result<Opened, tonic::Status>> + Send;
}

/// `WatchRollout` on a coordinator.
#[derive(Debug, Clone)]
pub struct GrpcSource {
    pub client: crate::client::Client,
    pub rollout_id: String,
    /// How to find the coordinator again: given, every reopen after the first connects anew,
    /// so a watch follows a group's leader across a failover (docs/ha.md).
    pub reconnect: Option<crate::client::CoordinatorArgs>,
    pub opened: bool,
}

impl GrpcSource {
    pub fn new(client: crate::client::Client, rollout_id: &str) -> Self {
        Self {
            client,
            rollout_id: rollout_id.to_string(),
            reconnect: None,
            opened: false,
        }
    }
}

impl EventSource for GrpcSource {
    async fn open(&mut self, from_seq: u64) -> Result<Opened, tonic::Status> {
        if self.opened
            && let Some(args) = &self.reconnect
        {
            self.client = crate::client::connect(args)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        }
        self.opened = true;
        let response = self
            .client
            .watch_rollout(pb::WatchRolloutRequest {
                rollout_id: self.rollout_id.clone(),
                from_seq,
            })
            .await?;
        let history_seq = response
            .metadata()
            .get(HISTORY_SEQ_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(Opened {
            events: response.into_inner().boxed(),
            history_seq,
        })
    }
}

/// How far to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Until the rollout reaches a final state.
    Final,
    /// Until the last event stored when the watch began (the history so far).
    Now,
}

/// What the follower reports.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowMsg {
    Event(Box<pb::RolloutEvent>),
    /// Something about the stream an operator may want to know (it broke, we reconnect).
    Notice(String),
    End(FollowEnd),
}

#[derive(Debug, Clone, PartialEq)]
pub enum FollowEnd {
    /// The rollout reached this final state (its event was delivered).
    Final(pb::RolloutState),
    /// [`Until::Now`]: the history so far was delivered.
    CaughtUp,
    /// Could not (or can no longer) follow the rollout.
    Failed(String),
}

fn fatal(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::NotFound
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::Unimplemented
    )
}

fn final_state(event: &pb::RolloutEvent) -> Option<pb::RolloutState> {
    if event.kind != "rollout_state" {
        return None;
    }
    let state = pb::RolloutState::try_from(event.rollout_state).ok()?;
    is_final_state(state).then_some(state)
}

/// Follow `source` from `from_seq` in a task; read what it reports from the returned channel.
/// The task ends after sending [`FollowMsg::End`], or when the receiver is dropped.
pub fn spawn_follow<S: EventSource>(
    source: S,
    from_seq: u64,
    until: Until,
) -> mpsc::Receiver<FollowMsg> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(follow(source, from_seq, until, tx));
    rx
}

/// The follower itself (see [`spawn_follow`]).
pub async fn follow<S: EventSource>(
    mut source: S,
    from_seq: u64,
    until: Until,
    tx: mpsc::Sender<FollowMsg>,
) {
    let end = |tx: mpsc::Sender<FollowMsg>, end: FollowEnd| async move {
        let _ = tx.send(FollowMsg::End(end)).await;
    };
    let mut next_seq = from_seq.max(1);
    let mut target: Option<u64> = None;
    let mut opened_once = false;
    let mut failures = 0u32;
    let mut backoff = RETRY_MIN;
    loop {
        let before = next_seq;
        let broke: String = match source.open(next_seq).await {
            Err(status) if fatal(&status) => {
                return end(tx, FollowEnd::Failed(status.message().to_string())).await;
            }
            Err(status) => format!("cannot open the event stream: {}", status.message()),
            Ok(opened) => {
                if until == Until::Now && !opened_once {
                    target = opened.history_seq;
                }
                opened_once = true;
                if target.is_some_and(|t| next_seq > t) {
                    return end(tx, FollowEnd::CaughtUp).await;
                }
                let mut events = opened.events;
                loop {
                    match events.next().await {
                        Some(Ok(event)) => {
                            // A live notice outside the history (a hold on the coordinator's
                            // store): shown, but no position in the history.
                            if event.seq == 0 {
                                if tx.send(FollowMsg::Event(Box::new(event))).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            if event.seq < next_seq {
                                continue;
                            }
                            if event.seq > next_seq {
                                let note = format!(
                                    "events {next_seq}..{} were not received",
                                    event.seq - 1
                                );
                                if tx.send(FollowMsg::Notice(note)).await.is_err() {
                                    return;
                                }
                            }
                            next_seq = event.seq + 1;
                            let last = final_state(&event);
                            if tx.send(FollowMsg::Event(Box::new(event))).await.is_err() {
                                return;
                            }
                            if let Some(state) = last {
                                return end(tx, FollowEnd::Final(state)).await;
                            }
                            if target.is_some_and(|t| next_seq > t) {
                                return end(tx, FollowEnd::CaughtUp).await;
                            }
                        }
                        Some(Err(status)) if status.code() == tonic::Code::DataLoss => {
                            break format!("fell behind ({})", status.message());
                        }
                        Some(Err(status)) if fatal(&status) => {
                            return end(tx, FollowEnd::Failed(status.message().to_string())).await;
                        }
                        Some(Err(status)) => {
                            break format!("the event stream broke: {}", status.message());
                        }
                        None if until == Until::Now => {
                            return end(tx, FollowEnd::CaughtUp).await;
                        }
                        None => break "the event stream ended before the rollout did".to_string(),
                    }
                }
            }
        };
        if next_seq > before {
            failures = 0;
            backoff = RETRY_MIN;
        } else {
            failures += 1;
        }
        if failures > MAX_RETRIES {
            return end(
                tx,
                FollowEnd::Failed(format!("{broke}; gave up after {MAX_RETRIES} retries")),
            )
            .await;
        }
        let note = format!("{broke}; resuming from event {next_seq}");
        if tx.send(FollowMsg::Notice(note)).await.is_err() {
            return;
        }
        // Reconnect at once after progress; back off while nothing gets through.
        if failures > 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn event(seq: u64, state: Option<pb::RolloutState>) -> pb::RolloutEvent {
        match state {
            Some(s) => pb::RolloutEvent {
                seq,
                kind: "rollout_state".into(),
                rollout_state: s as i32,
                ..Default::default()
            },
            None => pb::RolloutEvent {
                seq,
                kind: "step".into(),
                node: "n".into(),
                ..Default::default()
            },
        }
    }

    type Item = Result<pb::RolloutEvent, tonic::Status>;
    /// One scripted opening: the events and the advertised history seq, or a refusal.
    type Opening = Result<(Vec<Item>, Option<u64>), tonic::Status>;

    /// Serves scripted stream openings; records the `from_seq` of each.
    #[derive(Clone, Default)]
    struct Fake {
        openings: Arc<Mutex<VecDeque<Opening>>>,
        asked: Arc<Mutex<Vec<u64>>>,
    }

    impl Fake {
        fn then(self, items: Vec<Item>, history: Option<u64>) -> Self {
            self.openings
                .lock()
                .unwrap()
                .push_back(Ok((items, history)));
            self
        }
        fn then_err(self, status: tonic::Status) -> Self {
            self.openings.lock().unwrap().push_back(Err(status));
            self
        }
    }

    impl EventSource for Fake {
        async fn open(&mut self, from_seq: u64) -> Result<Opened, tonic::Status> {
            self.asked.lock().unwrap().push(from_seq);
            let next = self.openings.lock().unwrap().pop_front();
            match next {
                Some(Ok((items, history_seq))) => Ok(Opened {
                    events: futures::stream::iter(items).boxed(),
                    history_seq,
                }),
                Some(Err(status)) => Err(status),
                None => Err(tonic::Status::unavailable("no more scripted streams")),
            }
        }
    }

    async fn collect(fake: Fake, from: u64, until: Until) -> (Vec<u64>, Vec<String>, FollowEnd) {
        let mut rx = spawn_follow(fake, from, until);
        let (mut seqs, mut notes) = (Vec::new(), Vec::new());
        while let Some(msg) = rx.recv().await {
            match msg {
                FollowMsg::Event(e) => seqs.push(e.seq),
                FollowMsg::Notice(n) => notes.push(n),
                FollowMsg::End(end) => return (seqs, notes, end),
            }
        }
        panic!("the follower ended without End");
    }

    #[tokio::test(start_paused = true)]
    async fn data_loss_and_breaks_resume_from_the_next_event() {
        let fake = Fake::default()
            .then(
                vec![
                    Ok(event(1, None)),
                    Ok(event(2, None)),
                    Err(tonic::Status::data_loss("fell 9 behind")),
                ],
                None,
            )
            // The replay repeats 2 (dropped), then breaks.
            .then(
                vec![
                    Ok(event(2, None)),
                    Ok(event(3, None)),
                    Err(tonic::Status::unavailable("connection reset")),
                ],
                None,
            )
            .then_err(tonic::Status::unavailable("refused"))
            .then(
                vec![
                    Ok(event(4, None)),
                    Ok(event(5, Some(pb::RolloutState::Succeeded))),
                    Ok(event(6, None)),
                ],
                None,
            );
        let asked = fake.asked.clone();
        let (seqs, notes, end) = collect(fake, 0, Until::Final).await;
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(end, FollowEnd::Final(pb::RolloutState::Succeeded));
        assert_eq!(*asked.lock().unwrap(), vec![1, 3, 4, 4]);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("fell behind"), "{notes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_rollout_ends_at_once() {
        let fake = Fake::default().then_err(tonic::Status::not_found("no rollout with id `x`"));
        let (seqs, _, end) = collect(fake, 0, Until::Final).await;
        assert!(seqs.is_empty());
        assert_eq!(end, FollowEnd::Failed("no rollout with id `x`".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_coordinator_is_given_up_on() {
        let mut fake = Fake::default();
        for _ in 0..=MAX_RETRIES + 1 {
            fake = fake.then_err(tonic::Status::unavailable("refused"));
        }
        let (_, _, end) = collect(fake, 0, Until::Final).await;
        assert!(
            matches!(&end, FollowEnd::Failed(m) if m.contains("gave up")),
            "{end:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn history_so_far_stops_at_the_advertised_seq() {
        let fake = Fake::default().then(
            vec![Ok(event(1, None)), Ok(event(2, None)), Ok(event(3, None))],
            Some(2),
        );
        let (seqs, _, end) = collect(fake, 0, Until::Now).await;
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(end, FollowEnd::CaughtUp);
    }
}
