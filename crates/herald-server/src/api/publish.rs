//! Publishing over HTTP: `POST /api/channels/{channel}` (the body is the data)
//! and `POST /api/publish` (a JSON envelope, one channel or several). Both answer
//! only once the message is committed.

use axum::{
    Extension, Json,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use herald_core::{Channel, Data, EventName, NewMessage, Principal};
use herald_store::{Idempotency, Receipt};
use serde::Deserialize;
use serde_json::{json, value::RawValue};

use crate::{
    api::stats::Source,
    auth::forbidden,
    edge::error::ApiError,
    edge::query::Query,
    guard::{Client, Publish, Who},
    state::SharedState,
};

/// Who publishes and over what, for the guards: publish limits are checked
/// by the caller (per request over HTTP, per connection on WebSocket), and
/// [`append`] moderates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    /// Published with an API key (a backend): moderated only when
    /// `[moderation] api_keys` says so.
    pub(crate) api_key: bool,
    /// `http`, `ws` or `mqtt`, as the moderation webhook is told.
    pub(crate) transport: &'static str,
}

/// Room for the envelope's own fields around a maximal payload.
const ENVELOPE_OVERHEAD: usize = 16 * 1024;

pub(crate) async fn publish_body(
    state: SharedState,
    principal: &Principal,
    (client, who): (Client, Who),
    channel: Channel,
    headers: &HeaderMap,
    query: &Query,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.guards.check_publish(client, who, None).map_err(|l| state.guards.publish_error(l))?;
    let limit = state.config.limits.max_payload;
    let event = query.get("event").map(EventName::parse).transpose()?;
    let bytes = read_body(headers, body, limit).await?;
    let data = if is_json(headers) {
        Data::json(bytes).map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?
    } else {
        Data::text_bytes(bytes).map_err(|_| {
            ApiError::bad_request(
                "invalid_text",
                "body is not UTF-8 text; send JSON with Content-Type: application/json",
            )
        })?
    };
    let origin = Origin { api_key: matches!(who, Who::ApiKey(_)), transport: "http" };
    let key = idempotency_key(headers)?;
    let ids = append(&state, principal, origin, vec![channel], event, data, key).await?;
    state.stats.published(Source::Http, 1);
    Ok(Json(ids.into_iter().next().expect("one channel, one id")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    channel: Option<String>,
    channels: Option<Vec<String>>,
    event: Option<String>,
    data: Option<Box<RawValue>>,
}

pub(crate) async fn publish_envelope(
    State(state): State<SharedState>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    match envelope(state, client, &headers, &Query::parse(raw.as_deref()), body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn envelope(
    state: SharedState,
    client: Client,
    headers: &HeaderMap,
    query: &Query,
    body: Body,
) -> Result<serde_json::Value, ApiError> {
    let principal = state.auth.authenticate(headers, query)?;
    let who = state.guards.who(&principal, crate::auth::credential(headers, query));
    state.guards.check_publish(client, who, None).map_err(|l| state.guards.publish_error(l))?;
    let limit = state.config.limits.max_payload;
    let bytes = read_body(headers, body, limit + ENVELOPE_OVERHEAD).await?;
    let env: Envelope = serde_json::from_slice(&bytes).map_err(|e| {
        let code = if e.is_data() { "invalid_request" } else { "invalid_json" };
        ApiError::bad_request(code, format!("publish body: {e}"))
    })?;
    let names = match (env.channel, env.channels) {
        (Some(c), None) => vec![c],
        (None, Some(cs)) if !cs.is_empty() => cs,
        (None, Some(_)) => return Err(ApiError::bad_request("invalid_request", "'channels' is empty")),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("invalid_request", "give either 'channel' or 'channels', not both"));
        }
        (None, None) => return Err(ApiError::bad_request("invalid_request", "'channel' or 'channels' is required")),
    };
    let max = state.config.limits.publish_channels;
    if names.len() > max {
        return Err(ApiError::bad_request("too_many_channels", format!("at most {max} channels per publish")));
    }
    let channels = names.iter().map(|n| Channel::parse(n)).collect::<Result<Vec<_>, _>>()?;
    let event = env.event.as_deref().map(EventName::parse).transpose()?;
    let raw = env.data.ok_or_else(|| ApiError::bad_request("invalid_request", "'data' is required"))?;
    let raw = raw.get();
    if raw.len() > limit {
        return Err(ApiError::payload_too_large(limit));
    }
    let data = data_from_json(raw);
    let single = channels.len() == 1;
    let origin = Origin { api_key: matches!(who, Who::ApiKey(_)), transport: "http" };
    let key = idempotency_key(headers)?;
    let mut results = append(&state, &principal, origin, channels, event, data, key).await?;
    state.stats.published(Source::Http, results.len() as u64);
    Ok(if single { results.remove(0) } else { json!({ "results": results }) })
}

/// The payload of a JSON envelope (`/api/publish`, WebSocket `publish`). A JSON
/// string is text: on SSE it arrives as the text itself, and in every JSON form
/// it is the same string again.
pub(crate) fn data_from_json(raw: &str) -> Data {
    if raw.starts_with('"') {
        Data::text(serde_json::from_str::<String>(raw).expect("a RawValue string is a valid string"))
    } else {
        Data::json(Bytes::copy_from_slice(raw.as_bytes())).expect("a RawValue is valid JSON")
    }
}

/// The request's `Idempotency-Key`, if it has one: 1 to 255 visible ASCII
/// characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(k.to_owned())),
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// Stores one message per channel, atomically, and answers each
/// `{channel,id}`. With an idempotency key, a repeat within 5 minutes (by
/// the same sender: keys are kept per API key holder and per user) is
/// answered with the first answer and stores nothing. Each channel's copy is
/// moderated first (the rule covering that channel, then the webhook): one
/// refusal refuses the whole publish, and nothing of it is stored.
pub(crate) async fn append(
    state: &SharedState,
    principal: &Principal,
    origin: Origin,
    channels: Vec<Channel>,
    event: Option<EventName>,
    data: Data,
    idempotency_key: Option<String>,
) -> Result<Vec<serde_json::Value>, ApiError> {
    if let Some(c) = channels.iter().find(|c| c.is_reserved()) {
        return Err(ApiError::bad_request("reserved_channel", format!("'{c}' is reserved for the server ($ prefix)")));
    }
    if let Some(c) = channels.iter().find(|c| !principal.may_publish(c)) {
        let why = if c.inbox_owner().is_some() {
            "only API keys write to inboxes"
        } else {
            "the token's publish patterns do not cover it"
        };
        return Err(forbidden(format!("not allowed to publish to '{c}': {why}")));
    }
    let mut batch = Vec::with_capacity(channels.len());
    for channel in channels {
        let p = Publish {
            channel: &channel,
            event: event.as_ref(),
            user: principal.user(),
            api_key: origin.api_key,
            transport: origin.transport,
        };
        let data = state.guards.moderate(&p, data.clone()).await.map_err(|r| r.api_error())?;
        batch.push(NewMessage { channel, event: event.clone(), data, meta: None });
    }
    let receipt = store_batch(state, principal, batch, idempotency_key).await?;
    Ok(receipt.iter().map(|(channel, id)| json!({ "channel": channel, "id": id })).collect())
}

/// Stores a batch, at most once per idempotency key when there is one.
pub(crate) async fn store_batch(
    state: &SharedState,
    principal: &Principal,
    batch: Vec<NewMessage>,
    idempotency_key: Option<String>,
) -> Result<Receipt, ApiError> {
    Ok(match idempotency_key {
        Some(key) => {
            let scope = match principal {
                Principal::Admin => "key".to_owned(),
                Principal::User(grant) => format!("user/{}", grant.sub),
            };
            let fingerprint = herald_store::fingerprint(&batch);
            state.store.append_once(Idempotency { key: format!("{scope}:{key}"), fingerprint }, batch).await?
        }
        None => state.store.append(batch).await?.iter().map(|m| (m.channel.clone(), m.id)).collect(),
    })
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || mime.ends_with("+json")
}

/// Reads a body of at most `limit` bytes; larger ones are refused with 413,
/// before reading when `Content-Length` already says so.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        let too_large = inner.is::<http_body_util::LengthLimitError>()
            || inner.source().is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("could not read the request body: {inner}"))
        }
    })
}
