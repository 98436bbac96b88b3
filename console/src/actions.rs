//! Operator actions from the page: `POST /api/rollouts/{id}/{pause|resume|promote|abort}`.
//!
//! Refused unless the request has a live session cookie (401), its role may act (403: viewers
//! never act, whatever the page shows), it carries the session's CSRF token in
//! `x-hotroll-csrf` and, when the browser sends an `Origin`, that origin is this server (403).
//! The cookie is SameSite=Strict as well: a cross-site page can neither send it nor read the
//! CSRF token.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hotroll_rollouts::engine::Event;
use hotroll_rollouts::rollouts::RolloutError;

use crate::AppState;
use crate::sessions::{CSRF_HEADER, refuse, require};

/// Longest abort reason taken from the page.
const MAX_REASON: usize = 500;

/// Whether `Origin` (when sent) names the host this request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Browsers send Origin with every POST from script; a request without one is not a
        // cross-site form (those carry it too), and still needs the cookie and the CSRF token.
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(|h| h.to_str()),
    ) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority == host)
}

#[derive(serde::Deserialize, Default)]
struct AbortBody {
    #[serde(default)]
    reason: String,
}

fn event_for(action: &str, body: &Bytes) -> Option<Event> {
    Some(match action {
        "pause" => Event::OperatorPause,
        "resume" => Event::OperatorResume,
        "promote" => Event::OperatorPromote,
        "abort" => {
            let body: AbortBody = if body.is_empty() {
                AbortBody::default()
            } else {
                serde_json::from_slice(body).ok()?
            };
            let mut reason: String = body.reason.trim().chars().take(MAX_REASON).collect();
            if reason.is_empty() {
                reason = "aborted from the web console".into();
            }
            Event::OperatorAbort { reason }
        }
        _ => return None,
    })
}

pub(crate) async fn act(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let session = match require(&state, &headers) {
        Ok(session) => session,
        Err(refused) => return refused,
    };
    if !session.role.may_act() {
        tracing::warn!(rollout = %id, action, "console action refused: a viewer");
        return refuse(StatusCode::FORBIDDEN, "a viewer may not act on rollouts");
    }
    let csrf_ok = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == session.csrf);
    if !csrf_ok || !same_origin(&headers) {
        tracing::warn!(rollout = %id, action, "console action refused: CSRF check");
        return refuse(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token, or a cross-site request",
        );
    }
    let Some(event) = event_for(&action, &body) else {
        return refuse(StatusCode::NOT_FOUND, &format!("no action `{action}`"));
    };
    tracing::info!(rollout = %id, action, "console action");
    match state.rollouts.operate(&id, event).await {
        Ok(snapshot) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "state": snapshot.state }).to_string(),
        )
            .into_response(),
        Err(RolloutError::NotFound(id)) => {
            refuse(StatusCode::NOT_FOUND, &format!("no rollout `{id}`"))
        }
        Err(RolloutError::NotApplicable(e)) => refuse(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}
