//! Long-lived HTTP responses (SSE, hidden iframe): one loop that waits for the
//! next delivery, a heartbeat, the stream's end of life or shutdown, and batches
//! whatever else is already queued into the same chunk so a burst costs one
//! write, not one per message. The transport supplies only the encoding.

use std::time::Duration;

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    app::SharedState,
    coalesce::Coalescer,
    stats::{ConnectionGuard, Transport},
    subscription::{Delivery, Subscription},
};

/// A chunk grows to about this size before it is handed to the socket.
const CHUNK: usize = 32 * 1024;

/// A wire format for a streamed response.
pub(crate) trait Encoder: Send + 'static {
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
}

struct Streamer<E> {
    encoder: E,
    preamble_sent: bool,
    heartbeat: Duration,
    end_at: Option<Instant>,
    expires: Option<Instant>,
    closed: bool,
    coalesce: Coalescer,
    sub: Subscription,
    shutdown: CancellationToken,
    state: SharedState,
    _connection: ConnectionGuard,
}

pub(crate) fn respond<E: Encoder>(state: SharedState, sub: Subscription, encoder: E, settings: Settings) -> Response {
    let streamer = Streamer {
        encoder,
        preamble_sent: false,
        heartbeat: settings.heartbeat,
        end_at: settings.lifetime.map(|d| Instant::now() + d),
        expires: settings.expires_at.map(instant_of),
        closed: false,
        coalesce: Coalescer::default(),
        sub,
        shutdown: state.shutdown.clone(),
        _connection: state.stats.connect(settings.transport),
        state,
    };
    let body = futures_util::stream::unfold(streamer, |mut s| async move {
        s.next_chunk().await.map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), s))
    });
    let mut res = Response::new(Body::from_stream(body));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(settings.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Proxies such as nginx would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

impl<E: Encoder> Streamer<E> {
    /// The next bytes to send, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.preamble_sent {
            self.preamble_sent = true;
            return Some(self.encoder.preamble());
        }
        if self.closed {
            return None;
        }
        // Checked first, so a busy stream cannot outlive its token or its end.
        let now = Instant::now();
        if self.expires.is_some_and(|at| at <= now) {
            self.closed = true;
            return Some(self.encoder.close("token_expired", "the token expired; reconnect with a new one"));
        }
        if self.end_at.is_some_and(|at| at <= now) {
            return None;
        }
        // One timer for the nearest of heartbeat, end of life and token expiry
        // (which one is decided when it fires): a waiting stream is mostly
        // this future, and each timer is a hundred bytes more of it.
        let wake = [self.expires, self.end_at].into_iter().flatten().fold(now + self.heartbeat, Instant::min);
        let next = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return None,
            d = self.sub.next() => d,
            // The heartbeat, or the end or expiry checked above on the next call
            // (a heartbeat there first does no harm).
            _ = tokio::time::sleep_until(wake) => return Some(self.encoder.heartbeat()),
        };
        let first = match next {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "stream ended by a store error; the client will resume");
                return None;
            }
        };
        // A busy stream gathers what comes within the window into one write.
        self.coalesce.ready().await;
        let mut buf = BytesMut::new();
        let mut count = 0;
        let mut item = Some(first);
        while let Some(d) = item {
            count += u64::from(matches!(d, Delivery::Message(_)));
            self.encoder.encode(d, &self.sub, &mut buf);
            item = if buf.len() < CHUNK { self.sub.try_next() } else { None };
        }
        self.state.stats.delivered(count);
        self.coalesce.wrote();
        Some(buf.freeze())
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The instant at wall-clock time `ms` (since the epoch).
pub(crate) fn instant_of(ms: i64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(herald_store::now_ms()).max(0) as u64)
}
