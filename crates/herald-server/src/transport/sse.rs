//! Server-Sent Events: `GET /api/channels/{channel}/events` and the
//! multi-channel `GET /api/events?channel=A&channel=B` (filters allowed).
//!
//! Single-channel events carry the plain message id, so `Last-Event-ID: 123`
//! resumes exactly; multi-channel events carry a cursor token naming every
//! channel's position, and their data is the message object (the client needs
//! to know the channel). A stream starts with `retry:`, sends a comment when
//! quiet, and ends on shutdown or when its optional maximum lifetime is up;
//! the browser then reconnects with `Last-Event-ID` and misses nothing.

use std::time::Duration;

use axum::{
    Extension,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;

use herald_core::{Channel, CursorToken, Filter, Gap, Message, Principal, Since, Target, Wire, cursor};

use crate::{
    api::stats::Transport,
    edge::error::ApiError,
    edge::query::Query,
    edge::stream::{self, Encoder, Settings},
    guard::{Client, Permit, Who},
    state::SharedState,
    subscription::{Delivery, Subscription},
};

/// Most channels or filters one multi-channel stream may name.
const MAX_TARGETS: usize = 64;

#[derive(Clone, Copy)]
enum Ids {
    /// The message id itself.
    Plain,
    /// The stream's cursor token.
    Token,
    /// The cursor token, and no `event:` lines (`?envelope=1`): the message
    /// object already names its event. For clients such as herald.js.
    Envelope,
}

pub(crate) async fn single_channel(
    state: SharedState,
    principal: Arc<Principal>,
    channel: Channel,
    headers: &HeaderMap,
    query: &Query,
    client: Client,
    who: Who,
) -> Result<Response, ApiError> {
    // `since` is checked even when `Last-Event-ID` overrides it: a malformed
    // parameter is an error wherever it is.
    let since = query.get("since").map(Since::parse).transpose()?;
    let since = match last_event_id(headers, query)? {
        Some(id) => Since::After(cursor::parse_id(id)?),
        None => since.unwrap_or(Since::After(0)),
    };
    let permit = match state.admit(client, who, true) {
        Ok(p) => p,
        Err(e) => return Ok(refusal(e)),
    };
    let expires_at = principal.expires_at();
    let targets = vec![Target::Channel(channel)];
    let sub = state.subscribe(principal, targets, since, &CursorToken::default(), true).await?;
    Ok(stream(state, sub, Ids::Plain, expires_at, permit))
}

pub(crate) async fn multi_channel(
    State(state): State<SharedState>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let query = Query::parse(raw.as_deref());
    let principal = state.auth.authenticate(&headers, &query)?;
    let who = state.guards.who(&principal, crate::auth::credential(&headers, &query));
    let mut targets = Vec::new();
    for name in query.all("channel") {
        targets.push(Target::from_filter(Filter::parse(name)?));
    }
    if targets.is_empty() {
        return Err(ApiError::bad_request("invalid_request", "name at least one ?channel= (a channel or a filter)"));
    }
    if targets.len() > MAX_TARGETS {
        return Err(ApiError::bad_request("invalid_request", format!("at most {MAX_TARGETS} channels per stream")));
    }
    let token = match last_event_id(&headers, &query)? {
        Some(t) => CursorToken::decode(t)?,
        None => CursorToken::default(),
    };
    let since = query.get("since").map(Since::parse).transpose()?.unwrap_or(Since::After(0));
    let permit = match state.admit(client, who, true) {
        Ok(p) => p,
        Err(e) => return Ok(refusal(e)),
    };
    let expires_at = principal.expires_at();
    let sub = state.subscribe(principal, targets, since, &token, true).await?;
    let ids = if matches!(query.get("envelope"), Some("1" | "true")) { Ids::Envelope } else { Ids::Token };
    Ok(stream(state, sub, ids, expires_at, permit))
}

/// A stream refused for a limit, answered in band: a browser's `EventSource`
/// never retries a non-200 answer, so this is `200` with a `retry:` of the
/// wait, one `event: error` carrying the JSON error, and the end of the
/// stream. The browser comes back after the wait with its `Last-Event-ID`.
/// Any other error (no credential, a bad cursor) is not worth retrying and
/// stays an HTTP status.
pub(crate) fn refusal(e: ApiError) -> Response {
    let Some(wait) = e.retry_after() else { return e.into_response() };
    // Milliseconds, rounded up: the browser never comes back before the wait is over.
    let retry = wait.as_nanos().div_ceil(1_000_000).max(1);
    let mut body = BytesMut::new();
    body.put_slice(format!("retry: {retry}\n\n").as_bytes());
    body.put_slice(b"event: error\n");
    put_data(&mut body, &e.body());
    let mut res = (StatusCode::OK, body.freeze()).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The resume cursor: the `Last-Event-ID` header (what a reconnecting browser
/// sends) wins over `?lastEventId=` (what a first request can carry).
/// The cursor to resume from: the `Last-Event-ID` header, else
/// `?lastEventId=`; empty is absent. A header that is not visible ASCII is
/// refused rather than ignored (found by schemathesis: the stream started
/// over from `since` as if none had come).
fn last_event_id<'a>(headers: &'a HeaderMap, query: &'a Query) -> Result<Option<&'a str>, ApiError> {
    let header = match headers.get("last-event-id").map(|v| v.to_str()) {
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return Err(ApiError::bad_request("invalid_cursor", "Last-Event-ID is not visible ASCII")),
        None => None,
    };
    Ok(header.filter(|v| !v.is_empty()).or_else(|| query.get("lastEventId").filter(|v| !v.is_empty())))
}

fn stream(state: SharedState, sub: Subscription, ids: Ids, expires_at: Option<i64>, permit: Permit) -> Response {
    let cfg = &state.config.sse;
    let settings = Settings {
        transport: Transport::Sse,
        content_type: "text/event-stream",
        heartbeat: cfg.heartbeat,
        lifetime: (!cfg.max_lifetime.is_zero()).then_some(cfg.max_lifetime),
        expires_at,
        permit,
    };
    let encoder = SseEncoder { retry: cfg.retry, ids };
    stream::respond(state, sub, encoder, settings)
}

struct SseEncoder {
    retry: Duration,
    ids: Ids,
}

impl Encoder for SseEncoder {
    fn preamble(&self) -> Bytes {
        Bytes::from(format!("retry: {}\n\n", self.retry.as_millis()))
    }

    fn heartbeat(&self) -> Bytes {
        Bytes::from_static(b": keep-alive\n\n")
    }

    fn encode(&self, d: Delivery, sub: &Subscription, buf: &mut BytesMut) {
        match d {
            Delivery::Message(m) => {
                if let Ids::Plain = self.ids {
                    buf.put(m.encoded(Wire::SseEvent, encode_single));
                    return;
                }
                buf.put_slice(b"id: ");
                buf.put_slice(CursorToken::encode_cursors(sub.cursors().iter()).as_bytes());
                buf.put_u8(b'\n');
                match self.ids {
                    Ids::Envelope => buf.put(m.encoded(Wire::SseData, encode_data_only)),
                    _ => buf.put(m.encoded(Wire::SseBody, encode_envelope)),
                }
            }
            Delivery::Gap(g) => encode_gap(&g, buf),
            Delivery::Unread(n) => {
                buf.put_slice(b"event: unread\n");
                put_data(buf, &format!("{{\"count\":{n}}}"));
            }
        }
    }

    fn close(&self, code: &str, message: &str) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_slice(b"event: close\n");
        put_data(&mut buf, &serde_json::json!({ "code": code, "message": message }).to_string());
        buf.freeze()
    }
}

/// `id:`, `event:` when set, and the payload as `data:` lines.
fn encode_single(m: &Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(m.data.len() + 32);
    buf.put_slice(format!("id: {}\n", m.id).as_bytes());
    put_event_and_data(&mut buf, m, &m.data.as_str());
    buf.freeze()
}

/// The message object as `data:` lines, with no `event:` line, so a browser's
/// `onmessage` sees every message whatever its event name.
fn encode_data_only(m: &Message) -> Bytes {
    let mut buf = BytesMut::new();
    put_data(&mut buf, std::str::from_utf8(&m.json()).expect("JSON is UTF-8"));
    buf.freeze()
}

/// `event:` when set, and the message object as `data:`.
fn encode_envelope(m: &Message) -> Bytes {
    let mut buf = BytesMut::new();
    let json = m.json();
    put_event_and_data(&mut buf, m, std::str::from_utf8(&json).expect("JSON is UTF-8"));
    buf.freeze()
}

fn put_event_and_data(buf: &mut BytesMut, m: &Message, data: &str) {
    if let Some(ev) = &m.event {
        buf.put_slice(b"event: ");
        buf.put_slice(ev.as_str().as_bytes());
        buf.put_u8(b'\n');
    }
    put_data(buf, data);
}

/// One `data:` line per line of the payload (CRLF, CR and LF all end a line,
/// as the EventSource parser reads them), then the blank line ending the event.
fn put_data(buf: &mut BytesMut, data: &str) {
    let mut rest = data;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        buf.put_slice(b"data: ");
        buf.put_slice(&rest.as_bytes()[..end]);
        buf.put_u8(b'\n');
        if end == rest.len() {
            break;
        }
        let skip = if rest[end..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[end + skip..];
    }
    buf.put_u8(b'\n');
}

fn encode_gap(g: &Gap, buf: &mut BytesMut) {
    buf.put_slice(b"event: gap\n");
    put_data(buf, &serde_json::to_string(g).expect("a gap serialises"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> String {
        let mut b = BytesMut::new();
        put_data(&mut b, s);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn payload_lines_become_data_lines() {
        assert_eq!(data("hi"), "data: hi\n\n");
        assert_eq!(data(""), "data: \n\n");
        assert_eq!(data("a\nb\r\nc\rd"), "data: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(data("a\n"), "data: a\ndata: \n\n");
    }
}
