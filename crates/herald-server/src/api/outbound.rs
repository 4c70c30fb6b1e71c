//! The outbound HTTP API, for API keys only: a user's contact (never shown
//! to the user's own token), what was sent for a user, and the job queue
//! (listing by state, reviving dead letters).

use axum::{
    Json,
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
};
use herald_store::{Changes, Expect, JobState, RecordWrite, now_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    api::{
        inbox::{admin_only, parse_json, user_id},
        publish::read_body,
    },
    edge::{error::ApiError, query::Query},
    outbound::keys,
    state::SharedState,
};

/// Most bytes of a contact body.
const CONTACT_BODY: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Contact {
    /// `null` removes the address.
    email: Option<String>,
}

/// `PUT /api/users/{user}/contact` `{"email":..}`: sets (or, with `null`,
/// removes) the address fallback mails go to.
pub(crate) async fn put_contact(
    State(state): State<SharedState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    admin_only(&state, &headers, &Query::parse(raw.as_deref()))?;
    let user = user_id(&user)?;
    let c: Contact = parse_json(&read_body(&headers, body, CONTACT_BODY).await?)?;
    if let Some(email) = &c.email {
        email
            .parse::<lettre::Address>()
            .map_err(|e| ApiError::bad_request("invalid_email", format!("'{email}' is not an e-mail address: {e}")))?;
    }
    let value = c.email.as_ref().map(|e| json!({ "email": e }).to_string().into_bytes());
    let write = RecordWrite { key: keys::contact(&user), expect: Expect::Any, value };
    state.outbound.jobs.submit(Changes { jobs: vec![], records: vec![write] }, now_ms()).await?;
    Ok(Json(json!({ "user": user, "email": c.email })))
}

/// `GET /api/users/{user}/contact`.
pub(crate) async fn get_contact(
    State(state): State<SharedState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    admin_only(&state, &headers, &Query::parse(raw.as_deref()))?;
    let user = user_id(&user)?;
    let email = crate::outbound::contact_email(&state.outbound, &user).await?;
    Ok(Json(json!({ "user": user, "email": email })))
}

/// `GET /api/users/{user}/deliveries`: the last deliveries made for the
/// user, newest first (`{"deliveries":[{id,via,time,outcome,error,count,notifications}]}`).
pub(crate) async fn deliveries(
    State(state): State<SharedState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    admin_only(&state, &headers, &Query::parse(raw.as_deref()))?;
    let user = user_id(&user)?;
    let log = match state.outbound.jobs.record(keys::sent(&user)).await? {
        Some(r) => serde_json::from_slice::<Value>(&r.value).unwrap_or_else(|_| json!([])),
        None => json!([]),
    };
    Ok(Json(json!({ "user": user, "deliveries": log })))
}

/// `GET /api/jobs?state=dead&after=ID&limit=K`: jobs in a state (`dead`,
/// `pending` or `running`), by id.
pub(crate) async fn list(
    State(state): State<SharedState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let query = Query::parse(raw.as_deref());
    admin_only(&state, &headers, &query)?;
    let which = query.get("state").unwrap_or("dead");
    let job_state = JobState::parse(which).ok_or_else(|| {
        ApiError::bad_request("invalid_parameter", format!("state '{which}' is not dead, pending or running"))
    })?;
    let after = match query.get("after") {
        Some(a) => a.parse().map_err(|_| ApiError::bad_request("invalid_parameter", "'after' must be a job id"))?,
        None => 0,
    };
    let limit = query.positive("limit", 100)?.min(1000);
    let jobs = state.outbound.jobs.jobs(job_state, after, limit).await?;
    let next = if jobs.len() == limit { jobs.last().map(|j| json!(j.id)) } else { None };
    let jobs: Vec<Value> = jobs.iter().map(|j| state.outbound.describe(j)).collect();
    Ok(Json(json!({ "jobs": jobs, "next": next })))
}

/// `POST /api/jobs/{id}/retry`: a dead job runs again, now, with a fresh
/// retry schedule (and the same delivery id).
pub(crate) async fn retry(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin_only(&state, &headers, &Query::parse(raw.as_deref()))?;
    let id = id.parse().map_err(|_| ApiError::bad_request("invalid_id", format!("'{id}' is not a job id")))?;
    let job = state.outbound.retry(id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job": state.outbound.describe(&job) }))))
}

/// `POST /api/dev/webhook` — open mode only: a receiver for trying the
/// outbound webhooks without a backend of your own (point `[webhooks] url`
/// at it). It checks the Standard Webhooks signature with `[webhooks]
/// secret` and answers 204, or 401 when the signature does not verify; what
/// it received shows in the user's deliveries.
pub(crate) async fn dev_webhook(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    if !state.auth.is_open() {
        return Err(ApiError::not_found());
    }
    let Some(secret) = state.outbound.secret(keys::NOTIFY) else { return Ok(StatusCode::UNAUTHORIZED) };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (id, timestamp, signatures) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let Ok(timestamp) = timestamp.parse::<u64>() else { return Ok(StatusCode::UNAUTHORIZED) };
    let body = read_body(&headers, body, state.config.limits.max_payload.max(1 << 20)).await?;
    let expected = secret.sign(&id, timestamp, &body);
    if signatures.split(' ').any(|s| s == expected) {
        tracing::info!(%id, "dev webhook: a signed event arrived");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Ok(StatusCode::UNAUTHORIZED)
    }
}
