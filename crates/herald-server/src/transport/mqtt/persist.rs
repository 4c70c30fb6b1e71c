//! What of the broker survives a restart: retained messages and persistent
//! sessions, kept as records in the store's broker tables (`BrokerStore`).
//!
//! A retained message is written before its publish is acknowledged. A
//! persistent session is written when its subscriptions change and when its
//! connection ends (parked); a session that was connected when the process
//! died comes back with the subscriptions and cursors of its last write, so
//! it may get some messages again but loses none on channel topics. What a
//! session keeps is its identity, its expiry, its subscriptions and, per
//! channel, the id before the oldest message not yet acknowledged: on
//! resuming after a restart it replays from there out of the history. Not
//! kept: messages on non-channel topics waiting in its queue (they have no
//! history), pending wills, QoS 2 exchanges in flight (their messages come
//! again as new ones), and shared subscriptions.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use herald_core::{Channel, CursorToken, Meta, Principal};
use serde::{Deserialize, Serialize};

use super::{
    broker::Routed,
    session::{Session, SubOpts},
};

/// Record layout version of a retained message.
const RETAINED_V1: u8 = 1;

/// `[1][meta length, u32 BE][meta (Meta::encode)][payload]`.
pub(crate) fn encode_retained(msg: &Routed) -> Vec<u8> {
    let meta = msg.meta.encode();
    let mut out = Vec::with_capacity(5 + meta.len() + msg.payload.len());
    out.push(RETAINED_V1);
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&msg.payload);
    out
}

/// A retained message read back; `None` for a record this version cannot read.
pub(crate) fn decode_retained(topic: &str, bytes: &[u8]) -> Option<Routed> {
    let (&version, rest) = bytes.split_first()?;
    if version != RETAINED_V1 || rest.len() < 4 {
        return None;
    }
    let meta_len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let meta = Meta::decode(rest[4..].get(..meta_len)?)?;
    let payload = Bytes::copy_from_slice(&rest[4 + meta_len..]);
    Some(Routed { topic: topic.into(), payload, meta: Arc::new(meta), shared: None })
}

/// A persistent session as stored (JSON: small, rare, readable with sqlite3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredSession {
    /// The session's id, kept so that the no-local mark of messages it
    /// published still matches it after a restart.
    pub(crate) id: u64,
    /// Whose it is: only the same identity may resume it (the user; none
    /// for an admin's). Records written before also hold `admin`, which
    /// this already says; it is ignored.
    pub(crate) user: Option<String>,
    /// Seconds it outlives its connection.
    pub(crate) expiry: u32,
    /// When its connection ended (ms since the epoch); `None` while it was
    /// connected, which after a restart counts from the restart.
    pub(crate) parked_at: Option<i64>,
    pub(crate) subs: Vec<StoredSub>,
    /// Per channel, the id to resume after (a cursor token, `a=5,b=12`).
    pub(crate) cursors: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredSub {
    pub(crate) filter: String,
    pub(crate) qos: u8,
    #[serde(default)]
    pub(crate) no_local: bool,
    #[serde(default)]
    pub(crate) retain_as_published: bool,
    #[serde(default)]
    pub(crate) sub_id: Option<u32>,
}

impl StoredSub {
    pub(crate) fn opts(&self) -> SubOpts {
        SubOpts {
            qos: self.qos.min(2),
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            sub_id: self.sub_id,
        }
    }
}

impl StoredSession {
    /// What to keep of `session`. Each channel's cursor is moved back before
    /// its oldest message queued or in flight, so that what the client has
    /// not acknowledged comes again from the history.
    pub(crate) fn of(session: &Session, parked_at: Option<i64>) -> Self {
        let mut cursors: BTreeMap<Channel, u64> =
            session.herald.cursors().iter().map(|(c, id)| (c.clone(), id)).collect();
        for o in session.inflight.values().chain(session.queue.iter()) {
            if let (Some(id), Ok(channel)) = (o.id, Channel::parse(&o.topic)) {
                let before = id.saturating_sub(1);
                cursors.entry(channel).and_modify(|c| *c = (*c).min(before)).or_insert(before);
            }
        }
        StoredSession {
            id: session.id,
            user: session.principal.user().map(str::to_owned),
            expiry: session.expiry,
            parked_at,
            subs: session
                .subs
                .iter()
                .map(|(filter, o)| StoredSub {
                    filter: filter.clone(),
                    qos: o.qos,
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    sub_id: o.sub_id,
                })
                .collect(),
            cursors: CursorToken(cursors).encode(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a stored session serialises")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// Whether `principal` may resume it (the same rule as for a parked session).
    pub(crate) fn belongs_to(&self, principal: &Principal) -> bool {
        self.user.as_deref() == principal.user()
    }

    /// When it expires (ms since the epoch; `None`: never), counting a
    /// session that was connected when saved as parked at `restarted_ms`.
    pub(crate) fn expires_at(&self, restarted_ms: i64) -> Option<i64> {
        let since = self.parked_at.unwrap_or(restarted_ms);
        (self.expiry != u32::MAX).then(|| since.saturating_add(i64::from(self.expiry) * 1000))
    }

    pub(crate) fn expired(&self, now_ms: i64, restarted_ms: i64) -> bool {
        self.expires_at(restarted_ms).is_some_and(|at| at <= now_ms)
    }

    pub(crate) fn cursor_token(&self) -> CursorToken {
        CursorToken::decode(&self.cursors).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_records_round_trip() {
        let meta = Meta { qos: 1, retain: true, content_type: Some("text/plain".into()), ..Meta::default() };
        let msg = Routed {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"\x00\xffhello"),
            meta: Arc::new(meta.clone()),
            shared: None,
        };
        let back = decode_retained("a/b", &encode_retained(&msg)).unwrap();
        assert_eq!((&*back.topic, &back.payload[..], &*back.meta), ("a/b", &b"\x00\xffhello"[..], &meta));
        assert!(decode_retained("a/b", &[2, 0, 0, 0, 0]).is_none(), "an unknown version is not read");
        assert!(decode_retained("a/b", &[1, 0, 0, 0, 9, 1]).is_none(), "a short record is not read");
    }

    #[test]
    fn sessions_expire_from_their_parking_or_the_restart() {
        let s = StoredSession {
            id: 7,
            user: Some("u".into()),
            expiry: 60,
            parked_at: Some(1_000),
            subs: vec![StoredSub {
                filter: "a/#".into(),
                qos: 1,
                no_local: true,
                retain_as_published: false,
                sub_id: Some(3),
            }],
            cursors: "a/b=4".into(),
        };
        assert_eq!(StoredSession::decode(&s.encode()).as_ref(), Some(&s));
        assert!(!s.expired(60_999, 0) && s.expired(61_000, 0));
        let connected = StoredSession { parked_at: None, ..s.clone() };
        assert!(!connected.expired(100_000, 50_000), "counted from the restart");
        let forever = StoredSession { expiry: u32::MAX, ..s.clone() };
        assert!(!forever.expired(i64::MAX, 0));
        assert_eq!(s.cursor_token().encode(), "a/b=4");
        let earlier = br#"{"id":1,"user":null,"admin":true,"expiry":5,"parked_at":null,"subs":[],"cursors":""}"#;
        assert!(StoredSession::decode(earlier).is_some(), "a record with the old `admin` field still reads");
    }
}
