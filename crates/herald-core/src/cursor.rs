//! Cursors: "the last id I have" for a channel, and the decision of what to replay.
//!
//! A single-channel cursor is the plain id (`Last-Event-ID: 123`). A multi-channel
//! stream's cursor is a [`CursorToken`], `chat/a=5,news=12`, opaque to clients but
//! readable in logs. Channel names never contain `=` or `,`, so no escaping is needed.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::channel::{Channel, ChannelError};

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Live messages only (`since=now`).
    Now,
    /// Everything after this id (`0` = all retained history).
    After(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor '{0}' is not a message id (a non-negative integer) or 'now'")]
    NotAnId(String),
    #[error("cursor token '{0}' is malformed: expected channel=id pairs separated by ','")]
    BadToken(String),
    #[error("cursor token names an invalid channel: {0}")]
    BadChannel(#[from] ChannelError),
}

impl Since {
    pub fn parse(s: &str) -> Result<Self, CursorError> {
        match s {
            "now" => Ok(Since::Now),
            _ => parse_id(s).map(Since::After),
        }
    }
}

/// Parses a message id: decimal digits only (no sign, no spaces, no `+`).
pub fn parse_id(s: &str) -> Result<u64, CursorError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CursorError::NotAnId(s.chars().take(64).collect()));
    }
    s.parse().map_err(|_| CursorError::NotAnId(s.chars().take(64).collect()))
}

/// Per-channel cursors of a multi-channel stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CursorToken(pub BTreeMap<Channel, u64>);

impl CursorToken {
    pub fn encode(&self) -> String {
        Self::encode_cursors(self.0.iter().map(|(c, id)| (c, *id)))
    }

    /// Encodes per-channel cursors without building a token first (the
    /// multi-channel SSE stream writes one per event).
    pub fn encode_cursors<'a>(cursors: impl IntoIterator<Item = (&'a Channel, u64)>) -> String {
        let mut out = String::new();
        for (i, (ch, id)) in cursors.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(ch.as_str());
            out.push('=');
            out.push_str(&id.to_string());
        }
        out
    }

    pub fn decode(s: &str) -> Result<Self, CursorError> {
        let mut map = BTreeMap::new();
        if s.is_empty() {
            return Ok(CursorToken(map));
        }
        for pair in s.split(',') {
            let (ch, id) = pair.split_once('=').ok_or_else(|| CursorError::BadToken(s.chars().take(64).collect()))?;
            let id = parse_id(id).map_err(|_| CursorError::BadToken(s.chars().take(64).collect()))?;
            map.insert(Channel::parse(ch)?, id);
        }
        Ok(CursorToken(map))
    }
}

/// What a store knows of a channel's retained history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The oldest retained id; `head + 1` when nothing is retained.
    pub first: u64,
    /// The latest id ever assigned; 0 for a channel never published to.
    pub head: u64,
    /// Where the channel's ids begin: 0 nearly always. A store that lost
    /// data (a Redis restarted without its last writes, or wiped) goes on
    /// from a higher id so that none is used twice; a channel that starts
    /// there has its origin there, and a reader asking for everything (a
    /// cursor of 0) has missed nothing below it.
    pub origin: u64,
}

impl Window {
    /// A window whose ids begin at 1.
    pub fn new(first: u64, head: u64) -> Self {
        Window { first, head, origin: 0 }
    }
}

/// Ids a client will not get back: `from..=to`, reported as a `gap` signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub channel: Channel,
    pub from: u64,
    pub to: u64,
    /// Set when the cursor was ahead of the channel's head: it belongs to a
    /// history this server no longer has (a wiped data directory). The client
    /// should drop what it holds for the channel; all retained messages follow.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

/// The replay decision for one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Deliver stored messages with ids greater than this.
    pub after: u64,
    pub gap: Option<Gap>,
}

/// Decides where to replay from for a cursor `after` given the channel's window.
pub fn plan(channel: &Channel, after: u64, w: Window) -> Replay {
    // "Everything" of a channel that began past 0 is everything from its origin.
    let after = if after == 0 { w.origin.min(w.head) } else { after };
    let oldest_after = w.first.saturating_sub(1);
    if after > w.head {
        return Replay {
            after: oldest_after,
            gap: Some(Gap { channel: channel.clone(), from: 1, to: oldest_after, reset: true }),
        };
    }
    if after < oldest_after {
        return Replay {
            after: oldest_after,
            gap: Some(Gap { channel: channel.clone(), from: after + 1, to: oldest_after, reset: false }),
        };
    }
    Replay { after, gap: None }
}

impl Since {
    /// The concrete cursor for a channel whose head is `head`.
    pub fn resolve(self, head: u64) -> u64 {
        match self {
            Since::Now => head,
            Since::After(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ch() -> Channel {
        Channel::parse("c").unwrap()
    }

    #[test]
    fn since_parsing() {
        assert_eq!(Since::parse("now").unwrap(), Since::Now);
        assert_eq!(Since::parse("0").unwrap(), Since::After(0));
        assert_eq!(Since::parse("123").unwrap(), Since::After(123));
        for bad in ["", "-1", "+1", " 1", "1.0", "abc", "99999999999999999999999"] {
            assert!(Since::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replay_decisions() {
        let w = Window::new(11, 20);
        assert_eq!(plan(&ch(), 15, w), Replay { after: 15, gap: None });
        assert_eq!(plan(&ch(), 10, w), Replay { after: 10, gap: None }, "cursor just before the oldest: nothing lost");
        assert_eq!(plan(&ch(), 20, w), Replay { after: 20, gap: None });
        assert_eq!(
            plan(&ch(), 3, w),
            Replay { after: 10, gap: Some(Gap { channel: ch(), from: 4, to: 10, reset: false }) }
        );
        assert_eq!(
            plan(&ch(), 25, w),
            Replay { after: 10, gap: Some(Gap { channel: ch(), from: 1, to: 10, reset: true }) }
        );
        // Everything expired: nothing retained, head kept.
        let empty = Window::new(21, 20);
        assert_eq!(plan(&ch(), 20, empty), Replay { after: 20, gap: None });
        assert_eq!(plan(&ch(), 0, empty).gap.unwrap().to, 20);
        // A channel never published to.
        assert_eq!(plan(&ch(), 0, Window::new(1, 0)), Replay { after: 0, gap: None });
        // A channel that began at an origin past 0: everything is everything
        // from there; a cursor from before it did miss something.
        let moved = Window { first: 5001, head: 5003, origin: 5000 };
        assert_eq!(plan(&ch(), 0, moved), Replay { after: 5000, gap: None });
        assert_eq!(plan(&ch(), 7, moved).gap.map(|g| (g.from, g.to)), Some((8, 5000)));
    }

    proptest! {
        #[test]
        fn token_round_trips(entries in prop::collection::btree_map("[a-z0-9]{1,6}(/[a-z0-9][a-z0-9:@~._-]{0,5}){0,3}", any::<u64>(), 0..8)) {
            let token = CursorToken(entries.iter().map(|(k, v)| (Channel::parse(k).unwrap(), *v)).collect());
            let text = token.encode();
            prop_assert!(!text.contains('\n') && !text.contains('\r'));
            prop_assert_eq!(CursorToken::decode(&text).unwrap(), token);
        }

        #[test]
        fn decode_never_panics(s in ".{0,200}") {
            let _ = CursorToken::decode(&s);
        }

        /// The plan never skips a retained message, never replays one at or
        /// before the cursor unless it reports a reset, and its gap covers exactly
        /// the ids between cursor and oldest retained.
        #[test]
        fn plan_is_exact(first in 1u64..1000, len in 0u64..1000, after in 0u64..3000) {
            let head = first + len - 1;
            let w = Window::new(first, head);
            let r = plan(&ch(), after, w);
            prop_assert!(r.after <= head);
            match r.gap {
                None => prop_assert_eq!(r.after, after),
                Some(g) if g.reset => prop_assert!(after > head),
                Some(g) => {
                    prop_assert_eq!(g.from, after + 1);
                    prop_assert_eq!(g.to, first - 1);
                    prop_assert_eq!(r.after, first - 1);
                }
            }
            prop_assert!(r.after + 1 >= first, "starts no earlier than the oldest retained");
        }
    }
}
