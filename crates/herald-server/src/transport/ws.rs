//! WebSocket at `/api/ws`: many channels over one connection, JSON text frames
//! (DESIGN.md, "WebSocket protocol").
//!
//! One task per connection drives one [`Subscription`] whose targets change with
//! `subscribe` / `unsubscribe`. Everything already queued is written before one
//! flush. A bad frame is answered with an `error` frame and the connection stays
//! usable; a client that keeps sending bad frames is closed with a reason. The
//! server pings, and closes connections that stay silent for two ping intervals.
//!
//! The guards: the handshake is a request (rate limited) and the connection
//! is admitted (connection limits) before `101`, a refusal being a plain
//! HTTP answer; a publish over the connection's or the user's rate gets an
//! `error` frame with its `ref` and the wait (the socket stays open), and a
//! sustained flood a close `4029`; a write that stalls for `[limits]
//! write_timeout` closes with `4008 slow_consumer` (if the close frame can
//! still get out), as does a subscription past `[limits] max_lag`.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use herald_core::{CursorToken, EventName, Filter, Message, Principal, Since, Target, Wire};
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};

use crate::{
    api::publish,
    api::stats::{CloseReason, ConnectionGuard, Transport},
    auth::forbidden,
    edge::coalesce::Coalescer,
    edge::error::ApiError,
    edge::query::Query,
    edge::stream,
    edge::websocket::{Handshake, Incoming, Refusal, WebSocket, WsError, switching_protocols},
    guard::{Client, ConnGuard, Who},
    metrics::WriteLatency,
    state::SharedState,
    subscription::{Delivery, Subscription},
};

/// Room for the frame's own fields around a maximal payload.
const FRAME_OVERHEAD: usize = 16 * 1024;
/// Bad frames tolerated per minute before the connection is closed.
const MAX_BAD_FRAMES: u32 = 20;

/// Which protocol a WebSocket handshake asks for, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/api/ws`: Herald's JSON protocol, served here.
    Herald,
    /// `/mqtt`: MQTT over WebSocket, served by `mqtt`.
    Mqtt,
}

/// A WebSocket request as the front door read it.
pub(crate) struct Request {
    pub endpoint: Endpoint,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub handshake: Handshake,
    /// Who is asking, as the front door resolved it.
    pub client: Client,
}

/// What a WebSocket connection starts from: the socket, the request, and any
/// bytes the client sent after the request head.
pub(crate) struct Opening {
    pub tcp: TcpStream,
    pub state: SharedState,
    pub request: Box<Request>,
    pub early: Bytes,
}

/// Serves `/api/ws` on a connection the front door hands over, as a task of
/// its own. What it starts from comes in one box, emptied by `open`: the
/// task keeps only the pointer's room for its life.
pub(crate) async fn serve(opening: Box<Opening>) {
    let Some(mut s) = Box::pin(open(opening)).await else { return };
    let end = s.run().await;
    s.connection.end(end.reason());
    Box::pin(close(s, end)).await;
}

/// Checks the handshake and the credential, then switches protocols. A refused
/// client gets a plain HTTP answer with a JSON body saying why, rather than a
/// socket that closes at once.
async fn open(opening: Box<Opening>) -> Option<Session> {
    // Unboxed here, so the box is freed with this future, not kept by the task.
    let Opening { mut tcp, state, request, early } = *opening;
    let opened = async {
        // Credentials first, as on every route: a bad token is a 401 whatever
        // else is wrong with the request.
        let query = Query::parse(request.query.as_deref());
        let credential = crate::auth::bearer(request.authorization.as_deref(), &query);
        let principal = state.auth.authenticate_bearer(request.authorization.as_deref(), &query);
        // The handshake is a request like any other (and a failing
        // credential's is the address's).
        let who = match &principal {
            Ok(p) => state.guards.who(p, credential),
            Err(_) => Who::Anonymous,
        };
        let client = request.client;
        state.guards.check_request(client, who).map_err(IntoResponse::into_response)?;
        let principal = principal.map_err(IntoResponse::into_response)?;
        let accept = request.handshake.accept().map_err(refused)?;
        let permit = state.admit(client, who, true).map_err(IntoResponse::into_response)?;
        let cx = state.context(principal.clone(), true);
        let sub = Subscription::open(cx, Vec::new(), Since::Now, &CursorToken::default())
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        Ok::<_, Response>((accept, principal, sub, state.guards.connection_guard(permit, client, who)))
    };
    let (accept, principal, sub, guard) = match opened.await {
        Ok(v) => v,
        Err(res) => {
            let _ = crate::edge::front::write_whole(&mut tcp, res, &state).await;
            return None;
        }
    };
    tcp.write_all(&switching_protocols(&accept, None)).await.ok()?;
    let limit = state.config.limits.max_payload + FRAME_OVERHEAD;
    Some(Session {
        connection: state.stats.connect(Transport::Ws),
        state,
        principal,
        socket: WebSocket::new(tcp, &early, limit),
        sub,
        subscriptions: 0,
        bad_frames: 0,
        bad_window: Instant::now(),
        coalesce: Coalescer::default(),
        guard,
    })
}

/// `/api/ws` through the router: the front door serves WebSocket handshakes
/// that are plain HTTP/1.1 GETs; anything else that reaches here (HTTP/1.0, a
/// head over 16 KiB) cannot be one.
pub(crate) async fn not_upgradable(
    State(state): State<SharedState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    state.auth.authenticate(&headers, &Query::parse(raw.as_deref()))?;
    Err(not_a_handshake("it must be an HTTP/1.1 GET with a head under 16 KiB"))
}

/// The answer to a request on a WebSocket endpoint that is not a handshake.
pub(crate) fn not_a_handshake(why: &str) -> ApiError {
    ApiError::bad_request("websocket_expected", format!("not a WebSocket handshake: {why}"))
}

/// The answer to a refused handshake: `400`, or for another protocol version
/// `426` naming the one spoken here (RFC 6455 section 4.4).
pub(crate) fn refused(refusal: Refusal) -> Response {
    let mut res = not_a_handshake(refusal.why()).into_response();
    if refusal == Refusal::Version {
        *res.status_mut() = StatusCode::UPGRADE_REQUIRED;
        res.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
    }
    res
}

/// Every client frame, flat: the `type` decides which fields are required.
/// (Not a tagged enum: serde cannot buffer the raw `data` through one.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    channel: Option<String>,
    since: Option<SinceValue>,
    event: Option<String>,
    data: Option<Box<RawValue>>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SinceValue {
    Id(u64),
    Text(String),
}

/// Why the session ended, and what to tell the client.
enum End {
    Gone,
    /// The server closes, with a code and reason.
    Close(u16, String),
    /// The client closed with this code: answer with it.
    Reply(u16),
}

impl End {
    /// The reason counted and logged for the connection's end.
    fn reason(&self) -> CloseReason {
        match self {
            End::Gone | End::Reply(_) => CloseReason::Client,
            End::Close(1012, _) => CloseReason::Shutdown,
            End::Close(4001, _) => CloseReason::TokenExpired,
            End::Close(1011, _) => CloseReason::StoreError,
            End::Close(1001, _) => CloseReason::Timeout,
            End::Close(1008 | 4029, _) => CloseReason::Limit,
            End::Close(4008, _) => CloseReason::SlowConsumer,
            End::Close(..) => CloseReason::ProtocolError,
        }
    }
}

/// How long a server-initiated close waits for the client's close frame
/// (and, from a client that stopped reading, for room to send ours).
const CLOSE_PATIENCE: Duration = Duration::from_secs(2);

/// Close codes of the guards.
const SLOW_CONSUMER: u16 = 4008;
const FLOOD: u16 = 4029;

struct Session {
    /// Counts the connection open until the session ends (after the close).
    connection: ConnectionGuard,
    state: SharedState,
    principal: Arc<Principal>,
    socket: WebSocket,
    sub: Subscription,
    /// At most `[ws] max_subscriptions`.
    subscriptions: u32,
    bad_frames: u32,
    bad_window: Instant,
    coalesce: Coalescer,
    /// Its place in the connection counts and its publishes' rate.
    guard: ConnGuard,
}

/// Says goodbye: with a reason when the server ends it (then waits for the
/// client's answer, so the close frame is not lost to a reset), with the
/// client's code when the client did. Bounded: a client that stopped
/// reading gets the close frame only if there is room for it.
async fn close(mut s: Session, end: End) {
    match end {
        End::Close(code, reason) => {
            if tokio::time::timeout(CLOSE_PATIENCE, s.socket.close(code, &reason)).await.is_ok() {
                s.socket.await_close(CLOSE_PATIENCE).await;
            }
        }
        End::Reply(code) => {
            let _ = tokio::time::timeout(CLOSE_PATIENCE, s.socket.close(code, "")).await;
        }
        End::Gone => {}
    }
}

/// What woke a connection's task.
enum Event {
    Frame(Option<Result<Incoming, WsError>>),
    Delivery(Delivery),
    Ping,
}

impl Session {
    async fn run(&mut self) -> End {
        let every = self.state.config.ws.ping;
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        let mut last_heard = Instant::now();
        let shutdown = self.state.shutdown.clone();
        // Boxed, and only when the token expires: a timer is a hundred bytes
        // of every idle connection otherwise.
        let mut expiry =
            self.principal.expires_at().map(|at| Box::pin(tokio::time::sleep_until(stream::instant_of(at))));
        loop {
            // The wait only names what happened; one boxed call handles it. An
            // idle connection's task is sized for the wait alone, not for a
            // frame or a delivery kept beside each handler's state.
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Close(1012, "server restarting; reconnect and resume".into()),
                _ = stream::fired(&mut expiry) => {
                    return End::Close(4001, "token_expired: reconnect with a new token".into());
                }
                frame = self.socket.recv() => {
                    last_heard = Instant::now();
                    Event::Frame(frame)
                }
                d = self.sub.next() => match d {
                    Ok(d) => Event::Delivery(d),
                    Err(e) if e.is_lagging() => {
                        self.state.guards.stats.lagging_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return End::Close(SLOW_CONSUMER, "slow_consumer: too far behind; reconnect and resume".into());
                    }
                    Err(_) => return End::Close(1011, "store unavailable; reconnect and resume".into()),
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > every * 2 {
                        return End::Close(1001, "no answer to pings".into());
                    }
                    Event::Ping
                }
            };
            if let Some(end) = Box::pin(self.on_event(event)).await {
                return end;
            }
        }
    }

    /// Handles what the wait in `run` returned; `Some` ends the connection.
    async fn on_event(&mut self, event: Event) -> Option<End> {
        match event {
            Event::Frame(None) => Some(End::Gone),
            Event::Frame(Some(Err(e))) => match e.close_code() {
                Some(code) => Some(End::Close(code, format!("bad frame: {e}"))),
                None => Some(End::Gone),
            },
            Event::Frame(Some(Ok(Incoming::Text(text)))) => self.on_text(&text).await,
            Event::Frame(Some(Ok(Incoming::Binary(_)))) => {
                let why = "binary frames are not supported; send JSON text";
                self.bad_frame(None, "invalid_frame", why).await
            }
            // The closing handshake: answer with the client's code.
            Event::Frame(Some(Ok(Incoming::Close(code)))) => Some(End::Reply(code.unwrap_or(1000))),
            Event::Frame(Some(Ok(Incoming::Ping(payload)))) => {
                self.socket.feed_pong(&payload);
                self.flush().await.err()
            }
            Event::Frame(Some(Ok(Incoming::Pong))) => None,
            Event::Delivery(d) => self.deliver(d).await.err(),
            Event::Ping => {
                self.socket.feed_ping();
                self.flush().await.err()
            }
        }
    }

    /// Writes everything fed so far, within the write timeout: a client
    /// that stops reading is a slow consumer, closed with `4008`.
    async fn flush(&mut self) -> Result<(), End> {
        // Most flushes go at once: no timer for those. (A flush stopped
        // half-way goes on where it stopped: `WebSocket` keeps its place.)
        if let Some(done) = futures_util::FutureExt::now_or_never(self.socket.flush()) {
            return done.map_err(|_| End::Gone);
        }
        let flushed = match self.state.guards.write_timeout() {
            None => self.socket.flush().await,
            Some(limit) => match tokio::time::timeout(limit, self.socket.flush()).await {
                Ok(r) => r,
                Err(_) => {
                    self.state.guards.stats.slow_consumers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let why = "slow_consumer: the connection stopped reading; reconnect and resume";
                    return Err(End::Close(SLOW_CONSUMER, why.into()));
                }
            },
        };
        flushed.map_err(|_| End::Gone)
    }

    /// Writes a delivery and whatever else is already queued, then flushes once.
    async fn deliver(&mut self, first: Delivery) -> Result<(), End> {
        // A busy connection gathers what comes within the window into one write.
        self.coalesce.ready().await;
        let mut count = 0;
        let mut latency = WriteLatency::new(self.connection.opened_ms());
        let mut item = Some(first);
        while let Some(d) = item {
            let frame = match d {
                Delivery::Message(m) => {
                    count += 1;
                    latency.note(&m);
                    m.encoded(Wire::WsFrame, ws_frame)
                }
                Delivery::Gap(g) => {
                    let mut v = serde_json::to_value(&g).expect("a gap serialises");
                    v["type"] = "gap".into();
                    Bytes::from(v.to_string())
                }
                Delivery::Unread(n) => Bytes::from(format!("{{\"type\":\"unread\",\"count\":{n}}}")),
            };
            self.socket.feed_text(&frame);
            item = if count < 256 { self.sub.try_next() } else { None };
        }
        self.state.stats.delivered(Transport::Ws, count);
        self.coalesce.wrote();
        let flushed = self.flush().await;
        latency.record(&self.state.metrics, Transport::Ws);
        flushed
    }

    async fn send_json(&mut self, v: Value) -> Option<End> {
        self.socket.feed_text(v.to_string().as_bytes());
        self.flush().await.err()
    }

    async fn bad_frame(&mut self, reference: Option<Value>, code: &str, message: &str) -> Option<End> {
        if self.bad_window.elapsed() > Duration::from_secs(60) {
            self.bad_window = Instant::now();
            self.bad_frames = 0;
        }
        self.bad_frames += 1;
        if self.bad_frames > MAX_BAD_FRAMES {
            return Some(End::Close(1008, "too many bad frames".into()));
        }
        self.error(reference, code, message).await
    }

    async fn error(&mut self, reference: Option<Value>, code: &str, message: &str) -> Option<End> {
        let mut v = json!({ "type": "error", "code": code, "message": message });
        if let Some(r) = reference {
            v["ref"] = r;
        }
        self.send_json(v).await
    }

    /// An `error` frame with everything the error says (a refusal's
    /// `limit` and `retry_after`, a rejection's `rule` and `reason`).
    async fn error_from(&mut self, reference: Option<Value>, e: &ApiError) -> Option<End> {
        let mut v = e.json();
        v["type"] = "error".into();
        if let Some(r) = reference {
            v["ref"] = r;
        }
        self.send_json(v).await
    }

    async fn on_text(&mut self, text: &[u8]) -> Option<End> {
        let text = std::str::from_utf8(text).unwrap_or_default(); // checked by the socket
        let frame = match serde_json::from_str::<ClientFrame>(text) {
            Ok(f) => f,
            Err(e) => {
                // Echo the ref when the frame had one, so the client can match it.
                let reference = serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("ref").cloned());
                let code = if e.is_data() { "invalid_frame" } else { "invalid_json" };
                return self.bad_frame(reference, code, &format!("{e}")).await;
            }
        };
        let reference = frame.reference;
        let channel = frame.channel.ok_or_else(|| ApiError::bad_request("invalid_frame", "'channel' is required"));
        let result = match frame.kind.as_str() {
            "ping" => Ok(json!({ "type": "pong" })),
            "subscribe" => match channel {
                Ok(c) => self.subscribe(&c, frame.since).await,
                Err(e) => Err(e),
            },
            "unsubscribe" => channel.and_then(|c| self.unsubscribe(&c)),
            "publish" => match channel {
                Ok(c) => self.publish(&c, frame.event.as_deref(), frame.data).await,
                Err(e) => Err(e),
            },
            other => Err(ApiError::bad_request(
                "invalid_frame",
                format!("unknown type '{other}'; expected subscribe, unsubscribe, publish or ping"),
            )),
        };
        match result {
            Ok(mut v) => {
                if let Some(r) = reference {
                    v["ref"] = r;
                }
                self.send_json(v).await
            }
            // A publish over the rate: not a bad frame, but a flood if it goes on.
            Err(e) if matches!(e.code, "rate_limited" | "quota_exceeded") => {
                if self.guard.strike(self.state.guards.flood_after) {
                    self.state.guards.stats.floods_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Some(End::Close(FLOOD, "rate_limited: too many publishes; slow down".into()));
                }
                self.error_from(reference, &e).await
            }
            // A refusal that says what happened, not a malformed frame.
            Err(e) if e.status.is_server_error() || e.code == "content_rejected" => {
                self.error_from(reference, &e).await
            }
            Err(e) => self.bad_frame(reference, e.code, &e.message).await,
        }
    }

    async fn subscribe(&mut self, channel: &str, since: Option<SinceValue>) -> Result<Value, ApiError> {
        let target = Target::from_filter(Filter::parse(channel)?);
        if !self.principal.may_subscribe(&target) {
            return Err(forbidden(format!("not allowed to subscribe to '{channel}'")));
        }
        let since = match since {
            None => Since::After(0),
            Some(SinceValue::Id(n)) => Since::After(n),
            Some(SinceValue::Text(t)) => Since::parse(&t)?,
        };
        // Subscribing again restarts the channel from the new cursor.
        if self.sub.remove(&target) {
            self.subscriptions -= 1;
        }
        let max = self.state.config.ws.max_subscriptions;
        if self.subscriptions as usize >= max {
            return Err(ApiError::bad_request("too_many_subscriptions", format!("at most {max} per connection")));
        }
        let added = self.sub.add(target, since).await?;
        self.subscriptions += 1;
        let mut v = json!({ "type": "subscribed", "channel": channel, "gap": added.gap });
        if let Some(head) = added.head {
            v["head"] = head.into();
        }
        Ok(v)
    }

    fn unsubscribe(&mut self, channel: &str) -> Result<Value, ApiError> {
        let target = Target::from_filter(Filter::parse(channel)?);
        if !self.sub.remove(&target) {
            return Err(ApiError::bad_request("not_subscribed", format!("not subscribed to '{channel}'")));
        }
        self.subscriptions -= 1;
        Ok(json!({ "type": "unsubscribed", "channel": channel }))
    }

    async fn publish(
        &mut self,
        channel: &str,
        event: Option<&str>,
        data: Option<Box<RawValue>>,
    ) -> Result<Value, ApiError> {
        let channel = herald_core::Channel::parse(channel)?;
        let event = event.map(EventName::parse).transpose()?;
        let raw = data.ok_or_else(|| ApiError::bad_request("invalid_frame", "'data' is required"))?;
        let limit = self.state.config.limits.max_payload;
        if raw.get().len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        let guards = &self.state.guards;
        self.guard.check_publish(guards).map_err(|l| guards.publish_error(l))?;
        self.guard.calm();
        let data = publish::data_from_json(raw.get());
        // An admin that is not open mode's anonymous holds an API key.
        let api_key = self.principal.is_admin() && !self.state.auth.is_open();
        let origin = publish::Origin { api_key, transport: "ws" };
        let result = publish::append(&self.state, &self.principal, origin, vec![channel], event, data, None).await?;
        self.state.stats.published(crate::api::stats::Source::Ws, 1);
        let mut v = result.into_iter().next().expect("one channel, one id");
        v["type"] = "published".into();
        Ok(v)
    }
}

/// `{"type":"message",` followed by the message object without its `{`.
fn ws_frame(m: &Message) -> Bytes {
    let json = m.json();
    let mut out = Vec::with_capacity(json.len() + 17);
    out.extend_from_slice(b"{\"type\":\"message\",");
    out.extend_from_slice(&json[1..]);
    Bytes::from(out)
}
