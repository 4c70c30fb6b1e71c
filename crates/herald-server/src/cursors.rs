//! One subscription's cursors: the last id handed out per channel, and
//! whether anything has been handed out for it yet.
//!
//! A vector sorted by channel rather than a map: most subscriptions follow a
//! single channel for their whole life, and a `BTreeMap`'s first node costs
//! 280 bytes (heaptrack, per idle SSE stream) where one entry here is 32.
//! Lookups stay logarithmic; inserting a channel is linear, and happens once
//! per channel a subscription meets.

use herald_core::Channel;

#[derive(Debug, Default)]
pub struct Cursors {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    channel: Channel,
    id: u64,
    /// Nothing has been handed out since the cursor was placed.
    untouched: bool,
}

impl Cursors {
    fn find(&self, channel: &Channel) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.channel.cmp(channel))
    }

    pub fn get(&self, channel: &Channel) -> Option<u64> {
        self.find(channel).ok().map(|i| self.entries[i].id)
    }

    /// Whether the cursor of `channel` is still where it was placed.
    pub fn is_untouched(&self, channel: &Channel) -> bool {
        self.find(channel).is_ok_and(|i| self.entries[i].untouched)
    }

    /// Places the cursor of `channel` at `id` (a start, before delivering).
    pub fn place(&mut self, channel: &Channel, id: u64) {
        self.set(channel, id, true);
    }

    /// Moves the cursor of `channel` to `id` as something is handed out.
    pub fn moved(&mut self, channel: &Channel, id: u64) {
        self.set(channel, id, false);
    }

    fn set(&mut self, channel: &Channel, id: u64, untouched: bool) {
        match self.find(channel) {
            Ok(i) => {
                self.entries[i].id = id;
                self.entries[i].untouched = untouched;
            }
            Err(i) => {
                if self.entries.capacity() == 0 {
                    // One channel is the common case: no room for four.
                    self.entries.reserve_exact(1);
                }
                self.entries.insert(i, Entry { channel: channel.clone(), id, untouched });
            }
        }
    }

    /// Keeps the channels `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Channel) -> bool) {
        self.entries.retain(|e| keep(&e.channel));
    }

    /// Every channel and its cursor, in channel order.
    pub fn iter(&self) -> impl Iterator<Item = (&Channel, u64)> {
        self.entries.iter().map(|e| (&e.channel, e.id))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    #[test]
    fn sorted_by_channel_placed_then_moved() {
        let mut c = Cursors::default();
        c.place(&ch("b"), 5);
        c.place(&ch("a"), 1);
        c.moved(&ch("c"), 9);
        let all: Vec<_> = c.iter().map(|(ch, id)| format!("{ch}={id}")).collect();
        assert_eq!(all, ["a=1", "b=5", "c=9"]);
        assert!(c.is_untouched(&ch("b")));
        assert!(!c.is_untouched(&ch("c")));
        assert!(!c.is_untouched(&ch("zz")), "unknown channels are not untouched");
        c.moved(&ch("b"), 6);
        assert_eq!((c.get(&ch("b")), c.is_untouched(&ch("b"))), (Some(6), false));
        c.retain(|ch| ch.as_str() != "a");
        assert_eq!((c.get(&ch("a")), c.len()), (None, 2));
    }
}
