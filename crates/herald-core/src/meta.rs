//! Publish properties that only some transports carry (MQTT's QoS, retain flag
//! and v5 properties), and their compact binary form for the store.
//!
//! They are stored with the message: a subscriber that reads a message back
//! from history (a persistent MQTT session resuming, or a subscription whose
//! first read raced the commit) must get the same QoS, expiry and properties as
//! one that received it live. HTTP publishes carry none (the column stays NULL).

use bytes::Bytes;

/// See the module header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// The QoS it was published with (messages from HTTP count as 1).
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub payload_utf8: Option<bool>,
    /// When it expires (ms since the epoch), from MQTT's message expiry.
    pub expires_at: Option<i64>,
    /// The MQTT session that published it, for the no-local option. Session
    /// ids do not repeat across restarts (the broker seeds them from the clock),
    /// so a stored origin never matches another process's session.
    pub origin: Option<u64>,
}

/// The encoding's version, its first byte; a store holding another one
/// decodes to `None` rather than to wrong properties.
const VERSION: u8 = 1;

const RETAIN: u8 = 1;
const UTF8_KNOWN: u8 = 2;
const UTF8: u8 = 4;

// Tags of the optional fields, each written only when present.
const CONTENT_TYPE: u8 = 1;
const RESPONSE_TOPIC: u8 = 2;
const CORRELATION: u8 = 3;
const EXPIRES_AT: u8 = 4;
const ORIGIN: u8 = 5;
const USER_PROPERTY: u8 = 6;

impl Meta {
    /// `[version, flags, qos]` then tagged fields; lengths are u32 little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let flags = if self.retain { RETAIN } else { 0 }
            | match self.payload_utf8 {
                Some(true) => UTF8_KNOWN | UTF8,
                Some(false) => UTF8_KNOWN,
                None => 0,
            };
        let mut out = vec![VERSION, flags, self.qos];
        let mut field = |tag: u8, bytes: &[u8]| {
            out.push(tag);
            put_len_prefixed(&mut out, bytes);
        };
        if let Some(v) = &self.content_type {
            field(CONTENT_TYPE, v.as_bytes());
        }
        if let Some(v) = &self.response_topic {
            field(RESPONSE_TOPIC, v.as_bytes());
        }
        if let Some(v) = &self.correlation_data {
            field(CORRELATION, v);
        }
        if let Some(v) = self.expires_at {
            field(EXPIRES_AT, &v.to_le_bytes());
        }
        if let Some(v) = self.origin {
            field(ORIGIN, &v.to_le_bytes());
        }
        for (k, v) in &self.user_properties {
            out.push(USER_PROPERTY);
            put_len_prefixed(&mut out, k.as_bytes());
            put_len_prefixed(&mut out, v.as_bytes());
        }
        out
    }

    /// The inverse of [`Meta::encode`]; `None` for anything it did not write.
    pub fn decode(bytes: &[u8]) -> Option<Meta> {
        let (&[version, flags, qos], mut rest) = bytes.split_first_chunk::<3>()?;
        if version != VERSION || qos > 2 {
            return None;
        }
        let mut meta = Meta {
            qos,
            retain: flags & RETAIN != 0,
            payload_utf8: (flags & UTF8_KNOWN != 0).then_some(flags & UTF8 != 0),
            ..Meta::default()
        };
        while let Some((&tag, after)) = rest.split_first() {
            rest = after;
            let value = take_len_prefixed(&mut rest)?;
            match tag {
                CONTENT_TYPE => meta.content_type = Some(text(value)?),
                RESPONSE_TOPIC => meta.response_topic = Some(text(value)?),
                CORRELATION => meta.correlation_data = Some(Bytes::copy_from_slice(value)),
                EXPIRES_AT => meta.expires_at = Some(i64::from_le_bytes(value.try_into().ok()?)),
                ORIGIN => meta.origin = Some(u64::from_le_bytes(value.try_into().ok()?)),
                USER_PROPERTY => {
                    let v = take_len_prefixed(&mut rest)?;
                    meta.user_properties.push((text(value)?, text(v)?));
                }
                _ => return None,
            }
        }
        Some(meta)
    }
}

fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    // MQTT strings and binary data are at most 65,535 bytes: a u32 always fits.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take_len_prefixed<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, after) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if after.len() < len {
        return None;
    }
    let (value, after) = after.split_at(len);
    *rest = after;
    Some(value)
}

fn text(bytes: &[u8]) -> Option<String> {
    String::from_utf8(bytes.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn full() -> Meta {
        Meta {
            qos: 2,
            retain: true,
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "second".into()), (String::new(), "é".into())],
            content_type: Some("application/json".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\xffid")),
            payload_utf8: Some(false),
            expires_at: Some(-5),
            origin: Some(u64::MAX),
        }
    }

    #[test]
    fn round_trips_every_field_and_the_empty_meta() {
        assert_eq!(Meta::decode(&full().encode()), Some(full()));
        assert_eq!(Meta::decode(&Meta::default().encode()), Some(Meta::default()));
        assert_eq!(Meta::default().encode().len(), 3, "no optional field costs nothing");
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        let good = full().encode();
        for cut in 0..good.len() {
            // Cut between two fields it is a shorter valid meta; never the whole.
            assert_ne!(Meta::decode(&good[..cut]), Some(full()), "truncated at {cut}");
        }
        assert_eq!(Meta::decode(&good[..2]), None, "no QoS");
        assert_eq!(Meta::decode(&good[..6]), None, "inside a length");
        assert_eq!(Meta::decode(&good[..9]), None, "inside a value");
        let mut other_version = good.clone();
        other_version[0] = 2;
        assert_eq!(Meta::decode(&other_version), None);
        let mut unknown_tag = Meta::default().encode();
        unknown_tag.extend_from_slice(&[99, 0, 0, 0, 0]);
        assert_eq!(Meta::decode(&unknown_tag), None);
        assert_eq!(Meta::decode(&[VERSION, 0, 3]), None, "QoS 3 does not exist");
    }

    proptest! {
        #[test]
        fn any_meta_round_trips(
            qos in 0u8..=2,
            retain: bool,
            props in proptest::collection::vec((".*", ".*"), 0..4),
            content_type in proptest::option::of(".*"),
            correlation in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            payload_utf8: Option<bool>,
            expires_at: Option<i64>,
            origin: Option<u64>,
        ) {
            let m = Meta {
                qos, retain, user_properties: props, content_type, response_topic: None,
                correlation_data: correlation.map(Bytes::from), payload_utf8, expires_at, origin,
            };
            prop_assert_eq!(Meta::decode(&m.encode()), Some(m));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Meta::decode(&bytes);
        }
    }
}
