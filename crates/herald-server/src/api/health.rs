//! Liveness and readiness, for scripts, tests and orchestrators.

use axum::{Json, extract::State, http::StatusCode};
use serde_json::{Value, json};

use crate::state::SharedState;

/// Alive: the process answers HTTP.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready: the store is open and can take writes (over Redis: every Redis
/// answers and every feed is up), the listeners are bound, and it is not
/// shutting down.
pub(crate) async fn readyz(State(state): State<SharedState>) -> (StatusCode, Json<Value>) {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        let why = if state.store.status().available { "starting or stopping" } else { "store unavailable" };
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": why })))
    }
}
