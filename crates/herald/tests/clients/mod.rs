//! Real clients for the transports `common` has no helper for: a WebSocket
//! client (tokio-tungstenite) speaking Herald's JSON protocol, a raw WebSocket
//! that never answers pings, and a hidden-iframe reader that splits the HTML
//! stream into its script calls and comments; and raw MQTT packets. Shared by
//! `ws.rs`, `iframe.rs`, `matrix.rs`, `mqtt.rs` and `auth.rs`; every wait is
//! bounded so a hang fails instead of stalling.
#![allow(dead_code, unreachable_pub)]

use std::{collections::VecDeque, time::Duration};

use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, protocol::CloseFrame},
};

use crate::common::{Server, client};

/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A WebSocket connection to `/api/ws`.
pub struct Ws {
    inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read ahead by [`Ws::subscribe_more`], handed out first by [`Ws::recv`].
    pending: VecDeque<Value>,
}

impl Ws {
    pub async fn connect(s: &Server) -> Ws {
        let (inner, res) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(s.ws_url()))
            .await
            .expect("WebSocket handshake within 10s")
            .expect("WebSocket handshake");
        assert_eq!(res.status(), 101);
        Ws { inner, pending: VecDeque::new() }
    }

    /// A connection from the loopback address `ip` (another client to the
    /// server's limits), with `query` after `/api/ws?`; the server's answer
    /// when it refuses the handshake.
    pub async fn connect_from(
        s: &Server,
        ip: &str,
        query: &str,
    ) -> Result<Ws, tungstenite::http::Response<Option<Vec<u8>>>> {
        let tcp = crate::common::tcp_from(ip, &s.addr, None).await;
        let url = format!("{}?{query}", s.ws_url());
        match tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)))
            .await
            .expect("a WebSocket handshake answer within 10s")
        {
            Ok((inner, res)) => {
                assert_eq!(res.status(), 101);
                Ok(Ws { inner, pending: VecDeque::new() })
            }
            Err(tungstenite::Error::Http(res)) => Err(*res),
            Err(e) => panic!("WebSocket handshake failed: {e}"),
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(Message::text(v.to_string())).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).await;
    }

    pub async fn send(&mut self, m: Message) {
        self.inner.send(m).await.expect("send a WebSocket frame");
    }

    /// Sends without caring whether the server already hung up.
    pub async fn try_send(&mut self, m: Message) -> Result<(), tungstenite::Error> {
        self.inner.send(m).await
    }

    /// The next frame of any kind (pings included), or `None` when the
    /// connection ended. Fails the test after 10 s of silence.
    pub async fn next_frame(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        tokio::time::timeout(PATIENCE, self.inner.next()).await.expect("a WebSocket frame within 10s")
    }

    /// The next JSON text frame; pings and pongs are skipped (tungstenite
    /// answers pings while we read). A close or a non-JSON frame fails the test.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        loop {
            match self.next_frame().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("non-JSON text frame {t:?}: {e}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a JSON text frame, got {other:?}"),
            }
        }
    }

    /// The next frame, which must have `"type": kind`.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], kind, "expected a '{kind}' frame, got {v}");
        v
    }

    /// Subscribes and returns the `subscribed` frame, which must be the very
    /// next frame: use it when nothing else can be in flight on the connection.
    pub async fn subscribe(&mut self, channel: &str, since: Option<Value>) -> Value {
        self.send_json(subscribe_frame(channel, since)).await;
        let v = self.recv_type("subscribed").await;
        assert_eq!(v["channel"], channel, "{v}");
        v
    }

    /// Subscribes while earlier subscriptions may still be delivering: frames
    /// arriving before the `subscribed` one are kept, in order, for `recv`.
    pub async fn subscribe_more(&mut self, channel: &str, since: Option<Value>) -> Value {
        self.send_json(subscribe_frame(channel, since)).await;
        let mut ahead = Vec::new();
        let v = loop {
            let v = self.recv().await;
            if v["type"] == "subscribed" {
                break v;
            }
            ahead.push(v);
        };
        self.pending.extend(ahead);
        assert_eq!(v["channel"], channel, "{v}");
        v
    }

    /// The next `n` frames, each a `message`.
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv_type("message").await);
        }
        out
    }

    /// Sends `{"type":"ping"}` and expects the `pong` as the very next frame:
    /// proof that the connection is still open and still reading.
    pub async fn assert_usable(&mut self) {
        self.send_json(json!({ "type": "ping" })).await;
        self.recv_type("pong").await;
    }

    /// Reads until the connection ends. Returns the close frame when the
    /// server sent one (`Some(None)` for a close without a code), `None` when
    /// the socket just ended or broke. Any text frame on the way fails the test.
    pub async fn closed(&mut self) -> Option<Option<CloseFrame>> {
        loop {
            match self.next_frame().await {
                Some(Ok(Message::Close(frame))) => return Some(frame),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("expected the connection to close, got {other:?}"),
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.inner.close(None).await;
    }
}

fn subscribe_frame(channel: &str, since: Option<Value>) -> Value {
    let mut frame = json!({ "type": "subscribe", "channel": channel });
    if let Some(since) = since {
        frame["since"] = since;
    }
    frame
}

/// A WebSocket client that does the handshake by hand and then never writes
/// another byte, so it never answers a ping; [`SilentWs::frame`] reads the
/// server's frames raw (opcode and payload).
pub struct SilentWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl SilentWs {
    pub async fn connect(s: &Server) -> SilentWs {
        let mut tcp = TcpStream::connect(&s.addr).await.expect("connect");
        let req = format!(
            "GET /api/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            s.addr
        );
        tcp.write_all(req.as_bytes()).await.expect("write the handshake");
        let mut ws = SilentWs { tcp, buf: Vec::new() };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await.expect("the handshake answer");
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "handshake answer: {head}");
        ws.buf.drain(..end);
        ws
    }

    /// Reads more bytes; `None` at end of stream or on error.
    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.tcp.read(&mut chunk)).await.expect("bytes within 10s").ok()?;
        if n == 0 {
            return None;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Some(())
    }

    /// The next server frame as (opcode, payload); `None` when the stream ended.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((op, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some((op, payload));
            }
            self.fill().await?;
        }
    }
}

/// Parses one unmasked server frame at the start of `b`.
fn parse_server_frame(b: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if b.len() < 2 {
        return None;
    }
    assert_eq!(b[1] & 0x80, 0, "server frames are never masked");
    let (len, mut at) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = b.get(at..at + len)?.to_vec();
    at += len;
    Some((b[0] & 0x0f, payload, at))
}

/// One line of a hidden-iframe stream.
#[derive(Debug, Clone)]
pub enum Item {
    /// `<script>parent.F(ARG);</script>`: the argument parsed, and the raw line.
    Call(Value, String),
    /// An HTML comment on its own line (padding or keep-alive).
    Comment(String),
    /// Any other line: the document head before the first call.
    Markup(String),
}

impl Item {
    /// A comment with something in it: the padding comment is blank, a
    /// keep-alive is not.
    pub fn is_keep_alive(&self) -> bool {
        matches!(self, Item::Comment(c) if !c.trim_start_matches("<!--").trim_end_matches("-->").trim().is_empty())
    }
}

/// A hidden-iframe stream, read line by line.
pub struct Iframe {
    body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
    callback: String,
    /// Everything received before the first call.
    pub preamble: String,
    seen_call: bool,
    /// The whole stream so far, for "never appears raw" checks.
    pub raw: String,
}

impl Iframe {
    /// `GET /api/channels/{channel}/iframe?callback=F&since=S`; asserts 200 text/html.
    pub async fn open(s: &Server, channel: &str, callback: &str, since: &str) -> Iframe {
        let url = format!("{}/api/channels/{channel}/iframe?callback={callback}&since={since}", s.url);
        let res = client().get(url).send().await.expect("iframe request");
        assert_eq!(res.status(), 200, "iframe {channel}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/html"), "content-type {ct}");
        Iframe {
            body: Box::pin(res.bytes_stream()),
            buf: Vec::new(),
            callback: callback.to_string(),
            preamble: String::new(),
            seen_call: false,
            raw: String::new(),
        }
    }

    /// The next complete line, classified. Fails the test after 10 s of silence.
    pub async fn next_item(&mut self) -> Option<Item> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8(line).expect("the iframe stream is UTF-8");
                self.raw.push_str(&line);
                let item = self.classify(line.trim_end_matches('\n'));
                match &item {
                    Item::Call(..) => self.seen_call = true,
                    _ if !self.seen_call => {
                        self.preamble.push_str(&line);
                    }
                    Item::Markup(m) => panic!("markup after the first call: {m:?}"),
                    Item::Comment(_) => {}
                }
                return Some(item);
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next()).await.expect("iframe bytes within 10s")?;
            self.buf.extend_from_slice(&chunk.expect("iframe body"));
        }
    }

    fn classify(&self, line: &str) -> Item {
        let prefix = format!("<script>parent.{}(", self.callback);
        if let Some(rest) = line.strip_prefix(&prefix) {
            let arg = rest
                .strip_suffix(");</script>")
                .unwrap_or_else(|| panic!("script line does not end the call: {line:?}"));
            // Nothing inside may end the script, open a comment or break the parse.
            for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
                assert!(!arg.contains(bad), "raw {bad:?} inside a script call: {line:?}");
            }
            let v = serde_json::from_str(arg).unwrap_or_else(|e| panic!("call argument is not JSON ({e}): {arg:?}"));
            return Item::Call(v, line.to_string());
        }
        assert!(!line.to_ascii_lowercase().contains("<script"), "a script that is not a callback call: {line:?}");
        if line.starts_with("<!--") && line.ends_with("-->") {
            return Item::Comment(line.to_string());
        }
        Item::Markup(line.to_string())
    }

    /// The next callback argument, skipping comments.
    pub async fn next_call(&mut self) -> Value {
        loop {
            match self.next_item().await.expect("the iframe stream ended early") {
                Item::Call(v, _) => return v,
                Item::Comment(_) | Item::Markup(_) => continue,
            }
        }
    }

    /// The next `n` callback arguments.
    pub async fn calls(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_call().await);
        }
        out
    }
}

/// The id of a message object, or a panic naming it.
pub fn id_of(v: &Value) -> u64 {
    v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
}

/// Publishes text messages `"m{id}"` for each id of `ids` to `channel`, and
/// checks each publish got exactly that id (the channel's next one).
pub async fn publish_ids(s: &Server, channel: &str, ids: std::ops::RangeInclusive<u64>) {
    for id in ids {
        assert_eq!(crate::common::publish(s, channel, &format!("m{id}")).await, id, "publish m{id} to {channel}");
    }
}

/// The payload `publish_ids` gave message `id`.
pub fn text_of(id: u64) -> String {
    format!("m{id}")
}

/// Raw MQTT over TCP, for what no well-behaved client sends (garbage,
/// oversize packets, silence) and for exact bytes (reason codes, properties).
pub mod raw_mqtt {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::PATIENCE;
    use crate::common::Server;

    /// A CONNECT packet: MQTT 3.1.1 (level 4) or 5 (level 5, empty properties).
    pub fn connect_packet(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
        connect_with_password(level, client_id, keep_alive, None)
    }

    /// A clean-start CONNECT, with a password (and a user name, which MQTT 3.1.1
    /// requires beside one) when given.
    pub fn connect_with_password(level: u8, client_id: &str, keep_alive: u16, password: Option<&str>) -> Vec<u8> {
        let flags = 0x02 | if password.is_some() { 0xc0 } else { 0 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags];
        body.extend(keep_alive.to_be_bytes());
        if level == 5 {
            body.push(0); // no properties
        }
        for field in [Some(client_id), password.map(|_| "user"), password].into_iter().flatten() {
            body.extend((field.len() as u16).to_be_bytes());
            body.extend(field.as_bytes());
        }
        let mut p = vec![0x10];
        p.extend(remaining_length(body.len()));
        p.extend(body);
        p
    }

    pub fn remaining_length(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return out;
            }
        }
    }

    /// Reads one whole packet (fixed header included).
    pub async fn read_packet(tcp: &mut TcpStream) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async {
            let mut p = vec![tcp.read_u8().await.expect("a packet")];
            let mut len = 0usize;
            for i in 0..4 {
                let b = tcp.read_u8().await.expect("remaining length");
                p.push(b);
                len |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    break;
                }
            }
            let start = p.len();
            p.resize(start + len, 0);
            tcp.read_exact(&mut p[start..]).await.expect("packet body");
            p
        })
        .await
        .expect("a packet within 10s")
    }

    /// A raw connection that has sent CONNECT and read a successful CONNACK.
    pub async fn raw_connected(s: &Server, level: u8, client_id: &str, keep_alive: u16) -> TcpStream {
        let mut tcp = TcpStream::connect(&s.mqtt).await.expect("TCP connect");
        tcp.write_all(&connect_packet(level, client_id, keep_alive)).await.unwrap();
        let connack = read_packet(&mut tcp).await;
        assert_eq!(connack[0], 0x20, "CONNACK expected, got {connack:x?}");
        assert_eq!(connack[3], 0, "CONNACK must accept, got {connack:x?}");
        tcp
    }

    /// Reads until the server closes the connection (EOF or reset) and returns
    /// what it sent first. Fails the test if it is still open after 10 s.
    pub async fn closed_by_server(tcp: &mut TcpStream) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("the server closes the connection within 10s")
    }

    /// Connects with `password` and returns the socket with the CONNACK's
    /// return (3.1.1) or reason (5) code.
    pub async fn connect_code(s: &Server, level: u8, client_id: &str, password: &str) -> (TcpStream, u8) {
        let mut tcp = TcpStream::connect(&s.mqtt).await.expect("TCP connect");
        tcp.write_all(&connect_with_password(level, client_id, 0, Some(password))).await.unwrap();
        let connack = read_packet(&mut tcp).await;
        assert_eq!(connack[0], 0x20, "CONNACK expected, got {connack:x?}");
        (tcp, connack[3])
    }

    /// The topic of a PUBLISH packet (MQTT 3.1.1 or 5); `None` for any other.
    pub fn publish_topic(packet: &[u8]) -> Option<String> {
        if packet[0] >> 4 != 3 {
            return None;
        }
        let header = 1 + packet[1..].iter().position(|b| b & 0x80 == 0)? + 1;
        let len = usize::from(u16::from_be_bytes([packet[header], packet[header + 1]]));
        Some(String::from_utf8_lossy(&packet[header + 2..header + 2 + len]).into_owned())
    }

    /// Subscribes to `filter` at QoS 1 and returns the SUBACK's code for it.
    pub async fn subscribe_code(tcp: &mut TcpStream, level: u8, pid: u16, filter: &str) -> u8 {
        let mut body = pid.to_be_bytes().to_vec();
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend((filter.len() as u16).to_be_bytes());
        body.extend(filter.as_bytes());
        body.push(1);
        let mut p = vec![0x82];
        p.extend(remaining_length(body.len()));
        p.extend(body);
        tcp.write_all(&p).await.unwrap();
        loop {
            let packet = read_packet(tcp).await;
            if packet[0] != 0x90 {
                continue; // a retained message or a count may come first
            }
            // Fixed header (2 bytes: a SUBACK for one filter is short), packet
            // id, and for MQTT 5 the properties with their one-byte length.
            let start = 4 + if level == 5 { 1 + packet[4] as usize } else { 0 };
            return packet[start];
        }
    }
}
