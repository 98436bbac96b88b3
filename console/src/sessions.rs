//! The login: a token is exchanged once for a session cookie (HttpOnly, SameSite=Strict, and
//! Secure under TLS), so the token itself never sits in the page. Each session also has a CSRF
//! token the page reads from `/api/me` and sends back in a header with every action.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::RngCore;

use crate::AppState;
use crate::principal::Role;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "hotroll_session";

/// A session lasts at most this long (and never past its token's expiry).
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;

/// Sessions kept at most; the oldest are dropped beyond (a login flood cannot grow memory).
const MAX_SESSIONS: usize = 10_000;

/// The header an action carries its session's CSRF token in.
pub const CSRF_HEADER: &str = "x-hotroll-csrf";

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub role: Role,
    pub csrf: String,
    pub expires_unix_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, role: Role, expires_unix_ms: u64) -> (String, Session) {
        let now = now_unix_ms();
        let session = Session {
            role,
            csrf: random_hex(),
            expires_unix_ms: expires_unix_ms.min(now.saturating_add(SESSION_TTL_MS)),
        };
        let id = random_hex();
        let mut sessions = self.lock();
        sessions.retain(|_, s| s.expires_unix_ms > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_unix_ms)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session the request's cookie names, if any.
    pub fn of(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self.lock();
        match sessions.get(id) {
            Some(s) if s.expires_unix_ms > now_unix_ms() => Some(s.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    fn close(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.lock().remove(id);
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A JSON error body `{"error": ...}` with `status`.
pub(crate) fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// The session of a request, or the refusal to answer it with.
#[allow(clippy::result_large_err)]
pub(crate) fn require(state: &AppState, headers: &HeaderMap) -> Result<Session, Response> {
    state
        .sessions
        .of(headers)
        .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "log in first"))
}

#[derive(serde::Deserialize)]
struct LoginBody {
    token: String,
}

/// `POST /login` with `{"token": "..."}`: sets the session cookie.
pub(crate) async fn login(
    State(state): State<AppState>,
    ConnectInfo(crate::tls::PeerAddr(peer)): ConnectInfo<crate::tls::PeerAddr>,
    body: Bytes,
) -> Response {
    let Ok(LoginBody { token }) = serde_json::from_slice::<LoginBody>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "expected {\"token\": \"...\"}");
    };
    // Token stores read files or etcd: off the async workers.
    let tokens = state.tokens.clone();
    let checked = tokio::task::spawn_blocking(move || tokens.check(Some(peer.ip()), token.trim()))
        .await
        .unwrap_or_else(|_| Err(crate::principal::LoginRefused("token check failed".into())));
    let login = match checked {
        Ok(login) => login,
        Err(refused) => {
            tracing::warn!(%peer, reason = %refused, "console login refused");
            return refuse(StatusCode::UNAUTHORIZED, &refused.0);
        }
    };
    let (id, session) = state.sessions.open(login.role, login.expires_unix_ms);
    let max_age = session.expires_unix_ms.saturating_sub(now_unix_ms()) / 1000;
    let secure = if state.secure { "; Secure" } else { "" };
    let set_cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    tracing::info!(%peer, role = ?session.role, "console login");
    let Ok(set_cookie) = HeaderValue::from_str(&set_cookie) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot make the cookie");
    };
    (
        [
            (header::SET_COOKIE, set_cookie),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        serde_json::json!({ "role": session.role }).to_string(),
    )
        .into_response()
}

/// `POST /logout`: ends the session and clears the cookie.
pub(crate) async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state.sessions.close(&headers);
    let secure = if state.secure { "; Secure" } else { "" };
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    match HeaderValue::from_str(&clear) {
        Ok(clear) => ([(header::SET_COOKIE, clear)], "").into_response(),
        Err(_) => StatusCode::NO_CONTENT.into_response(),
    }
}

/// `GET /api/me`: the session's role and CSRF token (what the page needs to draw its buttons
/// and to act).
pub(crate) async fn me(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match require(&state, &headers) {
        Ok(session) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({
                "role": session.role,
                "may_act": session.role.may_act(),
                "csrf": session.csrf,
                "expires_unix_ms": session.expires_unix_ms,
            })
            .to_string(),
        )
            .into_response(),
        Err(refused) => refused,
    }
}
