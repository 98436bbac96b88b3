//! JSON views of the fleet and the rollouts, for a logged-in session (viewer or operator).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hotroll_rollouts::rollouts::RolloutError;
use hotroll_rollouts::store::RolloutSnapshot;
use serde_json::{Value, json};

use crate::AppState;
use crate::sessions::{refuse, require};

/// Rollouts the list shows (newest first).
const LISTED_ROLLOUTS: usize = 200;

fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

pub(crate) fn rollout_error(e: &RolloutError) -> Response {
    match e {
        RolloutError::NotFound(id) => refuse(StatusCode::NOT_FOUND, &format!("no rollout `{id}`")),
        other => refuse(StatusCode::SERVICE_UNAVAILABLE, &other.to_string()),
    }
}

/// `GET /api/fleet`: every known node with its labels, connection and app versions.
pub(crate) async fn fleet(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = require(&state, &headers) {
        return refused;
    }
    let nodes: Vec<Value> = state
        .registry
        .list()
        .into_iter()
        .map(|n| {
            json!({
                "name": n.record.name,
                "labels": n.record.labels,
                "connected": n.connected,
                "apps": n.record.apps,
                "last_seen_ms": n.record.last_seen_ms,
            })
        })
        .collect();
    json_response(&json!({ "nodes": nodes }))
}

/// One rollout without its per-node rows (what the list shows).
fn summary(s: &RolloutSnapshot) -> Value {
    json!({
        "id": s.id,
        "state": s.state,
        "app": s.app,
        "from": s.from,
        "to": s.to,
        "failures": s.failures,
        "max_failures": s.max_failures,
        "current_wave": s.current_wave,
        "waves": s.waves,
        "nodes": s.nodes.len(),
        "created_ms": s.created_ms,
        "finished_ms": s.finished_ms,
        "error": s.error,
    })
}

/// `GET /api/rollouts`: the latest rollouts, newest first.
pub(crate) async fn rollouts(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = require(&state, &headers) {
        return refused;
    }
    match state.rollouts.list(LISTED_ROLLOUTS) {
        Ok(list) => json_response(&json!({
            "rollouts": list.iter().map(summary).collect::<Vec<_>>()
        })),
        Err(e) => rollout_error(&e),
    }
}

/// A rollout's full status and its instruction names, as the live page draws them.
pub(crate) fn status_json(state: &AppState, id: &str) -> Result<Value, RolloutError> {
    let (snapshot, names) = state.rollouts.status(id)?;
    Ok(json!({ "status": snapshot, "instructions": *names }))
}

/// `GET /api/rollouts/{id}`: the rollout's status, every node's row included.
pub(crate) async fn rollout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = require(&state, &headers) {
        return refused;
    }
    match status_json(&state, &id) {
        Ok(value) => json_response(&value),
        Err(e) => rollout_error(&e),
    }
}
