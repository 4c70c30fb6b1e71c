//! What this process committed last, per channel: the head id, and the last
//! few messages (the tail). Readers whose cursor is at the head (a long poll or
//! a reconnecting stream that missed nothing, most of them) skip the store
//! read; readers a few messages behind (long polls between two polls of a
//! burst, a stream reconnecting after a blip) are answered from the tail,
//! with no trip to SQLite (perf, 1,000 long polls in a burst: most of the
//! server's CPU went to the blocking pool's thread hand-offs, SQLite's file
//! locks and statement parsing, for messages committed milliseconds before).
//!
//! Safe to trust because it only moves forward and the store updates it
//! *before* handing a commit to the sink: a reader that registered with the
//! hub and then reads here gets every later message live. A tail answers only
//! when it holds every id the read asks for, and applies the channel's
//! retention as the store would.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, RwLock},
};

use herald_core::{Channel, Message, Retention, Window};

use crate::Page;

/// Messages kept per channel.
const TAIL: usize = 32;
/// Messages kept over all channels; past it every tail is dropped and refills
/// from the next commits (a coarse bound, but O(1) per commit and rare: it
/// takes more than 500 busy channels; at worst some 10 MB of messages).
const MAX_TAILED: usize = 16 * 1024;

#[derive(Default)]
pub(crate) struct HeadCache {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    channels: HashMap<Channel, Entry>,
    /// Messages held in all tails.
    tailed: usize,
}

#[derive(Default)]
struct Entry {
    head: u64,
    /// The last committed messages, ending at `head`, oldest first.
    tail: VecDeque<Arc<Message>>,
}

impl HeadCache {
    pub(crate) fn get(&self, channel: &Channel) -> Option<u64> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.channels.get(channel).map(|e| e.head)
    }

    /// Records that a read found `channel` at `head` (kept if already further).
    pub(crate) fn advance(&self, channel: &Channel, head: u64) {
        if self.get(channel).is_some_and(|h| h >= head) {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let Inner { channels, tailed } = &mut *inner;
        let e = channels.entry(channel.clone()).or_default();
        if head > e.head {
            // Not committed here: the tail no longer ends at the head.
            *tailed -= e.tail.len();
            e.tail = VecDeque::new();
            e.head = head;
        }
    }

    /// Records a commit (messages in id order per channel).
    pub(crate) fn committed(&self, msgs: &[Arc<Message>]) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let Inner { channels, tailed } = &mut *inner;
        for m in msgs {
            let e = channels.entry(m.channel.clone()).or_default();
            if m.id <= e.head {
                continue;
            }
            if m.id != e.head + 1 {
                // A hole (ids taken by a read's head): the tail restarts here.
                *tailed -= e.tail.len();
                e.tail.clear();
            }
            e.head = m.id;
            e.tail.push_back(m.clone());
            *tailed += 1;
            if e.tail.len() > TAIL {
                e.tail.pop_front();
                *tailed -= 1;
            }
        }
        if *tailed > MAX_TAILED {
            for e in channels.values_mut() {
                e.tail = VecDeque::new();
            }
            *tailed = 0;
        }
    }

    /// Up to `limit` messages after `after`, when the tail holds all of them
    /// and the read needs no window the tail cannot vouch for; `None`: read
    /// the store. `cutoff`: the oldest time `retention` keeps, now.
    pub(crate) fn read(
        &self,
        channel: &Channel,
        after: u64,
        limit: usize,
        retention: Retention,
        cutoff: i64,
    ) -> Option<Page> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let e = inner.channels.get(channel)?;
        if after > e.head {
            return None; // a cursor ahead of the head: the store knows the window
        }
        if after == e.head {
            // Nothing to read, and nothing missed: the cursor is the head.
            return Some(Page { messages: Vec::new(), window: Window::new(after.max(1), e.head) });
        }
        // The first message to hand out must be in the tail and retained
        // (later ones then are too: ids and times only grow).
        let oldest = e.tail.front()?;
        let next = after + 1;
        let by_count = e.head.saturating_sub(retention.size) + 1;
        let skip = next.checked_sub(oldest.id)? as usize;
        let first_out = e.tail.get(skip)?;
        if next < by_count || first_out.time < cutoff {
            return None;
        }
        let messages = e.tail.iter().skip(skip).take(limit).cloned().collect();
        // Everything from `next` is retained, so no gap: the window starts
        // at or before it (exactly where is the store's to say, and no
        // caller of a read after a cursor needs more).
        Some(Page { messages, window: Window::new(next, e.head) })
    }
}

#[cfg(test)]
mod tests {
    use herald_core::Data;

    use super::*;

    fn msg(id: u64, time: i64) -> Arc<Message> {
        Arc::new(Message::new(Channel::parse("c").unwrap(), id, None, Data::text("x"), time))
    }

    fn ids(p: Option<Page>) -> Option<Vec<u64>> {
        p.map(|p| p.messages.iter().map(|m| m.id).collect())
    }

    const KEEP_ALL: Retention = Retention { size: 1000, ttl_ms: None };

    #[test]
    fn answers_from_the_tail_only_when_it_holds_every_id_asked_for() {
        let cache = HeadCache::default();
        let ch = Channel::parse("c").unwrap();
        let all: Vec<_> = (1..=40).map(|i| msg(i, i as i64)).collect();
        cache.committed(&all);
        assert_eq!(cache.get(&ch), Some(40));
        assert_eq!(ids(cache.read(&ch, 37, 100, KEEP_ALL, 0)), Some(vec![38, 39, 40]));
        assert_eq!(ids(cache.read(&ch, 30, 2, KEEP_ALL, 0)), Some(vec![31, 32]), "limit");
        assert_eq!(ids(cache.read(&ch, 40, 100, KEEP_ALL, 0)), Some(vec![]), "at the head");
        assert_eq!(ids(cache.read(&ch, 8, 100, KEEP_ALL, 0)), Some((9..=40).collect()), "the tail's first");
        assert!(cache.read(&ch, 7, 100, KEEP_ALL, 0).is_none(), "older than the tail");
        assert!(cache.read(&ch, 41, 100, KEEP_ALL, 0).is_none(), "ahead of the head");
        assert!(cache.read(&Channel::parse("other").unwrap(), 0, 100, KEEP_ALL, 0).is_none());
    }

    #[test]
    fn applies_retention_by_count_and_age() {
        let cache = HeadCache::default();
        let ch = Channel::parse("c").unwrap();
        cache.committed(&(1..=10).map(|i| msg(i, i as i64 * 100)).collect::<Vec<_>>());
        let five = Retention { size: 5, ttl_ms: None };
        assert!(cache.read(&ch, 3, 100, five, 0).is_none(), "id 4 is past the count");
        assert_eq!(ids(cache.read(&ch, 5, 100, five, 0)), Some(vec![6, 7, 8, 9, 10]));
        assert!(cache.read(&ch, 5, 100, KEEP_ALL, 700).is_none(), "id 6 is too old");
        assert_eq!(ids(cache.read(&ch, 6, 100, KEEP_ALL, 700)), Some(vec![7, 8, 9, 10]));
    }

    #[test]
    fn a_head_learnt_from_a_read_empties_the_tail() {
        let cache = HeadCache::default();
        let ch = Channel::parse("c").unwrap();
        cache.committed(&[msg(1, 1), msg(2, 2)]);
        cache.advance(&ch, 5);
        assert_eq!(cache.get(&ch), Some(5));
        assert!(cache.read(&ch, 2, 100, KEEP_ALL, 0).is_none());
        cache.committed(&[msg(6, 6)]);
        assert!(cache.read(&ch, 4, 100, KEEP_ALL, 0).is_none(), "id 5 was never in the tail");
        assert_eq!(ids(cache.read(&ch, 5, 100, KEEP_ALL, 0)), Some(vec![6]));
    }
}
