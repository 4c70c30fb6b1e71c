//! Where `/metrics` is served: on the HTTP address, behind an API key when
//! auth is configured (like every operator call), or, with `[metrics] listen`
//! set, on an address of its own without credentials (an address the
//! operator keeps to the scraper) and not on the HTTP address at all.

use axum::{
    Router,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{
    auth::forbidden,
    edge::{error::ApiError, query::Query},
    state::SharedState,
};

/// The Prometheus text format's content type (version 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics` on the HTTP address.
pub(crate) async fn metrics(
    State(state): State<SharedState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    if !state.config.metrics.listen.trim().is_empty() {
        // Served on its own address instead.
        return Err(ApiError::not_found());
    }
    if !state.auth.authenticate(&headers, &Query::parse(raw.as_deref()))?.is_admin() {
        return Err(forbidden("/metrics needs an API key"));
    }
    Ok(render(&state).await)
}

async fn render(state: &SharedState) -> Response {
    let outbound = state.outbound.stats().await;
    let mut res = state.metrics.render(state, &outbound).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Serves `GET /metrics` (and nothing else) on its own listener until shutdown.
pub(crate) async fn serve(listener: TcpListener, state: SharedState) {
    let shutdown = state.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(|State(s): State<SharedState>| async move { render(&s).await }))
        .fallback(|| async { ApiError::not_found() })
        .with_state(state);
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the metrics listener failed");
    }
}
