//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from the
//! docs, and free to change with the targets).
//!
//! The parsers under test are crate-private; each function here calls the
//! real code and hands back plain values the targets can check, without
//! sockets: the MQTT framing and codec (`transport/mqtt/codec.rs`), the
//! WebSocket frame parser (`edge/websocket.rs`) and the front door's decision
//! on a request head (`edge/front.rs`). The core's parsers (channels, filters,
//! cursors) are public already and are fuzzed through `herald-core` directly.

/// MQTT: framing packets off a stream, and the v3/v5 codec.
pub mod mqtt {
    use std::{
        collections::VecDeque,
        pin::{Pin, pin},
        task::{Context, Poll, Waker},
    };

    use mqtt_proto::v5;
    use tokio::io::{AsyncRead, ReadBuf};

    use crate::transport::mqtt::codec::{self, Framer, ReadError};

    /// The protocol a connection speaks.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Version {
        V3,
        V5,
    }

    impl From<Version> for codec::Version {
        fn from(v: Version) -> Self {
            match v {
                Version::V3 => codec::Version::V3,
                Version::V5 => codec::Version::V5,
            }
        }
    }

    /// How framing ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum FrameEnd {
        /// The stream ended (with or without a packet half read).
        Closed,
        BadLength,
        TooLarge(usize),
    }

    fn end(e: ReadError) -> FrameEnd {
        match e {
            ReadError::Closed | ReadError::Io(_) => FrameEnd::Closed,
            ReadError::BadLength => FrameEnd::BadLength,
            ReadError::TooLarge(n) => FrameEnd::TooLarge(n),
        }
    }

    /// The length of the first packet in `buf` when it is all there.
    pub fn whole_packet(buf: &[u8], max: usize) -> Result<Option<usize>, FrameEnd> {
        codec::whole_packet(buf, max).map_err(end)
    }

    /// Every packet the connection's `Framer` takes off a stream that arrives
    /// in `chunks` (each read gives at most the rest of one chunk), and how
    /// the stream ended.
    pub fn frame(chunks: &[&[u8]], max: usize) -> (Vec<Vec<u8>>, FrameEnd) {
        let reader = Chunks(chunks.iter().copied().filter(|c| !c.is_empty()).collect());
        let mut framer = Framer::new(reader, max);
        let mut packets = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            // A reader over memory is always ready: one poll finishes.
            let next = match pin!(framer.next()).poll(&mut cx) {
                Poll::Ready(r) => r,
                Poll::Pending => unreachable!("reads from memory never wait"),
            };
            match next {
                Ok(p) => packets.push(p.to_vec()),
                Err(e) => return (packets, end(e)),
            }
        }
    }

    /// A stream delivered in the given pieces.
    struct Chunks<'a>(VecDeque<&'a [u8]>);

    impl AsyncRead for Chunks<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(chunk) = self.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(&chunk[n..]);
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// The version a CONNECT asks for, from its protocol level.
    pub fn connect_version(packet: &[u8]) -> Option<Version> {
        codec::connect_version(packet).map(|v| match v {
            codec::Version::V3 => Version::V3,
            codec::Version::V5 => Version::V5,
        })
    }

    /// A packet decoded as the broker sees it (v3 lifted to v5).
    pub fn decode(version: Version, bytes: &[u8]) -> Result<v5::Packet, String> {
        codec::decode(version.into(), bytes).map_err(|e| e.to_string())
    }

    /// A packet encoded for a connection of `version` (v3: lowered).
    pub fn encode(version: Version, packet: &v5::Packet) -> Option<Vec<u8>> {
        codec::encode(version.into(), packet)
    }

    /// The broker's raw MQTT topic matching (for topics that are not channels).
    pub fn topic_matches(filter: &str, topic: &str) -> bool {
        crate::transport::mqtt::topic::matches(filter, topic)
    }

    /// An encoded v5 PUBLISH with more subscription identifiers.
    pub fn add_subscription_ids(packet: Vec<u8>, ids: &[u32]) -> Option<Vec<u8>> {
        codec::add_subscription_ids(packet, ids)
    }
}

/// WebSocket (RFC 6455): frames in, messages out; frames the server writes.
pub mod websocket {
    use crate::edge::websocket::{self as ws, Handshake, Incoming};

    /// Most a frame header claims is never reserved at once beyond this.
    pub const MAX_RESERVE: usize = ws::MAX_RESERVE;

    /// A whole message from the client.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Message {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    /// The receiving side of one connection, without its socket.
    pub struct Receiver(ws::Receiver);

    impl Receiver {
        pub fn new(max_message: usize) -> Self {
            Receiver(ws::Receiver::new(&[], max_message))
        }

        /// Bytes as one read from the socket brings them.
        pub fn push(&mut self, bytes: &[u8]) {
            self.0.read.extend_from_slice(bytes);
        }

        /// The next whole message, `None` until one is there; an error is
        /// the close code the connection ends with.
        pub fn parse(&mut self) -> Result<Option<Message>, u16> {
            match self.0.parse() {
                Ok(m) => Ok(m.map(|m| match m {
                    Incoming::Text(b) => Message::Text(b.to_vec()),
                    Incoming::Binary(b) => Message::Binary(b.to_vec()),
                    Incoming::Ping(b) => Message::Ping(b.to_vec()),
                    Incoming::Pong => Message::Pong,
                    Incoming::Close(c) => Message::Close(c),
                })),
                Err(e) => Err(e.close_code().expect("parsing does no I/O")),
            }
        }

        /// Bytes held and the room allocated for them.
        pub fn buffered(&self) -> (usize, usize) {
            (self.0.read.len(), self.0.read.capacity())
        }
    }

    /// One frame as the server writes it (unmasked).
    pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ws::put_frame(&mut out, opcode, payload);
        out
    }

    /// The payload of the close frame the server sends.
    pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        ws::close_payload(code, reason)
    }

    /// The opening handshake's answer to these headers: the accept key, or
    /// why it is refused.
    pub fn accept(headers: &[(&str, &[u8])]) -> Result<String, &'static str> {
        let mut h = Handshake::default();
        for (name, value) in headers {
            h.header(name, value);
        }
        h.accept().map_err(|r| r.why())
    }
}

/// The front door's decision on a request head.
pub mod front {
    use crate::{
        edge::front::{self, Route},
        transport::ws::Endpoint,
    };

    /// The largest request head the front door reads itself.
    pub const MAX_HEAD: usize = front::MAX_HEAD;
    /// Most headers a request answered here may have.
    pub const MAX_HEADERS: usize = front::MAX_HEADERS;

    /// Whether the front door stops reading and decides.
    pub fn head_complete(buf: &[u8]) -> bool {
        front::head_complete(buf)
    }

    /// What the front door does with the bytes read.
    #[derive(Debug)]
    pub enum Decision {
        /// The connection goes to hyper with every byte read.
        Hyper,
        /// A WebSocket handshake on `/api/ws` (`mqtt: false`) or `/mqtt`.
        WebSocket {
            mqtt: bool,
            head_len: usize,
            query: Option<String>,
            authorization: Option<String>,
            /// The handshake's accept key, or why it is refused.
            accept: Result<String, &'static str>,
            /// The subprotocol `/mqtt` answers with.
            mqtt_protocol: Option<String>,
        },
        /// A poll answered without the router.
        Poll {
            head_len: usize,
            channel: String,
            query: Option<String>,
            authorization: Option<String>,
            keep_alive: bool,
        },
        /// A request answered here through the router.
        Router {
            head_len: usize,
            method: String,
            uri: String,
            http11: bool,
            headers: Vec<(String, Vec<u8>)>,
            keep_alive: bool,
        },
    }

    pub fn decide(buf: &[u8]) -> Decision {
        // A loopback client: exempt from the guards, as most fuzzing
        // harnesses' peers would be; the address policy is not what is fuzzed.
        let none = crate::guard::address::AddressPolicy::new(&[], &[]).expect("an empty policy");
        let routed = front::decide(buf, crate::guard::address::Peer::EXEMPT, &none);
        let (route, head_len) = (routed.route, routed.len);
        match route {
            Route::Hyper => Decision::Hyper,
            Route::WebSocket(r) => Decision::WebSocket {
                mqtt: matches!(r.endpoint, Endpoint::Mqtt),
                head_len,
                accept: r.handshake.accept().map_err(|e| e.why()),
                mqtt_protocol: r.handshake.choose(&["mqtt", "mqttv3.1"]).map(str::to_owned),
                query: r.query,
                authorization: r.authorization,
            },
            Route::Poll(p, keep_alive) => Decision::Poll {
                head_len,
                channel: p.channel.to_string(),
                query: p.query,
                authorization: p.authorization,
                keep_alive,
            },
            Route::Here(req, keep_alive) => Decision::Router {
                head_len,
                method: req.method().to_string(),
                uri: req.uri().to_string(),
                http11: req.version() == axum::http::Version::HTTP_11,
                headers: req.headers().iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
                keep_alive,
            },
        }
    }
}
