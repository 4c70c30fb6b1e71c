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
    /// Seconds for a `Retry-After` header (503 while the store is away).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
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
        serde_json::json!({ "code": self.code, "message": self.message }).to_string()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, self.body()).into_response();
        res.headers_mut().insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("static"));
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server is shutting down; retry")
            }
            StoreError::Backend(detail) => {
                tracing::error!(%detail, "store failure");
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the message store failed; retry",
                );
                e.retry_after = Some(1);
                e
            }
            StoreError::Unavailable(detail) => {
                // Logged by the store when it starts failing, not per request.
                tracing::debug!(%detail, "store unavailable");
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the message store cannot be reached; nothing was stored for sure: retry with the same \
                     Idempotency-Key to apply it at most once",
                );
                e.retry_after = Some(1);
                e
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
