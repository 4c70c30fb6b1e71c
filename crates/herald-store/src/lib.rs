//! The `Store` seam: where messages get their ids and are kept as history.
//!
//! A store assigns each channel's next id, commits, and only then hands the
//! committed messages — in id order — to its [`CommitSink`] (the hub), and answers
//! the publisher. Reading returns the messages after a cursor together with the
//! channel's [`Window`], from which the core decides about gaps.
//!
//! Three implementations live here: [`MemoryStore`] (tests, `--memory`),
//! [`SqliteStore`] (the embedded default) and [`RedisStore`] (several nodes
//! sharing Redis: ids and history in Redis, and every node's sink fed from
//! Redis, its own commits included).
//!
//! Beside messages, the same stores keep inbox state ([`InboxStore`]), the
//! MQTT broker's records ([`BrokerStore`]) and outbound jobs ([`JobStore`],
//! in `jobs/`).

mod heads;
mod idempotency;
mod jobs;
mod memory;
mod readers;
mod redis;
mod sqlite;

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use herald_core::{
    Channel, Filter, Hub, Message, NewMessage, RetentionRules, Window,
    inbox::{ReadMark, ReadState},
};

pub use idempotency::fingerprint;
pub use jobs::{
    After, Changes, Claimed, Expect, Job, JobError, JobId, JobState, JobStore, JobSummary, Lease, NewJob, Record,
    RecordWrite,
};
pub use memory::MemoryStore;
pub use redis::{RedisOptions, RedisStore};
pub use sqlite::{SqliteOptions, SqliteStore, SyncMode};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store is closed")]
    Closed,
    #[error("storage failure: {0}")]
    Backend(String),
    /// The store cannot be reached, or did not answer in time: nothing was
    /// acknowledged, and a write in flight may or may not have happened
    /// (retry it with the same idempotency key).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// An idempotency key came again with a different request.
    #[error("the idempotency key was used for a different request")]
    IdempotencyConflict,
}

/// Receives what the store committed, in commit order per channel, and the
/// signals of [`Store::signal`]. On one node the sink hears of a commit
/// before the publisher is answered; over Redis every node's sink is fed from
/// Redis, the committing node's too, a moment after.
pub trait CommitSink: Send + Sync + 'static {
    fn committed(&self, msgs: &[Arc<Message>]);

    /// How long one commit of `messages` messages took (write and commit),
    /// told just before [`CommitSink::committed`]: for metrics. A store
    /// that commits in groups reports each group once.
    fn commit_took(&self, _messages: usize, _took: std::time::Duration) {}

    /// A signal from this node or another (see [`Signal`]).
    fn signaled(&self, _signal: &Signal) {}

    /// The channels and filters someone on this node listens to: after a
    /// feed from Redis was cut off for longer than Redis keeps it, the store
    /// re-reads these channels' heads and hands over what was missed.
    fn interest(&self) -> (Vec<Channel>, Vec<Filter>) {
        (Vec::new(), Vec::new())
    }
}

/// A small notice for every node (on one node, for this one): a read mark
/// made or a group changed (`key` names the user), an MQTT client id claimed
/// elsewhere, a retained message set. Over Redis a signal travels in order
/// with the messages of its key's partition and is recovered like them when
/// a feed is cut, so no node misses one. The store does not read `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub kind: u8,
    pub key: String,
    pub body: Bytes,
    /// Where it stands in its partition's order, as delivered by a Redis
    /// store (its feed sequence number); 0 from the other stores and when
    /// sending. A broker record's signal has the version its `put` answered.
    pub seq: u64,
}

impl Signal {
    pub fn new(kind: u8, key: impl Into<String>, body: Bytes) -> Self {
        Signal { kind, key: key.into(), body, seq: 0 }
    }

    /// What a Redis store announces itself when a [`BrokerStore`] record is
    /// written: `key` is the table's letter (`r` retained, `s` sessions), a
    /// `/` and the record's key; `body` the record (empty: deleted).
    pub const RECORD: u8 = 0;

    /// Signals of some partition may have been lost (a Redis feed cut off
    /// for longer than its log reaches): refresh whatever depends on them.
    /// `key` and `body` are empty.
    pub const RESYNC: u8 = 255;
}

/// What makes a publish apply at most once: the caller's key, scoped to
/// whoever sent it, and a fingerprint of the request, so a key used again
/// for something else is refused rather than answered with another result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: u64,
}

/// How long an idempotency key's first answer is kept (DESIGN: 5 minutes).
pub const IDEMPOTENCY_TTL_MS: i64 = 300_000;

/// The answer to a publish: each message's channel and id, in order.
pub type Receipt = Vec<(Channel, u64)>;

/// How the store's backing service is doing, for `/readyz` and `/api/stats`.
#[derive(Debug, Clone, Default)]
pub struct StoreStatus {
    /// False while writes cannot succeed (Redis unreachable).
    pub available: bool,
    /// Details for the stats page (Redis: connection state per shard, feed
    /// lag); `None` for the embedded stores.
    pub details: Option<serde_json::Value>,
}

impl CommitSink for Hub {
    fn committed(&self, msgs: &[Arc<Message>]) {
        self.publish(msgs);
    }

    fn interest(&self) -> (Vec<Channel>, Vec<Filter>) {
        Hub::interest(self)
    }
}

/// The wall clock in ms, replaceable so retention by age can be tested without
/// waiting.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock: milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn system_clock() -> Clock {
    Arc::new(now_ms)
}

/// What every store is built with.
#[derive(Clone)]
pub struct StoreConfig {
    pub retention: RetentionRules,
    pub clock: Clock,
    pub sink: Arc<dyn CommitSink>,
}

/// A page of history.
#[derive(Debug, Clone)]
pub struct Page {
    /// Messages after the requested id, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// The channel's retained window at the time of the read. `head` is
    /// exact. So is `first` for a read from 0 and for one whose cursor is
    /// older than the window (a gap); after a cursor with nothing missed it
    /// may be reported as the cursor's next id, as a read answered from the
    /// recent messages held in memory cannot see further back (and nothing
    /// decided from a window needs to then).
    pub window: Window,
}

pub trait Store: Send + Sync + 'static {
    /// Stores a batch atomically: every message gets its channel's next id, all
    /// commit together, the sink sees them in id order, then this resolves.
    fn append(&self, batch: Vec<NewMessage>) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>>;

    /// [`Self::append`] at most once per idempotency key: a key seen within
    /// [`IDEMPOTENCY_TTL_MS`] answers the first receipt again and stores
    /// nothing; the same key with another fingerprint is
    /// [`StoreError::IdempotencyConflict`].
    fn append_once(
        &self,
        idempotency: Idempotency,
        batch: Vec<NewMessage>,
    ) -> BoxFuture<'_, Result<Receipt, StoreError>>;

    /// Up to `limit` retained messages of `channel` with ids greater than `after`.
    fn read(&self, channel: Channel, after: u64, limit: usize) -> BoxFuture<'_, Result<Page, StoreError>>;

    /// The channel's head as this process last committed or read it, when
    /// known without a read; `None`: read to find out. It only moves forward,
    /// and it moves before the sink hears of a commit, so a subscriber that
    /// registered with the hub and then finds its cursor here has nothing to
    /// replay: everything later reaches it live.
    fn cached_head(&self, _channel: &Channel) -> Option<u64> {
        None
    }

    /// Every channel ever published to that `filter` matches, with its head id.
    fn channels(&self, filter: Filter) -> BoxFuture<'_, Result<Vec<(Channel, u64)>, StoreError>>;

    /// Sends a signal to every node's sink (this node's included).
    fn signal(&self, signal: Signal) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Whether writes can succeed now, with details for the stats page.
    fn status(&self) -> StoreStatus {
        StoreStatus { available: true, details: None }
    }

    /// Finishes pending writes and refuses new ones.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Group membership and inbox read state: what per-user inboxes need besides
/// the messages themselves.
pub trait InboxStore: Send + Sync + 'static {
    /// The groups `user` belongs to, each with the id its channel had when the
    /// user joined (the user sees only later notifications).
    fn groups_of(&self, user: String) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>>;

    /// Adds users to a group, joining after `joined_after`; users already in it
    /// keep their original join. Returns how many were new.
    fn add_members(
        &self,
        group: String,
        users: Vec<String>,
        joined_after: u64,
    ) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Removes users from a group; returns how many were members.
    fn remove_members(&self, group: String, users: Vec<String>) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Members of a group in name order, after `after`, at most `limit`.
    fn members(&self, group: String, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// What `user` has read, per source channel.
    fn read_state(&self, user: String) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>>;

    /// Merges read marks into `user`'s state, atomically (a concurrent mark
    /// from another device or node is never lost), and returns the merged
    /// state of each channel marked.
    fn mark_read(
        &self,
        user: String,
        marks: Vec<(Channel, ReadMark)>,
    ) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>>;
}

/// What the MQTT broker keeps across restarts, in two tables of records the
/// broker encodes itself: retained messages by topic, persistent sessions by
/// client id. Small and rare next to messages (a write per retained publish,
/// per subscription change and per disconnect of a persistent session).
pub trait BrokerStore: Send + Sync + 'static {
    /// Stores `value` under `key`, or deletes the key with `None`. Answers
    /// the write's version: over Redis, the `seq` of the [`Signal::RECORD`]
    /// every node will hear of it (so a node can tell its own later write
    /// from an earlier one announced late); 0 from the other stores.
    fn put(&self, table: BrokerTable, key: String, value: Option<Vec<u8>>) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Every record of `table`.
    fn load(&self, table: BrokerTable) -> BoxFuture<'_, Result<Vec<BrokerRecord>, StoreError>>;

    /// The record under `key`.
    fn get(&self, table: BrokerTable, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>>;

    /// True when other nodes share these records (Redis): sessions are then
    /// read when their client connects, not held in memory from the start,
    /// and every write is announced to every node ([`Signal::RECORD`]).
    fn is_shared(&self) -> bool {
        false
    }
}

/// A key and the record stored under it.
pub type BrokerRecord = (String, Vec<u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokerTable {
    /// Topic to retained message.
    Retained,
    /// Client id to persistent session.
    Sessions,
}

/// Keeps time monotonic per store, so ids and times order the same way even if
/// the wall clock steps back (retention by age relies on it).
pub(crate) fn monotonic(clock: &Clock, last: &mut i64) -> i64 {
    let now = clock().max(*last);
    *last = now;
    now
}
