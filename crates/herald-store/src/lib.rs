//! The `Store` seam: where messages get their ids and are kept as history.
//!
//! A store assigns each channel's next id, commits, and only then hands the
//! committed messages — in id order — to its [`CommitSink`] (the hub), and answers
//! the publisher. Reading returns the messages after a cursor together with the
//! channel's [`Window`], from which the core decides about gaps.
//!
//! Two implementations live here: [`MemoryStore`] (tests, `--memory`) and
//! [`SqliteStore`] (the embedded default). A Redis store will implement the same
//! trait; its fan-out across nodes then feeds each node's sink.
//!
//! Beside messages, the same stores keep inbox state ([`InboxStore`]), the
//! MQTT broker's records ([`BrokerStore`]) and outbound jobs ([`JobStore`],
//! in `jobs/`).

mod heads;
mod jobs;
mod memory;
mod readers;
mod sqlite;

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc};

use herald_core::{Channel, Filter, Hub, Message, NewMessage, RetentionRules, Window, inbox::ReadState};

pub use jobs::{
    After, Changes, Claimed, Expect, Job, JobError, JobId, JobState, JobStore, JobSummary, Lease, NewJob, Record,
    RecordWrite,
};
pub use memory::MemoryStore;
pub use sqlite::{SqliteOptions, SqliteStore, SyncMode};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store is closed")]
    Closed,
    #[error("storage failure: {0}")]
    Backend(String),
}

/// Receives committed messages, in commit order, before publishers are answered.
pub trait CommitSink: Send + Sync + 'static {
    fn committed(&self, msgs: &[Arc<Message>]);
}

impl CommitSink for Hub {
    fn committed(&self, msgs: &[Arc<Message>]) {
        self.publish(msgs);
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

    /// Replaces `user`'s read state for the given channels.
    fn save_read_state(&self, user: String, states: Vec<(Channel, ReadState)>)
    -> BoxFuture<'_, Result<(), StoreError>>;
}

/// What the MQTT broker keeps across restarts, in two tables of records the
/// broker encodes itself: retained messages by topic, persistent sessions by
/// client id. Small and rare next to messages (a write per retained publish,
/// per subscription change and per disconnect of a persistent session).
pub trait BrokerStore: Send + Sync + 'static {
    /// Stores `value` under `key`, or deletes the key with `None`.
    fn put(&self, table: BrokerTable, key: String, value: Option<Vec<u8>>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Every record of `table`.
    fn load(&self, table: BrokerTable) -> BoxFuture<'_, Result<Vec<BrokerRecord>, StoreError>>;
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
