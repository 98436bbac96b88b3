//! The small HTTP server that serves the coordinator's metrics on `/metrics`
//! (`hotroll serve --metrics-listen ADDR`); the metrics themselves live with the rollouts
//! (`hotroll_rollouts::metrics`), which update them.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use hotroll_rollouts::metrics::*;

use crate::registry::Registry;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
}

async fn scrape(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let connected = state.registry.list().iter().filter(|n| n.connected).count();
    state.metrics.set_connected_agents(connected);
    match state.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening on /metrics");
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(AppState { metrics, registry });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
