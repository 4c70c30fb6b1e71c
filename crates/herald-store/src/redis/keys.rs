//! Where everything lives in Redis: channels hashed to partitions, and the
//! names of each partition's keys.
//!
//! Every key of a partition carries the partition's hash tag (`{...}`), so
//! one script can touch a channel's head, its history stream and the
//! partition's feed atomically, on one Redis or in one Redis Cluster slot.
//! The tags are chosen so that their cluster slots are evenly spaced: bare
//! numbers as tags leave some masters idle (centrifuge#554).

use herald_core::Channel;

/// Redis Cluster's hash slots.
const SLOTS: u32 = 16_384;

/// The key layout of one Herald deployment (one prefix).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// Per partition, the `{tag}` part of its keys (braces included).
    tags: Vec<String>,
}

impl Keys {
    pub(crate) fn new(prefix: &str, partitions: u32) -> Self {
        let tags = balanced_tags(partitions).into_iter().map(|t| format!("{{{t}}}")).collect();
        Keys { prefix: prefix.to_owned(), tags }
    }

    pub(crate) fn partitions(&self) -> u32 {
        self.tags.len() as u32
    }

    /// The partition a name (a channel, a user, a client id) belongs to.
    pub(crate) fn partition_of(&self, name: &str) -> u32 {
        (fnv1a(name.as_bytes()) % u64::from(self.partitions())) as u32
    }

    pub(crate) fn channel_partition(&self, channel: &Channel) -> u32 {
        self.partition_of(channel.as_str())
    }

    fn key(&self, p: u32, what: &str) -> String {
        format!("{}:{}:{what}", self.prefix, self.tags[p as usize])
    }

    /// Deployment-wide settings (the number of partitions), outside any
    /// partition.
    pub(crate) fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    /// Node name -> its last liveness stamp (ms), outside any partition.
    pub(crate) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The partition's record: feed sequence `q`, id `floor`, the Redis
    /// `run` id it was last written under, the last message time `t`.
    pub(crate) fn part(&self, p: u32) -> String {
        self.key(p, "part")
    }

    /// Channel name -> head id.
    pub(crate) fn heads(&self, p: u32) -> String {
        self.key(p, "heads")
    }

    /// Channel name -> origin (only channels that began past 0).
    pub(crate) fn origins(&self, p: u32) -> String {
        self.key(p, "origins")
    }

    /// The partition's channel names, for filters (lexical ranges).
    pub(crate) fn names(&self, p: u32) -> String {
        self.key(p, "names")
    }

    /// The feed's recent payloads, by sequence: what a node that missed some
    /// reads back.
    pub(crate) fn log(&self, p: u32) -> String {
        self.key(p, "log")
    }

    /// The pub/sub channel of the partition's feed.
    pub(crate) fn feed(&self, p: u32) -> String {
        self.key(p, "feed")
    }

    /// A channel's history stream.
    pub(crate) fn stream(&self, p: u32, channel: &Channel) -> String {
        self.key(p, &format!("s:{channel}"))
    }

    pub(crate) fn idempotency(&self, p: u32, key: &str) -> String {
        self.key(p, &format!("i:{key}"))
    }

    /// A user's read state: source channel -> encoded `ReadState`.
    pub(crate) fn reads(&self, user: &str) -> String {
        self.key(self.partition_of(user), &format!("r:{user}"))
    }

    /// A user's groups: group -> joined after.
    pub(crate) fn groups_of(&self, user: &str) -> String {
        self.key(self.partition_of(user), &format!("g:{user}"))
    }

    /// A group's members, by name (score 0, for ordered paging).
    pub(crate) fn members(&self, group: &str) -> String {
        self.key(self.partition_of(group), &format!("m:{group}"))
    }

    /// A partition's MQTT records of one table (`r` retained, `s` sessions).
    pub(crate) fn records(&self, p: u32, table: char) -> String {
        self.key(p, &format!("rec:{table}"))
    }
}

/// FNV-1a: a stable hash, the same on every node and every version.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// CRC16/XMODEM, Redis Cluster's key hash.
pub(crate) fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in bytes {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

pub(crate) fn slot(tag: &str) -> u32 {
    u32::from(crc16(tag.as_bytes())) % SLOTS
}

/// One short tag per partition whose slot is the one nearest to evenly
/// spaced over the cluster's slots: partition `p` of `n` aims at slot
/// `p * 16384 / n`. Searched among short decimal strings, the same on every
/// node (deterministic, no state).
pub(crate) fn balanced_tags(n: u32) -> Vec<String> {
    let n = n.clamp(1, SLOTS);
    let mut by_slot: Vec<Option<u32>> = vec![None; SLOTS as usize];
    let mut found = 0;
    let mut i = 0u32;
    while found < SLOTS && i < 400_000 {
        let s = slot(&i.to_string()) as usize;
        if by_slot[s].is_none() {
            by_slot[s] = Some(i);
            found += 1;
        }
        i += 1;
    }
    (0..n)
        .map(|p| {
            let target = (u64::from(p) * u64::from(SLOTS) / u64::from(n)) as u32;
            // The nearest slot at or after the target that a candidate hits.
            (0..SLOTS)
                .map(|d| (target + d) % SLOTS)
                .find_map(|s| by_slot[s as usize])
                .expect("short decimal strings reach every slot")
                .to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
    }

    #[test]
    fn tags_spread_evenly_over_the_slots() {
        for n in [16u32, 128, 1000] {
            let tags = balanced_tags(n);
            assert_eq!(tags.len(), n as usize);
            let spacing = SLOTS / n;
            for (p, t) in tags.iter().enumerate() {
                let ideal = p as u32 * SLOTS / n;
                let s = slot(t);
                assert!(s >= ideal && s - ideal < spacing.max(2), "partition {p} of {n}: slot {s}, ideal {ideal}");
            }
            let mut distinct: Vec<u32> = tags.iter().map(|t| slot(t)).collect();
            distinct.dedup();
            assert_eq!(distinct.len(), n as usize, "every partition has a slot of its own");
        }
    }

    #[test]
    fn every_key_of_a_partition_shares_its_slot() {
        let keys = Keys::new("herald", 16);
        let ch = Channel::parse("chat/room/Default").unwrap();
        let p = keys.channel_partition(&ch);
        let slot_of = |key: &str| {
            let open = key.find('{').unwrap();
            let close = key[open..].find('}').unwrap() + open;
            slot(&key[open + 1..close])
        };
        let s = slot_of(&keys.part(p));
        for k in [keys.heads(p), keys.origins(p), keys.names(p), keys.log(p), keys.feed(p), keys.stream(p, &ch)] {
            assert_eq!(slot_of(&k), s, "{k}");
        }
    }
}
