//! One webhook attempt: a signed `POST` of an event (Standard Webhooks, with
//! `webhook.rs`'s signature and client) and what its answer means.
//!
//! 2xx is delivered. `410 Gone` means the receiver wants no more: the caller
//! disables the endpoint. Anything else — another status, a timeout, a
//! refused connection — is worth another attempt, as the specification
//! recommends; a `Retry-After` on 429 and 503 (seconds or an HTTP date) says
//! when.

use std::time::{Duration, SystemTime};

use super::Attempt;
use crate::webhook::Secret;

/// Longest wait a `Retry-After` may ask for; a longer one is cut to it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Sends `body` to `url` as event `id`.
pub(crate) async fn post(client: &reqwest::Client, url: &str, secret: &Secret, id: &str, body: Vec<u8>) -> Attempt {
    let timestamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut req = client.post(url).header("content-type", "application/json");
    for (name, value) in secret.headers(id, timestamp, &body) {
        req = req.header(name, value);
    }
    let res = match req.body(body).send().await {
        Ok(res) => res,
        Err(e) => return Attempt::Again { error: describe(&e), after: None },
    };
    let status = res.status();
    if status.is_success() {
        return Attempt::Sent;
    }
    if status == reqwest::StatusCode::GONE {
        return Attempt::Gone;
    }
    let after = matches!(status.as_u16(), 429 | 503)
        .then(|| res.headers().get("retry-after").and_then(|v| v.to_str().ok()))
        .flatten()
        .and_then(|v| retry_after(v, SystemTime::now()));
    Attempt::Again { error: format!("HTTP {status}"), after }
}

/// The error without the URL's query (reqwest includes the URL, which may
/// carry a token the operator put there).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() || e.status().is_some_and(|s| s.is_redirection()) {
        "redirected (not followed)"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_owned() } else { format!("{kind}: {detail}") }
}

/// A `Retry-After` value: delay-seconds or an HTTP date.
pub(crate) fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value).ok()?.duration_since(now).unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO), "a date passed: now");
        assert_eq!(retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("soon", now), None);
    }
}
