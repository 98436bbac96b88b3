//! One rollout live, as server-sent events from the same stream `rollout watch` reads
//! (`Rollouts::watch`): `history` events carry one stored history entry each with its seq as
//! the SSE id, so a browser that reconnects sends `Last-Event-ID` and resumes right after the
//! last entry it saw; `status` events carry the rollout's status (at most every
//! [`STATUS_EVERY`] while things change: with 10,000 nodes it is the big one); `end` says the
//! rollout is over and the stream closes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hotroll_rollouts::engine::Record;
use hotroll_rollouts::rollouts::{LiveEvent, WatchStart};
use hotroll_rollouts::store::StoredEvent;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::api::{rollout_error, status_json};
use crate::sessions::require;

/// The shortest time between two `status` events of one stream.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// How soon a browser whose stream broke tries again (its `EventSource` waits about 3 s
/// unless told): a wall screen should not lag behind for long after a network blip.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// Events buffered per stream before the sender waits for the browser.
const STREAM_BUFFER: usize = 256;

/// The first seq the browser wants: after its `Last-Event-ID`, else `?from=N`, else 1.
fn resume_from(headers: &HeaderMap, uri: &Uri) -> u64 {
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(last) = last_seen {
        return last.saturating_add(1);
    }
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "from")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(1)
        .max(1)
}

/// `GET /api/rollouts/{id}/events`.
pub(crate) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = require(&state, &headers) {
        return refused;
    }
    let from_seq = resume_from(&headers, &uri);
    let start = match watch(&state, &id, from_seq).await {
        Ok(start) => start,
        Err(refused) => return refused,
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(forward(state, id, from_seq, start, tx));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn watch(state: &AppState, id: &str, from_seq: u64) -> Result<WatchStart, Response> {
    let rollouts = state.rollouts.clone();
    let lookup = id.to_string();
    match tokio::task::spawn_blocking(move || rollouts.watch(&lookup, from_seq)).await {
        Ok(Ok(start)) => Ok(start),
        Ok(Err(e)) => Err(rollout_error(&e)),
        Err(_) => Err(crate::sessions::refuse(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "watch task failed",
        )),
    }
}

/// Resolves once the console stops.
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn is_final(record: &Record) -> bool {
    matches!(record, Record::RolloutState { state, .. } if state.is_final())
}

fn history_event(event: &StoredEvent) -> Option<Event> {
    let data = serde_json::to_string(event).ok()?;
    Some(
        Event::default()
            .id(event.seq.to_string())
            .event("history")
            .data(data),
    )
}

/// Where one stream is, and the channel to its browser.
struct Forwarder {
    state: AppState,
    id: String,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    last_seq: u64,
    status_dirty: bool,
    last_status: Option<tokio::time::Instant>,
    finished: bool,
}

impl Forwarder {
    /// Send one history entry (skipping what the browser already has); false: the browser
    /// went away.
    async fn history(&mut self, event: &StoredEvent) -> bool {
        if event.seq <= self.last_seq {
            return true;
        }
        self.last_seq = event.seq;
        self.status_dirty = true;
        if is_final(&event.record) {
            self.finished = true;
        }
        match history_event(event) {
            Some(sse) => self.tx.send(Ok(sse)).await.is_ok(),
            None => true,
        }
    }

    async fn status(&mut self) -> bool {
        self.status_dirty = false;
        self.last_status = Some(tokio::time::Instant::now());
        let Ok(value) = status_json(&self.state, &self.id) else {
            return true;
        };
        self.tx
            .send(Ok(Event::default().event("status").data(value.to_string())))
            .await
            .is_ok()
    }

    fn status_due(&self) -> bool {
        self.status_dirty
            && self
                .last_status
                .is_none_or(|at| at.elapsed() >= STATUS_EVERY)
    }

    /// What the store holds from `last_seq + 1` (after a lag, or once the rollout's task ended).
    async fn catch_up(&mut self) -> Option<Option<broadcast::Receiver<LiveEvent>>> {
        let start = watch(&self.state, &self.id, self.last_seq + 1).await.ok()?;
        for event in &start.past {
            if !self.history(event).await {
                return None;
            }
        }
        Some(start.live)
    }

    async fn end(&mut self) {
        let _ = self.status().await;
        let _ = self
            .tx
            .send(Ok(Event::default().event("end").data("{}")))
            .await;
    }
}

async fn forward(
    state: AppState,
    id: String,
    from_seq: u64,
    start: WatchStart,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut f = Forwarder {
        state,
        id,
        tx,
        last_seq: from_seq.saturating_sub(1),
        status_dirty: true,
        last_status: None,
        finished: false,
    };
    if f.tx
        .send(Ok(Event::default().retry(RECONNECT_AFTER)))
        .await
        .is_err()
    {
        return;
    }
    // The status first: the page draws every row from it, then applies the history.
    if !f.status().await {
        return;
    }
    for event in &start.past {
        if !f.history(event).await {
            return;
        }
    }
    let mut live = start.live;
    let mut stopping = f.state.stopping.clone();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if f.finished {
            f.end().await;
            return;
        }
        let Some(receiver) = live.as_mut() else {
            // Not running in this process (finished, or retired): the store has it all.
            f.end().await;
            return;
        };
        tokio::select! {
            received = receiver.recv() => match received {
                Ok(LiveEvent::Stored(event)) => {
                    if !f.history(&event).await {
                        return;
                    }
                }
                Ok(LiveEvent::Held(_) | LiveEvent::Resumed { .. }) => f.status_dirty = true,
                Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => {
                    // Fell behind the rollout's buffer, or its task ended: the rest is stored.
                    match f.catch_up().await {
                        Some(next) => live = next,
                        None => return,
                    }
                }
            },
            _ = stopped(&mut stopping) => return,
            _ = tick.tick() => {
                if f.tx.is_closed() {
                    return;
                }
            }
        }
        if f.status_due() && !f.status().await {
            return;
        }
    }
}
