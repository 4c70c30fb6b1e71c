//! The HTTP front door: accepts connections and answers the requests that hold
//! a connection open for long (SSE, hidden iframe, long poll, and the idle
//! keep-alive between them) itself, with no buffer held while it waits.
//!
//! Why not hyper for everything: hyper keeps an 8 KiB read buffer and an
//! 8 KiB header buffer per connection for the connection's whole life
//! (measured with heaptrack: 24 KiB of an idle SSE connection's 21 KiB
//! resident share). For a push server most connections are idle streams, so
//! that is most of its memory. Here a request head is read into a buffer that
//! lives only until the head is parsed, the request goes through the same
//! axum router as every other, and the response is written straight to the
//! socket: a streamed body as chunks, a whole body with its length.
//!
//! Only plain `GET`s over HTTP/1.1 with no body are answered here, and
//! WebSocket handshakes on `/api/ws` and `/mqtt` (the connection becomes a
//! task of `ws` or `mqtt`, which speak the protocol on the socket itself: see
//! `websocket`). Anything else
//! (publishes with bodies, other upgrades, HTTP/1.0, HEAD, pipelined requests,
//! heads we cannot parse) is handed to hyper with the bytes already read, so
//! hyper stays the one full HTTP/1 implementation and this module only the
//! fast path for the common long-lived case.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header},
};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use herald_core::Channel;
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    edge::coalesce::Coalescer,
    edge::websocket::Handshake,
    guard::{Client, Peer, address::AddressPolicy},
    state::SharedState,
    transport::poll,
    transport::ws,
};

/// The largest request head read here; a bigger one goes to hyper, which
/// serves it within its own limit (about 400 KiB) and answers 431 past that.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Most headers a request may have here (the rest: hyper).
pub(crate) const MAX_HEADERS: usize = 48;
/// How long a kept-alive connection may sit without starting a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request head may take once it has begun.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown`, each served on its own task tracked
/// by `tracker` (so the caller can wait for them to end).
pub(crate) async fn serve(
    listener: TcpListener,
    state: SharedState,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let router = crate::routes::app(state.clone());
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as a busy loop
                    // would only make it worse.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Events are written in whole batches already; Nagle would only delay them.
        let _ = tcp.set_nodelay(true);
        // Who the peer is, decided once: exempt, a trusted proxy, or an address to limit.
        let peer = state.guards.address.peer(addr.ip());
        tracker.spawn(connection(tcp, peer, state.clone(), router.clone(), shutdown.clone(), tracker.clone()));
    }
}

/// What to do with a request whose head has been read.
pub(crate) enum Route {
    /// Answer it here, through the router.
    Here(Box<Request<Body>>, bool),
    /// A poll, answered here without the router.
    Poll(Box<poll::Direct>, bool),
    /// A WebSocket handshake on `/api/ws` or `/mqtt`: the connection becomes
    /// a task of its own.
    WebSocket(Box<ws::Request>),
    /// Give the connection to hyper.
    Hyper,
}

/// One connection's requests, in turn. A block, not an `async fn`: an async
/// fn's arguments keep their room in its future after moving on, and this
/// future is every HTTP connection's task.
#[allow(clippy::manual_async_fn)] // the block is the point
fn connection(
    mut tcp: TcpStream,
    peer: Peer,
    state: SharedState,
    router: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> impl Future<Output = ()> + Send {
    async move {
        let mut pending = BytesMut::new();
        // Long polls on this connection, one after another, share it.
        let mut coalesce = Coalescer::default();
        loop {
            match read_head(&mut tcp, &mut pending, &shutdown).await {
                Ok(true) => {}
                _ => return,
            }
            // Scoped: what is only needed until the head is written does not
            // take room in this task's future while a body streams.
            let (body, keep_alive, close) = {
                let Routed { route, len: head_len, untrusted_forwarding } =
                    decide(&pending, peer, &state.guards.address);
                if untrusted_forwarding {
                    state.guards.address.untrusted_forwarding(|| tcp.peer_addr().ok().map(|a| a.ip()));
                }
                // Nothing is kept while the response is produced or streamed.
                let head = std::mem::take(&mut pending);
                // Answering and writing a head are boxed: they last a moment (a long
                // poll's wait aside), and inline they would size the task of every
                // connection, streaming or idle, for their largest state (measured:
                // 1,032 bytes inline, 464 boxed).
                let (res, keep_alive) = match route {
                    Route::Hyper => {
                        return Box::pin(hand_to_hyper(tcp, peer, head.freeze(), router, state, shutdown)).await;
                    }
                    Route::WebSocket(request) => {
                        let early = Bytes::copy_from_slice(&head[head_len..]);
                        drop(head);
                        let endpoint = request.endpoint;
                        let opening = Box::new(ws::Opening { tcp, state, request, early });
                        // A task of its own, and this one ends: awaited here, the
                        // session would keep this task's state (768 bytes, heaptrack)
                        // beside its own for the connection's life.
                        match endpoint {
                            ws::Endpoint::Herald => tracker.spawn(ws::serve(opening)),
                            ws::Endpoint::Mqtt => tracker.spawn(crate::transport::mqtt::serve_websocket(opening)),
                        };
                        return;
                    }
                    Route::Here(mut req, keep_alive) => {
                        // Dropped here, not at the end of the iteration: it would
                        // be held for as long as the response streams (1 KiB of
                        // every idle SSE connection, heaptrack).
                        drop(head);
                        // The router's guard layer resolves the client from it.
                        req.extensions_mut().insert(peer);
                        let answer =
                            async { router.clone().oneshot(*req).await.unwrap_or_else(|never| match never {}) };
                        (Box::pin(respond(&mut tcp, Box::pin(answer), &mut pending)).await, keep_alive)
                    }
                    Route::Poll(req, keep_alive) => {
                        drop(head);
                        let answer = Box::pin(poll::direct(state.clone(), *req, &mut coalesce));
                        (Box::pin(respond(&mut tcp, answer, &mut pending)).await, keep_alive)
                    }
                };
                let Some(res) = res else { return };
                match Box::pin(write_head(&mut tcp, res, &state)).await {
                    Ok(Written::Whole { close }) => (None, keep_alive, close),
                    Ok(Written::Head { body, close }) => (Some(body), keep_alive, close),
                    Err(_) => return,
                }
            };
            let streamed = match body {
                Some(body) => stream_body(&mut tcp, body, &mut pending, &state).await,
                None => Ok(true),
            };
            match streamed {
                Ok(true) if keep_alive && !close => {}
                _ => return,
            }
        }
    }
}

/// Waits for `answer`. A long poll may wait a while for it: meanwhile the
/// socket is watched, and a client that goes away drops the request (and its
/// subscription) at once. `None`: the client is gone.
///
/// `answer` comes boxed: an `async fn` keeps its arguments' room beside
/// their pinned copy, and a waiting long poll's answer is some 800 bytes
/// (heaptrack: 1.6 KB per waiting long poll, twice the answer).
async fn respond<F: Future<Output = Response<Body>>>(
    tcp: &mut TcpStream,
    mut answer: Pin<Box<F>>,
    pending: &mut BytesMut,
) -> Option<Response<Body>> {
    let mut probe = [0u8; 32];
    loop {
        tokio::select! {
            res = answer.as_mut() => return Some(res),
            r = tcp.read(&mut probe) => if !keep_early_bytes(r, &probe, pending) {
                return None;
            },
        }
    }
}

/// What the socket gave while an answer was being produced: bytes (the
/// client's next request) are kept in `pending`; `false` when the client went
/// away, failed, or sent more than a request head's worth.
fn keep_early_bytes(read: io::Result<usize>, probe: &[u8], pending: &mut BytesMut) -> bool {
    match read {
        Ok(n) if n > 0 && pending.len() + n <= MAX_HEAD => {
            pending.put_slice(&probe[..n]);
            true
        }
        _ => false,
    }
}

/// Reads until `buf` holds a whole request head. `Ok(false)`: the connection
/// ended (closed, timed out, shutdown) before a request began.
async fn read_head(tcp: &mut TcpStream, buf: &mut BytesMut, shutdown: &CancellationToken) -> io::Result<bool> {
    // One timer, boxed and re-armed: this is where a kept-alive connection
    // waits, and a `timeout` per read inline was most of its task.
    let mut timer = Box::pin(tokio::time::sleep(IDLE_TIMEOUT));
    loop {
        if head_complete(buf) || buf.len() >= MAX_HEAD {
            return Ok(true);
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        let read = tokio::select! {
            _ = shutdown.cancelled(), if buf.is_empty() => return Ok(false),
            _ = timer.as_mut() => return Ok(false),
            r = tcp.read_buf(buf) => r,
        };
        match read {
            Ok(0) => return Ok(false),
            Ok(_) => timer.as_mut().reset(tokio::time::Instant::now() + HEAD_TIMEOUT),
            Err(e) => return Err(e),
        }
    }
}

/// Whether `buf` holds a whole request head: an empty line ends it. A line
/// may end with a bare LF (RFC 9112 section 2.2; httparse and hyper accept
/// it), so `\n\n` and `\n\r\n` end a head too: looking only for
/// `\r\n\r\n`, a head written with bare LFs was never seen whole and its
/// connection waited out the head timeout unanswered (found by fuzzing).
pub(crate) fn head_complete(buf: &[u8]) -> bool {
    buf.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (buf.get(i + 1) == Some(&b'\n') || buf.get(i + 1..i + 3) == Some(b"\r\n")))
}

/// What to do with the bytes read so far, `buf` holding a whole head (or as
/// much as is read of one): the route and the head's length. A body, a
/// pipelined request behind this one, a head over `MAX_HEAD`, or anything
/// unusual: hyper takes over with what was read so far. (After a WebSocket
/// handshake, what follows is the client's first frames.)
///
/// The size is checked here because `read_head` stops at `MAX_HEAD` only
/// between reads: a larger head that came in one read was answered here,
/// and the same head in smaller reads went to hyper (found by fuzzing).
pub(crate) fn decide(buf: &[u8], peer: Peer, addresses: &AddressPolicy) -> Routed {
    match route(buf, peer, addresses) {
        Some(r) if r.len <= MAX_HEAD && (r.len == buf.len() || matches!(r.route, Route::WebSocket(_))) => r,
        r => Routed { route: Route::Hyper, len: 0, untrusted_forwarding: r.is_some_and(|r| r.untrusted_forwarding) },
    }
}

/// A parsed head: where it goes, its length, and whether it carried
/// `X-Forwarded-For` from a peer whose word on it is not taken.
pub(crate) struct Routed {
    pub(crate) route: Route,
    pub(crate) len: usize,
    pub(crate) untrusted_forwarding: bool,
}

/// Parses the head at the start of `buf`: the request to answer here, or
/// `Route::Hyper`, and the head's length. `None` when it does not parse.
/// The client behind a poll or a WebSocket handshake (answered without the
/// router and its guard layer) is resolved here.
fn route(buf: &[u8], peer: Peer, addresses: &AddressPolicy) -> Option<Routed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    let forwarded = parsed.headers.iter().any(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"));
    let untrusted_forwarding = forwarded && !peer.is_proxy();
    let routed = |route| Some(Routed { route, len, untrusted_forwarding });
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return routed(Route::Hyper);
    }
    // The target as hyper and the router read it (`http::Uri`): a fragment
    // is dropped, and one it refuses goes to hyper (which answers 400).
    // Split by hand, a poll's query kept its fragment (`?since=4#x` was
    // refused here and served through the router; found by fuzzing).
    let uri = Uri::try_from(parsed.path?).ok()?;
    let client = || {
        let hops: Vec<&[u8]> = match peer.is_proxy() {
            true => parsed
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
                .map(|h| h.value)
                .collect(),
            false => Vec::new(),
        };
        Client { addr: addresses.client(peer, &hops) }
    };
    let endpoint = match uri.path() {
        "/api/ws" => Some(ws::Endpoint::Herald),
        "/mqtt" => Some(ws::Endpoint::Mqtt),
        _ => None,
    };
    if let Some(endpoint) = endpoint {
        // A handshake has no body; one with a body gets hyper's answer (400).
        let route = if parsed.headers.iter().any(announces_body) {
            Route::Hyper
        } else {
            Route::WebSocket(Box::new(websocket_request(endpoint, uri.query(), parsed.headers, client())))
        };
        return routed(route);
    }
    let mut keep_alive = true;
    let mut cross_origin = false;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if announces_body(h) || name == header::UPGRADE || name == header::EXPECT {
            return routed(Route::Hyper);
        }
        if name == header::CONNECTION && h.value.to_ascii_lowercase().windows(5).any(|w| w == b"close") {
            keep_alive = false;
        }
        cross_origin |= name == header::ORIGIN;
    }
    // A cross-origin poll goes through the router for its CORS headers.
    if !cross_origin && let Some(mut direct) = direct_poll(uri.path(), uri.query()) {
        direct.authorization = authorization(parsed.headers);
        direct.client = client();
        return routed(Route::Poll(Box::new(direct), keep_alive));
    }
    let mut req = Request::builder().method(Method::GET).version(Version::HTTP_11).uri(uri);
    for h in parsed.headers.iter() {
        req = req.header(HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?);
    }
    routed(Route::Here(Box::new(req.body(Body::empty()).ok()?), keep_alive))
}

/// Whether a header says a body follows the head.
fn announces_body(h: &httparse::Header<'_>) -> bool {
    h.name.eq_ignore_ascii_case("transfer-encoding")
        || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
}

/// The credential as the router's extractors read it: the first
/// `Authorization` header (`HeaderMap::get`), when it is visible ASCII
/// (`HeaderValue::to_str`). Not the last one: a request with two was
/// answered with the second credential here and the first through the
/// router (found by fuzzing).
fn authorization(headers: &[httparse::Header<'_>]) -> Option<String> {
    let h = headers.iter().find(|h| h.name.eq_ignore_ascii_case("authorization"))?;
    HeaderValue::from_bytes(h.value).ok().and_then(|v| v.to_str().ok().map(str::to_owned))
}

/// What a WebSocket connection needs of its request: query, credential, handshake.
fn websocket_request(
    endpoint: ws::Endpoint,
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
    client: Client,
) -> ws::Request {
    let mut handshake = Handshake::default();
    for h in headers {
        handshake.header(h.name, h.value);
    }
    ws::Request { endpoint, query: query.map(str::to_owned), authorization: authorization(headers), handshake, client }
}

/// `/api/channels/{channel}/messages` with a valid channel name and nothing
/// percent-escaped (the router would decode it): a poll to answer without
/// the router.
fn direct_poll(path: &str, query: Option<&str>) -> Option<poll::Direct> {
    let channel = path.strip_prefix("/api/channels/")?.strip_suffix("/messages")?;
    if channel.contains('%') {
        return None;
    }
    let channel = Channel::parse(channel).ok()?;
    Some(poll::Direct { channel, query: query.map(str::to_owned), authorization: None, client: Client::default() })
}

/// What [`write_head`] wrote.
enum Written {
    /// The whole response.
    Whole { close: bool },
    /// The head of a streamed response; its body goes out with [`stream_body`].
    Head { body: Body, close: bool },
}

/// A socket to write to: the whole stream, or its write half while the read
/// half watches for the client leaving.
trait Socket: AsyncWrite + Unpin {
    fn socket(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl Socket for tokio::net::tcp::WriteHalf<'_> {
    fn socket(&self) -> &TcpStream {
        self.as_ref()
    }
}

/// Writes `bytes`, within `[limits] write_timeout`: a client that stops
/// reading (its receive window and our send buffer full) is a slow consumer,
/// and its connection ends, freeing its task, its subscription and buffers.
async fn write_within(w: &mut impl Socket, bytes: &[u8], state: &SharedState) -> io::Result<()> {
    let n = write_now(w.socket(), bytes)?;
    if n < bytes.len() {
        Box::pin(write_rest(w, &bytes[n..], state)).await?;
    }
    Ok(())
}

/// Writes what the socket takes at once (most writes, all of it: no
/// waiting, no timer); how much that was.
fn write_now(socket: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match socket.try_write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The rest of a write that has to wait for room, within the write timeout.
/// Callers box it: a connection's task is not sized for it.
async fn write_rest(w: &mut impl Socket, rest: &[u8], state: &SharedState) -> io::Result<()> {
    match state.guards.write_timeout() {
        None => w.write_all(rest).await,
        Some(limit) => match tokio::time::timeout(limit, w.write_all(rest)).await {
            Ok(r) => r,
            Err(_) => {
                state.guards.stats.slow_consumers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(io::Error::new(io::ErrorKind::TimedOut, "slow consumer: a write stalled"))
            }
        },
    }
}

/// Writes `res`, whole when its body's length is known (`content-length`),
/// else only its head (`transfer-encoding: chunked`). `close`: the response
/// asks for the connection to close after it.
async fn write_head(tcp: &mut TcpStream, res: Response<Body>, state: &SharedState) -> io::Result<Written> {
    let (parts, body) = res.into_parts();
    let no_body = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let length = axum::body::HttpBody::size_hint(&body).exact();
    // The head is encoded and `parts` dropped here: a stream holds nothing of it.
    let (mut head, close) = encode_head(parts);
    if no_body {
        head.put_slice(b"\r\n");
        write_within(tcp, &head, state).await?;
        return Ok(Written::Whole { close });
    }
    if let Some(len) = length {
        // A whole body (JSON answers, errors, pages): one write with the head.
        head.put_slice(format!("content-length: {len}\r\n\r\n").as_bytes());
        let bytes = body.collect().await.map_err(io::Error::other)?.to_bytes();
        head.put(bytes);
        write_within(tcp, &head, state).await?;
        return Ok(Written::Whole { close });
    }
    head.put_slice(b"transfer-encoding: chunked\r\n\r\n");
    write_within(tcp, &head, state).await?;
    Ok(Written::Head { body, close })
}

/// Writes a response whose body is whole (an error), for a connection that
/// then ends.
pub(crate) async fn write_whole(tcp: &mut TcpStream, res: Response<Body>, state: &SharedState) -> io::Result<()> {
    write_head(tcp, res, state).await.map(drop)
}

/// Writes a streamed body as chunks, each as soon as the body yields it. The
/// socket is watched meanwhile, so a client that goes away ends the stream at
/// once; bytes it sends (its next request) are kept in `pending`. This is
/// where an idle stream waits, so it holds as little as it can.
/// `Ok(false)`: the connection must close.
///
/// A block, not an `async fn`: an async fn keeps its arguments' room beside
/// the copies it works with.
#[allow(clippy::manual_async_fn)] // the block is the point
fn stream_body<'a>(
    tcp: &'a mut TcpStream,
    body: Body,
    pending: &'a mut BytesMut,
    state: &'a SharedState,
) -> impl Future<Output = io::Result<bool>> + Send + 'a {
    async move {
        let mut frames = body.into_data_stream();
        let (mut rd, mut wr) = tcp.split();
        let mut probe = [0u8; 32];
        loop {
            // Only the wait is a `select!`; the write follows it, so the task is
            // sized for one or the other, not both.
            let frame = tokio::select! {
                frame = frames.next() => frame,
                r = rd.read(&mut probe) => if keep_early_bytes(r, &probe, pending) { continue } else { return Ok(false) },
            };
            let (bytes, last) = match frame {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => (chunk(data), false),
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => (Bytes::from_static(b"0\r\n\r\n"), true),
            };
            // Inline, so this task is sized for a pointer to a stalled write,
            // not for the write itself.
            let n = write_now(wr.socket(), &bytes)?;
            if n < bytes.len() {
                Box::pin(write_rest(&mut wr, &bytes[n..], state)).await?;
            }
            if last {
                return Ok(true);
            }
        }
    }
}

/// `data` framed as one HTTP/1.1 chunk.
fn chunk(data: Bytes) -> Bytes {
    let mut chunk = BytesMut::with_capacity(data.len() + 16);
    chunk.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
    chunk.put(data);
    chunk.put_slice(b"\r\n");
    chunk.freeze()
}

/// The status line and headers, all but the framing ones (set from the body);
/// and whether the response asks to close the connection.
fn encode_head(parts: axum::http::response::Parts) -> (BytesMut, bool) {
    let mut head = BytesMut::with_capacity(256);
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(parts.status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.put_slice(b"\r\n");
    let mut close = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        close |= name == header::CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"close");
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    (head, close)
}

/// Serves the rest of the connection with hyper, `read` being the bytes
/// already taken from the socket. Each request carries the peer for the
/// router's guard layer; writes are bounded by the write timeout (`Rewind`).
async fn hand_to_hyper(
    tcp: TcpStream,
    peer: Peer,
    read: Bytes,
    router: Router,
    state: SharedState,
    shutdown: CancellationToken,
) {
    let write_timeout = state.guards.write_timeout();
    let peer_ip = tcp.peer_addr().ok().map(|a| a.ip());
    let io =
        hyper_util::rt::TokioIo::new(Rewind { read, inner: tcp, write_timeout, stalled: None, state: state.clone() });
    let router = router.map_request(move |mut req: Request<hyper::body::Incoming>| {
        if !peer.is_proxy() && req.headers().contains_key("x-forwarded-for") {
            state.guards.address.untrusted_forwarding(|| peer_ip);
        }
        req.extensions_mut().insert(peer);
        req
    });
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A socket with some bytes already read from it put back in front, whose
/// writes fail once one has made no progress for the write timeout.
struct Rewind {
    read: Bytes,
    inner: TcpStream,
    write_timeout: Option<Duration>,
    /// Armed while a write waits on a full socket.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    state: SharedState,
}

impl Rewind {
    /// A write that could not go: `Pending` until the timeout, then an error.
    fn poll_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(limit) = self.write_timeout else { return Poll::Pending };
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                self.state.guards.stats.slow_consumers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "slow consumer: a write stalled")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.read.has_remaining() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            if !self.read.has_remaining() {
                // Emptied `Bytes` still hold their whole buffer, and an
                // upgraded connection keeps this wrapper for its life (heaptrack:
                // 1.1 KB of each idle WebSocket).
                self.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.poll_stalled(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.poll_stalled(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AddressPolicy {
        AddressPolicy::new(&["10.0.0.0/8".into()], &["127.0.0.0/8".into()]).unwrap()
    }

    fn route(head: &[u8]) -> Option<(Route, usize)> {
        super::route(head, Peer::EXEMPT, &policy()).map(|r| (r.route, r.len))
    }

    fn decide(head: &[u8]) -> (Route, usize) {
        let r = super::decide(head, Peer::EXEMPT, &policy());
        (r.route, r.len)
    }

    fn routed(head: &str) -> Option<(bool, bool, usize)> {
        route(head.as_bytes()).map(|(r, len)| match r {
            Route::Here(_, keep_alive) | Route::Poll(_, keep_alive) => (true, keep_alive, len),
            Route::Hyper | Route::WebSocket(_) => (false, false, len),
        })
    }

    #[test]
    fn polls_and_handshakes_carry_their_client_and_forwarding_from_strangers_is_noticed() {
        let p = policy();
        let key = |s: &str| Some(crate::guard::AddrKey::of(s.parse().unwrap()));
        let proxy = p.peer("10.0.0.1".parse().unwrap());
        let poll = b"GET /api/channels/a/messages HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6, 198.51.100.7\r\n\r\n";
        let routed = super::route(poll, proxy, &p).unwrap();
        assert!(!routed.untrusted_forwarding);
        match routed.route {
            Route::Poll(d, _) => assert_eq!(d.client.addr, key("198.51.100.7")),
            _ => panic!("a direct poll"),
        }
        let stranger = p.peer("192.0.2.9".parse().unwrap());
        let ws = b"GET /api/ws HTTP/1.1\r\nUpgrade: websocket\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
        let routed = super::route(ws, stranger, &p).unwrap();
        assert!(routed.untrusted_forwarding, "a stranger's X-Forwarded-For is noticed");
        match routed.route {
            Route::WebSocket(r) => assert_eq!(r.client.addr, key("192.0.2.9"), "and not believed"),
            _ => panic!("a handshake"),
        }
    }

    #[test]
    fn same_origin_polls_skip_the_router_with_their_credential() {
        let direct = |head: &str| match route(head.as_bytes()) {
            Some((Route::Poll(p, _), _)) => Some((p.channel.to_string(), p.query, p.authorization)),
            _ => None,
        };
        let got =
            direct("GET /api/channels/chat/room/messages?since=4&wait=30 HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n");
        assert_eq!(got, Some(("chat/room".into(), Some("since=4&wait=30".into()), Some("Bearer t".into()))));
        // Two credentials: the first, as the router reads it (fuzzing found
        // the fast path taking the last).
        let two = "GET /api/channels/a/messages HTTP/1.1\r\nAuthorization: Bearer first\r\nauthorization: Bearer second\r\n\r\n";
        assert_eq!(direct(two).and_then(|d| d.2).as_deref(), Some("Bearer first"));
        let invalid_first =
            "GET /api/channels/a/messages HTTP/1.1\r\nAuthorization: é\r\nAuthorization: Bearer b\r\n\r\n";
        assert_eq!(direct(invalid_first).map(|d| d.2), Some(None), "the router reads no credential either");
        // The target as the router reads it: no fragment (fuzzing found the
        // query keeping it here); one http::Uri refuses goes to hyper.
        let fragment = "GET /api/channels/a/messages?since=4#x HTTP/1.1\r\n\r\n";
        assert_eq!(direct(fragment).map(|d| (d.0, d.1)), Some(("a".into(), Some("since=4".into()))));
        assert_eq!(direct("GET /api/channels/a/messages#?since=4 HTTP/1.1\r\n\r\n").map(|d| d.1), Some(None));
        for routed in [
            "GET /api/channels/chat/messages HTTP/1.1\r\nOrigin: https://x.example\r\n\r\n",
            "GET /api/channels/chat%2Froom/messages HTTP/1.1\r\n\r\n",
            "GET /api/channels/bad name/messages HTTP/1.1\r\n\r\n",
            "GET /api/channels/chat/events HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(direct(routed), None, "{routed}");
        }
    }

    #[test]
    fn plain_gets_are_answered_here() {
        let head = "GET /api/channels/a/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
        assert_eq!(routed(head), Some((true, true, head.len())));
        let close = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert_eq!(routed(close), Some((true, false, close.len())));
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for head in [
            "POST /api/channels/a HTTP/1.1\r\nContent-Length: 2\r\n\r\n",
            "GET /other HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "HEAD / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(routed(head), Some((false, _, _))), "{head}");
        }
        // WebSocket handshakes on /api/ws and /mqtt stay here, with their credential.
        let ws = "GET /api/ws?token=t HTTP/1.1\r\nUpgrade: websocket\r\nAuthorization: Bearer b\r\n\r\n";
        match route(ws.as_bytes()) {
            Some((Route::WebSocket(r), _)) => {
                assert_eq!((r.query.as_deref(), r.authorization.as_deref()), (Some("token=t"), Some("Bearer b")));
                assert_eq!(r.handshake.upgrade.as_deref(), Some("websocket"));
            }
            _ => panic!("not a WebSocket route"),
        }
        // Not a request head at all: hyper answers 400.
        assert!(routed("NOT HTTP\r\n\r\n").is_none());
    }

    #[test]
    fn a_head_over_the_limit_goes_to_hyper_however_it_arrived() {
        let head = |n: usize| format!("GET /api/channels/a/messages HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(n));
        let fits = head(MAX_HEAD - head(0).len());
        assert_eq!(fits.len(), MAX_HEAD);
        assert!(matches!(decide(fits.as_bytes()), (Route::Poll(..), MAX_HEAD)));
        let over = head(MAX_HEAD - head(0).len() + 1);
        assert!(matches!(decide(over.as_bytes()), (Route::Hyper, 0)), "read whole in one read, still hyper's");
        let ws = format!("GET /api/ws HTTP/1.1\r\nUpgrade: websocket\r\nX-Pad: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(decide(ws.as_bytes()), (Route::Hyper, 0)));
    }

    #[test]
    fn a_head_with_bare_line_feeds_is_whole_and_answered() {
        // Fuzzing found these waiting for more bytes until the head timeout.
        for head in
            ["GET /healthz HTTP/1.1\nHost: x\n\n", "GET /healthz HTTP/1.1\r\nHost: x\n\r\n", "GET / HTTP/1.1\n\n"]
        {
            assert!(head_complete(head.as_bytes()), "{head:?}");
            assert_eq!(routed(head), Some((true, true, head.len())), "{head:?}");
        }
        for partial in ["GET / HTTP/1.1\r\nHost: x\r\n", "GET / HTTP/1.1\n", "GET / HTTP/1.1\r\n\r"] {
            assert!(!head_complete(partial.as_bytes()), "{partial:?}");
        }
    }
}
