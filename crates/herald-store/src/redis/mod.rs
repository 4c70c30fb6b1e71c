//! The Redis store: several Herald nodes share one deployment's channels.
//!
//! Ids and history live in Redis: each channel hashes to one of a fixed
//! number of partitions, and one Lua script per publish (per shard) assigns
//! the next ids, appends to the channels' history streams, trims them, and
//! advances the partition's feed: a sequence number, a short log of recent
//! payloads, and a pub/sub message carrying the committed messages. Every
//! node subscribes to every partition's feed on one connection per Redis
//! (never per channel), and hands what arrives to its sink, in order, its own
//! publishes included. Nothing is trusted to pub/sub alone: a jump in a
//! partition's sequence, a feed that reconnects, and a periodic check of
//! every partition's sequence all read back what was missed from the log,
//! and where the log no longer reaches, re-read the heads of the channels
//! this node serves (`feed.rs`).
//!
//! Redis trouble is never silent: a command that Redis does not answer
//! within the timeout is [`StoreError::Unavailable`] (the HTTP edge answers
//! 503 with `Retry-After`); a Redis restart that may have lost writes (no
//! AOF with `appendfsync always`), or a wiped one, makes new ids start from a
//! floor above every id handed out before, so no id is reused and readers are
//! told of a gap. Design notes: `../shared/SCALE-OUT.md`; ARCHITECTURE.md.

mod feed;
mod inbox;
mod jobs;
mod keys;
mod nodes;
mod scripts;
mod shard;
mod wire;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use herald_core::{Channel, Filter, Message, NewMessage, Window};
use redis::Value;
use tokio::sync::watch;

use self::{keys::Keys, scripts::*, shard::Shard};
use crate::{
    BoxFuture, IDEMPOTENCY_TTL_MS, Idempotency, Page, Receipt, Signal, Store, StoreConfig, StoreError, StoreStatus,
    heads::HeadCache,
};

#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// One URL per Redis (several: client-side shards).
    pub urls: Vec<String>,
    /// Every key starts with it: several deployments can share a Redis.
    pub prefix: String,
    /// Channels hash to this many partitions; fixed for the data's life
    /// (stored in Redis: a node configured otherwise refuses to start).
    pub partitions: u32,
    /// Longest wait for any answer from Redis; past it a publish is 503.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// How often each partition's feed sequence is compared with what this
    /// node received (finds a lost last message, or a deaf connection).
    pub check_every: Duration,
    /// Recent feed payloads kept per partition for nodes that missed some.
    pub log_len: usize,
    /// This node's name, in logs and stats.
    pub node: String,
    /// `urls` are seeds of one Redis Cluster (not client-side shards):
    /// commands go to the master of their partition's slot, and the feeds
    /// are sharded pub/sub.
    pub cluster: bool,
}

impl RedisOptions {
    pub fn new(urls: Vec<String>) -> Self {
        RedisOptions {
            urls,
            prefix: "herald".into(),
            partitions: 16,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            check_every: Duration::from_secs(1),
            log_len: 10_000,
            node: "herald".into(),
            cluster: false,
        }
    }
}

pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: StoreConfig,
    options: RedisOptions,
    keys: Keys,
    shards: Vec<Shard>,
    /// Per partition: its shard.
    shard_of: Vec<usize>,
    /// Per partition: the last feed sequence handed to the sink.
    seen: Vec<AtomicU64>,
    /// Per partition: this node has seen it give out ids (so a record
    /// without its Redis run id means Redis lost it, not that it is new; a
    /// signal alone leaves a record without one).
    known: Vec<AtomicBool>,
    /// Channels' heads as the feed and reads found them, and their last few
    /// messages, as the SQLite store keeps them.
    heads: HeadCache,
    /// The last message's age when it arrived here, in ms.
    feed_lag_ms: AtomicI64,
    /// Times the log no longer reached and channels were re-read instead.
    resyncs: AtomicU64,
    /// The deployment's nodes as this node last read their stamps.
    nodes: std::sync::Mutex<nodes::Seen>,
    closed: AtomicBool,
    stop: watch::Sender<bool>,
}

impl RedisStore {
    /// Connects to every Redis, checks its settings, and starts the feeds.
    /// Refuses a Redis that evicts keys (history and heads would vanish
    /// under memory pressure) and one that holds this prefix with another
    /// number of partitions.
    pub async fn open(options: RedisOptions, config: StoreConfig) -> Result<Self, StoreError> {
        if options.urls.is_empty() {
            return Err(StoreError::Backend("no Redis URL".into()));
        }
        let partitions = options.partitions.clamp(1, 16_384);
        let keys = Keys::new(&options.prefix, partitions);
        let mut shards = Vec::new();
        if options.cluster {
            let shard = Shard::connect_cluster(&options.urls, options.timeout, options.connect_timeout).await?;
            check_settings(&shard, &keys).await?;
            shards.push(shard);
        } else {
            for url in &options.urls {
                let shard = Shard::connect(url, options.timeout, options.connect_timeout).await?;
                check_settings(&shard, &keys).await?;
                shards.push(shard);
            }
        }
        let n = shards.len();
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            shard_of: (0..partitions).map(|p| shard::shard_of(p, n)).collect(),
            seen: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            known: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            heads: HeadCache::default(),
            feed_lag_ms: AtomicI64::new(0),
            resyncs: AtomicU64::new(0),
            nodes: Default::default(),
            closed: AtomicBool::new(false),
            config,
            options,
            keys,
            shards,
            stop,
        });
        for s in 0..n {
            let ready = feed::start(inner.clone(), s);
            // The first subscription, so that nothing published from here on
            // is missed; later reconnections happen in the background.
            let _ = tokio::time::timeout(inner.options.connect_timeout * 2, ready).await;
        }
        tokio::spawn(nodes::run(inner.clone()));
        Ok(RedisStore { inner })
    }
}

/// Refuses what would lose data, and warns about what may.
async fn check_settings(shard: &Shard, keys: &Keys) -> Result<(), StoreError> {
    match shard.config("maxmemory-policy").await.as_deref() {
        Some("noeviction") => {}
        Some(policy) => {
            return Err(StoreError::Backend(format!(
                "{} evicts keys (maxmemory-policy {policy}): Herald's heads and history would vanish under memory \
                 pressure; set maxmemory-policy noeviction",
                shard.name
            )));
        }
        None => {
            tracing::warn!(redis = %shard.name, "CONFIG GET is refused: cannot check maxmemory-policy is noeviction")
        }
    }
    let aof = shard.config("appendonly").await;
    let fsync = shard.config("appendfsync").await;
    let lossless = aof.as_deref() == Some("yes") && fsync.as_deref() == Some("always");
    shard.lossy.store(!lossless, Ordering::Relaxed);
    if !lossless {
        tracing::warn!(
            redis = %shard.name, appendonly = ?aof, appendfsync = ?fsync,
            "a restart of this Redis may lose acknowledged messages; clients are then told of a gap \
             (appendonly yes with appendfsync always loses none)"
        );
    }
    let wanted = keys.partitions().to_string();
    let stored: Option<String> = shard
        .pipe(
            redis::pipe()
                .cmd("HSETNX")
                .arg(keys.meta())
                .arg("partitions")
                .arg(&wanted)
                .ignore()
                .cmd("HGET")
                .arg(keys.meta())
                .arg("partitions"),
        )
        .await
        .map(|v: (Option<String>,)| v.0)?;
    match stored {
        Some(p) if p != wanted => Err(StoreError::Backend(format!(
            "{} holds this deployment with {p} partitions, not {wanted}: set [redis] partitions = {p}",
            shard.name
        ))),
        _ => Ok(()),
    }
}

impl Inner {
    /// The messages this node just committed. Their heads are known from
    /// now on, as on one node (a publisher that reads right after its
    /// publish finds it), though the hub hears of them from the feed: a
    /// subscriber that registers now and finds its cursor at such a head
    /// has nothing to replay, and what the feed brings up to it is dropped
    /// as already covered.
    fn committed_here(&self, batch: Vec<NewMessage>, pairs: Vec<(u64, i64)>) -> Vec<Arc<Message>> {
        let msgs: Vec<Arc<Message>> = batch
            .into_iter()
            .zip(pairs)
            .map(|(m, (id, time))| Arc::new(Message::new(m.channel, id, m.event, m.data, time).with_meta(m.meta)))
            .collect();
        self.heads.committed(&msgs);
        msgs
    }

    fn shard(&self, p: u32) -> &Shard {
        &self.shards[self.shard_of[p as usize]]
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) { Err(StoreError::Closed) } else { Ok(()) }
    }

    /// Commits a batch: one script per shard (its partitions together, so a
    /// multi-channel publish within one Redis is atomic). Answers each
    /// message's id and time in batch order, or the receipt of an earlier
    /// publish under the same idempotency key.
    /// [`Self::commit`], its time reported to the sink (metrics): over Redis
    /// a commit is one publish's script round trip.
    async fn timed_commit(
        &self,
        batch: &[NewMessage],
        idempotency: Option<&Idempotency>,
    ) -> Result<Committed, StoreError> {
        let started = std::time::Instant::now();
        let committed = self.commit(batch, idempotency).await?;
        if let Committed::Fresh(pairs) = &committed {
            self.config.sink.commit_took(pairs.len(), started.elapsed());
        }
        Ok(committed)
    }

    async fn commit(&self, batch: &[NewMessage], idempotency: Option<&Idempotency>) -> Result<Committed, StoreError> {
        self.check_open()?;
        let now = (self.config.clock)();
        // One script per shard (its partitions together), or per partition
        // on a Cluster (a script's keys must share a slot): indexes of its
        // messages, in batch order.
        let cluster = self.shards[0].is_cluster();
        let mut calls: BTreeMap<(usize, u32), Vec<usize>> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            let p = self.keys.channel_partition(&m.channel);
            calls.entry((self.shard_of[p as usize], if cluster { p } else { 0 })).or_default().push(i);
        }
        let calls = calls.into_iter().map(|((s, _), idx)| self.commit_on(s, batch, idx, idempotency, now));
        let results = futures_join(calls).await;
        let mut out = vec![(0u64, 0i64); batch.len()];
        let mut replayed = false;
        for r in results {
            match r? {
                (ShardAnswer::Fresh(pairs), idx) => {
                    for (i, pair) in idx.into_iter().zip(pairs) {
                        out[i] = pair;
                    }
                }
                (ShardAnswer::Replayed(ids), idx) => {
                    replayed = true;
                    for (i, id) in idx.into_iter().zip(ids) {
                        out[i] = (id, 0);
                    }
                }
            }
        }
        Ok(if replayed { Committed::Replayed(out) } else { Committed::Fresh(out) })
    }

    async fn commit_on(
        &self,
        s: usize,
        batch: &[NewMessage],
        idx: Vec<usize>,
        idempotency: Option<&Idempotency>,
        now: i64,
    ) -> Result<(ShardAnswer, Vec<usize>), StoreError> {
        let shard = &self.shards[s];
        // Partition groups in first-seen order.
        let mut groups: Vec<u32> = Vec::new();
        for &i in &idx {
            let p = self.keys.channel_partition(&batch[i].channel);
            if !groups.contains(&p) {
                groups.push(p);
            }
        }
        let mut script = PUBLISH_SCRIPT.prepare_invoke();
        let key = idempotency.map_or(String::new(), |k| k.key.clone());
        script.key(self.keys.idempotency(groups[0], &key));
        for &p in &groups {
            script
                .key(self.keys.part(p))
                .key(self.keys.heads(p))
                .key(self.keys.origins(p))
                .key(self.keys.names(p))
                .key(self.keys.log(p));
        }
        for &i in &idx {
            let ch = &batch[i].channel;
            script.key(self.keys.stream(self.keys.channel_partition(ch), ch));
        }
        script
            .arg(now)
            .arg(if shard.lossy.load(Ordering::Relaxed) { "1" } else { "0" })
            .arg(idempotency.map_or(String::new(), |k| k.fingerprint.to_string()))
            .arg(IDEMPOTENCY_TTL_MS)
            .arg(groups.len())
            .arg(idx.len())
            .arg(self.options.log_len)
            .arg(if shard.is_cluster() { "1" } else { "0" });
        for &p in &groups {
            script.arg(self.keys.feed(p)).arg(if self.known[p as usize].load(Ordering::Relaxed) { "1" } else { "0" });
        }
        for &i in &idx {
            let m = &batch[i];
            let p = self.keys.channel_partition(&m.channel);
            let g = groups.iter().position(|x| *x == p).expect("grouped above") + 1;
            let retention = self.config.retention.for_channel(&m.channel);
            script
                .arg(g)
                .arg(m.channel.as_str())
                .arg(m.event.as_ref().map_or("", |e| e.as_str()))
                .arg(m.data.kind() as u8)
                .arg(&m.data.bytes()[..])
                .arg(m.meta.as_deref().map(herald_core::Meta::encode).unwrap_or_default())
                .arg(retention.size)
                .arg(retention.ttl_ms.unwrap_or(0));
        }
        let answer: Vec<Value> = shard.script(&script).await?;
        for &p in &groups {
            self.known[p as usize].store(true, Ordering::Relaxed);
        }
        let status = answer.first().and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
        match status.as_deref() {
            Some("ok") => {
                let nums: Vec<i64> =
                    answer[1..].iter().filter_map(|v| redis::from_redis_value::<i64>(v.clone()).ok()).collect();
                if nums.len() != idx.len() * 2 {
                    return Err(StoreError::Backend(format!("{}: unexpected publish answer", shard.name)));
                }
                Ok((ShardAnswer::Fresh(nums.chunks(2).map(|c| (c[0] as u64, c[1])).collect()), idx))
            }
            Some("replay") => {
                let text =
                    answer.get(1).and_then(|v| redis::from_redis_value::<String>(v.clone()).ok()).unwrap_or_default();
                let ids: Vec<u64> = text.split(',').filter_map(|n| n.parse().ok()).collect();
                if ids.len() != idx.len() {
                    return Err(StoreError::IdempotencyConflict);
                }
                Ok((ShardAnswer::Replayed(ids), idx))
            }
            Some("conflict") => Err(StoreError::IdempotencyConflict),
            _ => Err(StoreError::Backend(format!("{}: unexpected publish answer", shard.name))),
        }
    }
}

enum ShardAnswer {
    /// (id, time) per message.
    Fresh(Vec<(u64, i64)>),
    Replayed(Vec<u64>),
}

enum Committed {
    /// (id, time) per message.
    Fresh(Vec<(u64, i64)>),
    /// Ids only (times were not kept with the key): some or all shards had
    /// answered this key before.
    Replayed(Vec<(u64, i64)>),
}

/// Runs futures at once and waits for them all (a shard per future: a
/// multi-shard publish takes the slowest shard's time, not their sum).
async fn futures_join<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut futures: Vec<Option<_>> = futures.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}

impl Store for RedisStore {
    fn append(&self, batch: Vec<NewMessage>) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
        Box::pin(async move {
            let pairs = match self.inner.timed_commit(&batch, None).await? {
                Committed::Fresh(p) => p,
                Committed::Replayed(_) => unreachable!("only keyed publishes are replayed"),
            };
            Ok(self.inner.committed_here(batch, pairs))
        })
    }

    fn append_once(
        &self,
        idempotency: Idempotency,
        batch: Vec<NewMessage>,
    ) -> BoxFuture<'_, Result<Receipt, StoreError>> {
        Box::pin(async move {
            match self.inner.timed_commit(&batch, Some(&idempotency)).await? {
                Committed::Fresh(pairs) => {
                    Ok(self.inner.committed_here(batch, pairs).iter().map(|m| (m.channel.clone(), m.id)).collect())
                }
                Committed::Replayed(pairs) => {
                    Ok(batch.into_iter().zip(pairs).map(|(m, (id, _))| (m.channel, id)).collect())
                }
            }
        })
    }

    fn read(&self, channel: Channel, after: u64, limit: usize) -> BoxFuture<'_, Result<Page, StoreError>> {
        let inner = &self.inner;
        let retention = inner.config.retention.for_channel(&channel);
        let cutoff = retention.cutoff((inner.config.clock)());
        if let Some(page) = inner.heads.read(&channel, after, limit, retention, cutoff) {
            return Box::pin(std::future::ready(Ok(page)));
        }
        Box::pin(async move {
            let p = inner.keys.channel_partition(&channel);
            let mut script = READ_SCRIPT.prepare_invoke();
            script
                .key(inner.keys.heads(p))
                .key(inner.keys.origins(p))
                .key(inner.keys.stream(p, &channel))
                .arg(channel.as_str())
                .arg(after)
                .arg(limit)
                .arg(if retention.ttl_ms.is_some() { cutoff.max(0) } else { 0 })
                .arg(retention.size);
            let answer: (u64, u64, u64, Vec<Value>) = inner.shard(p).script(&script).await?;
            let (head, first, origin, entries) = answer;
            let messages = entries
                .into_iter()
                .map(|e| {
                    wire::entry(&channel, e)
                        .ok_or_else(|| StoreError::Backend(format!("unreadable history entry in {channel}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            inner.heads.advance(&channel, head);
            Ok(Page { messages, window: Window { first, head, origin } })
        })
    }

    fn cached_head(&self, channel: &Channel) -> Option<u64> {
        self.inner.heads.get(channel)
    }

    fn channels(&self, filter: Filter) -> BoxFuture<'_, Result<Vec<(Channel, u64)>, StoreError>> {
        Box::pin(async move {
            let inner = &self.inner;
            // Every match starts with the filter's literal prefix, and channel
            // names are ASCII below 0x7f: a lexical range holds them all.
            let low = format!("[{}", filter.literal_prefix());
            let high = format!("({}\u{7f}", filter.literal_prefix());
            let mut found = Vec::new();
            for p in 0..inner.keys.partitions() {
                let names: Vec<String> = inner
                    .shard(p)
                    .query(redis::cmd("ZRANGEBYLEX").arg(inner.keys.names(p)).arg(&low).arg(&high))
                    .await?;
                let names: Vec<Channel> =
                    names.iter().filter_map(|n| Channel::parse(n).ok()).filter(|c| filter.matches(c)).collect();
                if names.is_empty() {
                    continue;
                }
                let heads: Vec<Option<u64>> = inner
                    .shard(p)
                    .query(
                        redis::cmd("HMGET")
                            .arg(inner.keys.heads(p))
                            .arg(names.iter().map(Channel::as_str).collect::<Vec<_>>()),
                    )
                    .await?;
                found.extend(names.into_iter().zip(heads).map(|(c, h)| (c, h.unwrap_or(0))));
            }
            found.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(found)
        })
    }

    fn signal(&self, signal: Signal) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.inner.check_open()?;
            self.inner.send_signal(&signal, "sig", None, None).await.map(drop)
        })
    }

    fn status(&self) -> StoreStatus {
        let inner = &self.inner;
        let shards: Vec<serde_json::Value> = inner
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({
                    "redis": s.name,
                    "available": s.is_available(),
                    "feed_connected": s.feed_up.load(Ordering::Relaxed),
                    "lossy_restarts": s.lossy.load(Ordering::Relaxed),
                    "partitions": inner.shard_of.iter().filter(|x| **x == i).count(),
                    "feed_received": s.received.load(Ordering::Relaxed),
                    "feed_recovered": s.recovered.load(Ordering::Relaxed),
                    "feed_reconnects": s.reconnects.load(Ordering::Relaxed),
                    "last_error": s.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                })
            })
            .collect();
        StoreStatus {
            available: !inner.closed.load(Ordering::Relaxed) && inner.shards.iter().all(Shard::is_available),
            details: Some(serde_json::json!({
                "node": inner.options.node,
                "partitions": inner.keys.partitions(),
                "feed_lag_ms": inner.feed_lag_ms.load(Ordering::Relaxed),
                "resyncs": inner.resyncs.load(Ordering::Relaxed),
                "nodes": nodes::json(&inner.nodes.lock().unwrap_or_else(|e| e.into_inner()), inner.options.check_every),
                "shards": shards,
            })),
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            let _ = self.inner.stop.send(true);
            nodes::leave(&self.inner).await;
        })
    }
}

impl Inner {
    /// Runs the signal script: a signal alone (`sig`), or a broker record
    /// written (`put`) or deleted (`del`) together with its announcement.
    /// Answers the signal's sequence number.
    async fn send_signal(
        &self,
        signal: &Signal,
        op: &str,
        record: Option<(&str, char)>,
        value: Option<&[u8]>,
    ) -> Result<u64, StoreError> {
        let p = match record {
            Some((key, _)) => self.keys.partition_of(key),
            None => self.keys.partition_of(&signal.key),
        };
        let mut script = SIGNAL_SCRIPT.prepare_invoke();
        script
            .key(self.keys.part(p))
            .key(self.keys.log(p))
            .key(self.keys.records(p, record.map_or('r', |r| r.1)))
            .arg(self.keys.feed(p))
            .arg(self.options.log_len)
            .arg(if self.shard(p).is_cluster() { "1" } else { "0" })
            .arg(wire::signal_fields(signal))
            .arg(op)
            .arg(record.map_or("", |r| r.0))
            .arg(value.unwrap_or_default());
        self.shard(p).script(&script).await
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
    }
}

/// A signal's body as bytes.
pub(crate) fn body(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}
