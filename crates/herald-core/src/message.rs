//! Messages: what a publisher sends ([`NewMessage`]) and what the store hands back
//! once it has an id and a time ([`Message`]).
//!
//! Payloads stay opaque bytes: JSON is validated once at the edge and then carried
//! as text, never re-parsed. Each committed message keeps a small cache of its
//! encodings, one per wire format, so a message going to ten thousand subscribers
//! is encoded once per format and the bytes are shared.

use bytes::Bytes;
use std::{fmt, sync::OnceLock};

use crate::{channel::Channel, meta::Meta};

/// A message's event name, `[A-Za-z0-9_.-]{1,64}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventName(Box<str>);

/// Event names the server emits itself; publishing with them is refused so a
/// client can trust that a `gap` or `unread` event came from the server.
pub const RESERVED_EVENTS: &[&str] = &["gap", "unread", "error", "close"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    #[error("event name must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    Malformed,
    #[error("event name '{0}' is reserved for the server")]
    Reserved(String),
}

impl EventName {
    /// Parses a name a client wants to publish with.
    pub fn parse(name: &str) -> Result<Self, EventNameError> {
        let ok = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(EventNameError::Malformed);
        }
        if RESERVED_EVENTS.contains(&name) {
            return Err(EventNameError::Reserved(name.to_owned()));
        }
        Ok(EventName(name.into()))
    }

    /// Rebuilds a name read back from the store, which only holds names that
    /// passed [`EventName::parse`] (or server-written ones).
    pub fn from_trusted(name: &str) -> Self {
        EventName(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// How a payload was published, which decides how it is written on every wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DataKind {
    /// Valid JSON text, carried as is.
    Json = 1,
    /// UTF-8 text.
    Text = 2,
    /// Anything else (MQTT payloads that are not UTF-8). JSON forms carry it
    /// base64-encoded, with `"encoding":"base64"` beside it.
    Binary = 3,
}

impl DataKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(DataKind::Json),
            2 => Some(DataKind::Text),
            3 => Some(DataKind::Binary),
            _ => None,
        }
    }
}

/// A payload: bytes and what they are. The constructors are the only way in, so
/// `Json` always holds valid JSON and `Text` valid UTF-8.
#[derive(Clone, PartialEq, Eq)]
pub struct Data {
    kind: DataKind,
    bytes: Bytes,
}

impl Data {
    /// Validates JSON text; the bytes are kept exactly as sent.
    pub fn json(bytes: Bytes) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)?;
        Ok(Data { kind: DataKind::Json, bytes })
    }

    pub fn text(text: impl Into<String>) -> Self {
        Data { kind: DataKind::Text, bytes: Bytes::from(text.into()) }
    }

    /// Validates UTF-8 text.
    pub fn text_bytes(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Data { kind: DataKind::Text, bytes })
    }

    /// Any bytes: JSON objects and arrays become JSON, UTF-8 becomes text, the
    /// rest stays binary. How MQTT payloads, which carry no type, are kept.
    pub fn sniff(bytes: Bytes) -> Self {
        let looks_json = matches!(bytes.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'['));
        if looks_json && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            return Data { kind: DataKind::Json, bytes };
        }
        match std::str::from_utf8(&bytes) {
            Ok(_) => Data { kind: DataKind::Text, bytes },
            Err(_) => Data { kind: DataKind::Binary, bytes },
        }
    }

    /// Rebuilds data read back from a store that only holds validated payloads.
    pub fn from_trusted(kind: DataKind, bytes: Bytes) -> Self {
        Data { kind, bytes }
    }

    pub fn kind(&self) -> DataKind {
        self.kind
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The payload as text: JSON and text as they are, binary as base64.
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        match self.kind {
            DataKind::Binary => std::borrow::Cow::Owned(base64(&self.bytes)),
            _ => std::borrow::Cow::Borrowed(std::str::from_utf8(&self.bytes).unwrap_or_default()),
        }
    }

    /// Writes the payload as a JSON value: JSON as is, text and binary (base64)
    /// as a JSON string.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self.kind {
            DataKind::Json => out.extend_from_slice(&self.bytes),
            _ => serde_json::to_writer(&mut *out, &*self.as_str()).expect("writing to a Vec cannot fail"),
        }
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({:?})", self.kind, self.as_str())
    }
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() { T[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// What a publisher asks to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub channel: Channel,
    pub event: Option<EventName>,
    pub data: Data,
    pub meta: Option<std::sync::Arc<Meta>>,
}

/// The wire formats whose encodings are cached on a message. The core only names
/// them; each transport module owns its encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Wire {
    /// The message object `{channel,id,event,data,time}` as JSON.
    Json = 0,
    /// A complete single-channel SSE event (`id`, `event`, `data` lines).
    SseEvent = 1,
    /// The SSE `event`/`data` lines of a multi-channel stream, without the `id`.
    SseBody = 2,
    /// The message object escaped for embedding inside an HTML `<script>`.
    HtmlScript = 3,
    /// A WebSocket `{"type":"message",...}` text frame.
    WsFrame = 4,
    /// The message object as SSE `data` lines alone.
    SseData = 5,
}

const WIRE_FORMATS: usize = 6;

/// A stored message: it has its channel's next id and the time it was committed.
pub struct Message {
    pub channel: Channel,
    /// The channel's sequence number: starts at 1, +1 per message, never reused.
    pub id: u64,
    pub event: Option<EventName>,
    pub data: Data,
    /// Milliseconds since the Unix epoch (UTC), set by the store at commit.
    pub time: i64,
    pub meta: Option<std::sync::Arc<Meta>>,
    encoded: [OnceLock<Bytes>; WIRE_FORMATS],
}

impl Message {
    pub fn new(channel: Channel, id: u64, event: Option<EventName>, data: Data, time: i64) -> Self {
        Message { channel, id, event, data, time, meta: None, encoded: Default::default() }
    }

    pub fn with_meta(mut self, meta: Option<std::sync::Arc<Meta>>) -> Self {
        self.meta = meta;
        self
    }

    /// The cached encoding for `wire`, computed by `encode` the first time only.
    pub fn encoded(&self, wire: Wire, encode: impl FnOnce(&Message) -> Bytes) -> Bytes {
        self.encoded[wire as usize].get_or_init(|| encode(self)).clone()
    }

    /// The message object `{channel,id,event?,data,time}`, the shape every JSON
    /// transport shares.
    pub fn json(&self) -> Bytes {
        self.encoded(Wire::Json, |m| Bytes::from(m.write_json_object(Vec::new())))
    }

    /// Appends the message object to `out` (used to build frames around it).
    pub fn write_json_object(&self, mut out: Vec<u8>) -> Vec<u8> {
        out.reserve(self.data.len() + self.channel.as_str().len() + 80);
        out.extend_from_slice(b"{\"channel\":");
        serde_json::to_writer(&mut out, self.channel.as_str()).expect("vec write");
        out.extend_from_slice(format!(",\"id\":{}", self.id).as_bytes());
        if let Some(ev) = &self.event {
            // Event names are plain ASCII without quotes or backslashes.
            out.extend_from_slice(format!(",\"event\":\"{}\"", ev.as_str()).as_bytes());
        }
        out.extend_from_slice(b",\"data\":");
        self.data.write_json(&mut out);
        if self.data.kind() == DataKind::Binary {
            out.extend_from_slice(b",\"encoding\":\"base64\"");
        }
        out.extend_from_slice(format!(",\"time\":\"{}\"}}", crate::time::rfc3339_ms(self.time)).as_bytes());
        out
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("channel", &self.channel)
            .field("id", &self.id)
            .field("event", &self.event)
            .field("data", &self.data)
            .field("time", &self.time)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names() {
        assert!(EventName::parse("chat").is_ok());
        assert!(EventName::parse("a.b-c_9").is_ok());
        assert_eq!(EventName::parse("").unwrap_err(), EventNameError::Malformed);
        assert_eq!(EventName::parse("a b").unwrap_err(), EventNameError::Malformed);
        assert_eq!(EventName::parse(&"x".repeat(65)).unwrap_err(), EventNameError::Malformed);
        assert_eq!(EventName::parse("gap").unwrap_err(), EventNameError::Reserved("gap".into()));
        assert_eq!(EventName::parse("unread").unwrap_err(), EventNameError::Reserved("unread".into()));
    }

    #[test]
    fn json_object_keeps_json_and_quotes_text() {
        let ch = Channel::parse("a/b").unwrap();
        let m = Message::new(
            ch.clone(),
            7,
            Some(EventName::parse("chat").unwrap()),
            Data::json(Bytes::from_static(b"{\"x\": [1,2]}")).unwrap(),
            0,
        );
        assert_eq!(
            std::str::from_utf8(&m.json()).unwrap(),
            r#"{"channel":"a/b","id":7,"event":"chat","data":{"x": [1,2]},"time":"1970-01-01T00:00:00.000Z"}"#
        );
        let t = Message::new(ch, 8, None, Data::text("say \"hi\"\n"), 0);
        let v: serde_json::Value = serde_json::from_slice(&t.json()).unwrap();
        assert_eq!(v["data"], "say \"hi\"\n");
        assert!(v.get("event").is_none());
    }

    #[test]
    fn sniffing_and_binary() {
        assert_eq!(Data::sniff(Bytes::from_static(b" {\"a\":1}")).kind(), DataKind::Json);
        assert_eq!(Data::sniff(Bytes::from_static(b"42")).kind(), DataKind::Text, "only objects and arrays are JSON");
        assert_eq!(Data::sniff(Bytes::from_static(b"{broken")).kind(), DataKind::Text);
        let bin = Data::sniff(Bytes::from_static(&[0xff, 0x00, 0x10]));
        assert_eq!(bin.kind(), DataKind::Binary);
        assert_eq!(bin.as_str(), "/wAQ");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        let m = Message::new(Channel::parse("b").unwrap(), 1, None, bin, 0);
        let v: serde_json::Value = serde_json::from_slice(&m.json()).unwrap();
        assert_eq!((v["data"].as_str(), v["encoding"].as_str()), (Some("/wAQ"), Some("base64")));
    }

    #[test]
    fn invalid_json_is_refused() {
        assert!(Data::json(Bytes::from_static(b"{nope")).is_err());
        assert!(Data::json(Bytes::from_static(b"1 2")).is_err());
    }

    #[test]
    fn encodings_are_computed_once() {
        let m = Message::new(Channel::parse("a").unwrap(), 1, None, Data::text("x"), 0);
        let a = m.encoded(Wire::SseEvent, |_| Bytes::from_static(b"first"));
        let b = m.encoded(Wire::SseEvent, |_| Bytes::from_static(b"second"));
        assert_eq!(a, b);
    }
}
