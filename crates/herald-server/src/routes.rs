//! The route table: which handler answers which path. Tests build the same
//! router through [`app`].

use axum::{
    Extension, Router,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use herald_core::Channel;

use crate::{
    api::{health, inbox, openapi, outbound, pages, publish, stats},
    edge::{error::ApiError, query::Query},
    guard::Client,
    state::SharedState,
    transport::{iframe, poll, sse, ws},
};

pub fn app(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/publish", post(publish::publish_envelope))
        .route("/api/events", get(sse::multi_channel))
        .route("/api/stats", get(stats::stats))
        .route("/metrics", get(crate::metrics::route::metrics))
        .route("/api/openapi.json", get(openapi::openapi))
        .route("/api/ws", get(ws::not_upgradable))
        .route("/api/notifications", post(inbox::notify))
        .route("/api/users/{user}/notifications", get(inbox::list))
        .route("/api/users/{user}/unread", get(inbox::unread))
        .route("/api/users/{user}/read", post(inbox::mark_read))
        .route(
            "/api/groups/{group}/members",
            get(inbox::list_members).put(inbox::add_members).delete(inbox::remove_members),
        )
        .route("/api/dev/token", get(inbox::dev_token))
        .route("/api/users/{user}/contact", get(outbound::get_contact).put(outbound::put_contact))
        .route("/api/users/{user}/deliveries", get(outbound::deliveries))
        .route("/api/jobs", get(outbound::list))
        .route("/api/jobs/{id}/retry", post(outbound::retry))
        .route("/api/dev/webhook", post(outbound::dev_webhook))
        .route("/mqtt", get(crate::transport::mqtt::not_upgradable))
        .route("/api/channels/{*path}", get(channel_get).post(channel_post))
        .fallback(pages::asset)
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this route"),
            )
        })
        // Inside CORS, so a refusal carries the CORS headers a page needs to read it.
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::guard::http::limit_requests))
        .layer(cors(&state.config.server.cors_origins))
        .with_state(state)
}

/// Browsers on other origins may call the API (tokens travel in headers or the
/// query, never in cookies, so allowing an origin grants it nothing by itself).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new().allow_origin(allow).allow_methods([Method::GET, Method::POST]).allow_headers([
        axum::http::header::CONTENT_TYPE,
        axum::http::header::AUTHORIZATION,
        axum::http::HeaderName::from_static("last-event-id"),
    ])
}

/// `GET /api/channels/{channel}/{resource}`: the last segment names the
/// transport, everything before it the channel.
async fn channel_get(
    State(state): State<SharedState>,
    Extension(client): Extension<Client>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let Path(path) = path.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    let (channel, resource) = path.rsplit_once('/').ok_or_else(ApiError::not_found)?;
    let query = Query::parse(raw.as_deref());
    // Parsed: the raw string is not kept while a long poll or stream waits.
    drop(raw);
    if !matches!(resource, "messages" | "events" | "iframe") {
        return Err(ApiError::not_found());
    }
    let channel = Channel::parse(channel)?;
    let principal = state.auth.authenticate(&headers, &query)?;
    // Each branch boxed: this future is what a long poll holds while it waits,
    // and inline it would be as big as the biggest branch. The headers, the
    // path and the query are freed before a long poll starts waiting.
    let who = state.guards.who(&principal, crate::auth::credential(&headers, &query));
    match resource {
        "messages" => {
            drop((headers, path));
            let params = poll::Params::parse(&query, &state)?;
            drop(query);
            let permit = params.admit(&state, client, who)?;
            Box::pin(poll::messages(state, principal, channel, params, permit, &mut Default::default())).await
        }
        "events" => Box::pin(sse::single_channel(state, principal, channel, &headers, &query, client, who)).await,
        _ => Box::pin(iframe::stream(state, principal, channel, &query, client, who)).await,
    }
}

/// `POST /api/channels/{channel}`: publish; the whole path is the channel.
async fn channel_post(
    State(state): State<SharedState>,
    Extension(client): Extension<Client>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let Path(path) = path.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    let channel = Channel::parse(&path)?;
    let query = Query::parse(raw.as_deref());
    let principal = state.auth.authenticate(&headers, &query)?;
    let who = state.guards.who(&principal, crate::auth::credential(&headers, &query));
    publish::publish_body(state, &principal, (client, who), channel, &headers, &query, body)
        .await
        .map(IntoResponse::into_response)
}
