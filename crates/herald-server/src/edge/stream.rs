//! Long-lived HTTP responses (SSE, hidden iframe): wait for the next delivery,
//! a heartbeat, the stream's end of life or shutdown, and batch whatever else
//! is already queued into the same chunk so a burst costs one write, not one
//! per message. An idle stream waits on its mailbox and one timer with no
//! future held. The transport supplies only the encoding.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::{
    api::stats::{CloseReason, ConnectionGuard, Transport},
    edge::coalesce::Coalescer,
    guard::Permit,
    metrics::WriteLatency,
    state::SharedState,
    subscription::{Delivery, Subscription, SubscriptionError},
};

/// A chunk grows to about this size before it is handed to the socket.
const CHUNK: usize = 32 * 1024;

/// A wire format for a streamed response.
pub(crate) trait Encoder: Send + Unpin + 'static {
    /// Sent once, first (SSE `retry:`, the iframe's document head).
    fn preamble(&self) -> Bytes;
    /// Sent when the stream has been quiet for a heartbeat interval.
    fn heartbeat(&self) -> Bytes;
    fn encode(&self, d: Delivery, sub: &Subscription, buf: &mut BytesMut);
    /// Sent last when the server ends the stream for a reason the client must
    /// act on (an expired token: reconnecting with it would be refused).
    fn close(&self, code: &str, message: &str) -> Bytes;
}

pub(crate) struct Settings {
    pub(crate) transport: Transport,
    pub(crate) content_type: &'static str,
    pub(crate) heartbeat: Duration,
    /// Close the stream after this long (`None`: never).
    pub(crate) lifetime: Option<Duration>,
    /// When the credential expires (ms since the epoch): the stream is closed
    /// then, with a `token_expired` close the client can act on.
    pub(crate) expires_at: Option<i64>,
    /// The stream's place in the connection counts (`guard`).
    pub(crate) permit: Permit,
}

/// The stream's state. A hand-written [`Stream`], not an `async` block: an
/// idle stream is most of a push server's connections, and this way one
/// waits with nothing but this struct and one timer (an `async` version held
/// its whole waiting future besides: measured 1,008 bytes a stream against
/// about 600).
struct Streamer<E> {
    encoder: E,
    preamble_sent: bool,
    closed: bool,
    heartbeat: Duration,
    end_at: Option<Instant>,
    expires: Option<Instant>,
    /// When anything was last sent: a heartbeat follows a quiet interval.
    last_sent: Instant,
    coalesce: Coalescer,
    /// `None` while `waiting` owns it.
    sub: Option<Subscription>,
    /// A delivery taken and waiting out the coalescing window.
    held: Option<Delivery>,
    /// The subscription fell past `max_lag` behind: say so, then end.
    lagging: bool,
    /// The subscription's own async `next`, when memory is not enough
    /// (history to read, an unread count to follow). Boxed, and only then.
    waiting: Option<Waiting>,
    /// One timer for the nearest of heartbeat, the coalescing window's end,
    /// end of life and token expiry; which one it was is decided when it fires.
    timer: Pin<Box<Sleep>>,
    shutdown: CancellationToken,
    state: SharedState,
    /// Counts the stream open; records why it ended (a stream dropped
    /// without a reason set is one the client left).
    connection: ConnectionGuard,
    _permit: Permit,
}

/// `None`: shutdown.
/// What the boxed wait gives back: the subscription, and a delivery; `Ok(None)`:
/// caught up (wait on the mailbox now); `Err(None)`: shutdown.
type Waiting =
    Pin<Box<dyn Future<Output = (Subscription, Result<Option<Delivery>, Option<SubscriptionError>>)> + Send>>;

pub(crate) fn respond<E: Encoder>(state: SharedState, sub: Subscription, encoder: E, settings: Settings) -> Response {
    let now = Instant::now();
    let streamer = Streamer {
        encoder,
        preamble_sent: false,
        closed: false,
        heartbeat: settings.heartbeat,
        end_at: settings.lifetime.map(|d| now + d),
        expires: settings.expires_at.map(instant_of),
        last_sent: now,
        coalesce: Coalescer::default(),
        sub: Some(sub),
        held: None,
        lagging: false,
        waiting: None,
        timer: Box::pin(tokio::time::sleep_until(now + settings.heartbeat)),
        shutdown: state.shutdown.clone(),
        connection: state.stats.connect(settings.transport),
        _permit: settings.permit,
        state,
    };
    let mut res = Response::new(Body::from_stream(streamer));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(settings.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Proxies such as nginx would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

impl<E: Encoder> Stream for Streamer<E> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_chunk(cx).map(|chunk| chunk.map(Ok))
    }
}

impl<E: Encoder> Streamer<E> {
    /// The next bytes to send, or `None` to end the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if !self.preamble_sent {
            self.preamble_sent = true;
            self.last_sent = Instant::now();
            return Poll::Ready(Some(self.encoder.preamble()));
        }
        loop {
            if self.shutdown.is_cancelled() {
                self.connection.end(CloseReason::Shutdown);
                return Poll::Ready(None);
            }
            if self.closed {
                return Poll::Ready(None);
            }
            // Checked first, so a busy stream cannot outlive its token or its end.
            let now = Instant::now();
            if self.expires.is_some_and(|at| at <= now) {
                self.closed = true;
                self.connection.end(CloseReason::TokenExpired);
                let close = self.encoder.close("token_expired", "the token expired; reconnect with a new one");
                return Poll::Ready(Some(close));
            }
            if self.end_at.is_some_and(|at| at <= now) {
                self.connection.end(CloseReason::Lifetime);
                return Poll::Ready(None);
            }
            if self.held.is_none() {
                match self.poll_delivery(cx) {
                    Poll::Ready(Some(d)) => self.held = Some(d),
                    Poll::Ready(None) if self.lagging => {
                        self.closed = true;
                        let why = "too far behind the channel; reconnect and resume from your last id";
                        return Poll::Ready(Some(self.encoder.close("slow_consumer", why)));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {}
                }
            }
            let heartbeat_at = self.last_sent + self.heartbeat;
            // A busy stream gathers what comes within the window into one write.
            let wake = match (&self.held, self.coalesce.ready_at()) {
                (Some(_), None) => return Poll::Ready(Some(self.batch())),
                (Some(_), Some(window_end)) => window_end,
                (None, _) => heartbeat_at,
            };
            let wake = [self.expires, self.end_at].into_iter().flatten().fold(wake, Instant::min);
            if self.timer.deadline() != wake {
                self.timer.as_mut().reset(wake);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.held.is_none() && wake == heartbeat_at {
                self.last_sent = Instant::now();
                return Poll::Ready(Some(self.encoder.heartbeat()));
            }
            // The window's end, the end of life or the expiry: the loop sees to it.
        }
    }

    /// The next delivery: from memory when it can be (the mailbox is polled
    /// with no future held), else through the subscription's async `next`.
    /// `None`: the stream ends (shutdown, or a store error).
    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            if let Some(waiting) = self.waiting.as_mut() {
                let (sub, result) = std::task::ready!(waiting.as_mut().poll(cx));
                self.waiting = None;
                self.sub = Some(sub);
                match result {
                    Ok(Some(d)) => return Poll::Ready(Some(d)),
                    Ok(None) => continue, // caught up: wait on the mailbox alone
                    Err(None) => {
                        self.connection.end(CloseReason::Shutdown);
                        return Poll::Ready(None);
                    }
                    Err(Some(e)) if e.is_lagging() => {
                        self.state.guards.stats.lagging_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.lagging = true;
                        self.connection.end(CloseReason::SlowConsumer);
                        return Poll::Ready(None);
                    }
                    Err(Some(e)) => {
                        tracing::warn!(error = %e, "stream ended by a store error; the client will resume");
                        self.connection.end(CloseReason::StoreError);
                        return Poll::Ready(None);
                    }
                }
            }
            let sub = self.sub.as_mut().expect("the subscription is here when nothing waits");
            if let Some(d) = sub.try_next() {
                return Poll::Ready(Some(d));
            }
            if !sub.is_memory_only() {
                let mut sub = self.sub.take().expect("checked above");
                let shutdown = self.shutdown.clone();
                self.waiting = Some(Box::pin(async move {
                    let result = tokio::select! {
                        _ = shutdown.cancelled() => Err(None),
                        d = sub.next_general() => d.map_err(Some),
                    };
                    (sub, result)
                }));
                continue;
            }
            match sub.poll_live(cx) {
                Poll::Ready(true) => continue,
                Poll::Ready(false) => {
                    // The hub closed: shutdown.
                    self.connection.end(CloseReason::Shutdown);
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The held delivery and whatever else is ready, encoded as one chunk.
    fn batch(&mut self) -> Bytes {
        let sub = self.sub.as_mut().expect("a delivery is held only with the subscription back");
        let mut buf = BytesMut::new();
        let mut count = 0;
        let mut latency = WriteLatency::new(self.connection.opened_ms());
        let mut item = self.held.take();
        while let Some(d) = item {
            if let Delivery::Message(m) = &d {
                count += 1;
                latency.note(m);
            }
            self.encoder.encode(d, sub, &mut buf);
            item = if buf.len() < CHUNK { sub.try_next() } else { None };
        }
        let transport = self.connection.transport();
        self.state.stats.delivered(transport, count);
        latency.record(&self.state.metrics, transport);
        self.coalesce.wrote();
        self.last_sent = Instant::now();
        buf.freeze()
    }
}

/// Waits for `timer` to fire; forever when there is none: a `select!` branch
/// for a deadline most connections do not have (a token's expiry, MQTT's
/// keep-alive), whose timer is then allocated only for those that do.
pub(crate) async fn fired(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The instant at wall-clock time `ms` (since the epoch).
pub(crate) fn instant_of(ms: i64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(herald_store::now_ms()).max(0) as u64)
}
