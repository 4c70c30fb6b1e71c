//! The embedded store: SQLite in WAL mode under the data directory.
//!
//! All writes go through one writer thread that takes every append waiting in its
//! queue (up to `max_batch` messages), writes them in one transaction, commits,
//! hands them to the sink, and only then answers the publishers: group commit, so
//! throughput grows with concurrency while each publish is still acknowledged
//! only once durable. Other writes that must be as durable (outbound jobs,
//! `jobs/sqlite.rs`) queue to the same writer and share its commits. Reads
//! run on a few reader threads with connections of their own (`readers`),
//! which WAL lets run alongside the writer.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::Bytes;
use herald_core::{
    Channel, Data, DataKind, EventName, Filter, Message, Meta, NewMessage, Window,
    inbox::{ReadMark, ReadState},
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::{
    BoxFuture, BrokerRecord, BrokerStore, BrokerTable, IDEMPOTENCY_TTL_MS, Idempotency, InboxStore, Page, Receipt,
    Signal, Store, StoreConfig, StoreError,
    heads::HeadCache,
    idempotency::{decode_receipt, encode_receipt},
    monotonic,
    readers::Readers,
};

/// How hard a commit insists on reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// WAL with `synchronous=NORMAL`: an acknowledged message survives the
    /// process being killed (`kill -9`), not necessarily a power cut.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is fsynced; survives a power cut too.
    Full,
}

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub dir: PathBuf,
    pub sync: SyncMode,
    /// Most messages written in one transaction.
    pub max_batch: usize,
    /// How often messages past their age limit are deleted. Reads never return
    /// them either way; this only reclaims space.
    pub sweep_every: Duration,
}

impl SqliteOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SqliteOptions { dir: dir.into(), sync: SyncMode::Normal, max_batch: 1024, sweep_every: Duration::from_secs(60) }
    }
}

type Reply = oneshot::Sender<Result<Committed, StoreError>>;

struct Append {
    batch: Vec<NewMessage>,
    /// Set: the batch is written only if this key has no answer yet.
    idempotency: Option<Idempotency>,
    reply: Reply,
}

/// What became of one append in a group commit.
enum Committed {
    Fresh(Vec<Arc<Message>>),
    /// Its idempotency key had an answer already: nothing was written.
    Replayed(Receipt),
    Conflict,
}

/// What the writer thread takes from its queue.
enum Op {
    Append(Append),
    /// Any other write (outbound jobs): applied in the transaction of the
    /// group it arrives with, so it shares the group's commit.
    Write(Box<dyn WriteOp>),
}

/// A write other than an append, run by the writer thread.
trait WriteOp: Send {
    /// Applies the change inside the group's transaction, under a savepoint
    /// of its own: `false` (its own failure, kept for `done`) undoes this op
    /// alone.
    fn apply(&mut self, conn: &Connection) -> bool;
    /// Told once the group committed (`Ok`) or failed.
    fn done(self: Box<Self>, committed: Result<(), StoreError>);
}

/// A closure as a [`WriteOp`], answering through a oneshot after the commit.
struct Closure<T, E, F> {
    f: Option<F>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<T, E, F> WriteOp for Closure<T, E, F>
where
    T: Send,
    E: From<StoreError> + Send,
    F: FnOnce(&Connection) -> Result<T, E> + Send,
{
    fn apply(&mut self, conn: &Connection) -> bool {
        let result = (self.f.take().expect("applied once"))(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn done(self: Box<Self>, committed: Result<(), StoreError>) {
        let answer = match (committed, self.result) {
            (Ok(()), Some(result)) => result,
            (Err(e), _) => Err(e.into()),
            (Ok(()), None) => Err(StoreError::Backend("a write was not applied".into()).into()),
        };
        let _ = self.reply.send(answer);
    }
}

pub struct SqliteStore {
    config: StoreConfig,
    writes: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Readers,
    /// Inbox writes (membership, read state) are small and rare next to
    /// messages; they use their own connection, and SQLite serialises them
    /// with the message writer.
    inbox_writer: Arc<Mutex<Connection>>,
    cached_heads: Arc<HeadCache>,
}

/// Reader threads, each with its own connection (see `readers`). Two cores
/// measured; a read is mostly CPU, so more would only queue for the cores.
const READERS: usize = 4;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS channels (
    cid  INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    head INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    cid   INTEGER NOT NULL,
    id    INTEGER NOT NULL,
    event TEXT,
    kind  INTEGER NOT NULL,
    data  BLOB NOT NULL,
    time  INTEGER NOT NULL,
    meta  BLOB,
    PRIMARY KEY (cid, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    grp          TEXT NOT NULL,
    user         TEXT NOT NULL,
    joined_after INTEGER NOT NULL,
    PRIMARY KEY (grp, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS group_members_by_user ON group_members (user, grp);
CREATE TABLE IF NOT EXISTS mqtt_retained (
    topic TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    client_id TEXT PRIMARY KEY,
    value     BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    fingerprint INTEGER NOT NULL,
    receipt     TEXT NOT NULL,
    expires     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_state (
    user    TEXT NOT NULL,
    channel TEXT NOT NULL,
    state   TEXT NOT NULL,
    PRIMARY KEY (user, channel)
) WITHOUT ROWID;
";

fn open(path: &Path, sync: SyncMode) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // 1 KiB pages for a new database (an existing one keeps its own): messages
    // are appended at one end of each channel's range, so a group commit over
    // many channels dirties one page per channel, and every dirty page goes to
    // the WAL whole. Measured with 64 publishers on 64 channels: 4 KiB pages
    // wrote 4x the bytes for 75% of the throughput. Large payloads spill into
    // overflow pages; reads of long histories touch more (cached) pages.
    conn.pragma_update(None, "page_size", 1024)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if sync == SyncMode::Full { "FULL" } else { "NORMAL" })?;
    Ok(conn)
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    open(path, SyncMode::Normal)
}

/// Data directories from before MQTT properties were stored lack the
/// `meta` column; their messages read back with none, as they did then.
fn add_meta_column(conn: &Connection) -> rusqlite::Result<()> {
    let has_meta = conn.prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'meta'")?.exists([])?;
    if !has_meta {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN meta BLOB")?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) `herald.db` under `options.dir` and starts the writer.
    pub fn open(options: SqliteOptions, config: StoreConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&options.dir).map_err(|e| backend(format!("{}: {e}", options.dir.display())))?;
        let path = options.dir.join("herald.db");
        let conn = open(&path, options.sync).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        add_meta_column(&conn).map_err(backend)?;
        crate::jobs::init_sqlite(&conn).map_err(backend)?;
        // Checkpoint every 10,000 pages (10 MiB of WAL) instead of 1,000: a page
        // rewritten by many commits is copied back once per checkpoint, and the
        // commit that triggers one waits for it (measured: ~25% more publishes
        // per second, a p99 acknowledgement of about 14 ms instead of 9).
        conn.pragma_update(None, "wal_autocheckpoint", 10_000).map_err(backend)?;
        let inbox_writer = Arc::new(Mutex::new(open(&path, options.sync).map_err(backend)?));
        let (tx, rx) = mpsc::channel();
        let cached_heads = Arc::new(HeadCache::default());
        let writer = Writer {
            conn,
            config: config.clone(),
            heads: HashMap::new(),
            cached_heads: cached_heads.clone(),
            last_time: 0,
            options,
        };
        let handle = std::thread::Builder::new()
            .name("herald-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(backend)?;
        let readers = Readers::start(READERS, path, open_reader)?;
        Ok(SqliteStore {
            config,
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            readers,
            inbox_writer,
            cached_heads,
        })
    }

    /// Runs `f` in a transaction on the inbox write connection.
    async fn with_inbox_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.inbox_writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            // IMMEDIATE: the write lock is taken up front, so a concurrent
            // commit of the message writer waits (busy timeout) instead of
            // failing at once, as a read-then-write (deferred) transaction
            // does when another connection wrote in between.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok::<T, rusqlite::Error>(out)
        })
        .await
        .map_err(backend)?
        .map_err(backend)
    }

    /// Queues an append for the writer and waits for its group commit.
    async fn submit(&self, batch: Vec<NewMessage>, idempotency: Option<Idempotency>) -> Result<Committed, StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
            let tx = writes.as_ref().ok_or(StoreError::Closed)?;
            tx.send(Op::Append(Append { batch, idempotency, reply })).map_err(|_| StoreError::Closed)?;
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on the writer thread, in the transaction of the next group
    /// commit, and answers once that committed.
    pub(crate) async fn write<T, E>(&self, f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = Closure { f: Some(f), result: None, reply };
        {
            let writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
            let tx = writes.as_ref().ok_or(StoreError::Closed)?;
            tx.send(Op::Write(Box::new(op))).map_err(|_| StoreError::Closed)?;
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a reader thread's connection.
    pub(crate) async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.readers.run(f).await
    }
}

impl Store for SqliteStore {
    fn append(&self, batch: Vec<NewMessage>) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
        Box::pin(async move {
            match self.submit(batch, None).await? {
                Committed::Fresh(msgs) => Ok(msgs),
                Committed::Replayed(_) | Committed::Conflict => unreachable!("only keyed appends are replayed"),
            }
        })
    }

    fn append_once(
        &self,
        idempotency: Idempotency,
        batch: Vec<NewMessage>,
    ) -> BoxFuture<'_, Result<Receipt, StoreError>> {
        Box::pin(async move {
            match self.submit(batch, Some(idempotency)).await? {
                Committed::Fresh(msgs) => Ok(msgs.iter().map(|m| (m.channel.clone(), m.id)).collect()),
                Committed::Replayed(receipt) => Ok(receipt),
                Committed::Conflict => Err(StoreError::IdempotencyConflict),
            }
        })
    }

    fn signal(&self, signal: Signal) -> BoxFuture<'_, Result<(), StoreError>> {
        // One node: the only one to tell is this one.
        self.config.sink.signaled(&signal);
        Box::pin(std::future::ready(Ok(())))
    }

    fn read(&self, channel: Channel, after: u64, limit: usize) -> BoxFuture<'_, Result<Page, StoreError>> {
        let retention = self.config.retention.for_channel(&channel);
        let cutoff = retention.cutoff((self.config.clock)());
        if let Some(page) = self.cached_heads.read(&channel, after, limit, retention, cutoff) {
            return Box::pin(std::future::ready(Ok(page)));
        }
        let cached_heads = self.cached_heads.clone();
        Box::pin(self.with_reader(move |conn| {
            let Some((cid, head)) = conn
                .prepare_cached("SELECT cid, head FROM channels WHERE name = ?1")?
                .query_row([channel.as_str()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)))
                .optional()?
            else {
                return Ok(Page { messages: Vec::new(), window: Window::new(1, 0) });
            };
            // Retained = within the count limit and not past the age limit. Reads
            // apply both so a lowered limit takes effect before the next trim.
            let by_count = head.saturating_sub(retention.size) + 1;
            let by_age: Option<i64> = conn
                .prepare_cached("SELECT min(id) FROM messages WHERE cid = ?1 AND time >= ?2")?
                .query_row(params![cid, cutoff], |r| r.get(0))?;
            let first = by_age.map_or(head + 1, |id| (id as u64).max(by_count));
            let mut stmt = conn.prepare_cached(
                "SELECT id, event, kind, data, time, meta FROM messages
                 WHERE cid = ?1 AND id > ?2 AND id >= ?3 ORDER BY id LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![cid, after as i64, first as i64, limit as i64], |r| {
                let event: Option<String> = r.get(1)?;
                let kind = DataKind::from_u8(r.get::<_, u8>(2)?).unwrap_or(DataKind::Text);
                Ok(Arc::new(
                    Message::new(
                        channel.clone(),
                        r.get::<_, i64>(0)? as u64,
                        event.as_deref().map(EventName::from_trusted),
                        Data::from_trusted(kind, Bytes::from(r.get::<_, Vec<u8>>(3)?)),
                        r.get(4)?,
                    )
                    .with_meta(r.get_ref(5)?.as_blob_or_null()?.and_then(Meta::decode).map(Arc::new)),
                ))
            })?;
            let messages = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            cached_heads.advance(&channel, head);
            Ok(Page { messages, window: Window::new(first, head) })
        }))
    }

    fn cached_head(&self, channel: &Channel) -> Option<u64> {
        self.cached_heads.get(channel)
    }

    fn channels(&self, filter: Filter) -> BoxFuture<'_, Result<Vec<(Channel, u64)>, StoreError>> {
        Box::pin(self.with_reader(move |conn| {
            // Every match starts with the filter's literal prefix, and channel
            // names are ASCII below 0x7f, so this range holds all candidates.
            let low = filter.literal_prefix();
            let high = format!("{low}\u{7f}");
            let mut stmt =
                conn.prepare_cached("SELECT name, head FROM channels WHERE name >= ?1 AND name < ?2 ORDER BY name")?;
            let rows = stmt.query_map([&low, &high], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            let mut out = Vec::new();
            for row in rows {
                let (name, head) = row?;
                if let Ok(ch) = Channel::parse(&name)
                    && filter.matches(&ch)
                {
                    out.push((ch, head));
                }
            }
            Ok(out)
        }))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Dropping the sender lets the writer finish its queue and exit.
            self.writes.lock().unwrap_or_else(|e| e.into_inner()).take();
            let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(h) = handle {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
            self.readers.close().await;
        })
    }
}

/// The single writer: owns the write connection and each channel's head.
struct Writer {
    conn: Connection,
    config: StoreConfig,
    options: SqliteOptions,
    /// Channel name to (cid, head), loaded on first use. Cleared when a
    /// transaction fails, since its increments were rolled back.
    heads: HashMap<Channel, (i64, u64)>,
    /// What readers may know without reading: advanced before the sink.
    cached_heads: Arc<HeadCache>,
    last_time: i64,
}

impl Writer {
    fn run(mut self, ops: mpsc::Receiver<Op>) {
        let mut last_sweep = Instant::now();
        loop {
            let first = match ops.recv_timeout(self.options.sweep_every) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sweep();
                    last_sweep = Instant::now();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let weight = |op: &Op| match op {
                Op::Append(a) => a.batch.len(),
                Op::Write(_) => 1,
            };
            let mut size = weight(&first);
            let mut group = vec![first];
            while size < self.options.max_batch {
                match ops.try_recv() {
                    Ok(op) => {
                        size += weight(&op);
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
            if last_sweep.elapsed() >= self.options.sweep_every {
                self.sweep();
                last_sweep = Instant::now();
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn commit_group(&mut self, group: Vec<Op>) {
        let now = monotonic(&self.config.clock, &mut self.last_time);
        let mut replies = Vec::with_capacity(group.len());
        let mut batches = Vec::with_capacity(group.len());
        let mut writes = Vec::new();
        for op in group {
            match op {
                Op::Append(Append { batch, idempotency, reply }) => {
                    replies.push(reply);
                    batches.push((batch, idempotency));
                }
                Op::Write(w) => writes.push(w),
            }
        }
        let started = Instant::now();
        match self.write(batches, &mut writes, now) {
            Ok(committed) => {
                let all: Vec<Arc<Message>> = committed
                    .iter()
                    .filter_map(|c| match c {
                        Committed::Fresh(msgs) => Some(msgs),
                        _ => None,
                    })
                    .flatten()
                    .cloned()
                    .collect();
                if !all.is_empty() {
                    self.config.sink.commit_took(all.len(), started.elapsed());
                    self.cached_heads.committed(&all);
                    self.config.sink.committed(&all);
                }
                for (reply, outcome) in replies.into_iter().zip(committed) {
                    let _ = reply.send(Ok(outcome));
                }
                for w in writes {
                    w.done(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed");
                self.heads.clear();
                for reply in replies {
                    let _ = reply.send(Err(backend(&e)));
                }
                for w in writes {
                    w.done(Err(backend(&e)));
                }
            }
        }
    }

    fn write(
        &mut self,
        batches: Vec<(Vec<NewMessage>, Option<Idempotency>)>,
        writes: &mut [Box<dyn WriteOp>],
        now: i64,
    ) -> rusqlite::Result<Vec<Committed>> {
        // IMMEDIATE, as the inbox writer's: with two writing connections, a
        // deferred transaction that reads a new channel's row and then writes
        // failed with "database is locked" when the other had written in
        // between (its busy timeout does not apply to that upgrade), and
        // the whole group of publishes with it.
        let mut tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut touched: HashMap<i64, (u64, u64)> = HashMap::new();
        let mut out = Vec::with_capacity(batches.len());
        for (batch, idempotency) in batches {
            // A key answered before (in an earlier commit, or earlier in this
            // one: a retry racing its original) is answered again, unwritten.
            if let Some(k) = &idempotency {
                let prior: Option<(i64, String)> = tx
                    .prepare_cached("SELECT fingerprint, receipt FROM idempotency WHERE key = ?1 AND expires > ?2")?
                    .query_row(params![k.key, now], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((fingerprint, receipt)) = prior {
                    out.push(match (fingerprint == k.fingerprint as i64, decode_receipt(&receipt)) {
                        (true, Some(receipt)) => Committed::Replayed(receipt),
                        _ => Committed::Conflict,
                    });
                    continue;
                }
            }
            let mut msgs = Vec::with_capacity(batch.len());
            for m in batch {
                let (cid, head) = match self.heads.get(&m.channel) {
                    Some(v) => *v,
                    None => {
                        let found = tx
                            .prepare_cached("SELECT cid, head FROM channels WHERE name = ?1")?
                            .query_row([m.channel.as_str()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)))
                            .optional()?;
                        match found {
                            Some(v) => v,
                            None => {
                                tx.prepare_cached("INSERT INTO channels (name, head) VALUES (?1, 0)")?
                                    .execute([m.channel.as_str()])?;
                                (tx.last_insert_rowid(), 0)
                            }
                        }
                    }
                };
                let id = head + 1;
                self.heads.insert(m.channel.clone(), (cid, id));
                let size = self.config.retention.for_channel(&m.channel).size;
                touched.insert(cid, (id, size));
                tx.prepare_cached(
                    "INSERT INTO messages (cid, id, event, kind, data, time, meta) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    cid,
                    id as i64,
                    m.event.as_ref().map(EventName::as_str),
                    m.data.kind() as u8,
                    &m.data.bytes()[..],
                    now,
                    m.meta.as_deref().map(Meta::encode)
                ])?;
                msgs.push(Arc::new(Message::new(m.channel, id, m.event, m.data, now).with_meta(m.meta)));
            }
            if let Some(k) = idempotency {
                let receipt: Receipt = msgs.iter().map(|m| (m.channel.clone(), m.id)).collect();
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO idempotency (key, fingerprint, receipt, expires) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    k.key,
                    k.fingerprint as i64,
                    encode_receipt(&receipt),
                    now + IDEMPOTENCY_TTL_MS
                ])?;
            }
            out.push(Committed::Fresh(msgs));
        }
        for (cid, (head, size)) in touched {
            tx.prepare_cached("UPDATE channels SET head = ?2 WHERE cid = ?1")?.execute(params![cid, head as i64])?;
            if head > size {
                tx.prepare_cached("DELETE FROM messages WHERE cid = ?1 AND id <= ?2")?
                    .execute(params![cid, (head - size) as i64])?;
            }
        }
        for w in writes.iter_mut() {
            let sp = tx.savepoint()?;
            if w.apply(&sp) {
                sp.commit()?;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Deletes messages past their channel's age limit.
    fn sweep(&mut self) {
        let now = (self.config.clock)();
        let result = (|| -> rusqlite::Result<usize> {
            let channels: Vec<(i64, String)> = self
                .conn
                .prepare_cached("SELECT cid, name FROM channels")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            self.conn.prepare_cached("DELETE FROM idempotency WHERE expires <= ?1")?.execute([now])?;
            let mut deleted = 0;
            for (cid, name) in channels {
                let Ok(ch) = Channel::parse(&name) else { continue };
                let retention = self.config.retention.for_channel(&ch);
                if retention.ttl_ms.is_some() {
                    deleted += self
                        .conn
                        .prepare_cached("DELETE FROM messages WHERE cid = ?1 AND time < ?2")?
                        .execute(params![cid, retention.cutoff(now)])?;
                }
            }
            Ok(deleted)
        })();
        match result {
            Ok(n) if n > 0 => tracing::debug!(deleted = n, "expired messages swept"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping expired messages failed"),
        }
    }
}

impl InboxStore for SqliteStore {
    fn groups_of(&self, user: String) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>> {
        Box::pin(self.with_reader(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT grp, joined_after FROM group_members WHERE user = ?1 ORDER BY grp")?;
            let rows = stmt.query_map([&user], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        }))
    }

    fn add_members(
        &self,
        group: String,
        users: Vec<String>,
        joined_after: u64,
    ) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.with_inbox_writer(move |tx| {
            let mut stmt =
                tx.prepare_cached("INSERT OR IGNORE INTO group_members (grp, user, joined_after) VALUES (?1, ?2, ?3)")?;
            let mut added = 0;
            for u in &users {
                added += stmt.execute(params![group, u, joined_after as i64])?;
            }
            Ok(added)
        }))
    }

    fn remove_members(&self, group: String, users: Vec<String>) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.with_inbox_writer(move |tx| {
            let mut stmt = tx.prepare_cached("DELETE FROM group_members WHERE grp = ?1 AND user = ?2")?;
            let mut removed = 0;
            for u in &users {
                removed += stmt.execute(params![group, u])?;
            }
            Ok(removed)
        }))
    }

    fn members(&self, group: String, after: String, limit: usize) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(self.with_reader(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT user FROM group_members WHERE grp = ?1 AND user > ?2 ORDER BY user LIMIT ?3")?;
            let rows = stmt.query_map(params![group, after, limit as i64], |r| r.get::<_, String>(0))?;
            rows.collect()
        }))
    }

    fn read_state(&self, user: String) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>> {
        Box::pin(self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT channel, state FROM read_state WHERE user = ?1")?;
            let rows = stmt.query_map([&user], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = HashMap::new();
            for row in rows {
                let (channel, state) = row?;
                if let (Ok(c), Some(s)) = (Channel::parse(&channel), ReadState::decode(&state)) {
                    out.insert(c, s);
                }
            }
            Ok(out)
        }))
    }

    fn mark_read(
        &self,
        user: String,
        marks: Vec<(Channel, ReadMark)>,
    ) -> BoxFuture<'_, Result<HashMap<Channel, ReadState>, StoreError>> {
        // Read, merge and write in one IMMEDIATE transaction: SQLite holds
        // the write lock throughout, so a concurrent mark waits its turn.
        Box::pin(self.with_inbox_writer(move |tx| {
            let mut out = HashMap::new();
            for (channel, mark) in marks {
                let mut state = tx
                    .prepare_cached("SELECT state FROM read_state WHERE user = ?1 AND channel = ?2")?
                    .query_row(params![user, channel.as_str()], |r| r.get::<_, String>(0))
                    .optional()?
                    .and_then(|s| ReadState::decode(&s))
                    .unwrap_or_default();
                state.apply(&mark);
                tx.prepare_cached("INSERT OR REPLACE INTO read_state (user, channel, state) VALUES (?1, ?2, ?3)")?
                    .execute(params![user, channel.as_str(), state.encode()])?;
                out.insert(channel, state);
            }
            Ok(out)
        }))
    }
}

/// The broker's records: in their own tables, written on the inbox writer's
/// connection (small, rare writes, serialised by SQLite with the messages').
impl BrokerStore for SqliteStore {
    fn put(&self, table: BrokerTable, key: String, value: Option<Vec<u8>>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.with_inbox_writer(move |tx| {
            match (table_sql(table), value) {
                ((name, key_column), Some(v)) => tx
                    .prepare_cached(&format!("INSERT OR REPLACE INTO {name} ({key_column}, value) VALUES (?1, ?2)"))?
                    .execute(params![key, v])?,
                ((name, key_column), None) => {
                    tx.prepare_cached(&format!("DELETE FROM {name} WHERE {key_column} = ?1"))?.execute([key])?
                }
            };
            Ok(0)
        }))
    }

    fn load(&self, table: BrokerTable) -> BoxFuture<'_, Result<Vec<BrokerRecord>, StoreError>> {
        Box::pin(self.with_reader(move |conn| {
            let (name, key_column) = table_sql(table);
            let mut stmt = conn.prepare(&format!("SELECT {key_column}, value FROM {name}"))?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
            rows.collect()
        }))
    }

    fn get(&self, table: BrokerTable, key: String) -> BoxFuture<'_, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(self.with_reader(move |conn| {
            let (name, key_column) = table_sql(table);
            conn.prepare_cached(&format!("SELECT value FROM {name} WHERE {key_column} = ?1"))?
                .query_row([key], |r| r.get::<_, Vec<u8>>(0))
                .optional()
        }))
    }
}

/// A broker table's name and key column (fixed strings, never user input).
fn table_sql(table: BrokerTable) -> (&'static str, &'static str) {
    match table {
        BrokerTable::Retained => ("mqtt_retained", "topic"),
        BrokerTable::Sessions => ("mqtt_sessions", "client_id"),
    }
}
