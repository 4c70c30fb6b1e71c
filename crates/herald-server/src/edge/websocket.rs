//! The WebSocket protocol (RFC 6455), server side: the opening handshake's
//! checks and answer, and messages framed over a `TcpStream` the front door
//! hands over.
//!
//! Why not tungstenite (through axum): an idle WebSocket there held a 512-byte
//! read buffer, two waker `Arc`s, hyper's upgraded-connection box and a
//! ~400-byte protocol state for its whole life (heaptrack: 3.3 KB per idle
//! connection against SSE's 2.1). Here an idle connection holds the socket
//! and no buffer: bytes are read only once the socket is readable, into a
//! stack buffer, and kept only while a frame is incomplete (the buffer grows
//! with what arrives, not with the length a header claims); frames to send
//! are gathered in a buffer that is given back once written.
//!
//! What it does not do: extensions (permessage-deflate; no mainstream Rust
//! crate does either) and subprotocols beyond echoing one the caller accepts.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// The handshake's fixed GUID (RFC 6455 section 1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Read at most this much per `try_read`; on the stack, never kept.
const READ_CHUNK: usize = 4096;
/// Room reserved at once for an incomplete frame: more comes as its bytes do.
pub(crate) const MAX_RESERVE: usize = 4 * READ_CHUNK;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// The opening handshake's headers that matter, as the request gave them.
#[derive(Debug, Default, Clone)]
pub(crate) struct Handshake {
    pub upgrade: Option<String>,
    pub connection: Option<String>,
    pub version: Option<String>,
    pub key: Option<String>,
    pub protocols: Option<String>,
}

impl Handshake {
    /// Records `name: value` when it is one of the handshake's headers.
    pub(crate) fn header(&mut self, name: &str, value: &[u8]) {
        let slot = if name.eq_ignore_ascii_case("upgrade") {
            &mut self.upgrade
        } else if name.eq_ignore_ascii_case("connection") {
            &mut self.connection
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            &mut self.version
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            &mut self.key
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            &mut self.protocols
        } else {
            return;
        };
        let value = String::from_utf8_lossy(value);
        // Repeated headers are one comma-separated list.
        match slot {
            Some(v) => {
                v.push_str(", ");
                v.push_str(&value);
            }
            None => *slot = Some(value.into_owned()),
        }
    }

    /// The `Sec-WebSocket-Accept` value, or what is wrong with the request.
    pub(crate) fn accept(&self) -> Result<String, Refusal> {
        if !has_token(self.upgrade.as_deref(), "websocket") {
            return Err(Refusal::Request("expected 'Upgrade: websocket'"));
        }
        if !has_token(self.connection.as_deref(), "upgrade") {
            return Err(Refusal::Request("expected 'Connection: Upgrade'"));
        }
        if self.version.as_deref().map(str::trim) != Some("13") {
            return Err(Refusal::Version);
        }
        let key = self.key.as_deref().map(str::trim).unwrap_or("");
        if !is_nonce(key) {
            return Err(Refusal::Request("expected a 'Sec-WebSocket-Key' of 16 bytes in base64"));
        }
        let mut sha = Sha1::new();
        sha.update(key.as_bytes());
        sha.update(GUID.as_bytes());
        Ok(herald_core::message::base64(&sha.finalize()))
    }

    /// The first of `protocols` the client offered, spelt as the client spelt
    /// it (the answer must name one of the client's own).
    pub(crate) fn choose<'a>(&'a self, protocols: &[&str]) -> Option<&'a str> {
        let offered = || self.protocols.as_deref().into_iter().flat_map(|l| l.split(',')).map(str::trim);
        protocols.iter().find_map(|p| offered().find(|o| o.eq_ignore_ascii_case(p)))
    }
}

/// Why a handshake is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a WebSocket handshake, for the reason given.
    Request(&'static str),
    /// A version other than 13: answered `426` with `Sec-WebSocket-Version: 13`
    /// (RFC 6455 section 4.4), so the client can retry with it.
    Version,
}

impl Refusal {
    pub(crate) fn why(self) -> &'static str {
        match self {
            Refusal::Request(why) => why,
            Refusal::Version => "expected 'Sec-WebSocket-Version: 13'",
        }
    }
}

/// 16 bytes in base64: 22 characters of the alphabet, the last one carrying
/// only two bits, then `==`.
fn is_nonce(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && matches!(b[21], b'A' | b'Q' | b'g' | b'w')
}

fn has_token(list: Option<&str>, token: &str) -> bool {
    list.is_some_and(|l| l.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// The `101 Switching Protocols` answer to an accepted handshake.
pub(crate) fn switching_protocols(accept: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n"
    );
    if let Some(p) = protocol {
        head.push_str(&format!("sec-websocket-protocol: {p}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A whole text message, checked to be UTF-8.
    Text(Bytes),
    Binary(Bytes),
    /// Answer with [`WebSocket::feed_pong`].
    Ping(Bytes),
    Pong,
    /// The client is closing, with its code if it gave one.
    Close(Option<u16>),
}

/// Why the connection cannot go on; each has its close code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WsError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("a text message is not UTF-8")]
    NotUtf8,
    #[error("message over {0} bytes")]
    TooBig(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl WsError {
    /// The close code to tell the client, when it is still there to hear it.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(_) => Some(1002),
            WsError::NotUtf8 => Some(1007),
            WsError::TooBig(_) => Some(1009),
            WsError::Io(_) => None,
        }
    }
}

/// One WebSocket connection after the handshake.
pub(crate) struct WebSocket {
    tcp: TcpStream,
    /// What was read and is not yet a whole message.
    rx: Receiver,
    /// Frames fed but not yet written, and how much of them is written.
    write: Vec<u8>,
    written: usize,
    close_sent: bool,
}

/// The receiving side's state, apart from the socket: bytes go in, whole
/// messages come out (the fuzz targets drive it without a socket).
pub(crate) struct Receiver {
    /// Bytes read but not yet a whole frame; empty (unallocated) when idle.
    pub(crate) read: BytesMut,
    /// A fragmented message being put together: its opcode and payload so far.
    partial: Option<Box<(u8, BytesMut)>>,
    max_message: usize,
}

impl WebSocket {
    /// `early`: bytes that came after the handshake in the same read.
    pub(crate) fn new(tcp: TcpStream, early: &[u8], max_message: usize) -> Self {
        WebSocket { tcp, rx: Receiver::new(early, max_message), write: Vec::new(), written: 0, close_sent: false }
    }

    /// The next message; `None` when the connection ended without a close
    /// frame. Cancel-safe: what was read stays for the next call.
    pub(crate) async fn recv(&mut self) -> Option<Result<Incoming, WsError>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, WsError>>> {
        loop {
            match self.rx.parse() {
                Ok(Some(msg)) => return Poll::Ready(Some(Ok(msg))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            if let Err(e) = ready!(self.tcp.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(e.into())));
            }
            match self.fill() {
                Ok(0) => return Poll::Ready(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    /// One read into a stack buffer, kept only past what the parser needs.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.tcp.try_read(&mut chunk)?;
        self.rx.read.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Queues a text message; [`WebSocket::flush`] writes it.
    pub(crate) fn feed_text(&mut self, text: &[u8]) {
        self.feed(TEXT, text);
    }

    pub(crate) fn feed_binary(&mut self, data: &[u8]) {
        self.feed(BINARY, data);
    }

    pub(crate) fn feed_ping(&mut self) {
        self.feed(PING, &[]);
    }

    /// The answer to a ping, with its payload.
    pub(crate) fn feed_pong(&mut self, payload: &[u8]) {
        self.feed(PONG, payload);
    }

    /// Queues the close frame (once; nothing may follow it).
    pub(crate) fn feed_close(&mut self, code: u16, reason: &str) {
        if self.close_sent {
            return;
        }
        self.feed(CLOSE, &close_payload(code, reason));
        self.close_sent = true;
    }

    fn feed(&mut self, opcode: u8, payload: &[u8]) {
        if self.close_sent {
            return;
        }
        put_frame(&mut self.write, opcode, payload);
    }

    /// Writes everything fed so far.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.write.len() {
            let n = ready!(std::pin::Pin::new(&mut self.tcp).poll_write(cx, &self.write[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Given back once written: most connections are idle between writes.
        self.written = 0;
        self.write = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Sends a close frame (if none was) and ends the connection.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) {
        self.feed_close(code, reason);
        if self.flush().await.is_ok() {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.tcp).await;
        }
    }

    /// After a close this side started: reads until the client's close frame,
    /// the end of the stream, or `patience`. A socket dropped with unread
    /// bytes is reset, and a reset can make the client lose the close frame
    /// (and its code) it already received. What cannot be parsed (after a
    /// protocol error) is read and dropped.
    pub(crate) async fn await_close(&mut self, patience: std::time::Duration) {
        let wait = async {
            loop {
                match self.recv().await {
                    None | Some(Ok(Incoming::Close(_))) => return,
                    Some(Ok(_)) => {}
                    Some(Err(WsError::Io(_))) => return,
                    Some(Err(_)) => {
                        self.rx.read = BytesMut::new();
                        self.rx.partial = None;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(patience, wait).await;
    }
}

impl Receiver {
    pub(crate) fn new(early: &[u8], max_message: usize) -> Self {
        Receiver { read: BytesMut::from(early), partial: None, max_message }
    }

    /// The next whole message in what was read, if there is one.
    pub(crate) fn parse(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            let Some(head) = FrameHead::parse(&self.read)? else { return Ok(None) };
            let partial_len = self.partial.as_ref().map_or(0, |p| p.1.len());
            if head.opcode < CLOSE && head.len > self.max_message.saturating_sub(partial_len) {
                return Err(WsError::TooBig(self.max_message));
            }
            // Within the limit (data) or 125 bytes (control): no overflow.
            let total = head.size + head.len;
            if self.read.len() < total {
                self.read.reserve((total - self.read.len()).min(MAX_RESERVE));
                return Ok(None);
            }
            let _ = self.read.split_to(head.size);
            let mut payload = self.read.split_to(head.len);
            if self.read.is_empty() {
                // Give the buffer back: an idle connection keeps nothing.
                self.read = BytesMut::new();
            }
            unmask(&mut payload, head.mask);
            let (opcode, payload) = match (head.opcode, self.partial.take()) {
                (CONTINUATION, None) => return Err(WsError::Protocol("a continuation frame with nothing to continue")),
                (CONTINUATION, Some(mut p)) => {
                    p.1.extend_from_slice(&payload);
                    if !head.fin {
                        self.partial = Some(p);
                        continue;
                    }
                    (p.0, p.1)
                }
                (TEXT | BINARY, Some(_)) => {
                    return Err(WsError::Protocol("a new message began before the last one ended"));
                }
                (op @ (TEXT | BINARY), None) if !head.fin => {
                    self.partial = Some(Box::new((op, payload)));
                    continue;
                }
                (op, p) => {
                    // A control frame may come between fragments: keep them.
                    self.partial = p;
                    (op, payload)
                }
            };
            return Ok(Some(match opcode {
                TEXT => {
                    std::str::from_utf8(&payload).map_err(|_| WsError::NotUtf8)?;
                    Incoming::Text(payload.freeze())
                }
                BINARY => Incoming::Binary(payload.freeze()),
                PING => Incoming::Ping(payload.freeze()),
                PONG => Incoming::Pong,
                _ => Incoming::Close(close_code(&payload)?),
            }));
        }
    }
}

/// Binary messages as one byte stream, for protocols that run over a
/// WebSocket as over TCP (MQTT: a packet may span messages, a message may
/// hold several). Each write becomes one binary message; pings are answered;
/// a text message ends the stream (MQTT requires binary frames).
pub(crate) struct ByteStream {
    ws: WebSocket,
    unread: Bytes,
}

/// Frames queued past this are written before more are taken.
const MAX_QUEUED_WRITES: usize = 64 * 1024;

impl ByteStream {
    pub(crate) fn new(ws: WebSocket) -> Self {
        ByteStream { ws, unread: Bytes::new() }
    }

    /// Queues a close frame and tries to send it (best effort: the stream ends
    /// either way).
    fn close_with(&mut self, cx: &mut Context<'_>, code: u16, reason: &str) {
        self.ws.feed_close(code, reason);
        let _ = self.ws.poll_flush(cx);
    }
}

impl AsyncRead for ByteStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            // Pongs queued here go out with reading; a client that sends
            // pings but does not read gets no more read until they are out.
            if !this.ws.write.is_empty() {
                match this.ws.poll_flush(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending if this.ws.write.len() > MAX_QUEUED_WRITES => return Poll::Pending,
                    _ => {}
                }
            }
            let msg = match ready!(this.ws.poll_recv(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    if let Some(code) = e.close_code() {
                        this.close_with(cx, code, &e.to_string());
                    }
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            };
            match msg {
                Incoming::Binary(b) => this.unread = b,
                Incoming::Ping(p) => this.ws.feed_pong(&p), // written at the top of the loop
                Incoming::Pong => {}
                Incoming::Close(code) => {
                    this.close_with(cx, code.unwrap_or(1000), "");
                    return Poll::Ready(Ok(()));
                }
                Incoming::Text(_) => {
                    this.close_with(cx, 1003, "binary frames only");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "a text frame")));
                }
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        if this.unread.is_empty() {
            this.unread = Bytes::new(); // the message's buffer goes back
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ByteStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.ws.write.len() > MAX_QUEUED_WRITES {
            ready!(self.ws.poll_flush(cx))?;
        }
        if self.ws.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.ws.feed_binary(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ws.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ws.feed_close(1000, "");
        ready!(self.ws.poll_flush(cx))?;
        Pin::new(&mut self.ws.tcp).poll_shutdown(cx)
    }
}

/// Appends one whole server frame (unmasked, as server frames are) to `out`.
pub(crate) fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let len = payload.len();
    out.reserve(len + 10);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A close frame's payload: the code, then as much of `reason` as fits in
/// a control frame's 125 bytes, cut at a character boundary.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    payload
}

/// A frame's header, parsed.
#[derive(Debug, PartialEq, Eq)]
struct FrameHead {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// The header's own length.
    size: usize,
    /// The payload's length.
    len: usize,
}

impl FrameHead {
    /// `None` until the whole header is there.
    fn parse(buf: &[u8]) -> Result<Option<FrameHead>, WsError> {
        let [b0, b1, ..] = *buf else { return Ok(None) };
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set without an extension"));
        }
        if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
            return Err(WsError::Protocol("unknown opcode"));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("client frames must be masked"));
        }
        let (len, at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if len > i64::MAX as u64 {
            return Err(WsError::Protocol("a 64-bit length with its top bit set"));
        }
        if opcode >= CLOSE && (!fin || len > 125) {
            return Err(WsError::Protocol("control frames must be whole and at most 125 bytes"));
        }
        let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
        Ok(Some(FrameHead {
            fin,
            opcode,
            mask: mask.try_into().expect("4 bytes"),
            size: at + 4,
            // Past usize (32-bit targets) is past any message limit too.
            len: usize::try_from(len).unwrap_or(usize::MAX),
        }))
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    // Eight bytes at a time; each chunk starts at a multiple of four, so the
    // mask lines up, and so does the remainder's.
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A close frame's code (RFC 6455 section 7.4), checked; its reason must be UTF-8.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WsError> {
    let Some((code, reason)) = payload.split_first_chunk::<2>() else {
        return if payload.is_empty() { Ok(None) } else { Err(WsError::Protocol("a close frame of one byte")) };
    };
    let code = u16::from_be_bytes(*code);
    // Registered codes a peer may send (1004-1006 and 1015 may not be sent).
    let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !valid {
        return Err(WsError::Protocol("a close code that may not be sent"));
    }
    std::str::from_utf8(reason).map_err(|_| WsError::NotUtf8)?;
    Ok(Some(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, as clients must send them.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    /// A connected pair: the server side as a `WebSocket`, the client raw.
    async fn pair(max: usize) -> (WebSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (WebSocket::new(server, &[], max), client)
    }

    async fn send(client: &mut TcpStream, bytes: &[u8]) {
        tokio::io::AsyncWriteExt::write_all(client, bytes).await.unwrap();
    }

    #[test]
    fn accepts_the_rfc_example_key() {
        // RFC 6455 section 1.3's worked example.
        let mut h = Handshake::default();
        h.header("Upgrade", b"WebSocket");
        h.header("Connection", b"keep-alive, Upgrade");
        h.header("Sec-WebSocket-Version", b"13");
        h.header("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(h.accept().as_deref(), Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        let mut no_version = h.clone();
        no_version.version = Some("8".into());
        assert_eq!(no_version.accept(), Err(Refusal::Version));
        let mut no_upgrade = h.clone();
        no_upgrade.connection = Some("keep-alive".into());
        assert!(no_upgrade.accept().unwrap_err().why().contains("Connection"));
        for bad in ["!!!!!!!!!!!!!!!!!!!!!!==", "dGhlIHNhbXBsZSBub25jZR==", "dGhlIHNhbXBsZSBub25jZQ="] {
            let mut k = h.clone();
            k.key = Some(bad.into());
            assert!(k.accept().unwrap_err().why().contains("Key"), "{bad}");
        }
        assert_eq!(h.choose(&["mqtt"]), None);
        h.header("Sec-WebSocket-Protocol", b"chat");
        h.header("sec-websocket-protocol", b"MQTT, mqttv3.1");
        assert_eq!(h.choose(&["mqtt", "mqttv3.1"]), Some("MQTT"), "the client's own spelling");
        assert_eq!(h.choose(&["mqttv3.1"]), Some("mqttv3.1"));
        assert_eq!(h.choose(&["mq"]), None);
    }

    #[tokio::test]
    async fn reads_fragmented_messages_with_control_frames_between() {
        let (mut ws, mut client) = pair(1 << 20).await;
        let mut bytes = frame(false, TEXT, "héllo ".as_bytes());
        bytes.extend(frame(true, PING, b"p"));
        bytes.extend(frame(false, CONTINUATION, b"wor"));
        bytes.extend(frame(true, CONTINUATION, b"ld"));
        let big = vec![7u8; 70_000];
        bytes.extend(frame(true, BINARY, &big));
        bytes.extend(frame(true, CLOSE, &[0x03, 0xE8, b'o', b'k']));
        // Byte by byte: every split of a frame must wait for the rest.
        for b in &bytes[..40] {
            send(&mut client, &[*b]).await;
        }
        send(&mut client, &bytes[40..]).await;
        assert_eq!(ws.recv().await.unwrap().unwrap(), Incoming::Ping(Bytes::from_static(b"p")));
        assert_eq!(ws.recv().await.unwrap().unwrap(), Incoming::Text(Bytes::from("héllo world")));
        assert_eq!(ws.recv().await.unwrap().unwrap(), Incoming::Binary(Bytes::from(big)));
        assert_eq!(ws.recv().await.unwrap().unwrap(), Incoming::Close(Some(1000)));
        assert!(ws.rx.read.capacity() == 0, "nothing kept once every frame is read");
    }

    #[tokio::test]
    async fn protocol_violations_are_errors_with_their_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (
                {
                    let mut f = frame(true, TEXT, b"x");
                    f[1] &= 0x7F;
                    f
                },
                1002,
            ), // unmasked
            (
                {
                    let mut f = frame(true, TEXT, b"x");
                    f[0] |= 0x40;
                    f
                },
                1002,
            ), // RSV1
            (frame(true, 0x3, b""), 1002),           // unknown opcode
            (frame(true, CONTINUATION, b"x"), 1002), // nothing to continue
            ([frame(false, TEXT, b"a"), frame(true, TEXT, b"b")].concat(), 1002),
            (frame(false, PING, b""), 1002),          // fragmented control
            (frame(true, PING, &[0; 126]), 1002),     // long control
            (frame(true, TEXT, &[0xC3, 0x28]), 1007), // not UTF-8
            ([frame(false, TEXT, &[0xE2, 0x82]), frame(true, CONTINUATION, &[0xAC])].concat(), 0), // split € is fine
            (frame(true, CLOSE, &[3]), 1002),         // one-byte close
            (frame(true, CLOSE, &1005u16.to_be_bytes()), 1002), // reserved code
            (frame(true, BINARY, &[0; 101]), 1009),   // over the limit
            ([frame(false, BINARY, &[0; 60]), frame(true, CONTINUATION, &[0; 60])].concat(), 1009),
        ];
        for (bytes, code) in cases {
            let (mut ws, mut client) = pair(100).await;
            send(&mut client, &bytes).await;
            let got = ws.recv().await.unwrap();
            match code {
                0 => assert_eq!(got.unwrap(), Incoming::Text(Bytes::from("€"))),
                _ => assert_eq!(got.unwrap_err().close_code(), Some(code), "{bytes:?}"),
            }
        }
    }

    #[tokio::test]
    async fn writes_unmasked_frames_of_every_length_form_then_closes() {
        let (mut ws, mut client) = pair(100).await;
        ws.feed_text(b"hi");
        ws.feed_binary(&[1; 300]);
        ws.feed_binary(&[2; 70_000]);
        ws.close(1001, &"é".repeat(100)).await;
        ws.feed_text(b"after close: dropped");
        ws.flush().await.unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got).await.unwrap();
        let mut expect = vec![0x81, 2, b'h', b'i', 0x82, 126, 1, 44];
        expect.extend([1; 300]);
        expect.extend([0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        expect.extend([2; 70_000]);
        // 2 bytes of code and 122 of reason: 61 whole 'é's fit in 123.
        expect.extend([0x88, 124, 0x03, 0xE9]);
        expect.extend("é".repeat(61).as_bytes());
        assert_eq!(got, expect);
    }
}
