//! What travels on a partition's feed, and how history entries read back.
//!
//! A feed payload is a list of fields, each written `<length>:<bytes>` (so a
//! payload may hold any bytes, and the Lua script that commits messages
//! writes the same format it stores). The first field says what it is:
//! `M` (messages: the partition's sequence number, then per message its
//! channel, id, event, kind, time, data and properties) or `S` (a signal:
//! sequence, kind, key, body). Both are built where the commit happens, in
//! the script, so the feed carries exactly what was stored.

use std::sync::Arc;

use bytes::Bytes;
use herald_core::{Channel, Data, DataKind, EventName, Message, Meta};
use redis::Value;

use crate::Signal;

/// One decoded feed payload.
#[derive(Debug)]
pub(crate) enum Item {
    Messages { q: u64, messages: Vec<Arc<Message>> },
    Signal { q: u64, signal: Signal },
}

impl Item {
    pub(crate) fn q(&self) -> u64 {
        match self {
            Item::Messages { q, .. } | Item::Signal { q, .. } => *q,
        }
    }
}

/// Appends one field.
pub(crate) fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(bytes);
}

/// Reads fields off a payload, sharing its bytes.
struct Fields {
    buf: Bytes,
    at: usize,
}

impl Fields {
    fn next(&mut self) -> Option<Bytes> {
        let rest = self.buf.get(self.at..)?;
        let colon = rest.iter().take(21).position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
        let start = self.at + colon + 1;
        let end = start.checked_add(len).filter(|e| *e <= self.buf.len())?;
        self.at = end;
        Some(self.buf.slice(start..end))
    }

    fn number(&mut self) -> Option<u64> {
        std::str::from_utf8(&self.next()?).ok()?.parse().ok()
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.next()?.to_vec()).ok()
    }

    fn done(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// Decodes a feed payload; `None` for one this version cannot read (logged
/// by the caller, and recovered as a gap).
pub(crate) fn decode(payload: Bytes) -> Option<Item> {
    let mut f = Fields { buf: payload, at: 0 };
    let item = match &f.next()?[..] {
        b"M" => {
            let q = f.number()?;
            let mut messages = Vec::new();
            while !f.done() {
                let channel = Channel::parse(&f.text()?).ok()?;
                let id = f.number()?;
                let event = f.text()?;
                let kind = DataKind::from_u8(f.number()? as u8)?;
                let time = f.number()? as i64;
                let data = f.next()?;
                let meta = f.next()?;
                messages.push(message(channel, id, &event, kind, time, data, &meta));
            }
            Item::Messages { q, messages }
        }
        b"S" => {
            let q = f.number()?;
            let kind = f.number()? as u8;
            let key = f.text()?;
            let body = f.next()?;
            Item::Signal { q, signal: Signal { kind, key, body, seq: q } }
        }
        _ => return None,
    };
    f.done().then_some(item)
}

/// The body of a signal payload as the signal script expects it (the script
/// adds the `S` and the sequence).
pub(crate) fn signal_fields(signal: &Signal) -> Vec<u8> {
    let mut out = Vec::with_capacity(signal.key.len() + signal.body.len() + 16);
    field(&mut out, signal.kind.to_string().as_bytes());
    field(&mut out, signal.key.as_bytes());
    field(&mut out, &signal.body);
    out
}

fn message(
    channel: Channel,
    id: u64,
    event: &str,
    kind: DataKind,
    time: i64,
    data: Bytes,
    meta: &[u8],
) -> Arc<Message> {
    let event = (!event.is_empty()).then(|| EventName::from_trusted(event));
    let meta = (!meta.is_empty()).then(|| Meta::decode(meta)).flatten().map(Arc::new);
    Arc::new(Message::new(channel, id, event, Data::from_trusted(kind, data), time).with_meta(meta))
}

/// A history entry (`XRANGE` reply item: `[id, [field, value, ...]]`) as a
/// message of `channel`. Fields: `k` kind, `t` time, `d` data, `e` event,
/// `m` properties (the last two only when present).
pub(crate) fn entry(channel: &Channel, v: Value) -> Option<Arc<Message>> {
    let Value::Array(mut parts) = v else { return None };
    if parts.len() != 2 {
        return None;
    }
    let Value::Array(fields) = parts.pop()? else { return None };
    let id = match parts.pop()? {
        Value::BulkString(b) => std::str::from_utf8(&b).ok()?.split_once('-')?.0.parse().ok()?,
        _ => return None,
    };
    let (mut kind, mut time, mut data, mut event, mut meta) = (None, None, None, String::new(), Vec::new());
    let mut it = fields.into_iter();
    while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) = (it.next(), it.next()) {
        match &k[..] {
            b"k" => kind = std::str::from_utf8(&v).ok()?.parse::<u8>().ok().and_then(DataKind::from_u8),
            b"t" => time = std::str::from_utf8(&v).ok()?.parse::<i64>().ok(),
            b"d" => data = Some(Bytes::from(v)),
            b"e" => event = String::from_utf8(v).ok()?,
            b"m" => meta = v,
            _ => {}
        }
    }
    Some(message(channel.clone(), id, &event, kind?, time?, data?, &meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(parts: &[&[u8]]) -> Bytes {
        let mut out = Vec::new();
        for p in parts {
            field(&mut out, p);
        }
        Bytes::from(out)
    }

    #[test]
    fn messages_decode_with_binary_data() {
        let p = payload(&[
            b"M",
            b"7",
            b"a/b",
            b"3",
            b"chat",
            b"3",
            b"1700",
            &[0, 159, 146, 150],
            b"",
            b"c",
            b"4",
            b"",
            b"2",
            b"1701",
            b"hi",
            b"",
        ]);
        let Some(Item::Messages { q, messages }) = decode(p) else { panic!("decodes") };
        assert_eq!(q, 7);
        assert_eq!(messages.len(), 2);
        assert_eq!((messages[0].channel.as_str(), messages[0].id, messages[0].time), ("a/b", 3, 1700));
        assert_eq!(messages[0].event.as_ref().map(|e| e.as_str()), Some("chat"));
        assert_eq!(&messages[0].data.bytes()[..], &[0, 159, 146, 150]);
        assert!(messages[1].event.is_none());
    }

    #[test]
    fn signals_round_trip() {
        let s = Signal::new(3, "user:ann", Bytes::from_static(b"x:y"));
        let mut out = Vec::new();
        field(&mut out, b"S");
        field(&mut out, b"12");
        out.extend(signal_fields(&s));
        let Some(Item::Signal { q, signal }) = decode(Bytes::from(out)) else { panic!("decodes") };
        assert_eq!((q, signal), (12, Signal { seq: 12, ..s }));
    }

    #[test]
    fn truncated_or_unknown_payloads_are_refused() {
        assert!(decode(payload(&[b"M", b"7", b"a/b", b"3"])).is_none());
        assert!(decode(payload(&[b"X", b"1"])).is_none());
        assert!(decode(Bytes::from_static(b"1:M5:1")).is_none());
        assert!(decode(Bytes::from_static(b"99999999999999999999999:M")).is_none());
        assert!(decode(Bytes::new()).is_none());
    }
}
