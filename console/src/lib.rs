//! The web console (`hotroll serve --ui-listen ADDR`): the fleet, the rollouts and one rollout
//! live, in a browser. It reads the same domain sources as the Control service — the
//! [`Rollouts`] facade (status, list, watch) and the [`Registry`] — and never a wire type.
//!
//! * `principal`: who a logged-in browser is ([`Role`]) and what it may do.
//! * `sessions`: the login (a token exchanged for a session cookie) and the per-session CSRF
//!   token.
//! * `api`: JSON views of the fleet and the rollouts.
//! * `live`: one rollout's history and status as server-sent events, resumable by seq.
//! * `actions`: pause, resume, promote, abort — operators only, CSRF-checked.
//! * `assets`: the page, its script and style, embedded at build time.
//! * `tls`: the listener, plain or under the coordinator's TLS.

mod actions;
mod api;
mod assets;
mod live;
mod principal;
mod sessions;
mod tls;

use std::future::Future;
use std::sync::Arc;

use hotroll_rollouts::registry::Registry;
use hotroll_rollouts::rollouts::Rollouts;
use tokio::net::TcpListener;

pub use principal::{LoginRefused, LoginResult, Role, TokenCheck};
pub use sessions::{SESSION_COOKIE, SESSION_TTL_MS};

/// What the console serves from, and how it is reached.
#[derive(Clone)]
pub struct Console {
    pub rollouts: Arc<Rollouts>,
    pub registry: Arc<Registry>,
    /// Exchanges a login token for a role (the coordinator's token store, throttled).
    pub tokens: Arc<dyn TokenCheck>,
    /// The coordinator's TLS (server certificate only: browsers present none); `None` serves
    /// plain HTTP, and the session cookie is then sent without `Secure`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Shared by every handler.
pub(crate) struct State {
    pub rollouts: Arc<Rollouts>,
    pub registry: Arc<Registry>,
    pub tokens: Arc<dyn TokenCheck>,
    pub sessions: sessions::Sessions,
    pub secure: bool,
    /// Turns true when the console stops: live streams end then (graceful shutdown waits for
    /// every connection, and an event stream would never end on its own).
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

pub(crate) type AppState = Arc<State>;

impl Console {
    fn router(self, stopping: tokio::sync::watch::Receiver<bool>) -> axum::Router {
        use axum::routing::{get, post};
        let state: AppState = Arc::new(State {
            rollouts: self.rollouts,
            registry: self.registry,
            tokens: self.tokens,
            sessions: sessions::Sessions::default(),
            secure: self.tls.is_some(),
            stopping,
        });
        axum::Router::new()
            .route("/", get(assets::index))
            .route("/assets/{name}", get(assets::asset))
            .route("/login", post(sessions::login))
            .route("/logout", post(sessions::logout))
            .route("/api/me", get(sessions::me))
            .route("/api/fleet", get(api::fleet))
            .route("/api/rollouts", get(api::rollouts))
            .route("/api/rollouts/{id}", get(api::rollout))
            .route("/api/rollouts/{id}/events", get(live::events))
            .route("/api/rollouts/{id}/{action}", post(actions::act))
            .layer(axum::middleware::from_fn(assets::security_headers))
            .with_state(state)
    }

    /// Serve the console on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, tls = self.tls.is_some(), "web console listening");
        }
        let tls = self.tls.clone();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let router = self.router(stopping);
        let shutdown = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        match tls {
            Some(config) => {
                let app = router.into_make_service_with_connect_info::<tls::PeerAddr>();
                axum::serve(tls::TlsListener::new(listener, config), app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            None => {
                let app = router.into_make_service_with_connect_info::<tls::PeerAddr>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        }
    }
}
