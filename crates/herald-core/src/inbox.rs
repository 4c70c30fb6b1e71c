//! Inboxes and unread counts, as arithmetic over windows and read state.
//!
//! A user's inbox reads through several channels ("sources"): `user/{id}` for
//! notifications to that user alone, `$all` for notifications to everyone, and
//! `$group/{g}` for each group the user belongs to. A group or all-user
//! notification is one message in one channel, whatever the audience size; each
//! member's count is derived from that channel's window and the member's own
//! read state, so notifying 100,000 users costs one write.

use std::collections::BTreeSet;

use crate::{channel::Channel, cursor::Window};

/// The channel of notifications to every user.
pub const ALL_CHANNEL: &str = "$all";

/// The event name of notifications.
pub const NOTIFICATION_EVENT: &str = "notification";

pub fn user_channel(user: &str) -> Option<Channel> {
    Channel::parse(&format!("user/{user}")).ok()
}

pub fn group_channel(group: &str) -> Option<Channel> {
    Channel::parse(&format!("$group/{group}")).ok()
}

pub fn all_channel() -> Channel {
    Channel::parse(ALL_CHANNEL).expect("valid")
}

/// One source of a user's inbox and the ids of it that belong to the user: a
/// group member sees only what was sent after joining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub channel: Channel,
    /// Ids at or below this are not the user's.
    pub floor: u64,
}

/// A user's sources: their own channel, `$all`, and each group with the id the
/// group's channel had when they joined.
pub fn sources(user: &str, groups: &[(String, u64)]) -> Vec<Source> {
    let mut out = Vec::with_capacity(groups.len() + 2);
    if let Some(c) = user_channel(user) {
        out.push(Source { channel: c, floor: 0 });
    }
    out.push(Source { channel: all_channel(), floor: 0 });
    for (g, joined_after) in groups {
        if let Some(c) = group_channel(g) {
            out.push(Source { channel: c, floor: *joined_after });
        }
    }
    out
}

/// What a user has read of one source: everything up to `upto`, plus the
/// listed ids above it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadState {
    pub upto: u64,
    pub ids: BTreeSet<u64>,
}

impl ReadState {
    pub fn is_read(&self, id: u64) -> bool {
        id <= self.upto || self.ids.contains(&id)
    }

    /// Marks ids read, folding a run that continues `upto` into it.
    pub fn mark(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            if id > self.upto {
                self.ids.insert(id);
            }
        }
        while self.ids.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
    }

    /// Marks everything up to `head` read.
    pub fn mark_all(&mut self, head: u64) {
        self.upto = self.upto.max(head);
        self.ids = self.ids.split_off(&(self.upto + 1));
    }

    /// Merges a mark into this state: what every store does, atomically,
    /// so marks made at once on two devices (or two nodes) both count.
    pub fn apply(&mut self, mark: &ReadMark) {
        match mark {
            ReadMark::All(head) => self.mark_all(*head),
            ReadMark::Ids(ids) => self.mark(ids.iter().copied()),
        }
    }

    /// Text form for storage: `upto` then the ids, comma-separated.
    pub fn encode(&self) -> String {
        std::iter::once(self.upto).chain(self.ids.iter().copied()).map(|n| n.to_string()).collect::<Vec<_>>().join(",")
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut nums = s.split(',').map(|n| n.parse::<u64>());
        let upto = nums.next()?.ok()?;
        let ids = nums.collect::<Result<BTreeSet<_>, _>>().ok()?;
        Some(ReadState { upto, ids })
    }
}

/// A read mark on one source, as a device sends it: everything up to the
/// source's head as the device saw it, or some ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadMark {
    All(u64),
    Ids(Vec<u64>),
}

/// Unread messages of one source: retained ids above the floor, not read.
pub fn unread(window: Window, floor: u64, read: Option<&ReadState>) -> u64 {
    let upto = read.map_or(0, |r| r.upto);
    let lo = (window.first.saturating_sub(1)).max(floor).max(upto);
    if window.head <= lo {
        return 0;
    }
    let read_above = read.map_or(0, |r| r.ids.range(lo + 1..=window.head).count() as u64);
    window.head - lo - read_above
}

/// A notification's id in the inbox API: `{channel}:{id}`. Channel names may
/// contain `:`, so the id is what follows the last one.
pub fn notification_id(channel: &Channel, id: u64) -> String {
    format!("{channel}:{id}")
}

pub fn parse_notification_id(s: &str) -> Option<(Channel, u64)> {
    let (c, id) = s.rsplit_once(':')?;
    Some((Channel::parse(c).ok()?, crate::cursor::parse_id(id).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_respect_floor_window_and_reads() {
        let w = Window::new(1, 10);
        assert_eq!(unread(w, 0, None), 10);
        assert_eq!(unread(w, 7, None), 3, "joined after id 7");
        let mut r = ReadState::default();
        r.mark([1, 2, 5]);
        assert_eq!(r, ReadState { upto: 2, ids: [5].into() });
        assert_eq!(unread(w, 0, Some(&r)), 7);
        assert_eq!(unread(Window::new(6, 10), 0, Some(&r)), 5, "trimmed messages no longer count");
        r.mark_all(10);
        assert_eq!(unread(w, 0, Some(&r)), 0);
        assert_eq!(unread(Window::new(1, 0), 0, None), 0);
    }

    #[test]
    fn notification_ids_round_trip() {
        let c = Channel::parse("$group/a:b").unwrap();
        assert_eq!(parse_notification_id(&notification_id(&c, 7)), Some((c, 7)));
        assert_eq!(parse_notification_id("user/x"), None);
        assert_eq!(parse_notification_id("user/x:-1"), None);
    }

    proptest! {
        /// The count equals a brute-force count over the ids.
        #[test]
        fn unread_matches_brute_force(first in 1u64..30, len in 0u64..30, floor in 0u64..40, reads in prop::collection::vec(1u64..60, 0..20), all in prop::option::of(0u64..40)) {
            let head = first + len - 1;
            let mut r = ReadState::default();
            r.mark(reads.iter().copied());
            if let Some(a) = all { r.mark_all(a); }
            let brute = (first..=head).filter(|id| *id > floor && !r.is_read(*id)).count() as u64;
            prop_assert_eq!(unread(Window::new(first, head), floor, Some(&r)), brute);
            prop_assert_eq!(ReadState::decode(&r.encode()), Some(r));
        }
    }
}
