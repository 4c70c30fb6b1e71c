//! One subscription's cursors: the last id handed out per channel, and
//! whether anything has been handed out for it yet. A [`VecMap`]: most
//! subscriptions follow a single channel for their whole life, and a
//! `BTreeMap`'s first node costs 280 bytes (heaptrack, per idle SSE stream)
//! where one entry here is 32.

use herald_core::{Channel, VecMap};

#[derive(Debug, Default)]
pub struct Cursors {
    /// The cursor, and whether it is still where it was placed (nothing
    /// handed out since).
    entries: VecMap<Channel, (u64, bool)>,
}

impl Cursors {
    pub fn get(&self, channel: &Channel) -> Option<u64> {
        self.entries.get(channel).map(|(id, _)| *id)
    }

    /// Whether the cursor of `channel` is still where it was placed.
    pub fn is_untouched(&self, channel: &Channel) -> bool {
        self.entries.get(channel).is_some_and(|(_, untouched)| *untouched)
    }

    /// Places the cursor of `channel` at `id` (a start, before delivering).
    pub fn place(&mut self, channel: &Channel, id: u64) {
        self.entries.insert(channel.clone(), (id, true));
    }

    /// Moves the cursor of `channel` to `id` as something is handed out.
    pub fn moved(&mut self, channel: &Channel, id: u64) {
        match self.entries.get_mut(channel) {
            Some(entry) => *entry = (id, false),
            None => {
                self.entries.insert(channel.clone(), (id, false));
            }
        }
    }

    /// Keeps the channels `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Channel) -> bool) {
        self.entries.retain(|ch, _| keep(ch));
    }

    /// Every channel and its cursor, in channel order.
    pub fn iter(&self) -> impl Iterator<Item = (&Channel, u64)> {
        self.entries.iter().map(|(ch, (id, _))| (ch, *id))
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
        assert_eq!((c.get(&ch("a")), c.iter().count()), (None, 2));
    }
}
