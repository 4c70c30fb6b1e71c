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
}

pub(crate) struct Settings {
    pub(crate) transport: Transport,
    pub(crate) content_type: &'static str,
    pub(crate) heartbeat: Duration,
    /// Close the stream after this long (`None`: never).
    pub(crate) lifetime: Option<Duration>,
}

struct Streamer<E> {
    encoder: E,
    preamble_sent: bool,
    heartbeat: Duration,
    end_at: Option<Instant>,
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
        let end_at = self.end_at;
        let end = async move {
            match end_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return None,
            _ = end => return None,
            d = self.sub.next() => d,
            _ = tokio::time::sleep(self.heartbeat) => return Some(self.encoder.heartbeat()),
        };
        let first = match next {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "stream ended by a store error; the client will resume");
                return None;
            }
        };
        let mut buf = BytesMut::new();
        let mut count = 0;
        let mut item = Some(first);
        while let Some(d) = item {
            count += u64::from(matches!(d, Delivery::Message(_)));
            self.encoder.encode(d, &self.sub, &mut buf);
            item = if buf.len() < CHUNK { self.sub.try_next() } else { None };
        }
        self.state.stats.delivered(count);
        Some(buf.freeze())
    }
}
