//! The one place where errors become HTTP answers: a status, a stable code and a
//! message, as `{"code":"invalid_channel","message":"..."}`. Server-side failures
//! are logged here and shown to the client without their details.
//!
//! The codes are part of the contract; ARCHITECTURE.md lists them.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use herald_core::{ChannelError, CursorError, EventNameError, FilterError};
use herald_store::{JobError, StoreError};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Fields beyond code and message, and the wait a refusal asks for:
    /// the guards' answers (`limit`, `retry_after`; `rule`, `reason`).
    /// Boxed: most errors have none, and every `Result` carries this type.
    pub details: Option<Box<Details>>,
}

#[derive(Debug, Clone, Default)]
pub struct Details {
    /// Sent as `Retry-After` (whole seconds, rounded up) and as the body's
    /// `retry_after` (seconds, to the millisecond).
    pub retry_after: Option<std::time::Duration>,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: None }
    }

    /// Adds a field to the JSON body.
    pub fn with_field(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.details.get_or_insert_default().fields.insert(key.to_owned(), value.into());
        self
    }

    /// Asks the client to wait this long before trying again.
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        let d = self.details.get_or_insert_default();
        d.retry_after = Some(wait);
        // Milliseconds, rounded up: never a wait shorter than the real one.
        let ms = wait.as_nanos().div_ceil(1_000_000) as u64;
        d.fields.insert("retry_after".into(), serde_json::json!(ms as f64 / 1000.0));
        self
    }

    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.details.as_ref().and_then(|d| d.retry_after)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route; see the README for the API")
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("payload is larger than {limit} bytes"))
    }

    /// The JSON body, also used by transports that report errors in-band.
    pub fn body(&self) -> String {
        self.json().to_string()
    }

    /// The body as a JSON object: `code`, `message` and any details.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.details {
            for (k, f) in &d.fields {
                v[k] = f.clone();
            }
        }
        v
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, self.body()).into_response();
        let h = res.headers_mut();
        h.insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("static"));
        if let Some(wait) = self.retry_after() {
            let secs = wait.as_nanos().div_ceil(1_000_000_000) as u64;
            h.insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        res
    }
}

impl From<ChannelError> for ApiError {
    fn from(e: ChannelError) -> Self {
        ApiError::bad_request("invalid_channel", e.to_string())
    }
}

impl From<FilterError> for ApiError {
    fn from(e: FilterError) -> Self {
        ApiError::bad_request("invalid_filter", e.to_string())
    }
}

impl From<CursorError> for ApiError {
    fn from(e: CursorError) -> Self {
        ApiError::bad_request("invalid_cursor", e.to_string())
    }
}

impl From<EventNameError> for ApiError {
    fn from(e: EventNameError) -> Self {
        let code = match e {
            EventNameError::Malformed => "invalid_event",
            EventNameError::Reserved(_) => "reserved_event",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

impl From<crate::subscription::SubscriptionError> for ApiError {
    fn from(e: crate::subscription::SubscriptionError) -> Self {
        match e {
            crate::subscription::SubscriptionError::Store(e) => e.into(),
            crate::subscription::SubscriptionError::TooFarBehind => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "slow_consumer",
                "too far behind the channel; resume from your cursor",
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server is shutting down; retry")
            }
            StoreError::Backend(detail) => {
                tracing::error!(%detail, "store failure");
                let e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the message store failed; retry",
                );
                e.with_retry_after(std::time::Duration::from_secs(1))
            }
            StoreError::Unavailable(detail) => {
                // Logged by the store when it starts failing, not per request.
                tracing::debug!(%detail, "store unavailable");
                let e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the message store cannot be reached; nothing was stored for sure: retry with the same \
                     Idempotency-Key to apply it at most once",
                );
                e.with_retry_after(std::time::Duration::from_secs(1))
            }
            StoreError::IdempotencyConflict => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                "this Idempotency-Key was used for a different request in the last 5 minutes",
            ),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Store(e) => e.into(),
            JobError::NotDead(id) => {
                ApiError::new(StatusCode::NOT_FOUND, "job_not_found", format!("there is no dead job {id}"))
            }
            // Another writer got there first; the caller may try again.
            e @ (JobError::Conflict(_) | JobError::Stale(_)) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", format!("{e}; retry"))
            }
        }
    }
}
