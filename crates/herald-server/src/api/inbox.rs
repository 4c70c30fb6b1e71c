//! The inbox HTTP API: sending notifications, reading and marking a user's
//! inbox, managing group membership, and (open mode only) minting dev tokens.
//!
//! Group membership is managed by API only, not by token claims: the server
//! must know a user's groups when the user is offline, to count their unread
//! notifications (and, later, to fall back to email for them).

use std::time::Duration;

use axum::{
    Json,
    body::Body,
    extract::{Path, RawQuery, State},
    http::HeaderMap,
};
use herald_core::{
    Channel, EventName, NewMessage,
    channel::validate_segment,
    inbox::{self, NOTIFICATION_EVENT},
};
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};

use crate::{
    api::publish::read_body,
    api::stats::{Audience, Source},
    auth::forbidden,
    edge::error::ApiError,
    edge::query::Query,
    inbox::Mark,
    state::SharedState,
};

/// Most users one call may name (a notification, or a membership change).
const MAX_USERS: usize = 100_000;
/// Membership lists of 100,000 ids need more room than a message payload.
const BULK_BODY: usize = 16 * 1024 * 1024;

pub(crate) fn admin_only(state: &SharedState, headers: &HeaderMap, query: &Query) -> Result<(), ApiError> {
    if state.auth.authenticate(headers, query)?.is_admin() {
        Ok(())
    } else {
        Err(forbidden("this call needs an API key"))
    }
}

/// A user id: one channel segment, short enough that `user/{id}` is a channel.
pub(crate) fn user_id(s: &str) -> Result<String, ApiError> {
    validate_segment(s).map_err(|e| ApiError::bad_request("invalid_user", format!("user '{s}': {e}")))?;
    if inbox::user_channel(s).is_none() {
        return Err(ApiError::bad_request("invalid_user", "user id is too long"));
    }
    Ok(s.to_owned())
}

/// A group id: one channel segment, short enough that `$group/{id}` is a channel.
fn group_id(s: &str) -> Result<String, ApiError> {
    validate_segment(s).map_err(|e| ApiError::bad_request("invalid_group", format!("group '{s}': {e}")))?;
    if inbox::group_channel(s).is_none() {
        return Err(ApiError::bad_request("invalid_group", "group id is too long"));
    }
    Ok(s.to_owned())
}

pub(crate) fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() { "invalid_request" } else { "invalid_json" };
        ApiError::bad_request(code, e.to_string())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Notification {
    users: Option<Vec<String>>,
    group: Option<String>,
    all: Option<bool>,
    title: String,
    body: Option<String>,
    data: Option<Box<RawValue>>,
    /// `false`, or `{"delay":"5m","channels":["email"]}`: this
    /// notification's unread fallback (`outbound/fallback.rs`).
    fallback: Option<Value>,
}

/// `POST /api/notifications`: one message per named user, or one message in
/// the group's or everyone's channel that members' inboxes read through.
pub(crate) async fn notify(
    State(state): State<SharedState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    admin_only(&state, &headers, &Query::parse(raw.as_deref()))?;
    let limit = state.config.limits.max_payload;
    let n: Notification = parse_json(&read_body(&headers, body, BULK_BODY).await?)?;
    let audience = match (&n.users, &n.group) {
        (Some(_), _) => Audience::Users,
        (None, Some(_)) => Audience::Group,
        (None, None) => Audience::All,
    };
    let channels = match (n.users, n.group, n.all) {
        (Some(users), None, None | Some(false)) if !users.is_empty() && users.len() <= MAX_USERS => users
            .iter()
            .map(|u| user_id(u).map(|u| inbox::user_channel(&u).expect("a valid segment makes a valid channel")))
            .collect::<Result<Vec<_>, _>>()?,
        (None, Some(g), None | Some(false)) => vec![inbox::group_channel(&group_id(&g)?).expect("valid segment")],
        (None, None, Some(true)) => vec![inbox::all_channel()],
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("name exactly one audience: \"users\" (1 to {MAX_USERS}), \"group\", or \"all\": true"),
            ));
        }
    };
    let mut payload = json!({ "title": n.title });
    if let Some(b) = n.body {
        payload["body"] = b.into();
    }
    if let Some(d) = n.data {
        payload["data"] = serde_json::from_str(d.get()).expect("RawValue is JSON");
    }
    if let Some(f) = &n.fallback {
        payload["fallback"] =
            crate::outbound::Spec::request(f).map_err(|e| ApiError::bad_request("invalid_request", e))?;
    }
    let payload = bytes::Bytes::from(payload.to_string());
    if payload.len() > limit {
        return Err(ApiError::payload_too_large(limit));
    }
    let data = herald_core::Data::json(payload).expect("serialised JSON");
    let event = EventName::from_trusted(NOTIFICATION_EVENT);
    let batch: Vec<NewMessage> = channels
        .into_iter()
        .map(|channel| NewMessage { channel, event: Some(event.clone()), data: data.clone(), meta: None })
        .collect();
    let key = crate::api::publish::idempotency_key(&headers)?;
    let stored = crate::api::publish::store_batch(&state, &herald_core::Principal::Admin, batch, key).await?;
    state.stats.published(Source::Notification, stored.len() as u64);
    state.stats.notified(audience, stored.len() as u64);
    let results: Vec<Value> = stored.iter().map(|(channel, id)| json!({ "channel": channel, "id": id })).collect();
    Ok(Json(if results.len() == 1 { results[0].clone() } else { json!({ "results": results }) }))
}

fn check_inbox_access(state: &SharedState, headers: &HeaderMap, query: &Query, user: &str) -> Result<(), ApiError> {
    let principal = state.auth.authenticate(headers, query)?;
    if principal.may_access_inbox(user) { Ok(()) } else { Err(forbidden("a token may only access its own inbox")) }
}

/// `GET /api/users/{user}/unread`: `{"count":N}`.
pub(crate) async fn unread(
    State(state): State<SharedState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let user = user_id(&user)?;
    check_inbox_access(&state, &headers, &Query::parse(raw.as_deref()), &user)?;
    Ok(Json(json!({ "count": state.inbox.count(&user).await? })))
}

/// `GET /api/users/{user}/notifications?unread=true&limit=K&before=CURSOR`.
pub(crate) async fn list(
    State(state): State<SharedState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let user = user_id(&user)?;
    let query = Query::parse(raw.as_deref());
    check_inbox_access(&state, &headers, &query, &user)?;
    let unread_only = matches!(query.get("unread"), Some("true" | "1"));
    let limit = query.positive("limit", 20)?.min(state.config.limits.poll_limit);
    let before = query.get("before").map(parse_position).transpose()?;
    let items = state.inbox.list(&user).await?;
    let mut unread = 0;
    let mut out = Vec::new();
    let mut next = Value::Null;
    let mut last_included = None;
    for (m, read) in &items {
        unread += u64::from(!read);
        if (unread_only && *read) || before.as_ref().is_some_and(|b| !comes_after(b, m)) {
            continue;
        }
        if out.len() == limit {
            // More follow: the next page starts after the last item of this one.
            if let Some((time, id)) = last_included.take() {
                next = format!("{time}:{id}").into();
            }
            continue;
        }
        last_included = Some((m.time, inbox::notification_id(&m.channel, m.id)));
        out.push(item(m, *read));
    }
    Ok(Json(json!({ "notifications": out, "unread": unread, "next": next })))
}

/// A listing position: `{time}:{notification id}`.
fn parse_position(s: &str) -> Result<(i64, Channel, u64), ApiError> {
    let bad = || {
        ApiError::bad_request("invalid_cursor", format!("'before' must be a 'next' value from a listing, got '{s}'"))
    };
    let (time, id) = s.split_once(':').ok_or_else(bad)?;
    let (channel, id) = inbox::parse_notification_id(id).ok_or_else(bad)?;
    Ok((time.parse().map_err(|_| bad())?, channel, id))
}

/// Whether a message comes after the `before` position in the listing order
/// (newest first, then channel, then id descending).
fn comes_after(before: &(i64, Channel, u64), m: &herald_core::Message) -> bool {
    let (t, c, id) = before;
    m.time < *t || (m.time == *t && (m.channel > *c || (m.channel == *c && m.id < *id)))
}

fn item(m: &herald_core::Message, read: bool) -> Value {
    let mut v = notification(m);
    v["read"] = read.into();
    v
}

/// A notification as the API shows it (also in outbound events and mails):
/// `{id,channel,title,body,data,time}`.
pub(crate) fn notification(m: &herald_core::Message) -> Value {
    let data = serde_json::from_slice::<Value>(&m.json()).expect("message JSON")["data"].take();
    let (title, body, payload) = match (&m.event, data) {
        (Some(e), Value::Object(mut o)) if e.as_str() == NOTIFICATION_EVENT => (
            o.remove("title").unwrap_or(Value::Null),
            o.remove("body").unwrap_or(Value::Null),
            o.remove("data").unwrap_or(Value::Null),
        ),
        (_, other) => (Value::Null, Value::Null, other),
    };
    json!({
        "id": inbox::notification_id(&m.channel, m.id),
        "channel": m.channel,
        "title": title,
        "body": body,
        "data": payload,
        "time": herald_core::time::rfc3339_ms(m.time),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadRequest {
    ids: Option<Vec<String>>,
    all: Option<bool>,
}

/// `POST /api/users/{user}/read`: `{"ids":[..]}` or `{"all":true}`; answers the new count.
pub(crate) async fn mark_read(
    State(state): State<SharedState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let user = user_id(&user)?;
    check_inbox_access(&state, &headers, &Query::parse(raw.as_deref()), &user)?;
    let req: ReadRequest = parse_json(&read_body(&headers, body, BULK_BODY).await?)?;
    let mark = match (req.ids, req.all) {
        (Some(ids), None | Some(false)) => Mark::Ids(
            ids.iter()
                .map(|id| {
                    inbox::parse_notification_id(id).ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_id",
                            format!("'{id}' is not a notification id from the inbox listing"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        (None, Some(true)) => Mark::All,
        _ => return Err(ApiError::bad_request("invalid_request", "send {\"ids\":[..]} or {\"all\":true}")),
    };
    let count = state.inbox.mark(&user, mark).await?;
    state.stats.read_mark();
    Ok(Json(json!({ "count": count })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Members {
    users: Vec<String>,
}

/// `PUT /api/groups/{group}/members` `{"users":[..]}`: adds members.
pub(crate) async fn add_members(
    State(state): State<SharedState>,
    Path(group): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (group, users) = membership_request(&state, &group, &headers, raw.as_deref(), body).await?;
    Ok(Json(json!({ "added": state.inbox.add_members(&group, users).await? })))
}

/// `DELETE /api/groups/{group}/members` `{"users":[..]}`: removes members.
pub(crate) async fn remove_members(
    State(state): State<SharedState>,
    Path(group): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (group, users) = membership_request(&state, &group, &headers, raw.as_deref(), body).await?;
    Ok(Json(json!({ "removed": state.inbox.remove_members(&group, users).await? })))
}

/// The checks both membership changes share: an API key, a valid group, and
/// a body naming valid users.
async fn membership_request(
    state: &SharedState,
    group: &str,
    headers: &HeaderMap,
    raw: Option<&str>,
    body: Body,
) -> Result<(String, Vec<String>), ApiError> {
    admin_only(state, headers, &Query::parse(raw))?;
    let group = group_id(group)?;
    let m: Members = parse_json(&read_body(headers, body, BULK_BODY).await?)?;
    if m.users.len() > MAX_USERS {
        return Err(ApiError::bad_request("invalid_request", format!("at most {MAX_USERS} users per call")));
    }
    let users = m.users.iter().map(|u| user_id(u)).collect::<Result<_, _>>()?;
    Ok((group, users))
}

/// `GET /api/groups/{group}/members?after=NAME&limit=K`.
pub(crate) async fn list_members(
    State(state): State<SharedState>,
    Path(group): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let query = Query::parse(raw.as_deref());
    admin_only(&state, &headers, &query)?;
    let group = group_id(&group)?;
    let limit = query.positive("limit", 1000)?.min(10_000);
    let members = state.inbox.members(&group, query.get("after").unwrap_or(""), limit).await?;
    let next = if members.len() == limit { members.last().cloned().map(Value::from) } else { None };
    Ok(Json(json!({ "members": members, "next": next })))
}

/// `GET /api/dev/token?sub=USER&channels=P,..&publish=P,..&ttl=1h` — open mode
/// only: a user token signed with the per-process secret, for the demos.
pub(crate) async fn dev_token(
    State(state): State<SharedState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    if !state.auth.is_open() {
        return Err(ApiError::not_found());
    }
    let query = Query::parse(raw.as_deref());
    let sub = user_id(query.get("sub").ok_or_else(|| ApiError::bad_request("invalid_user", "'sub' is required"))?)?;
    let list = |k: &str| -> Vec<String> {
        query.get(k).unwrap_or("#").split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    };
    let ttl = match query.get("ttl") {
        Some(t) => crate::config::parse_duration(t).map_err(|e| ApiError::bad_request("invalid_parameter", e))?,
        None => Duration::from_secs(3600),
    };
    let token = state.auth.mint(&sub, &list("channels"), &list("publish"), ttl)?;
    Ok(Json(json!({ "token": token, "sub": sub, "expires_in": ttl.as_secs() })))
}
