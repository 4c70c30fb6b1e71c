//! The HTTP application: shared state and the route table. Tests build the same
//! router through [`app`].

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use herald_core::{Channel, CursorToken, Hub, Principal, Since, Target};
use herald_store::Store;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Auth, forbidden},
    config::Config,
    error::ApiError,
    health, iframe,
    inbox::Inbox,
    inbox_api, pages, poll, publish,
    query::Query,
    sse, stats,
    subscription::{Context, Subscription},
    ws,
};

/// What every handler shares.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// Cancelled on shutdown; every long-lived response listens to it.
    pub shutdown: CancellationToken,
    /// Set once the store is open and the listener bound.
    pub ready: AtomicBool,
    pub stats: Arc<crate::stats::Stats>,
    pub auth: Auth,
    pub inbox: Arc<Inbox>,
    pub mqtt: Arc<crate::mqtt::Broker>,
}

impl AppState {
    /// Opens a subscription for `principal` after checking it may subscribe to
    /// every target. `live` registers it with the hub (everything but short polls).
    pub(crate) async fn subscribe(
        &self,
        principal: Arc<Principal>,
        targets: Vec<Target>,
        since: Since,
        token: &CursorToken,
        live: bool,
    ) -> Result<Subscription, ApiError> {
        for t in &targets {
            if !principal.may_subscribe(t) {
                let name = match t {
                    Target::Channel(c) => c.to_string(),
                    Target::Filter(f) => f.to_string(),
                };
                return Err(forbidden(format!("not allowed to subscribe to '{name}'")));
            }
        }
        Ok(Subscription::open(self.context(principal, live), targets, since, token).await?)
    }

    pub(crate) fn context(&self, principal: Arc<Principal>, live: bool) -> Context {
        Context {
            store: self.store.clone(),
            hub: live.then(|| self.hub.clone()),
            // Live subscriptions carry the unread count of an inbox they
            // include; a one-shot read has no use for a live count.
            inbox: live.then(|| self.inbox.clone()),
            principal,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutdown.is_cancelled()
    }
}

pub type SharedState = Arc<AppState>;

pub fn app(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/publish", post(publish::publish_envelope))
        .route("/api/events", get(sse::multi_channel))
        .route("/api/stats", get(stats::stats))
        .route("/api/ws", get(ws::not_upgradable))
        .route("/api/notifications", post(inbox_api::notify))
        .route("/api/users/{user}/notifications", get(inbox_api::list))
        .route("/api/users/{user}/unread", get(inbox_api::unread))
        .route("/api/users/{user}/read", post(inbox_api::mark_read))
        .route(
            "/api/groups/{group}/members",
            get(inbox_api::list_members).put(inbox_api::add_members).delete(inbox_api::remove_members),
        )
        .route("/api/dev/token", get(inbox_api::dev_token))
        .route("/mqtt", get(crate::mqtt::not_upgradable))
        .route("/api/channels/{*path}", get(channel_get).post(channel_post))
        .fallback(pages::asset)
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this route"),
            )
        })
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
    match resource {
        "messages" => {
            drop((headers, path));
            let params = poll::Params::parse(&query, &state)?;
            drop(query);
            Box::pin(poll::messages(state, principal, channel, params, &mut Default::default())).await
        }
        "events" => Box::pin(sse::single_channel(state, principal, channel, &headers, &query)).await,
        _ => Box::pin(iframe::stream(state, principal, channel, &query)).await,
    }
}

/// `POST /api/channels/{channel}`: publish; the whole path is the channel.
async fn channel_post(
    State(state): State<SharedState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let Path(path) = path.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    let channel = Channel::parse(&path)?;
    let query = Query::parse(raw.as_deref());
    let principal = state.auth.authenticate(&headers, &query)?;
    publish::publish_body(state, &principal, channel, &headers, &query, body).await.map(IntoResponse::into_response)
}
